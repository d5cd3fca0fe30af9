"""Walk a diffusers UNet and wrap every quantizable layer exactly once."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from torch import nn

from .attention import QuantAttnProcessor, QuantSDPAProcessor
from .layers import QuantConv2d, QuantLayerMixin, QuantLinear

# Leaf layers that carry parameters but compute in float in every peer's W4A8 scheme. Any other module whose
# parameters are all vectors (norm gains, GaussianFourierProjection's frequencies, a learned scale) computes
# elementwise and stays in float too; one with a matrix or kernel of its own is refused, since it is a matmul
# or convolution gaq does not know how to quantize.
FLOAT_LAYERS = (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm2d, nn.Embedding, nn.InstanceNorm2d)
# diffusers' attention processors that compute plain (masked) softmax attention; anything else is refused.
KNOWN_PROCESSORS = ("AttnProcessor", "AttnProcessor2_0", "QuantAttnProcessor")
ADDED_KV_PROCESSORS = ("AttnAddedKVProcessor", "AttnAddedKVProcessor2_0")   # the same, with the text's K/V added


class UnsupportedLayerError(ValueError):
    pass


@dataclass
class WrapReport:
    wrapped: list[str] = field(default_factory=list)        # Conv2d / Linear names
    attention: list[str] = field(default_factory=list)      # Attention modules with quantized matmuls
    kept: list[str] = field(default_factory=list)           # quantizable but kept in full precision
    split: dict[str, int] = field(default_factory=dict)     # layers with split skip quantizers -> split point
    w_bits: dict[str, int] = field(default_factory=dict)    # layers whose weights are not at the model's w_bits -> bits

    def summary(self) -> str:
        return (f"wrapped {len(self.wrapped)} Conv2d/Linear and {len(self.attention)} attention modules "
                f"({2 * len(self.attention)} matmuls); kept {len(self.kept)} in full precision; "
                f"{len(self.split)} with split skip quantizers"
                + (f"; {len(self.w_bits)} with other weight bits ({_bits_summary(self.w_bits)})" if self.w_bits else ""))

    def to_dict(self) -> dict:
        return dict(wrapped=self.wrapped, attention=self.attention, kept=self.kept, split=self.split, w_bits=self.w_bits)


def _bits_summary(by_layer: dict[str, int]) -> str:
    counts: dict[int, int] = {}
    for bits in by_layer.values():
        counts[bits] = counts.get(bits, 0) + 1
    return ", ".join(f"{n} at {b} bits" for b, n in sorted(counts.items()))


def layer_w_bits(name: str, w_bits: int, by_layer: dict[str, int]) -> int:
    """The weight bits of layer ``name``: the first ``by_layer`` pattern (keep_fp's rules) that matches it."""
    return next((bits for pattern, bits in by_layer.items() if is_kept(name, [pattern])), w_bits)


def is_kept(name: str, patterns: list[str]) -> bool:
    """A bare word matches any dotted component of the name; a pattern with '*' or '.' is a glob on the name or a prefix
    of it; ``=name`` is exactly that module (and what it holds)."""
    parts = name.split(".")
    for pat in patterns:
        if pat.startswith("="):
            if name == pat[1:] or name.startswith(pat[1:] + "."):
                return True
        elif any(ch in pat for ch in "*?[."):
            if any(fnmatch.fnmatchcase(".".join(parts[: i + 1]), pat) for i in range(len(parts))):
                return True
        elif pat in parts:
            return True
    return False


def check_keep_fp(unet: nn.Module, patterns: list[str], key: str = "quantization.keep_fp") -> None:
    """Every ``keep_fp`` (or ``w_bits_by_layer``) entry must match a module: a typo would silently quantize the
    layer it meant to keep. (The default list, ModelOpt's, names layers that not every UNet has, so it is exempt.)"""
    import difflib

    from ..config import DEFAULT_KEEP_FP

    names = [n for n, _ in unet.named_modules() if n]
    for pat in patterns:
        if pat in DEFAULT_KEEP_FP and key == "quantization.keep_fp":
            continue
        if not any(is_kept(n, [pat]) for n in names):
            words = sorted({p for n in names for p in n.split(".") if not p.isdigit()} | set(names))
            close = difflib.get_close_matches(pat, words, n=3, cutoff=0.5)
            hint = f"closest: {', '.join(close)}" if close else f"e.g. {', '.join(names[:3])}"
            raise UnsupportedLayerError(f"{key} entry {pat!r} matches no layer of this model ({hint})")


def _skip_splits(unet: nn.Module) -> dict[str, int]:
    """Split points of the up-path ResNet convs that read ``cat([h, skip])``: the channel count of ``h``."""
    splits: dict[str, int] = {}
    ups = getattr(unet, "up_blocks", None)
    if ups is None:
        return splits
    mid = getattr(unet, "mid_block", None)
    if mid is not None and getattr(mid, "resnets", None):
        h = mid.resnets[-1].out_channels
    else:
        h = unet.down_blocks[-1].resnets[-1].out_channels
    for i, block in enumerate(ups):
        for j, res in enumerate(getattr(block, "resnets", [])):
            cin = res.conv1.in_channels
            if 0 < h < cin:
                splits[f"up_blocks.{i}.resnets.{j}.conv1"] = h
                if getattr(res, "conv_shortcut", None) is not None:
                    splits[f"up_blocks.{i}.resnets.{j}.conv_shortcut"] = h
            h = res.out_channels
    return splits


def wrap_unet(unet: nn.Module, w_bits: int, a_bits: int, keep_fp: list[str], w_symmetric: bool = True,
              a_symmetric: bool = True, quantize_attention_matmuls: bool = True, split_skip: bool = True,
              w_block_size: int = 0, w_bits_by_layer: dict[str, int] | None = None) -> WrapReport:
    """Replace, in place, each Conv2d / Linear by its fake-quant twin and each Attention's processor by
    :class:`QuantAttnProcessor`. Raises :class:`UnsupportedLayerError` on a parametrised layer it cannot handle.
    ``w_bits_by_layer``: weight bits by layer pattern (the first match wins), ``w_bits`` elsewhere."""
    check_keep_fp(unet, keep_fp)
    by_layer = dict(w_bits_by_layer or {})
    check_keep_fp(unet, list(by_layer), "quantization.w_bits_by_layer")
    report = WrapReport()
    splits = _skip_splits(unet) if split_skip else {}
    replacements: list[tuple[nn.Module, str, nn.Module]] = []
    for name, module in list(unet.named_modules()):
        if isinstance(module, (QuantLayerMixin, QuantAttnProcessor)):
            raise ValueError(f"model is already quantized ({name} is a {type(module).__name__}); wrap a fresh FP model")
        if is_attention(module):
            if not quantize_attention_matmuls or is_kept(name, keep_fp):
                report.kept.append(name + ".matmuls")
            else:
                module._gaq_fp_processor = module.processor  # restored by algorithms.common.full_precision
                module.set_processor(quant_processor(name, module, a_bits, a_symmetric))
                report.attention.append(name)
            continue
        if isinstance(module, (nn.Conv2d, nn.Linear)) and not _computes_plain_op(module):
            raise UnsupportedLayerError(f"unsupported layer type {type(module).__name__} at {name}; add '{name}' to keep_fp")
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            if is_kept(name, keep_fp):
                report.kept.append(name)
                continue
            parent_name, _, attr = name.rpartition(".")
            parent = unet.get_submodule(parent_name) if parent_name else unet
            bits = layer_w_bits(name, w_bits, by_layer)
            if bits != w_bits:
                report.w_bits[name] = bits
            if isinstance(module, nn.Conv2d):
                new = QuantConv2d.from_float(module, bits, a_bits, w_symmetric, a_symmetric, splits.get(name, 0))
                if name in splits:
                    report.split[name] = splits[name]
            else:
                new = QuantLinear.from_float(module, bits, a_bits, w_symmetric, a_symmetric, block_size=w_block_size)
            replacements.append((parent, attr, new))
            report.wrapped.append(name)
            continue
        own_params = list(module.parameters(recurse=False))
        container = any(True for _ in module.children())  # its own tables are applied elementwise (PixArt's scale_shift_table)
        if any(p.dim() >= 2 for p in own_params) and not isinstance(module, FLOAT_LAYERS) and not container:
            if is_kept(name, keep_fp):
                report.kept.append(name)
                continue
            raise UnsupportedLayerError(f"unsupported layer type {type(module).__name__} at {name}: gaq quantizes Conv2d, Linear and diffusers Attention")
    for parent, attr, new in replacements:
        setattr(parent, attr, new)
    return report


def is_attention(module: nn.Module) -> bool:
    """diffusers' attention modules (``Attention``, ``FluxAttention``, ...): they compute through a settable processor."""
    return hasattr(module, "set_processor") and getattr(module, "processor", None) is not None and hasattr(module, "to_q")


def quant_processor(name: str, module: nn.Module, a_bits: int, a_symmetric: bool) -> QuantAttnProcessor:
    """diffusers' plain processors are reproduced by :class:`QuantAttnProcessor`; any other (joint, rotary,
    query/key norms) keeps its own code with its SDPA call quantized (one that never calls SDPA is refused at its
    first call)."""
    proc = module.processor
    device = module.to_q.weight.device
    plain = getattr(module, "norm_q", None) is None and getattr(module, "norm_k", None) is None
    if type(proc).__name__ in KNOWN_PROCESSORS + ADDED_KV_PROCESSORS and plain:
        return QuantAttnProcessor(a_bits, a_symmetric, device=device, added_kv=type(proc).__name__ in ADDED_KV_PROCESSORS)
    return QuantSDPAProcessor.wrapping(proc, a_bits, a_symmetric, device, name)


def _computes_plain_op(module: nn.Module) -> bool:
    """True for Conv2d / Linear and subclasses (diffusers' LoRACompatible*) that compute the plain op."""
    if type(module).forward in (nn.Conv2d.forward, nn.Linear.forward):
        return True
    return type(module).__name__.startswith("LoRACompatible") and getattr(module, "lora_layer", None) is None


def quant_layers(model: nn.Module) -> list[tuple[str, QuantLayerMixin]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLayerMixin)]


def weight_sizes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Per quantized layer with quantized weights: (weights, bits), the figures weight bytes and budgets are summed from."""
    return {n: (m.weight.numel(), m.weight_quantizers[0].bits) for n, m in quant_layers(model) if m.weight_quantizers[0].enabled}


def fit_weights(model: nn.Module, method: str) -> None:
    """Every weight quantizer's range fitted to its weight (``max`` or ``mse``): the starting point of every algorithm."""
    for _, layer in quant_layers(model):
        for w, q in zip(layer.weight_parts(), layer.weight_quantizers):
            q.fit(w.detach(), method)


def quantizers(model: nn.Module, kind: str = "all"):
    """Yield (name, quantizer) for weight, activation or all quantizers."""
    from ..quantizers import UniformQuantizer

    for n, m in model.named_modules():
        if isinstance(m, UniformQuantizer):
            is_weight = ".weight_quantizers." in n
            if kind == "all" or (kind == "weight") == is_weight:
                yield n, m
