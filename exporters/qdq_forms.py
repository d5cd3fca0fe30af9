"""How a gaq fake-quant layer is written as ONNX QuantizeLinear / DequantizeLinear.

Autograd Functions with an ONNX ``symbolic`` compute in PyTorch exactly what the fake-quant model
computes, and the TorchScript exporter writes them as Q/DQ nodes. ``export_forms(model)`` swaps the
forwards of a loaded quantized UNet to use them for the duration of an export:

- every activation quantizer becomes ``DequantizeLinear(QuantizeLinear(x))`` with its calibrated scale
  and zero-point (per tensor; the attention matmul operands included); one with per-timestep ranges
  (``temporal``) looks its scale up from each row's timestep in the graph and is per-axis on axis 0;
- every quantized Conv2d / Linear reads its weight as ``DequantizeLinear(weight_int)`` per output
  channel, so the stored integers (AdaRound's rounding included) are the initializers, bit for bit.
  A Linear is written as ``MatMul(x, DQ(W^T)) + b`` with the transposed integers stored, because a
  Transpose between DQ and MatMul would stop runtimes from fusing the pair.
- a layer with split skip quantizers (``cat([h, skip])``) becomes two convolutions, one per input
  part with its own scales, added: one Q/DQ'd Conv per part is the pattern every runtime fuses.
"""
from __future__ import annotations

import contextlib
import types
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from gaq_backend.quantizers import UniformQuantizer
from gaq_backend.quantizers.timestep import current_timestep_tensor
from gaq_backend.wrapping.layers import QuantConv2d, QuantLinear


def _int_dtype(qmin: int):
    return torch.int8 if qmin < 0 else torch.uint8


class ActivationQDQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin: int, qmax: int):
        zp = zero_point.float()
        return (torch.clamp(torch.round(x / scale) + zp, qmin, qmax) - zp) * scale

    @staticmethod
    def symbolic(g, x, scale, zero_point, qmin, qmax):
        q = g.op("QuantizeLinear", x, scale, zero_point)
        return g.op("DequantizeLinear", q, scale, zero_point)


class RowwiseActivationQDQ(torch.autograd.Function):
    """Per-tensor quantization with one scale per batch row: ``temporal``'s per-timestep ranges, looked up
    from the row's timestep in the graph (Gather), written as per-axis Q/DQ on axis 0."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin: int, qmax: int):
        shape = (-1,) + (1,) * (x.dim() - 1)
        return ActivationQDQ.forward(ctx, x, scale.view(shape), zero_point.view(shape), qmin, qmax)

    @staticmethod
    def symbolic(g, x, scale, zero_point, qmin, qmax):
        q = g.op("QuantizeLinear", x, scale, zero_point, axis_i=0)
        return g.op("DequantizeLinear", q, scale, zero_point, axis_i=0)


class WeightDQ(torch.autograd.Function):
    """Per-channel (``block_size`` 0) or blocked (opset 21: one scale per ``block_size`` entries along ``axis``)."""

    @staticmethod
    def forward(ctx, w_int, scale, zero_point, axis: int, block_size: int = 0):
        if block_size:
            scale, zero_point = scale.repeat_interleave(block_size, axis), zero_point.repeat_interleave(block_size, axis)
        else:
            shape = [1] * w_int.dim()
            shape[axis] = -1
            scale, zero_point = scale.view(shape), zero_point.view(shape)
        return (w_int.float() - zero_point.float()) * scale

    @staticmethod
    def symbolic(g, w_int, scale, zero_point, axis, block_size=0):
        if block_size:
            return g.op("DequantizeLinear", w_int, scale, zero_point, axis_i=axis, block_size_i=block_size)
        return g.op("DequantizeLinear", w_int, scale, zero_point, axis_i=axis)


# Tensors the graph reads are attached as temporary buffers, already in their stored dtype and layout:
# the exporter then writes them as named initializers, with no Cast/Round/Transpose ops on them.
def _attach(module: nn.Module, name: str, value: torch.Tensor, added: list) -> torch.Tensor:
    module.register_buffer(name, value.detach().clone())
    added.append((module, name))
    return getattr(module, name)


def _prepare_activation(q: UniformQuantizer, added: list) -> None:
    table = q.timestep_ranges
    if table is not None:  # its timesteps and scales are buffers already; the zero-points need their integer type
        _attach(q, "qdq_table_zero_point", table.zero_point.round().to(_int_dtype(q.qmin)), added)
        return
    _attach(q, "qdq_scale", q.scale.reshape(()), added)
    _attach(q, "qdq_zero_point", q.zero_point.reshape(()).round().to(_int_dtype(q.qmin)), added)


def _prepare_layer(layer: nn.Module, added: list) -> None:
    transpose = isinstance(layer, QuantLinear)
    parts = layer.input_parts(layer.weight_int) if layer.split else [layer.weight_int]
    for i, (w, q) in enumerate(zip(parts, layer.weight_quantizers)):
        stored = w.to(_int_dtype(q.qmin))
        # 4-bit values are held in int8 / uint8 here; the int4 export narrows them afterwards
        _attach(layer, f"qdq_weight{i}", stored.t().contiguous() if transpose else stored.contiguous(), added)
        if q.block_size:   # (out, in / B) -> (in / B, out), the layout of the transposed integers, blocked along axis 0
            _attach(layer, f"qdq_weight_scale{i}", q.scale.t().contiguous(), added)
            _attach(layer, f"qdq_weight_zero_point{i}", q.zero_point.t().round().to(stored.dtype).contiguous(), added)
        else:
            _attach(layer, f"qdq_weight_scale{i}", q.scale.reshape(-1), added)
            _attach(layer, f"qdq_weight_zero_point{i}", q.zero_point.reshape(-1).round().to(stored.dtype), added)


def _qdq_activation(q: UniformQuantizer, x: torch.Tensor) -> torch.Tensor:
    table = q.timestep_ranges
    if table is not None:
        idx = table.nearest(current_timestep_tensor())  # traced as Sub, Abs, ArgMin; the lookups as Gather
        return RowwiseActivationQDQ.apply(x, table.scale[idx], q.qdq_table_zero_point[idx], q.qmin, q.qmax)
    return ActivationQDQ.apply(x, q.qdq_scale, q.qdq_zero_point, q.qmin, q.qmax)


def _export_forward(self, x: torch.Tensor) -> torch.Tensor:
    inputs = self.input_parts(x)
    if self.act_quantizers[0].enabled:
        inputs = [_qdq_activation(q, p) for p, q in zip(inputs, self.act_quantizers)]
    out = None
    for i, xi in enumerate(inputs):
        bias = self.bias if i == 0 else None
        w = (getattr(self, f"qdq_weight{i}"), getattr(self, f"qdq_weight_scale{i}"), getattr(self, f"qdq_weight_zero_point{i}"))
        if isinstance(self, QuantLinear):
            block = self.weight_quantizers[i].block_size
            y = torch.matmul(xi, WeightDQ.apply(*w, 0, block) if block else WeightDQ.apply(*w, 1))
            y = y + bias if bias is not None else y
        else:
            y = F.conv2d(xi, WeightDQ.apply(*w, 0), bias, self.stride, self.padding, self.dilation, self.groups)
        out = y if out is None else out + y
    return out


def float_block_linear_inputs(model: nn.Module) -> int:
    """Drop the input quantizer of every Linear with block-wise weights (returns how many): the graph is then
    ``DequantizeLinear(W) -> MatMul`` with a float input, the pattern onnxruntime fuses to MatMulNBits, whose kernel
    quantizes the input itself (dynamic int8 per block at accuracy level 4) in place of gaq's calibrated scale."""
    n = 0
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.weight_quantizers[0].block_size and m.act_quantizers[0].enabled:
            m.act_quantizers[0] = UniformQuantizer(32, device=m.weight.device)
            n += 1
    return n


