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
