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

    def entry(self, timestep: torch.Tensor) -> torch.Tensor:
        """The table entry of each timestep: the nearest recorded one."""
        t = timestep.reshape(-1).to(self.t)
        return (t.view(-1, 1) - self.t.view(1, -1)).abs().argmin(dim=1)

    def forward(self, out: torch.Tensor, timestep: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        coef = self.coef[self.entry(timestep)].to(out)                    # [B or 1, C, 3]
        shape = [coef.shape[0]] + [1] * (out.dim() - 1)
        shape[channel_dim(out)] = coef.shape[1]
        a, b, c = (coef[..., k].view(shape) for k in range(3))
        y = a * out + c
        return y + b * x.to(out) if x.shape == out.shape else y


def _prediction(out):
    """A denoiser's prediction from what its forward returned (an output object, or a tuple with return_dict=False)."""
    return out[0] if isinstance(out, tuple) else out.sample


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


class NormalEquations:
    """Per table entry and output channel, the sums of the least-squares fit of the FP output on (out, x, 1): what
    both fits accumulate, one batch at a time, and solve once."""

    def __init__(self, n_entries: int) -> None:
        self.n, self.gram, self.rhs, self.sq = n_entries, None, None, None
        self.use_x, self.count = True, 0

    def add(self, entry: torch.Tensor, out: torch.Tensor, x: torch.Tensor, fp: torch.Tensor) -> None:
        """``entry[i]``: the table entry of row i; ``out`` the quantized output before correction, ``fp`` the target."""
        out, fp = out.double().cpu(), fp.double().cpu()
        self.use_x = self.use_x and x.shape == out.shape
        for i in entry.unique().tolist():
            m = (entry == i).cpu()
            o, y = by_channel(out[m]), by_channel(fp[m])
            xs = by_channel(x[m].cpu()) if self.use_x else torch.zeros_like(o)
            cols = torch.stack([o, xs, torch.ones_like(o)], 1)            # [C, 3, values]
            if self.gram is None:
                self.gram = torch.zeros(self.n, o.shape[0], 3, 3, dtype=torch.float64)
                self.rhs = torch.zeros(self.n, o.shape[0], 3, dtype=torch.float64)
                self.sq = torch.zeros(self.n, o.shape[0], dtype=torch.float64)
            self.gram[i] += cols @ cols.transpose(1, 2)
            self.rhs[i] += (cols * y.unsqueeze(1)).sum(-1)
            self.sq[i] += y.pow(2).sum(-1)
        self.count += out.numel()

    def mse(self, coef: torch.Tensor) -> float:
        """Mean squared error of the fit ``coef`` [T, C, 3] from the same sums: sum y^2 - 2 theta.h + theta' G theta."""
        th = coef.double()
        sse = self.sq - 2 * (th * self.rhs).sum(-1) + (th.unsqueeze(-2) @ self.gram @ th.unsqueeze(-1)).squeeze(-1).squeeze(-1)
        return float(sse.sum()) / self.count

    def solve(self, kind: str, previous: torch.Tensor | None = None) -> torch.Tensor:
        """[T, C, 3]; an entry that saw no rows keeps ``previous``'s coefficients (the identity if none)."""
        coef = identity_table(self.n, self.gram.shape[1]) if previous is None else previous.double().clone()
        for i in range(self.n):
            if self.gram[i, :, 2, 2].min() > 0:          # the count of the entry's values
                coef[i] = _solve(self.gram[i], self.rhs[i], kind, self.use_x)
        return coef


def _figures(eqs: NormalEquations, coef: torch.Tensor, before: torch.Tensor) -> dict:
    return dict(a=[float(coef[..., 0].min()), float(coef[..., 0].max())], b=[float(coef[..., 1].min()), float(coef[..., 1].max())],
                c=[float(coef[..., 2].min()), float(coef[..., 2].max())], mse_before=eqs.mse(before), mse_after=eqs.mse(coef))


def identity_table(n: int, channels: int) -> torch.Tensor:
    coef = torch.zeros(n, channels, 3, dtype=torch.float64)
    coef[..., 0] = 1.0
    return coef


@torch.no_grad()
def fit_output_correction(model: nn.Module, calib, kind: str, batch_size: int = 64) -> dict:
    """Fit the table on ``calib``'s training rows (their recorded FP outputs are the target) and attach it.
    Returns the report's figures: the timesteps, the coefficients' ranges and the error before and after."""
    from .. import distributed
    from ..sampling import unet_forward

    train = calib.train
    ts = sorted({float(v) for v in train.t.tolist()})
    eqs = NormalEquations(len(ts))
    for b in train.batches(batch_size):
        out = unet_forward(model, b.x, b.t, b.cond).float()
        entry = torch.tensor([ts.index(float(v)) for v in b.t.tolist()])
        eqs.add(entry, out, b.x.float(), b.eps.float())
    # every rank holds the whole set and the same model; the mean over ranks makes the table identical everywhere
    world = distributed.world()[1]
    eqs.gram, eqs.rhs, eqs.sq = (v / world for v in distributed.sum_tensors([eqs.gram, eqs.rhs, eqs.sq]))
    coef = eqs.solve(kind)
    table = OutputCorrection(len(ts), coef.shape[1])
    table.t.copy_(torch.tensor(ts)), table.coef.copy_(coef.float())
    attach(model, table.to(next(model.parameters()).device))
    fig = _figures(eqs, coef, identity_table(*coef.shape[:2]))
    return dict(kind=kind, timesteps=ts, a=fig["a"], b=fig["b"], c=fig["c"],
                train_mse_before=fig["mse_before"], train_mse_after=fig["mse_after"])


@torch.no_grad()
def refit_on_trajectory(model: nn.Module, fp_model: nn.Module, forward_loop, kind: str) -> dict:
    """``output_correction_fit: trajectory``: refit the attached table on the inputs the corrected quantized model
    itself visits while ``forward_loop(model)`` samples with it, against the FP model's output at those same inputs.
    The calibration rows come from the FP trajectory; sampling sees the quantized one, which drifts from it step by
    step (docs/benchmarks.md, "Where the error that reaches the samples comes from"). Every denoiser call counts,
    at its nearest table entry (the entry that corrects it). One process only."""
    from .. import distributed
    from ..config import ConfigError

    if distributed.world()[1] > 1:
        raise ConfigError("quantization.output_correction_fit: trajectory runs in one process; not yet under torchrun")
    table: OutputCorrection = getattr(model, MODULE_NAME)
    eqs = NormalEquations(len(table.t))

    def record(module, args, kwargs, out):   # runs before the correction hook: ``out`` is the raw output
        x, t = call_sample_and_timestep(module, args, kwargs)
        raw, fp = _prediction(out), _prediction(fp_model(*args, **kwargs))
        entry = table.entry(t).expand(raw.shape[0])
        eqs.add(entry, raw, x, fp)

    handle = model.register_forward_hook(record, with_kwargs=True, prepend=True)
    try:
        forward_loop(model)
    finally:
        handle.remove()
    if eqs.gram is None:
        raise ValueError("output_correction_fit: trajectory: the forward loop made no denoiser call")
    before = table.coef.double().cpu()
    coef = eqs.solve(kind, previous=before)
    table.coef.copy_(coef.float())
    return dict(values=eqs.count, **_figures(eqs, coef, before))
