"""Image grids as PNG."""
from __future__ import annotations

import math

import numpy as np

PNG_SOFTWARE = "gaq"


def to_uint8(x) -> np.ndarray:
    """Model-range images (N, C, H, W) in [-1, 1], a torch tensor or a NumPy array -> uint8 (N, H, W, C)."""
    x = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    return ((np.clip(x, -1, 1) + 1) * 127.5).round().astype(np.uint8).transpose(0, 2, 3, 1)


def from_uint8(images: np.ndarray):
    """The inverse of :func:`to_uint8`: uint8 (N, H, W, C) -> float32 torch (N, C, H, W) in [-1, 1]."""
    import torch

    return torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2)


def grid(images: np.ndarray, pad: int = 2) -> np.ndarray:
    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = images[i]
    return out


def labelled(image: np.ndarray, text: str, height: int = 12) -> np.ndarray:
    """``image`` under a white strip with ``text`` in black (PIL's built-in bitmap font)."""
    from PIL import Image, ImageDraw

    strip = Image.new("L", (image.shape[1], height), 255)
    ImageDraw.Draw(strip).text((2, 0), text, fill=0)
    top = np.repeat(np.asarray(strip)[..., None], image.shape[2], axis=2)
    return np.concatenate([top, image], axis=0)


def side_by_side(*grids: np.ndarray, gap: int = 8, labels: tuple[str, ...] = ()) -> np.ndarray:
    """The grids left to right, each under its label when ``labels`` are given (e.g. "FP", "quantized")."""
    if labels:
        grids = tuple(labelled(g, t) for g, t in zip(grids, labels))
    h = max(g.shape[0] for g in grids)
    parts = []
    for i, g in enumerate(grids):
        if i:
            parts.append(np.full((h, gap, g.shape[2]), 255, dtype=np.uint8))
        parts.append(np.pad(g, ((0, h - g.shape[0]), (0, 0), (0, 0)), constant_values=255))
    return np.concatenate(parts, axis=1)


def save_grid(path: str, image: np.ndarray, scale: int = 2) -> None:
    from PIL import Image

    img = image[..., 0] if image.shape[-1] == 1 else image
    pil = Image.fromarray(img)
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Software", PNG_SOFTWARE)  # lets a later run recognise the file as gaq's and replace it
    pil.save(path, format="PNG", pnginfo=info)


def is_gaq_png(path: str) -> bool:
    """Whether ``path`` is a PNG that :func:`save_grid` wrote."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.format == "PNG" and im.text.get("Software") == PNG_SOFTWARE
    except Exception:  # not an image PIL can read: not ours
        return False
