"""What an export's parity check compares against: the inputs (the held-out rows saved with a quantized folder, or
a fresh capture for older folders) and PyTorch's outputs on them, in float64. ``validate`` and ``parity_debug``
both use it; neither imports the other at module level."""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn


def held_out_inputs(unet: nn.Module, n: int) -> tuple[torch.Tensor, torch.Tensor, dict] | None:
    """``n`` of the held-out recorded inputs saved with the quantized folder, ``(x, t, cond)`` (None for
    folders without them)."""
    held = getattr(getattr(unet, "gaq_info", None), "held_out", None)
    if held is None or not len(held):
        return None
    held = held.spread(n)
    return held.x, held.t, held.cond


def parity_inputs(recipe, scheduler_config: dict, n: int, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """``n`` held-out calibration inputs ``(x_t, t)`` spread evenly over the validation split (all timestep
    groups), captured again with the recipe (for folders written before held-out inputs were saved)."""
    from gaq_backend.calibration import capture_calibration
    from gaq_backend.models.loading import load_model

    if n < 1:
        raise ValueError(f"--check-samples must be at least 1; got {n}")
    fp = load_model(recipe.model, recipe.model_options).unet
    calib, _ = capture_calibration(fp, scheduler_config, recipe.sampler, recipe.calibration, progress)
    val = calib.val.spread(n)
    return val.x, val.t, {}


def torch_outputs(unet: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict, batch_size: int) -> np.ndarray:
    from gaq_backend.sampling import unet_forward

    return torch.cat([unet_forward(unet, x[i: i + batch_size], t[i: i + batch_size], {k: v[i: i + batch_size] for k, v in cond.items()})
                      for i in range(0, len(x), batch_size)]).double().numpy()


def in_float64(unet: nn.Module) -> nn.Module:
    """A float64 copy of ``unet`` whose layers cast their float inputs to float64: diffusers feeds some
    layers a float32 tensor it never casts to the model's dtype (``UNet2DModel``'s ``class_embed_type=
    "timestep"`` path), which a float32 model never notices."""
    model = copy.deepcopy(unet).double()
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            m.register_forward_pre_hook(lambda _m, args: tuple(a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args))
    return model
