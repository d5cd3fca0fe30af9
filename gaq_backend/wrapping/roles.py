"""Layers kept in full precision for what they do, found in one probe call instead of by name.

The peers keep the same parts of a denoiser in float (ModelOpt's default filter: ``time_embedding``,
``time_emb_proj``, ``add_embedding``, ``time_text_embed``, ``x_embedder``, ``pos_embed``, ``norm_out``, ...),
but by module names that differ in every architecture. Their roles show in one forward call:

- **conditioning**: a Linear that sees one vector per sample (a 2-D input ``[batch, features]``): the
  timestep, guidance, class and pooled-text embedders and the adaptive norms' modulation (adaLN),
  a handful of small layers every token depends on;
- **patch embedding**: the first layer called on the input itself (a UNet's ``conv_in``, a DiT's patch
  conv, Flux's ``x_embedder``);
- **final projection**: the last layer called (``conv_out``, ``proj_out``).

On diffusers' UNets these are the layers ``DEFAULT_KEEP_FP`` already names (plus SDXL's ``add_embedding``,
which ModelOpt keeps too); on transformers they are what the names would be if each class had its list.
"""
from __future__ import annotations

import torch
from torch import nn


def layers_by_role(model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict) -> dict[str, list[str]]:
    """``{"conditioning": [...], "patch embedding": [name], "final projection": [name]}`` from one call on one
    recorded input row (Conv2d / Linear layers only)."""
    from ..sampling import forward_with_hooks

    order: list[tuple[str, int]] = []   # (layer, rank of its input) in call order
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    forward_with_hooks(model, layers, lambda mod, args, out, n: order.append((n, args[0].dim())), x, t, cond)
    if not order:
        return {}
    roles = {"conditioning": sorted({n for n, rank in order if rank == 2}),
             "patch embedding": [next((n for n, rank in order if rank > 2), order[0][0])],
             "final projection": [order[-1][0]]}
    return {k: v for k, v in roles.items() if v}
