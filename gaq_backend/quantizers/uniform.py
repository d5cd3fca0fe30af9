"""Uniform affine quantization: ``x_hat = s * (clamp(round(x / s) + z, qmin, qmax) - z)``."""
from __future__ import annotations

import torch
from torch import nn


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity in the backward pass (straight-through estimator)."""
    return (x.round() - x).detach() + x


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _reduce_dims(x: torch.Tensor, channel_axis: int | None) -> tuple[int, ...]:
    if channel_axis is None:
        return tuple(range(x.dim()))
    return tuple(d for d in range(x.dim()) if d != channel_axis % x.dim())


def scale_from_range(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero-point that map [lo, hi] (per element of lo/hi) onto the integer grid."""
    qmin, qmax = qrange(bits, symmetric)
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    if symmetric:
        # Use the negative end's full reach: -2^(b-1) * s covers -amax exactly, +amax clips by one step.
        amax = torch.maximum(-lo, hi)
        scale = amax / (-qmin)
        zero = torch.zeros_like(scale)
    else:
        scale = (hi - lo) / (qmax - qmin)
        zero = torch.round(-lo / scale.clamp_min(1e-12)).clamp(qmin, qmax)
    return scale.clamp_min(1e-8), zero


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 if it is half precision (float64 stays float64): where quantization arithmetic runs."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class _FakeQuant(torch.autograd.Function):
    """``(clamp(round(x / s) + z, qmin, qmax) - z) * s`` with the straight-through estimator for round and LSQ's
    gradient for ``s``. Autograd would keep two input-sized tensors per quantizer for the backward pass and
    make five in the forward pass (0.5 GB per quantized attention-probability tensor of an SD 1.5 block at
    batch 8); this keeps ``x`` (usually saved by the op before anyway) and recomputes the rest. Same values
    as the autograd version; gradients equal up to float rounding (tested, to second order)."""

    @staticmethod
    def forward(ctx, x, scale, zero, qmin: int, qmax: int):
        ctx.save_for_backward(x, scale, zero)
        ctx.qrange = (qmin, qmax)
        return (x / scale).round_().add_(zero).clamp_(qmin, qmax).sub_(zero).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        x, scale, zero = ctx.saved_tensors
        qmin, qmax = ctx.qrange
        need_x, need_s, need_z = ctx.needs_input_grad[:3]
        v = x / scale
        if torch.is_grad_enabled():  # create_graph: differentiable ops, straight-through round as autograd has it
            r = round_ste(v) + zero
            inside = (r >= qmin) & (r <= qmax)
            gs = (grad * (torch.clamp(r, qmin, qmax) - zero - inside * v)).sum_to_size(scale.shape) if need_s else None
        else:  # the usual backward: in place on two fresh tensors
            r = torch.round(v).add_(zero)
            inside = (r >= qmin) & (r <= qmax)
            gs = r.clamp_(qmin, qmax).sub_(zero).sub_(v.mul_(inside)).mul_(grad).sum_to_size(scale.shape) if need_s else None
            del v, r
        gz = (grad * scale * (inside.to(grad.dtype) - 1)).sum_to_size(zero.shape) if need_z else None
        gx = grad * inside if need_x else None
        return gx, gs, gz, None, None


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Quantize-dequantize in at least float32 (a half-precision ``x`` would round ``x / scale`` coarsely),
    returned in ``x``'s dtype."""
    return _FakeQuant.apply(at_least_float32(x), scale, zero, qmin, qmax).to(x.dtype)


