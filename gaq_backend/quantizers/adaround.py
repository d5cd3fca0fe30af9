"""AdaRound (Nagel et al. 2020): learn whether each weight rounds up or down.

``W_q = s * (clamp(floor(W/s) + h(V) + z, qmin, qmax) - z)`` with the rectified sigmoid
``h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``; V starts where h(V) = frac(W/s),
so the soft-quantized weight initially equals W (inside the clipping range).
"""
from __future__ import annotations

import torch
from torch import nn

from .uniform import at_least_float32

ZETA, GAMMA = 1.1, -0.1


class AdaRound(nn.Module):
    """Plugs into ``QuantLayerMixin.weight_rounding``; one V per weight part (two for split layers)."""

    def __init__(self, layer) -> None:
        super().__init__()
        self.soft = True
        floors, vs = [], []
        for w, q in zip(layer.weight_parts(), layer.weight_quantizers):
            ws = at_least_float32(w.detach()) / q.scale.detach()  # V and the floors stay float32 for a half-precision layer
            floor = torch.floor(ws)
            rest = (ws - floor).clamp(1e-6, 1 - 1e-6)
            floors.append(floor)
            vs.append(nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)))
        self.floors = floors
        self.V = nn.ParameterList(vs)

    @staticmethod
    def h(v: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def _rounding(self, v: torch.Tensor) -> torch.Tensor:
        return self.h(v) if self.soft else (v >= 0).to(v.dtype)

    def integers(self, layer) -> list[torch.Tensor]:
        return [torch.clamp(f + (v >= 0).to(f.dtype) + q.zero_point, q.qmin, q.qmax)
                for f, v, q in zip(self.floors, self.V, layer.weight_quantizers)]

    def forward(self, layer) -> list[torch.Tensor]:
        return [q.scale * (torch.clamp(f + self._rounding(v) + q.zero_point, q.qmin, q.qmax) - q.zero_point)
                for f, v, q in zip(self.floors, self.V, layer.weight_quantizers)]

    def regularizer(self, beta: float) -> torch.Tensor:
        """Pushes h(V) to 0 or 1: sum(1 - |2 h(V) - 1|^beta)."""
        return sum((1 - (2 * self.h(v) - 1).abs().pow(beta)).sum() for v in self.V)
