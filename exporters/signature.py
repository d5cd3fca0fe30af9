"""The ONNX interface of an exported UNet: Hugging Face Optimum's diffusion UNet contract.

Inputs ``sample`` (float32, ``[batch, C, H, W]``), ``timestep`` (float32, rank 0 as Optimum exports it;
onnx.checker requires a declared shape on graph inputs, so a raw onnxruntime session rejects a
``[1]``-shaped feed: gaq's runtime helpers reshape it), and the conditioning inputs the UNet
takes: ``encoder_hidden_states`` (``[batch, sequence, cross_attention_dim]``), ``text_embeds`` and
``time_ids`` (SDXL's ``addition_embed_type="text_time"``), ``timestep_cond`` (``time_cond_proj_dim``),
``class_labels`` (int64 ``[batch]``). Output ``out_sample``. One timestep per call, as a pipeline feeds
it: every row of a batch is at the same timestep.
"""
from __future__ import annotations

import torch
from torch import nn

OUTPUT_NAME = "out_sample"
# recorded input name (calibration / held-out inputs) -> ONNX input name
COND_INPUTS = {
    "encoder_hidden_states": "encoder_hidden_states",
    "added_cond_kwargs.text_embeds": "text_embeds",
    "added_cond_kwargs.time_ids": "time_ids",
    "timestep_cond": "timestep_cond",
    "class_labels": "class_labels",
}


def cond_inputs(unet: nn.Module) -> list[str]:
    """The recorded names of the conditioning inputs ``unet``'s config makes it take, in ONNX input order."""
    cfg = unet.config
    names = []
    if getattr(cfg, "cross_attention_dim", None):
        names.append("encoder_hidden_states")
    if getattr(cfg, "addition_embed_type", None) == "text_time":
        names += ["added_cond_kwargs.text_embeds", "added_cond_kwargs.time_ids"]
    elif getattr(cfg, "addition_embed_type", None):
        raise ValueError(f"addition_embed_type={cfg.addition_embed_type!r} is not part of the exported UNet contract")
    if getattr(cfg, "time_cond_proj_dim", None):
        names.append("timestep_cond")
    if getattr(cfg, "num_class_embeds", None) or getattr(cfg, "class_embed_type", None):
        names.append("class_labels")
    return names


def example_inputs(unet: nn.Module, batch: int = 2, sequence: int = 8) -> tuple[torch.Tensor, ...]:
    """Tracing inputs, in input order: ``sample``, ``timestep`` (rank 0), then :func:`cond_inputs`."""
    cfg = unet.config
    c, s = cfg.in_channels, cfg.sample_size
    s = s if isinstance(s, int) else s[0]
    held = getattr(getattr(unet, "gaq_info", None), "held_out", None)
    out = [torch.zeros(batch, *held.x.shape[1:]) if held is not None else torch.zeros(batch, c, s, s), torch.tensor(500.0)]
    for name in cond_inputs(unet):
        if held is not None and name in held.cond:  # the recorded shapes and dtypes (e.g. the refiner's 5 time ids)
            v = held.cond[name]
            out.append(torch.zeros(batch, *v.shape[1:], dtype=torch.long if not v.is_floating_point() else torch.float32))
        elif name == "encoder_hidden_states":
            out.append(torch.zeros(batch, sequence, cfg.cross_attention_dim))
        elif name.endswith("text_embeds"):
            out.append(torch.zeros(batch, cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim))
        elif name.endswith("time_ids"):
            out.append(torch.zeros(batch, 6))
        elif name == "timestep_cond":
            out.append(torch.zeros(batch, cfg.time_cond_proj_dim))
        else:
            out.append(torch.zeros(batch, dtype=torch.long))
    return tuple(out)


def dynamic_axes(unet: nn.Module) -> dict[str, dict[int, str]]:
    axes = {"sample": {0: "batch", 2: "height", 3: "width"}, OUTPUT_NAME: {0: "batch", 2: "height", 3: "width"}}
    for name in cond_inputs(unet):
        axes[COND_INPUTS[name]] = {0: "batch", 1: "sequence"} if name == "encoder_hidden_states" else {0: "batch"}
    return axes


class UNetGraph(nn.Module):
    """The traced module: plain float32 tensors in and out (a half-precision UNet casts at the boundary),
    the rank-0 (or ``[1]``) timestep broadcast to the batch, SDXL's inputs gathered into ``added_cond_kwargs``."""

    def __init__(self, unet: nn.Module, half: bool = False):
        super().__init__()
        self.unet, self.half, self.names = unet, half, cond_inputs(unet)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
        t = timestep.reshape(-1).expand(sample.shape[0])
        kwargs: dict = {}
        for name, v in zip(self.names, cond):
            if self.half and v.is_floating_point():
                v = v.half()
            head, _, tail = name.partition(".")
            if tail:
                kwargs.setdefault(head, {})[tail] = v
            else:
                kwargs[name] = v
        out = self.unet(sample.half() if self.half else sample, t, **kwargs).sample
        return out.float()