def search_mse_scale(x: torch.Tensor, bits: int, symmetric: bool, channel_axis: int | None,
                     ratios: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick, per channel, the clipping ratio of the min/max range whose fake-quant error is smallest (LDM's weight init)."""
    ratios = torch.linspace(0.5, 1.0, 51, device=x.device) if ratios is None else ratios
    dims = _reduce_dims(x, channel_axis)
    lo, hi = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
    qmin, qmax = qrange(bits, symmetric)
    best_err = best_s = best_z = None
    for r in ratios:
        s, z = scale_from_range(lo * r, hi * r, bits, symmetric)
        err = (fake_quant(x, s, z, qmin, qmax) - x).pow(2).mean(dim=dims, keepdim=True)
        if best_err is None:
            best_err, best_s, best_z = err, s, z
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    return best_s, best_z


class UniformQuantizer(nn.Module):
    """Per-tensor or per-channel uniform affine fake quantizer.

    ``bits >= 32`` (or ``enabled=False``) makes it the identity. ``scale`` is a Parameter so that
    LSQ-style algorithms can learn it; it does not require grad unless an algorithm asks.
    Until :meth:`set_range` or :meth:`fit` is called the quantizer is uncalibrated and refuses to run.
    """

    def __init__(self, bits: int, symmetric: bool = True, channel_axis: int | None = None, shape: tuple[int, ...] = (),
                 device: torch.device | str | None = None, block_size: int = 0):
        super().__init__()
        if not (2 <= bits <= 8 or bits == 32):
            raise ValueError(f"quantizer bits must be an integer from 2 to 8, or 32 for no quantization; got {bits!r}")
        if block_size and channel_axis != 0:
            raise ValueError("block-wise quantizers are per output channel (channel_axis 0), one scale per block of axis 1")
        self.bits, self.symmetric, self.channel_axis = int(bits), bool(symmetric), channel_axis
        # > 0: one scale per output channel and block of block_size consecutive entries of axis 1 (scale shape
        # (out, in / block_size)), the layout of onnxruntime's MatMulNBits and of ONNX's blocked DequantizeLinear
        self.block_size = int(block_size)
        self.qmin, self.qmax = qrange(self.bits, self.symmetric) if self.bits < 32 else (0, 0)
        self.scale = nn.Parameter(torch.ones(shape, device=device), requires_grad=False)
        self.register_buffer("zero_point", torch.zeros(shape, device=device))
        self.register_buffer("calibrated", torch.tensor(False, device=device))
        # While set, forward hands its input to this callable and returns it unquantized (range calibration).
        self.observer = None
        # Optional per-timestep scale table (TimestepRanges); replaces scale / zero_point when present.
        self.timestep_ranges = None

    @property
    def enabled(self) -> bool:
        return self.bits < 32

    def params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero-point) broadcastable to the quantized tensor: a block-wise quantizer's repeated over each block."""
        if not self.block_size:
            return self.scale, self.zero_point
        return self.scale.repeat_interleave(self.block_size, 1), self.zero_point.repeat_interleave(self.block_size, 1)

    def extra_repr(self) -> str:
        gran = "per-tensor" if self.channel_axis is None else f"per-channel(axis={self.channel_axis})"
        gran += f", blocks of {self.block_size}" if self.block_size else ""
        return f"bits={self.bits}, {'symmetric' if self.symmetric else 'asymmetric'}, {gran}"

    def _broadcast_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        if self.channel_axis is None:
            return ()
        shape = [1] * x.dim()
        shape[self.channel_axis % x.dim()] = x.shape[self.channel_axis]
        return tuple(shape)

    @torch.no_grad()
    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        s, z = scale_from_range(torch.as_tensor(lo, dtype=torch.float32, device=self.scale.device),
                                torch.as_tensor(hi, dtype=torch.float32, device=self.scale.device), self.bits, self.symmetric)
        self.set_params(s, z)

    @torch.no_grad()
    def set_params(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        self.scale.data = scale.detach().float().clone()
        self.zero_point = zero_point.detach().float().clone()
        self.calibrated.fill_(True)

    @torch.no_grad()
    def fit(self, x: torch.Tensor, method: str = "max") -> None:
        """Fit the range to ``x``: ``max`` uses its min/max, ``mse`` searches the clipping ratio."""
        if not self.enabled:
            return
        x = at_least_float32(x)
        blocks = (x.shape[0], x.shape[1] // self.block_size) if self.block_size else None
        if blocks:   # each (channel, block) is a channel of its own
            x = x.reshape(blocks[0] * blocks[1], self.block_size)
        dims = _reduce_dims(x, self.channel_axis)
        if method == "max":
            self.set_range(x.amin(dim=dims, keepdim=self.channel_axis is not None), x.amax(dim=dims, keepdim=self.channel_axis is not None))
        elif method == "mse":
            s, z = search_mse_scale(x, self.bits, self.symmetric, self.channel_axis)
            if self.channel_axis is None:
                s, z = s.reshape(()), z.reshape(())
            self.set_params(s, z)
        else:
            raise ValueError(f"unknown range method {method!r} (allowed: max, mse)")
        if blocks:
            self.set_params(self.scale.reshape(blocks), self.zero_point.reshape(blocks))

    @property
    def code_dtype(self) -> torch.dtype:
        """The smallest integer type holding every code: int8 for signed ranges, uint8 for unsigned (bits <= 8)."""
        return torch.int8 if self.qmin < 0 else torch.uint8

    def integer(self, x: torch.Tensor) -> torch.Tensor:
        """The integer codes of ``x`` (no gradient)."""
        scale, zero = self.params()
        return torch.clamp(torch.round(at_least_float32(x) / scale) + zero, self.qmin, self.qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.observer is not None:
            self.observer(x)
            return x
        if self.timestep_ranges is not None:
            scale, zero = self.timestep_ranges.lookup(x)
            return fake_quant(x, scale, zero, self.qmin, self.qmax)
        if not bool(self.calibrated):
            raise RuntimeError("quantizer used before calibration: call fit() or set_range() first")
        return fake_quant(x, *self.params(), self.qmin, self.qmax)

    @torch.no_grad()
    def set_timestep_ranges(self, t: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """One range per timestep (per-tensor quantizers only)."""
        from .timestep import TimestepRanges

        if self.channel_axis is not None:
            raise ValueError("timestep ranges are for per-tensor quantizers")
        s, z = scale_from_range(lo.float(), hi.float(), self.bits, self.symmetric)
        table = TimestepRanges(len(t), device=self.scale.device)
        table.t.copy_(t.float()); table.scale.copy_(s); table.zero_point.copy_(z)
        self.timestep_ranges = table
        self.calibrated.fill_(True)