def check_exportable(model: nn.Module) -> None:
    """Refuse what the Q/DQ forms cannot express faithfully, naming the layer."""
    for name, m in model.named_modules():
        if isinstance(m, UniformQuantizer) and m.enabled:
            if getattr(m, "timestep_ranges", None) is not None and ".processor." in name:
                # attention operands are laid out (batch * heads, ...): axis 0 is not the batch there
                raise ValueError(f"{name} has timestep-dependent activation ranges on an attention operand; the "
                                 "export writes them per batch row and cannot here, so it is refused rather than dropping them")
            if ".weight_quantizers." not in name and m.bits != 8:
                raise ValueError(f"{name} quantizes activations to {m.bits} bits; ONNX QuantizeLinear has 8-bit "
                                 "activations (use a_bits 8 or 32)")
            if m.observer is not None:
                raise ValueError(f"{name} is still observing ranges (calibration not finished)")
        if isinstance(m, (QuantConv2d, QuantLinear)):
            if m.weight_quantizers[0].enabled and m.weight_int is None:
                raise ValueError(f"{name} has no fixed integer weights (was calibration finished and frozen?)")
            if not (m.use_act_quant and m.use_weight_quant):
                raise ValueError(f"{name} has quantization switched off (use_act_quant / use_weight_quant)")


@contextlib.contextmanager
def export_forms(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``model`` computes through the Q/DQ forms (identically to its fake-quant forward)."""
    check_exportable(model)
    patched: list[nn.Module] = []
    added: list[tuple[nn.Module, str]] = []
    try:
        for _, m in model.named_modules():
            if isinstance(m, (QuantConv2d, QuantLinear)) and m.weight_quantizers[0].enabled:
                _prepare_layer(m, added)
                m.forward = types.MethodType(_export_forward, m)
                patched.append(m)
            elif isinstance(m, UniformQuantizer) and m.enabled and m.channel_axis is None:
                _prepare_activation(m, added)
                m.forward = types.MethodType(_qdq_activation, m)
                patched.append(m)
        yield model
    finally:
        for m in patched:
            del m.forward
        for m, name in added:
            delattr(m, name)
