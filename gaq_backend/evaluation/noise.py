"""Noise-prediction error of a quantized UNet against the FP UNet on held-out calibration inputs."""
from __future__ import annotations

import torch

from ..calibration import CalibrationSet
from ..sampling import unet_forward


@torch.no_grad()
def noise_mse(model: torch.nn.Module, data: CalibrationSet, batch_size: int = 64) -> tuple[float, list[float]]:
    """Mean squared error of the model's noise prediction against the recorded FP output, overall and per timestep group."""
    if len(data) == 0:
        raise ValueError("no held-out calibration samples to measure noise_mse on")
    per_sample = torch.cat([(unet_forward(model, b.x, b.t, b.cond).float().cpu() - b.eps.float()).pow(2).flatten(1).mean(1)
                            for b in data.batches(batch_size)])  # on the host, beside the recorded outputs
    groups = [float(per_sample[data.group == g].mean()) for g in range(data.n_groups)]
    return float(per_sample.mean()), groups
