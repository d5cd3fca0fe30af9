"""Fake-quant Conv2d and Linear.

They subclass the torch layers so that parameter names (``weight``, ``bias``) and the state dict of
the FP model stay valid. Input activations are quantized per tensor, weights per output channel.
``split`` > 0 gives the first ``split`` input channels and the rest separate quantizers, for
Q-Diffusion's shortcut split on convolutions that read ``cat([h, skip])``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quantizers import UniformQuantizer


def _adopt(cls, layer: nn.Module) -> nn.Module:
    """A ``cls`` instance sharing ``layer``'s parameters and attributes, with fresh hook tables."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    fresh = set(new.__dict__)
    new.__dict__.update({k: v for k, v in layer.__dict__.items() if k not in fresh})
    new._parameters.update(layer._parameters)
    new._buffers.update(layer._buffers)
    new.training = layer.training
    return new


class QuantLayerMixin:
    """Shared quantization logic for the Conv2d and Linear wrappers."""

    weight_rounding: nn.Module | None

    def _init_quant(self, w_bits: int, a_bits: int, w_symmetric: bool, a_symmetric: bool, split: int, block_size: int = 0) -> None:
        out = self.weight.shape[0]
        wshape = (out, self.weight.shape[1] // block_size) if block_size else (out,) + (1,) * (self.weight.dim() - 1)
        parts = 2 if split else 1
        self.split = int(split)
        self.weight_quantizers = nn.ModuleList(
            [UniformQuantizer(w_bits, w_symmetric, channel_axis=0, shape=wshape, device=self.weight.device, block_size=block_size)
             for _ in range(parts)])
        self.act_quantizers = nn.ModuleList([UniformQuantizer(a_bits, a_symmetric, device=self.weight.device) for _ in range(parts)])
        # AdaRound and similar algorithms plug a module here that returns the quantized weight parts.
        self.weight_rounding = None
        # Integer weights (int8 / uint8 codes) fixed by calibration (what is saved and exported).
        self.register_buffer("weight_int", None)
        self.use_weight_quant = True
        self.use_act_quant = True

    def weight_parts(self) -> list[torch.Tensor]:
        return [self.weight] if not self.split else [self.weight[:, : self.split], self.weight[:, self.split:]]

    def input_parts(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x] if not self.split else [x[:, : self.split], x[:, self.split:]]

    def quantized_weight(self) -> torch.Tensor:
        if not self.weight_quantizers[0].enabled:
            return self.weight
        if self.weight_int is not None:
            parts = self.input_parts(self.weight_int) if self.split else [self.weight_int]
            deq = [(p - q.params()[1]) * q.params()[0] for p, q in zip(parts, self.weight_quantizers)]
        elif self.weight_rounding is not None:
            deq = self.weight_rounding(self)
        else:
            deq = [q(w) for w, q in zip(self.weight_parts(), self.weight_quantizers)]
        w = deq[0] if len(deq) == 1 else torch.cat(deq, dim=1)
        return w.to(self.weight.dtype)  # integers and float32 scales, computed in the layer's own dtype

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        parts = [q(p) for p, q in zip(self.input_parts(x), self.act_quantizers)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    @torch.no_grad()
    def freeze_weight(self, sync_float: bool = True) -> None:
        """Fix the integer weights from the current rounding; later forwards use exactly these.
        ``sync_float`` also overwrites the float weight with them, so nothing downstream (export, a copy)
        can read a stale unrounded weight; calibration leaves it for the end, because until then the float
        weight is the FP model (``algorithms.common.full_precision``)."""
        if not self.weight_quantizers[0].enabled:
            return
        if self.weight_int is None:
            if self.weight_rounding is not None:
                ints = self.weight_rounding.integers(self)
            else:
                ints = [q.integer(w) for w, q in zip(self.weight_parts(), self.weight_quantizers)]
            # one byte per weight: with the float weight, rounded layers hold 1.25x (fp32) their FP size, not 2x
            self.weight_int = (torch.cat(ints, dim=1) if len(ints) > 1 else ints[0]).to(self.weight_quantizers[0].code_dtype)
            self.weight_rounding = None
        if sync_float:
            self.weight.data.copy_(self.quantized_weight())

    @torch.no_grad()
    def round_in_place(self) -> None:
        """Fix the rounding into the float weight itself and drop the integer codes where they can be read back
        exactly (``freeze_weight`` derives them again at the end): a rounded layer then holds one tensor, not
        a float weight and its codes. For block reconstruction, whose FP passes never revisit a rounded unit."""
        self.freeze_weight(sync_float=True)
        if self.weight_int is None:
            return
        parts = self.input_parts(self.weight_int) if self.split else [self.weight_int]
        if all(torch.equal(q.integer(w).to(c.dtype), c) for w, c, q in zip(self.weight_parts(), parts, self.weight_quantizers)):
            self.weight_int = None  # fake-quantizing the rounded weight gives it back bit for bit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quantize_input(x) if self.use_act_quant else x
        return self._op(x, self.quantized_weight() if self.use_weight_quant else self.weight)


class QuantConv2d(QuantLayerMixin, nn.Conv2d):
    @classmethod
    def from_float(cls, conv: nn.Conv2d, w_bits: int, a_bits: int, w_symmetric: bool = True,
                   a_symmetric: bool = True, split: int = 0) -> "QuantConv2d":
        if conv.padding_mode != "zeros":
            raise ValueError(f"Conv2d padding_mode {conv.padding_mode!r} is not supported (only 'zeros')")
        new = _adopt(cls, conv)
        new._init_quant(w_bits, a_bits, w_symmetric, a_symmetric, split)
        return new

    def _op(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class QuantLinear(QuantLayerMixin, nn.Linear):
    @classmethod
    def from_float(cls, lin: nn.Linear, w_bits: int, a_bits: int, w_symmetric: bool = True,
                   a_symmetric: bool = True, split: int = 0, block_size: int = 0) -> "QuantLinear":
        """``block_size`` > 0: one weight scale per output feature and block of that many input features
        (a layer whose input features it does not divide stays per output feature)."""
        if split:
            raise ValueError("split quantizers apply to convolutions only")
        new = _adopt(cls, lin)
        new._init_quant(w_bits, a_bits, w_symmetric, a_symmetric, 0, block_size if block_size and lin.in_features % block_size == 0 else 0)
        return new

    def _op(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.linear(x, w, self.bias)
