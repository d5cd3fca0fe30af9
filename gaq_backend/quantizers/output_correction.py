"""Per-timestep correction of the denoiser's output (``quantization.output_correction``).

After calibration, per recorded timestep and output channel, the quantized model's output ``out`` is mapped to
``a * out + b * x + c`` (``x``: the model's input sample at that step), with (a, b, c) the least-squares fit to
the FP model's recorded output on the calibration rows:

- ``bias``: a = 1, b = 0, c = the mean error: PTQD's bias correction, one constant per step and channel;
- ``affine``: all three. At the noisiest steps the quantized model's implied clean-image estimate is noisy
  against its signal, and the fit shrinks it toward the input (a ~ 0.4, b ~ 0.6 at t = 980 on the embedded
  model): the error that matters most for the final sample (docs/benchmarks.md, "Quality at W4A8") is removed there.

A timestep between table entries uses the nearest one (as ``temporal``'s ranges do). The table is a submodule
(saved with the weights) applied by a forward hook, so ``gaq export`` traces it into the graph: a Gather by
timestep, a Mul and two Adds. Where the output's shape differs from the input's (learned-variance outputs), b is 0.
"""
from __future__ import annotations

import torch
from torch import nn

from .timestep import call_sample_and_timestep

MODULE_NAME = "gaq_output_correction"


def channel_dim(out: torch.Tensor) -> int:
    """UNets and image transformers return [B, C, H, W]; packed-token transformers (Flux) [B, L, C]."""
    return out.dim() - 1 if out.dim() == 3 else 1


def by_channel(v: torch.Tensor) -> torch.Tensor:
    """``v`` as [C, everything else] in float64."""
    return v.double().movedim(channel_dim(v), 0).reshape(v.shape[channel_dim(v)], -1)


class OutputCorrection(nn.Module):
    def __init__(self, n: int, channels: int) -> None:
        super().__init__()
        self.register_buffer("t", torch.zeros(n, dtype=torch.float32))
        self.register_buffer("coef", torch.zeros(n, channels, 3, dtype=torch.float32))   # a, b, c
        self.coef[..., 0] = 1.0

    def forward(self, out: torch.Tensor, timestep: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        t = timestep.reshape(-1).to(self.t)
        idx = (t.view(-1, 1) - self.t.view(1, -1)).abs().argmin(dim=1)
        coef = self.coef[idx].to(out)                    # [B or 1, C, 3]
        shape = [coef.shape[0]] + [1] * (out.dim() - 1)
        shape[channel_dim(out)] = coef.shape[1]
        a, b, c = (coef[..., k].view(shape) for k in range(3))
        y = a * out + c
        return y + b * x.to(out) if x.shape == out.shape else y


def _apply_hook(module: nn.Module, args, kwargs, out):
    x, t = call_sample_and_timestep(module, args, kwargs)
    correct = getattr(module, MODULE_NAME)
    if isinstance(out, tuple):                            # return_dict=False
        return (correct(out[0], t, x), *out[1:])
    out.sample = correct(out.sample, t, x)
    return out


def attach(model: nn.Module, correction: OutputCorrection) -> None:
    """Make ``correction`` part of ``model``'s state and outputs (idempotent: one hook per model)."""
    setattr(model, MODULE_NAME, correction)
    if getattr(model, "_gaq_correction_hook", None) is None:
        model._gaq_correction_hook = model.register_forward_hook(_apply_hook, with_kwargs=True)


def prepare_for_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """An empty table of the saved shape to load into, when the saved state has one."""
    coef = state.get(f"{MODULE_NAME}.coef")
    if coef is not None:
        attach(model, OutputCorrection(*coef.shape[:2]))


def _solve(gram: torch.Tensor, rhs: torch.Tensor, kind: str, use_x: bool) -> torch.Tensor:
    """(a, b, c) per channel from the normal equations of the columns (out, x, 1) against the FP output."""
    coef = torch.zeros(rhs.shape[0], 3, dtype=torch.float64)
    if kind == "bias":   # a = 1, b = 0: c is the mean of (fp - out)
        coef[:, 0], coef[:, 2] = 1.0, (rhs[:, 2] - gram[:, 2, 0]) / gram[:, 2, 2]
        return coef
    cols = [0, 1, 2] if use_x else [0, 2]
    g, h = gram[:, cols][:, :, cols], rhs[:, cols]
    coef[:, cols] = torch.linalg.solve(g + 1e-12 * torch.eye(len(cols), dtype=g.dtype), h.unsqueeze(-1)).squeeze(-1)
    return coef


@torch.no_grad()
def fit_output_correction(model: nn.Module, calib, kind: str, batch_size: int = 64) -> dict:
    """Fit the table on ``calib``'s training rows (their recorded FP outputs are the target) and attach it.
    Returns the report's figures: the timesteps, the coefficients' ranges and the error before and after."""
    from .. import distributed
    from ..sampling import unet_forward

    train = calib.train
    ts = sorted({float(v) for v in train.t.tolist()})
    gram = rhs = sq = None
    use_x, count = True, 0
    for b in train.batches(batch_size):
        out = unet_forward(model, b.x, b.t, b.cond).float().cpu()
        use_x = use_x and b.x.shape == out.shape
        for i, t in enumerate(ts):
            m = b.t.double() == t
            if not m.any():
                continue
            o, y = by_channel(out[m]), by_channel(b.eps[m].float())
            x = by_channel(b.x[m].float()) if use_x else torch.zeros_like(o)
            cols = torch.stack([o, x, torch.ones_like(o)], 1)            # [C, 3, values]
            if gram is None:
                gram = torch.zeros(len(ts), o.shape[0], 3, 3, dtype=torch.float64)
                rhs = torch.zeros(len(ts), o.shape[0], 3, dtype=torch.float64)
                sq = torch.zeros(len(ts), o.shape[0], dtype=torch.float64)
            gram[i] += cols @ cols.transpose(1, 2)
            rhs[i] += (cols * y.unsqueeze(1)).sum(-1)
            sq[i] += y.pow(2).sum(-1)
        count += out.numel()
    # every rank holds the whole set and the same model; the mean over ranks makes the table identical everywhere
    world = distributed.world()[1]
    gram, rhs, sq = (v / world for v in distributed.sum_tensors([gram, rhs, sq]))
    coef = torch.stack([_solve(gram[i], rhs[i], kind, use_x) for i in range(len(ts))])   # [T, C, 3]
    # squared error of a fit theta from the same sums: sum y^2 - 2 theta.h + theta' G theta
    sse = lambda th: float((sq - 2 * (th * rhs).sum(-1) + (th.unsqueeze(-2) @ gram @ th.unsqueeze(-1)).squeeze()).sum())  # noqa: E731
    identity = torch.zeros_like(coef)
    identity[..., 0] = 1.0
    table = OutputCorrection(len(ts), coef.shape[1])
    table.t.copy_(torch.tensor(ts)), table.coef.copy_(coef.float())
    attach(model, table.to(next(model.parameters()).device))
    return dict(kind=kind, timesteps=ts, a=[float(coef[..., 0].min()), float(coef[..., 0].max())],
                b=[float(coef[..., 1].min()), float(coef[..., 1].max())], c=[float(coef[..., 2].min()), float(coef[..., 2].max())],
                train_mse_before=sse(identity) / count, train_mse_after=sse(coef) / count)
