"""Fake quantization of the two attention matmuls (Q.K^T and softmax.V) of diffusers ``Attention``.

The processor reproduces diffusers' reference ``AttnProcessor`` and quantizes the four matmul
operands (query, key, attention probabilities, value) per tensor, as Q-Diffusion does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quantizers import UniformQuantizer


class QuantAttnProcessor(nn.Module):
    OPERANDS = ("query", "key", "probs", "value")

    def __init__(self, a_bits: int, a_symmetric: bool = True, device: torch.device | str | None = None):
        super().__init__()
        self.quantizers = nn.ModuleDict({k: UniformQuantizer(a_bits, a_symmetric, device=device) for k in self.OPERANDS})
        self.use_act_quant = True

    def _q(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return self.quantizers[name](x) if self.use_act_quant else x

    # diffusers filters kwargs by the processor's ``__call__`` signature, so name them here.
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
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

        if self.use_act_quant and any(q.enabled for q in self.quantizers.values()):
            scores = torch.bmm(self._q("query", query), self._q("key", key).transpose(-1, -2)).mul_(attn.scale)
            if attention_mask is not None:
                scores = scores + attention_mask
            probs = scores.float().softmax(dim=-1).to(query.dtype)
            hidden_states = torch.bmm(self._q("probs", probs), self._q("value", value))
        else:  # nothing to quantize in between (AdaRound's phase, W4A32): torch's fused kernel, no score matrix kept
            hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=attn.scale)

        hidden_states = attn.batch_to_head_dim(hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor
