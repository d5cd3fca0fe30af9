"""How far an error in the noise prediction at one sampler step moves the final sample, per recorded step.

The FP sampler is restarted from recorded rows x_t. At that step its noise prediction gets an i.i.d. Gaussian
error of standard deviation ``SIGMA``; the rest of the trajectory runs unchanged. The mean squared difference of
the final images from the unperturbed run, divided by ``SIGMA**2``, is the step's sensitivity: the first-order
gain from an error at that step to the sample. On the embedded MNIST model it spans about 4,000x, from ~1.4
at the first (noisiest) steps to ~3e-4 at the last ones (docs/benchmarks.md, "the budget paradox"), while the
quantization error in the noise prediction is largest at the last steps. A calibration loss that weights
every timestep equally therefore spends itself where errors matter least.
"""
from __future__ import annotations

import torch

from ..sampling import ddim_sample, make_scheduler
from .calibration_set import CalibrationSet

SIGMA = 0.01   # small against the unit-variance noise it perturbs, so the response is first order


@torch.no_grad()
def step_sensitivity(unet: torch.nn.Module, calib: CalibrationSet, rows: int = 8, seed: int = 0) -> dict[float, float]:
    """``{timestep: sensitivity}`` for every timestep recorded in ``calib``, from its first ``rows`` training rows
    there, with ``unet`` as it computes now (call it in full precision). Deterministic given ``seed``."""
    if calib.recorded_by is None:
        raise ValueError("timestep_weighting: sampling needs a calibration set recorded by gaq's own sampler "
                         "(model: embedded or a UNet folder); this one came from a pipeline or a user's loop")
    sched_cfg, sampler = calib.recorded_by.scheduler_config, calib.recorded_by.sampler
    visited = make_scheduler(sched_cfg, sampler).timesteps.double()
    out = {}
    for t in sorted({float(v) for v in calib.t.tolist()}, reverse=True):
        at = ((calib.t.double() == t) & ~calib.is_val).nonzero().flatten()[:rows]
        start = (visited - t).abs().argmin()
        if len(at) == 0 or abs(float(visited[start]) - t) > 1e-3:
            raise ValueError(f"timestep {t:g} of the calibration set is not a step of its sampler (re-capture it)")
        sub = calib.subset(at)
        x = sub.x.float()
        run = lambda hook: ddim_sample(unet, sched_cfg, sampler, x, len(x), hook, False, seed, sub.cond,  # noqa: E731
                                       start_step=int(start))
        gen = torch.Generator().manual_seed(seed)

        def perturb(i: int, tt: torch.Tensor, x_t: torch.Tensor, eps: torch.Tensor) -> None:
            if i == start:
                eps.add_(SIGMA * torch.randn(eps.shape, generator=gen).to(eps))

        out[t] = float((run(perturb) - run(None)).double().pow(2).mean()) / SIGMA ** 2
    return out
