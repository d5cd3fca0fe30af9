"""Fake quantization of the two attention matmuls (Q.K^T and softmax.V) of diffusers' attention modules.

:class:`QuantAttnProcessor` reproduces diffusers' reference ``AttnProcessor`` (or, for the simple
cross-attention blocks, ``AttnAddedKVProcessor``: the text's keys and values from ``add_k_proj`` /
``add_v_proj`` put before the image's) and quantizes the four matmul operands (query, key, attention
probabilities, value) per tensor, as Q-Diffusion does.

:class:`QuantSDPAProcessor` does the same for any other processor that computes attention with torch's
``scaled_dot_product_attention`` (SD3's joint attention, Flux's double- and single-stream attention with
rotary embeddings and query/key norms, PixArt's): the model's own processor runs unchanged, and only the
SDPA call inside it is replaced, for the duration of the call, by the same two quantized matmuls. So the
processor's own code (token concatenation, rotary embeddings, norms, masks) is never copied here.
"""
from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..quantizers import UniformQuantizer


class QuantAttnProcessor(nn.Module):
    OPERANDS = ("query", "key", "probs", "value")

    def __init__(self, a_bits: int, a_symmetric: bool = True, device: torch.device | str | None = None, added_kv: bool = False):
        super().__init__()
        self.quantizers = nn.ModuleDict({k: UniformQuantizer(a_bits, a_symmetric, device=device) for k in self.OPERANDS})
        self.use_act_quant = True
        self.added_kv = added_kv   # the layout of diffusers' AttnAddedKVProcessor (UNet's SimpleCrossAttn blocks)

    def _q(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return self.quantizers[name](x) if self.use_act_quant else x

    # diffusers filters kwargs by the processor's ``__call__`` signature, so name them here.
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        if self.added_kv:
            return self._added_kv_forward(attn, hidden_states, encoder_hidden_states, attention_mask)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch_size, seq_len, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query, key, value = (attn.head_to_batch_dim(t) for t in (query, key, value))
        hidden_states = attn.batch_to_head_dim(self._attend(attn, query, key, value, attention_mask))
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _attend(self, attn, query, key, value, attention_mask):
        return self.attend(query, key, value, attention_mask, attn.scale)

    def attend(self, query, key, value, attention_mask=None, scale=None, sdpa=F.scaled_dot_product_attention):
        """softmax(Q.K^T * scale + mask).V on (..., tokens, head_dim) operands, quantized; a boolean mask keeps
        the True entries, as torch's SDPA does."""
        if self.use_act_quant and any(q.enabled for q in self.quantizers.values()):
            scale = scale if scale is not None else 1.0 / math.sqrt(query.shape[-1])
            scores = torch.matmul(self._q("query", query), self._q("key", key).transpose(-1, -2)).mul_(scale)
            if attention_mask is not None:
                scores = (scores.masked_fill(~attention_mask, float("-inf")) if attention_mask.dtype == torch.bool
                          else scores + attention_mask)
            probs = scores.float().softmax(dim=-1).to(query.dtype)
            return torch.matmul(self._q("probs", probs), self._q("value", value))
        # nothing to quantize in between (AdaRound's phase, W4A32): torch's fused kernel, no score matrix kept
        return sdpa(query, key, value, attn_mask=attention_mask, scale=scale)

    def _added_kv_forward(self, attn, hidden_states, encoder_hidden_states, attention_mask):
        residual = hidden_states
        hidden_states = hidden_states.view(hidden_states.shape[0], hidden_states.shape[1], -1).transpose(1, 2)
        batch_size, seq_len, _ = hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch_size)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.add_k_proj(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.add_v_proj(encoder_hidden_states))
        if not attn.only_cross_attention:  # the text's keys and values first, then the image's own
            key = torch.cat([key, attn.head_to_batch_dim(attn.to_k(hidden_states))], dim=1)
            value = torch.cat([value, attn.head_to_batch_dim(attn.to_v(hidden_states))], dim=1)
        hidden_states = attn.batch_to_head_dim(self._attend(attn, query, key, value, attention_mask))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        return hidden_states.transpose(-1, -2).reshape(residual.shape) + residual


class QuantSDPAProcessor(QuantAttnProcessor):
    """A model's own attention processor with its ``scaled_dot_product_attention`` call quantized (module docstring).

    diffusers passes a processor only the keyword arguments its ``__call__`` names, so each wrapped processor
    type gets a subclass whose ``__call__`` carries the inner processor's signature (:meth:`wrapping`)."""

    def __init__(self, inner, a_bits: int, a_symmetric: bool = True, device: torch.device | str | None = None, where: str = ""):
        super().__init__(a_bits, a_symmetric, device)
        self.inner, self.where = inner, where

    @staticmethod
    def wrapping(inner, a_bits: int, a_symmetric: bool = True, device=None, where: str = "") -> "QuantSDPAProcessor":
        cls = _SUBCLASSES.get(type(inner))
        if cls is None:
            def __call__(self, attn, *args, **kwargs):
                return nn.Module.__call__(self, attn, *args, **kwargs)
            __call__.__signature__ = inspect.signature(type(inner).__call__)
            cls = _SUBCLASSES[type(inner)] = type(f"Quant{type(inner).__name__}", (QuantSDPAProcessor,), {"__call__": __call__})
        return cls(inner, a_bits, a_symmetric, device, where)

    def forward(self, attn, *args, **kwargs):
        sdpa = F.scaled_dot_product_attention
        calls = []

        def quantized(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **extra):
            if dropout_p or is_causal or extra.get("enable_gqa"):
                raise NotImplementedError("quantized attention with dropout, a causal mask or grouped-query attention")
            calls.append(1)
            return self.attend(query, key, value, attn_mask, scale, sdpa)

        F.scaled_dot_product_attention = quantized   # the processors look it up at call time (torch.nn.functional.<name>)
        try:
            out = self.inner(attn, *args, **kwargs)
        finally:
            F.scaled_dot_product_attention = sdpa
        if not calls:
            raise NotImplementedError(f"attention processor {type(self.inner).__name__} at {self.where} does not compute through "
                                      f"torch's scaled_dot_product_attention, so gaq cannot quantize its matmuls; add '{self.where}' "
                                      "to keep_fp, or set quantization.quantize_attention_matmuls: false")
        return out


_SUBCLASSES: dict[type, type] = {}
