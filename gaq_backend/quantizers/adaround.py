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


def _stretched(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rectified sigmoid before clamping, and its derivative."""
    s = torch.sigmoid(v)
    return s * (ZETA - GAMMA) + GAMMA, s * (1 - s) * (ZETA - GAMMA)


def _h(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(_stretched(v)[0], 0, 1)


def _h_inplace(v: torch.Tensor) -> torch.Tensor:
    """``_h(v)`` in one new tensor (no derivative, no temporaries): for forwards and first-order backwards."""
    return torch.sigmoid(v).mul_(ZETA - GAMMA).add_(GAMMA).clamp_(0, 1)


def _stretched_inplace(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sigmoid(v), the stretched sigmoid before clamping (a new tensor the caller may overwrite), and where
    the clamp passes gradients: the first-order backwards' common start."""
    s = torch.sigmoid(v)
    u = s * (ZETA - GAMMA)
    u.add_(GAMMA)
    return s, u, (u >= 0) & (u <= 1)


def _sigmoid_slope(s: torch.Tensor) -> torch.Tensor:
    """``s * (1 - s) * (ZETA - GAMMA)`` computed into ``s`` (the stretched sigmoid's derivative)."""
    one_minus = torch.neg(s).add_(1)
    return s.mul_(one_minus).mul_(ZETA - GAMMA)


class _SoftQuantWeight(torch.autograd.Function):
    """``s * (clamp(floor + h(V) + z, qmin, qmax) - z)`` with a hand-written backward that recomputes h(V)
    from V: autograd would keep about eight weight-sized tensors per layer for the backward pass (52 bytes per
    weight of a unit, 2.3 GB for the largest SD 1.5 block); this keeps none beyond V and the floors. The
    backward is made of differentiable ops, so second-order gradients (gradient_aligned) still work."""

    @staticmethod
    def forward(ctx, v, floor, scale, zero, qmin: int, qmax: int):
        ctx.save_for_backward(v, floor, scale, zero)
        ctx.qrange = (qmin, qmax)
        # in place: one weight-sized tensor (the result) instead of a temporary per operation
        return _h_inplace(v).add_(floor).add_(zero).clamp_(qmin, qmax).sub_(zero).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        v, floor, scale, zero = ctx.saved_tensors
        qmin, qmax = ctx.qrange
        if torch.is_grad_enabled():  # create_graph (gradient_aligned): differentiable ops
            u, du = _stretched(v)
            x = floor + torch.clamp(u, 0, 1) + zero
            inside = (u >= 0) & (u <= 1) & (x >= qmin) & (x <= qmax)  # torch.clamp passes gradients on its bounds too
            return grad * scale * du * inside, None, None, None, None, None
        s, x, inside = _stretched_inplace(v)
        x.clamp_(0, 1).add_(floor).add_(zero)
        inside &= x >= qmin
        inside &= x <= qmax
        del x
        return (grad * scale).mul_(_sigmoid_slope(s)).mul_(inside), None, None, None, None, None


class _RoundingRegularizer(torch.autograd.Function):
    """``sum(1 - |2 h(V) - 1|^beta)`` with a backward that recomputes h(V) (see ``_SoftQuantWeight``)."""

    @staticmethod
    def forward(ctx, v, beta: float):
        ctx.save_for_backward(v)
        ctx.beta = beta
        return _h_inplace(v).mul_(2).sub_(1).abs_().pow_(beta).neg_().add_(1).sum()

    @staticmethod
    def backward(ctx, grad):
        (v,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: differentiable ops
            u, du = _stretched(v)
            a = 2 * torch.clamp(u, 0, 1) - 1
            d_a = -ctx.beta * a.abs().pow(ctx.beta - 1) * torch.sign(a)
            return grad * d_a * 2 * du * ((u >= 0) & (u <= 1)), None
        s, a, inside = _stretched_inplace(v)
        a.clamp_(0, 1).mul_(2).sub_(1)
        sign = torch.sign(a)
        d = a.abs_().pow_(ctx.beta - 1).mul_(-ctx.beta).mul_(sign)
        del a, sign
        return d.mul_(grad).mul_(2).mul_(_sigmoid_slope(s)).mul_(inside), None


class AdaRound(nn.Module):
    """Plugs into ``QuantLayerMixin.weight_rounding``; one V per weight part (two for split layers)."""

    def __init__(self, layer) -> None:
        super().__init__()
        floors, vs = [], []
        for w, q in zip(layer.weight_parts(), layer.weight_quantizers):
            ws = at_least_float32(w.detach()) / q.params()[0].detach()  # V and the floors stay float32 for a half-precision layer
            floor = torch.floor(ws)
            rest = (ws - floor).clamp(1e-6, 1 - 1e-6)
            floors.append(floor)
            vs.append(nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)))
        self.floors = floors
        self.V = nn.ParameterList(vs)

    h = staticmethod(_h)

    def integers(self, layer) -> list[torch.Tensor]:
        return [torch.clamp(f + (v >= 0).to(f.dtype) + q.params()[1], q.qmin, q.qmax)
                for f, v, q in zip(self.floors, self.V, layer.weight_quantizers)]

    def forward(self, layer) -> list[torch.Tensor]:
        return [_SoftQuantWeight.apply(v, f, *q.params(), q.qmin, q.qmax)
                for f, v, q in zip(self.floors, self.V, layer.weight_quantizers)]

    def regularizer(self, beta: float) -> torch.Tensor:
        """Pushes h(V) to 0 or 1: sum(1 - |2 h(V) - 1|^beta)."""
        return sum(_RoundingRegularizer.apply(v, beta) for v in self.V)
