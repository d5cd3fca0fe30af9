"""The calibration set: recorded denoiser inputs with the FP output, the timestep-balanced validation split and
the timestep groups. Built by gaq's own capture (``capture.py``), by a pipeline's (``pipeline_capture.py``) and
from a user's loop (``recorder.py``); this module imports none of them."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch

from ..config import SamplerConfig

UNBATCHED = "unbatched."   # key prefix of inputs kept once, not per row


@dataclass(frozen=True)
class RecordingSampler:
    """The sampler that recorded a set (gaq's own capture), so that it can be rerun from recorded rows
    (``timestep_weighting: sampling``); sets recorded by a pipeline or a user's loop have none."""
    scheduler_config: dict
    sampler: SamplerConfig


@dataclass
class CalibrationSet:
    """Recorded UNet inputs ``(x_t, t)`` with the FP output ``eps``.

    ``step`` is the index of the recorded step in time order of the sampler (0 = first, noisiest);
    ``is_val`` marks the validation split and ``group`` the timestep group (0 = smallest t).
    """
    x: torch.Tensor
    t: torch.Tensor
    eps: torch.Tensor
    step: torch.Tensor
    is_val: torch.Tensor
    group: torch.Tensor
    cond: dict[str, torch.Tensor] = field(default_factory=dict)
    timesteps: torch.Tensor | None = None  # every timestep the sampler visits (recorded or not)
    recorded_by: RecordingSampler | None = None

    def __len__(self) -> int:
        return self.x.shape[0]

    def subset(self, mask_or_index: torch.Tensor) -> "CalibrationSet":
        x = self.x[mask_or_index]
        cond = {k: unbatched_rows(v, len(x)) if k.startswith(UNBATCHED) else v[mask_or_index] for k, v in self.cond.items()}
        return CalibrationSet(x, self.t[mask_or_index], self.eps[mask_or_index], self.step[mask_or_index],
                              self.is_val[mask_or_index], self.group[mask_or_index], cond, self.timesteps, self.recorded_by)

    @property
    def train(self) -> "CalibrationSet":
        return self.subset(~self.is_val)

    @property
    def val(self) -> "CalibrationSet":
        return self.subset(self.is_val)

    @property
    def n_groups(self) -> int:
        return int(self.group.max()) + 1 if len(self) else 0

    def spread(self, n: int) -> "CalibrationSet":
        """``n`` samples (at most all) evenly spaced over the set, so every recorded step is represented."""
        return self.subset(torch.linspace(0, len(self) - 1, min(n, len(self)), device="cpu").round().long())

    def batches(self, batch_size: int):
        for i in range(0, len(self), batch_size):
            yield self.subset(slice(i, i + batch_size))

    def stored_as(self, dtype: torch.dtype) -> "CalibrationSet":
        """The same rows with float inputs (x, eps, float conditioning) in ``dtype``; the model casts them back."""
        cast = lambda v: v.to(dtype) if v.is_floating_point() else v  # noqa: E731
        return CalibrationSet(cast(self.x), self.t, cast(self.eps), self.step, self.is_val, self.group,
                              {k: v if k.startswith(UNBATCHED) else cast(v) for k, v in self.cond.items()}, self.timesteps,
                              self.recorded_by)

    def fingerprint(self) -> str:
        """A hash of every row, split and group: equal on ranks that hold the same set."""
        h = hashlib.sha256()
        for k, v in [("x", self.x), ("t", self.t), ("eps", self.eps), ("is_val", self.is_val), ("group", self.group),
                     *sorted(self.cond.items())]:
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]

    def check_finite(self) -> None:
        check_finite(dict(x=self.x, eps=self.eps, t=self.t))


def check_finite(data: dict[str, torch.Tensor]) -> None:
    """Refuse calibration inputs or FP outputs with NaN or Inf, naming the first bad sample."""
    for name in ("x", "eps"):
        bad = ~torch.isfinite(data[name]).flatten(1).all(dim=1)
        if bad.any():
            i = int(bad.nonzero()[0])
            raise ValueError(f"calibration data contains NaN or Inf in '{name}' (sample {i}, t={int(data['t'][i])}); "
                             "the FP model or the sampler diverged")


def split_and_group(step: torch.Tensor, t: torch.Tensor, val_fraction: float, n_groups: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per recorded step, hold out ``val_fraction`` (at least one sample) for validation; cut the
    steps, ordered by t, into ``n_groups`` runs of consecutive steps of near-equal size."""
    gen = torch.Generator().manual_seed(seed)
    is_val = torch.zeros_like(step, dtype=torch.bool)
    steps = sorted(set(step.tolist()))
    for s in steps:
        idx = (step == s).nonzero().flatten()
        n_val = max(1, int(round(val_fraction * len(idx))))
        if n_val >= len(idx):
            raise ValueError(f"calibration step {s} has {len(idx)} samples, too few to hold out {n_val} for validation")
        is_val[idx[torch.randperm(len(idx), generator=gen, device="cpu")[:n_val]]] = True
    t_of_step = {s: float(t[step == s][0]) for s in steps}
    by_t = sorted(steps, key=lambda s: t_of_step[s])
    if n_groups > len(by_t):
        raise ValueError(f"n_groups={n_groups} exceeds the {len(by_t)} recorded steps; lower calibration.n_groups or calibration.interval")
    group = torch.zeros_like(step)
    for g, run in enumerate(np.array_split(np.array(by_t), n_groups)):
        for s in run:
            group[step == int(s)] = g
    return is_val, group


def calibration_from_tensors(raw: dict[str, torch.Tensor], val_fraction: float, n_groups: int, seed: int):
    """A :class:`CalibrationSet` from :meth:`Recorder.tensors` output (or its cached copy)."""
    is_val, group = split_and_group(raw["step"], raw["t"], val_fraction, n_groups, seed)
    cond = {k: v for k, v in raw.items() if k not in ("x", "t", "eps", "step", "timesteps")}
    cond = {k: unbatched_rows(v, len(raw["x"])) if k.startswith(UNBATCHED) else v for k, v in cond.items()}
    return CalibrationSet(raw["x"], raw["t"], raw["eps"], raw["step"], is_val, group, cond, timesteps=raw["timesteps"])


def unbatched_rows(v: torch.Tensor, n: int) -> torch.Tensor:
    """An input kept once (``unbatched.<name>``, one row) as ``n`` rows without copying it."""
    return v[:1].expand(n, *v.shape[1:])
