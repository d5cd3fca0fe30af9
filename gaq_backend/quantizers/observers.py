"""Activation range observers used while calibrating (see ``UniformQuantizer.observer``)."""
from __future__ import annotations

import torch

# torch.quantile refuses inputs above 2^24 elements; subsample deterministically beyond that.
_QUANTILE_MAX = 1 << 24


class MinMaxObserver:
    """Running min and max over everything seen."""

    def __init__(self) -> None:
        self.lo = self.hi = None

    def __call__(self, x: torch.Tensor) -> None:
        x = x.detach()
        lo, hi = x.min(), x.max()
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.lo is None:
            raise RuntimeError("observer saw no data")
        return self.lo, self.hi


class PercentileObserver:
    """Per-batch lower/upper percentiles, averaged over batches (robust to rare outliers)."""

    def __init__(self, percentile: float = 99.99) -> None:
        self.q = percentile / 100.0
        self.los: list[torch.Tensor] = []
        self.his: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor) -> None:
        flat = x.detach().flatten().float()
        if flat.numel() > _QUANTILE_MAX:
            flat = flat[:: (flat.numel() + _QUANTILE_MAX - 1) // _QUANTILE_MAX]
        qs = torch.quantile(flat, torch.tensor([1 - self.q, self.q], device=flat.device))
        self.los.append(qs[0]); self.his.append(qs[1])

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.los:
            raise RuntimeError("observer saw no data")
        return torch.stack(self.los).mean(), torch.stack(self.his).mean()


class TimestepMinMaxObserver:
    """Min and max per timestep, read from the UNet call's timesteps (``timestep.install_timestep_hook``), beside
    the running :class:`MinMaxObserver` of everything. ``usable`` turns False when an input's rows are not the
    call's batch rows (the attention operands are batch x heads), where one range per row's timestep has no meaning."""

    def __init__(self) -> None:
        self.all = MinMaxObserver()
        self.per_t: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}
        self.usable = True

    def __call__(self, x: torch.Tensor) -> None:
        from .timestep import current_timestep_tensor

        self.all(x)
        t = current_timestep_tensor()
        t = t.expand(x.shape[0]) if t.numel() == 1 else t
        if not self.usable or t.numel() != x.shape[0]:
            self.usable = False
            return
        rows = x.detach().flatten(1)
        lo, hi = rows.amin(1), rows.amax(1)
        for v in t.unique():
            m = t == v
            key = float(v)
            l, h = lo[m].min(), hi[m].max()
            old = self.per_t.get(key)
            self.per_t[key] = (l, h) if old is None else (torch.minimum(old[0], l), torch.maximum(old[1], h))

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.all.range()

    def table(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(timesteps, lo, hi), one entry per timestep seen, in increasing t."""
        ts = sorted(self.per_t)
        lo, hi = torch.stack([self.per_t[k][0] for k in ts]), torch.stack([self.per_t[k][1] for k in ts])
        return torch.tensor(ts, device=lo.device), lo, hi  # on the data's device (tests/test_device.py)

    def spread(self) -> float:
        """How much wider the range over all timesteps is than the narrowest timestep's: the resolution the worst
        served timestep loses to one range for all. (The median timestep's was tried: on 60 generated UNets it
        missed layers whose early, small-valued timesteps lose everything, e.g. a 100x span over the trajectory.)"""
        if not self.usable or len(self.per_t) < 2:
            return 1.0
        _, lo, hi = self.table()
        lo_all, hi_all = self.all.range()
        width = (hi - lo).float()
        return float((hi_all - lo_all).float() / width.min().clamp_min(1e-12))
