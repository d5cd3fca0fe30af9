"""The embedded default: a small MNIST DDPM trained by this project (``gaq train``).

Architecture follows the CIFAR-10 DDPM in miniature: ResNet blocks with a time
embedding, self-attention at the 8x8 level, and skip concatenations on the up path.
"""
from __future__ import annotations

import json
import os
from typing import Any

from ..utils.errors import one_line
from ..utils.inputs import check_input


EMBEDDED_MODEL_DIR = os.path.join(os.path.dirname(__file__), "..", "assets", "ddpm-mnist")
EMBEDDED_MODEL_DIR = os.path.normpath(EMBEDDED_MODEL_DIR)


def embedded_unet_config() -> dict[str, Any]:
    return dict(
        sample_size=32,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        attention_head_dim=32,
        norm_num_groups=16,
    )


def build_unet(config: dict[str, Any] | None = None):
    from diffusers import UNet2DModel

    return UNet2DModel(**(config or embedded_unet_config()))


def load_unet(path: str | None = None, variant: str | None = None):
    """Load a diffusers UNet folder (config.json + weights; the class from its ``_class_name``)."""
    import diffusers

    path = check_input(path or EMBEDDED_MODEL_DIR, "model", "folder")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"model path has no config.json (not a diffusers model folder): {path}")
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            name = json.load(f).get("_class_name", "UNet2DModel")
        if name not in ("UNet2DModel", "UNet2DConditionModel"):
            raise ValueError(f"{name} is not a UNet class gaq quantizes (UNet2DModel, UNet2DConditionModel)")
        model = getattr(diffusers, name).from_pretrained(path, variant=variant)
    except Exception as e:  # diffusers raises OSError, ValueError, JSON and safetensors errors for a bad folder
        reason = one_line(e, 200)
        raise ValueError(f"{path}: diffusers cannot load a UNet from it ({reason})") from None
    model.eval()
    return model
