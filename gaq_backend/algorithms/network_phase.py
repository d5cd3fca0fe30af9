"""``settings.network_iters`` (our extension, issue 29; off by default): after the reconstruction, every
activation step size tuned jointly against the FP model's noise prediction through the whole denoiser. This is
BRECQ's network-level objective, applied to the step sizes only: the rounding stays as the units learned it.

Each training row's squared error counts relative to the mean starting error of its timestep, so every
recorded timestep weighs the same. Plain MSE would be dominated by the last steps: their noise error is 70-85x
that of the first steps, and they move the samples least (docs/benchmarks.md, "Where the error that reaches the
samples comes from"). Under torchrun each rank computes its own rows of every batch and the gradients are
summed, as in the unit loops.
"""
from __future__ import annotations

import time

import torch
from torch import nn
from tqdm import tqdm

from ..calibration import CalibrationSet
from ..sampling import unet_forward
from ..quantizers.uniform import at_least_float32
from ..wrapping import quantizers
from .reconstruction import ReconstructionConfig, Shard, _step, sharded_loss


def _row_mse(model: nn.Module, rows: CalibrationSet) -> torch.Tensor:
    """Per row: the mean squared error of the noise prediction against the FP one, ``rows.eps`` (noise_mse's terms)."""
    out = unet_forward(model, rows.x, rows.t, rows.cond)
    return (at_least_float32(out) - at_least_float32(rows.eps.to(out.device))).pow(2).flatten(1).mean(1)


@torch.no_grad()
def _row_errors(model: nn.Module, rows: CalibrationSet, batch_size: int) -> torch.Tensor:
    return torch.cat([_row_mse(model, b).double().cpu() for b in rows.batches(batch_size)])


def _per_timestep_mean(errors: torch.Tensor, t: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
    """Mean of ``errors`` at each timestep of ``ts``, summed over ranks (every rank passes its own rows)."""
    from .. import distributed

    sums = torch.stack([errors[t == v].sum() for v in ts])
    counts = torch.stack([(t == v).sum().double() for v in ts])
    sums, counts = distributed.sum_tensors([sums, counts])
    return sums / counts.clamp_min(1)


def tune_step_sizes(model: nn.Module, calib: CalibrationSet, cfg: ReconstructionConfig, progress: bool = False) -> dict:
    """``cfg.network_iters`` Adam steps (``act_lr``, cosine schedule, batches of ``batch_size`` training rows) on
    every activation step size of the quantized ``model``; returns the figures for the report."""
    from .. import distributed

    start = time.perf_counter()
    rows = calib.train
    n = len(rows)
    held = distributed.owned(n)
    shard = Shard.of(torch.zeros(n, dtype=torch.bool), held)
    local = rows.subset(held) if shard.split else rows
    ts = torch.unique(rows.t.float().cpu())
    t_local = local.t.float().cpu()
    before = _row_errors(model, local, cfg.cache_batch_size)
    per_t = _per_timestep_mean(before, t_local, ts).clamp_min(1e-30)
    # factors over every rank's rows (sharded_loss indexes them by global row), mean 1
    inv = 1.0 / per_t[torch.bucketize(rows.t.float().cpu(), ts)]
    factors = (inv / inv.mean()).float()
    # per-tensor step sizes only: a timestep table (temporal's time path) is fitted per step, not learned
    scales = [q.scale for _, q in quantizers(model, "act") if q.enabled and q.timestep_ranges is None]
    for s in scales:
        s.requires_grad_(True)
    opt = torch.optim.Adam(scales, lr=cfg.act_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.network_iters), eta_min=0.0)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    curve = []

    try:
        for _ in tqdm(range(cfg.network_iters), desc="step sizes, whole model", unit="step", disable=not progress, leave=False):
            idx = torch.randint(n, (min(cfg.batch_size, n),), generator=gen, device="cpu")
            curve.append(_step(opt, scales, sharded_loss(lambda i: _row_mse(model, local.subset(i)), shard, factors, idx), shard.split))
            sched.step()
            with torch.no_grad():
                for s in scales:
                    s.clamp_(min=1e-8)
    finally:
        for s in scales:
            s.requires_grad_(False)
    after = _row_errors(model, local, cfg.cache_batch_size)
    (sums,) = distributed.sum_tensors([torch.stack([before.sum(), after.sum()])])
    return dict(iters=cfg.network_iters, rows=n, step_sizes=len(scales), loss_first=curve[0] if curve else None,
                loss_last=curve[-1] if curve else None, train_mse_before=float(sums[0] / n), train_mse_after=float(sums[1] / n),
                per_timestep_ratio={f"{float(t):g}": float(r) for t, r in
                                    zip(ts, _per_timestep_mean(after, t_local, ts) / per_t)},
                seconds=time.perf_counter() - start)
