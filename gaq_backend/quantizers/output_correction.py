"""Per-timestep bias correction of the denoiser's output (``quantization.bias_correction: timestep``).

After calibration, the quantized model's mean output error against the FP model is measured per recorded
timestep and output channel on the calibration rows, and subtracted from every later output at the nearest
table timestep. This is the bias half of PTQD's split of the quantization noise, one constant per step and
channel, in the style of TAC-Diffusion's timestep-aware correction. Why it matters more than its share of the
error says: the constant part adds up coherently over the sampler's steps, where the per-sample part is partly
denoised away (docs/benchmarks.md, "the budget paradox"). The table is a submodule (saved with the weights) and
is applied by a forward hook, so ``gaq export`` traces it into the graph as a Gather by timestep and a Sub.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

MODULE_NAME = "gaq_output_correction"


def channel_dim(out: torch.Tensor) -> int:
    """UNets and image transformers return [B, C, H, W]; packed-token transformers (Flux) [B, L, C]."""
    return -1 if out.dim() == 3 else 1


def per_channel_mean(err: torch.Tensor) -> torch.Tensor:
    """Mean of ``err`` over every axis but the channel axis: [C]."""
    d = channel_dim(err) % err.dim()
    return err.double().transpose(0, d).reshape(err.shape[d], -1).mean(1)


class OutputCorrection(nn.Module):
    def __init__(self, n: int, channels: int) -> None:
        super().__init__()
        self.register_buffer("t", torch.zeros(n, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(n, channels, dtype=torch.float32))

    def forward(self, out: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        t = timestep.reshape(-1).to(self.t)
        idx = (t.view(-1, 1) - self.t.view(1, -1)).abs().argmin(dim=1)
        b = self.bias[idx].to(out)                       # [B or 1, C]
        shape = [b.shape[0]] + [1] * (out.dim() - 1)
        shape[channel_dim(out)] = b.shape[1]
        return out - b.view(shape)


def _apply_hook(module: nn.Module, args, kwargs, out):
    bound = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments   # timestep's position varies
    t = torch.as_tensor(bound["timestep"], device=next(iter(bound.values())).device)
    correct = getattr(module, MODULE_NAME)
    if isinstance(out, tuple):                            # return_dict=False
        return (correct(out[0], t), *out[1:])
    out.sample = correct(out.sample, t)
    return out


def attach(model: nn.Module, correction: OutputCorrection) -> None:
    """Make ``correction`` part of ``model``'s state and outputs (idempotent: one hook per model)."""
    setattr(model, MODULE_NAME, correction)
    if getattr(model, "_gaq_correction_hook", None) is None:
        model._gaq_correction_hook = model.register_forward_hook(_apply_hook, with_kwargs=True)


def prepare_for_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """An empty table of the saved shape to load into, when the saved state has one."""
    bias = state.get(f"{MODULE_NAME}.bias")
    if bias is not None:
        attach(model, OutputCorrection(*bias.shape))


@torch.no_grad()
def fit_output_correction(model: nn.Module, calib, batch_size: int = 64) -> dict:
    """Measure the table on ``calib``'s training rows (their recorded FP outputs are the reference) and attach it.
    Returns the report's figures: the timesteps, the largest |bias| and the noise error before and after."""
    from .. import distributed
    from ..sampling import unet_forward

    train = calib.train
    ts = sorted({float(v) for v in train.t.tolist()})
    sums, sq_before, count = None, torch.zeros((), dtype=torch.float64), 0
    for b in train.batches(batch_size):
        err = (unet_forward(model, b.x, b.t, b.cond).float().cpu() - b.eps.float()).double()
        if sums is None:
            sums = torch.zeros(len(ts), err.shape[channel_dim(err)], dtype=torch.float64)
            rows = torch.zeros(len(ts), dtype=torch.float64)
        for i, t in enumerate(ts):
            m = b.t.double() == t
            if m.any():
                sums[i] += per_channel_mean(err[m]) * int(m.sum())
                rows[i] += int(m.sum())
        sq_before += err.pow(2).sum()
        count += err.numel()
    # every rank holds the whole set and the same model; the mean over ranks makes the table identical everywhere
    world = distributed.world()[1]
    sums, rows = (v / world for v in distributed.sum_tensors([sums, rows]))
    bias = sums / rows.clamp_min(1).unsqueeze(1)
    table = OutputCorrection(len(ts), bias.shape[1])
    table.t.copy_(torch.tensor(ts)), table.bias.copy_(bias.float())
    table.to(next(model.parameters()).device)
    attach(model, table)
    # per-channel means removed: the squared error falls by exactly their energy (a check, not an estimate)
    removed = float((bias.pow(2) * rows.unsqueeze(1)).sum()) * (count / float(rows.sum()) / bias.shape[1])
    return dict(timesteps=ts, max_abs_bias=float(bias.abs().max()), train_mse_before=float(sq_before / count),
                train_mse_after=float((sq_before - removed) / count))
