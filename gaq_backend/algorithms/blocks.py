"""Partition a wrapped diffusers UNet into reconstruction units (BRECQ / Q-Diffusion granularity).

A unit is a ResNet block, an attention / transformer block, or a single wrapped layer that lies
outside those (conv_in, the time-embedding MLP, up/down-sample convs, conv_out, ...). Units come in
module registration order, which is the UNet's forward order for diffusers' UNets.

A diffusion transformer's blocks (``BasicTransformerBlock``, ``JointTransformerBlock``,
``FluxTransformerBlock``, ``FluxSingleTransformerBlock``, ...) are found by structure rather than by class
name: a module with an attention module among its direct children and a wrapped layer outside it (the
feed-forward, the MLP projections, the adaLN modulation) is one unit, so a new block class needs no list entry.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..quantizers import UniformQuantizer
from ..wrapping import QuantAttnProcessor, QuantLayerMixin

BLOCK_TYPES = ("ResnetBlock2D", "ResnetBlockCondNorm2D", "Attention", "Transformer2DModel")


@dataclass
class ReconUnit:
    name: str
    module: nn.Module
    kind: str  # "block" or "layer"
    exclude: tuple[str, ...] = ()  # layers inside the unit that another unit reconstructs

    def layers(self) -> list[tuple[str, QuantLayerMixin]]:
        if isinstance(self.module, QuantLayerMixin):
            return [(self.name, self.module)]
        return [(f"{self.name}.{n}", m) for n, m in self.module.named_modules()
                if isinstance(m, QuantLayerMixin) and f"{self.name}.{n}" not in self.exclude]

    def act_quantizers(self) -> list[UniformQuantizer]:
        """Enabled activation quantizers this unit owns: its layers' inputs and its attention matmuls."""
        qs = [q for _, l in self.layers() for q in l.act_quantizers]
        qs += [q for m in self.module.modules() if isinstance(m, QuantAttnProcessor) for q in m.quantizers.values()]
        return [q for q in qs if q.enabled and q.timestep_ranges is None]


def reconstruction_units(model: nn.Module, exclude: tuple[str, ...] = ()) -> list[ReconUnit]:
    """Units covering every wrapped layer exactly once. Layers whose name is in ``exclude``
    (reconstructed elsewhere, e.g. by TFMQ-DM's temporal block) are left out of block units."""
    units: list[ReconUnit] = []
    inside: str | None = None
    for name, module in model.named_modules():
        if inside is not None and name.startswith(inside + "."):
            continue
        inside = None
        if type(module).__name__ in BLOCK_TYPES or is_transformer_block(module):
            unit = ReconUnit(name, module, "block", tuple(exclude))
            if unit.layers() or _has_matmul_quant(module):
                units.append(unit)
            inside = name
        elif isinstance(module, QuantLayerMixin) and name not in exclude:
            units.append(ReconUnit(name, module, "layer"))
    return units


def is_transformer_block(module: nn.Module) -> bool:
    """An attention module among the direct children, and a wrapped layer outside every attention child."""
    from ..wrapping.wrap import is_attention

    attns = [m for m in module.children() if is_attention(m)]
    if not attns:
        return False
    inside = {id(m) for a in attns for m in a.modules()}
    return any(isinstance(m, QuantLayerMixin) and id(m) not in inside for m in module.modules())


def _has_matmul_quant(module: nn.Module) -> bool:
    return any(isinstance(m, QuantAttnProcessor) for m in module.modules())
