"""The ONNX interface of an exported denoiser: Hugging Face Optimum's contracts.

UNets (first input ``sample``), as Optimum's UNet export:

Inputs ``sample`` (float32, ``[batch, C, H, W]``), ``timestep`` (float32, rank 0 as Optimum exports it;
onnx.checker requires a declared shape on graph inputs, so a raw onnxruntime session rejects a
``[1]``-shaped feed: gaq's runtime helpers reshape it), and the conditioning inputs the UNet
takes: ``encoder_hidden_states`` (``[batch, sequence, cross_attention_dim]``), ``text_embeds`` and
``time_ids`` (SDXL's ``addition_embed_type="text_time"``), ``timestep_cond`` (``time_cond_proj_dim``),
``class_labels`` (int64 ``[batch]``). Output ``out_sample``. One timestep per call, as a pipeline feeds
it: every row of a batch is at the same timestep.

Diffusion transformers (first input ``hidden_states``), as Optimum's SD3 / Flux transformer exports: the
recorded inputs, in recorded order, under their own names (``hidden_states``, ``timestep`` float32
``[batch]``, ``encoder_hidden_states``, ``pooled_projections``, ``guidance``, ``encoder_attention_mask``,
``class_labels``; Flux's ``img_ids`` / ``txt_ids`` without a batch axis, as recorded) and output
``out_hidden_states``. Batch and text length are dynamic; the resolution is the recorded one. The inputs come from what the model was calibrated with, not from a list per class:
Optimum has no ONNX config for DiT or PixArt, and the same rule gives theirs.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

OUTPUT_NAME = "out_sample"
TRANSFORMER_OUTPUT = "out_hidden_states"
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


# -- diffusion transformers: the recorded inputs are the contract --------------------------------------------------
def is_unet(model: nn.Module) -> bool:
    from gaq_backend.calibration.recorder import input_name

    return input_name(model) == "sample"


def transformer_inputs(model: nn.Module) -> list[str]:
    """Recorded names of a transformer's conditioning inputs, in recorded order (from its held-out inputs)."""
    held = getattr(getattr(model, "gaq_info", None), "held_out", None)
    if held is None:
        raise ValueError(f"{type(model).__name__}: exporting a diffusion transformer needs its recorded held-out inputs "
                         "(quantize it again with this gaq)")
    return list(held.cond)


def onnx_name(recorded: str) -> str:
    return recorded.rsplit(".", 1)[-1]   # added_cond_kwargs.text_embeds -> text_embeds, unbatched.img_ids -> img_ids


def graph_io(model: nn.Module, batch: int = 2) -> tuple[list[str], list[str], tuple, dict]:
    """(input names, output names, tracing inputs, dynamic axes) of ``model``'s exported graph."""
    if is_unet(model):
        names = ["sample", "timestep", *(COND_INPUTS[n] for n in cond_inputs(model))]
        return names, [OUTPUT_NAME], example_inputs(model, batch), dynamic_axes(model)
    from gaq_backend.calibration.calibration_set import UNBATCHED
    from gaq_backend.calibration.recorder import input_name

    held = model.gaq_info.held_out.spread(batch)
    first = input_name(model)
    inputs = [held.x.float(), held.t.float()]
    # dynamic batch and text length; the resolution (token count) stays the recorded one (TransformerGraph.forward)
    axes = {first: {0: "batch"}, "timestep": {0: "batch"}, TRANSFORMER_OUTPUT: {0: "batch"}}
    for k in transformer_inputs(model):
        v = held.cond[k]
        if k.startswith(UNBATCHED):   # position ids of the recorded resolution: as fixed as the tokens
            inputs.append(v[0])
        else:
            inputs.append(v.float() if v.is_floating_point() else v)
            axes[onnx_name(k)] = {0: "batch", **({1: "sequence"} if v.dim() == 3 or (v.dim() == 2 and not v.is_floating_point()) else {})}
    return [first, "timestep", *map(onnx_name, transformer_inputs(model))], [TRANSFORMER_OUTPUT], tuple(inputs), axes


class TransformerGraph(nn.Module):
    """The traced module of a diffusion transformer: float32 in and out, a ``[batch]`` timestep (Optimum's), the
    recorded inputs by recorded name (nested and unbatched ones as the model takes them)."""

    def __init__(self, model: nn.Module, half: bool = False):
        super().__init__()
        self.unet, self.half, self.names = model, half, transformer_inputs(model)   # ``unet``: the node scopes start /unet

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
        from gaq_backend.calibration.calibration_set import UNBATCHED
        from gaq_backend.calibration.recorder import input_name

        kwargs: dict = {}
        for name, v in zip(self.names, cond):
            if self.half and v.is_floating_point() and not name.startswith(UNBATCHED):
                v = v.half()
            head, _, tail = name.partition(".")
            if name.startswith(UNBATCHED):
                kwargs[tail] = v
            elif tail:
                kwargs.setdefault(head, {})[tail] = v
            else:
                kwargs[name] = v
        kwargs[input_name(self.unet)] = x.half() if self.half else x
        with static_squeeze():
            return self.unet(timestep=timestep, **kwargs).sample.float()


@contextlib.contextmanager
def static_squeeze():
    """Two tensor methods as torch's exporter needs them, while tracing a transformer:

    - ``t.squeeze(d)`` of a non-batch axis whose size is not 1 is a no-op, decided while tracing: the exported
      resolution is fixed, and the exporter would otherwise emit an If on the axis size (PixArt's unpatchify)
      whose unused branch fails ONNX shape inference;
    - ``t.unflatten(d, sizes)`` is a reshape on the traced shape: the exporter's own symbolic writes the traced
      batch into the target shape (Flux's ``query.unflatten(-1, (heads, -1))`` then ran at that batch only)."""
    squeeze, unflatten = torch.Tensor.squeeze, torch.Tensor.unflatten

    def fixed(self, *dims, **kw):
        dims = dims or tuple(kw.values())
        if len(dims) == 1 and isinstance(dims[0], int) and dims[0] != 0 and self.shape[dims[0]] != 1:
            return self
        return squeeze(self, *dims)

    def reshaped(self, dim, sizes):
        d = dim % self.dim()
        return self.reshape(*self.shape[:d], *sizes, *self.shape[d + 1:])

    torch.Tensor.squeeze, torch.Tensor.unflatten = fixed, reshaped
    try:
        yield
    finally:
        torch.Tensor.squeeze, torch.Tensor.unflatten = squeeze, unflatten


@contextlib.contextmanager
def decomposed_rms_norm():
    """``torch.nn.functional.rms_norm`` (``torch.nn.RMSNorm``: Flux's query/key norms) as its arithmetic: torch's
    exporter has no symbolic for it below opset 23 (RMSNormalization), and onnxruntime runs the arithmetic anyway."""
    import torch.nn.functional as F

    rms_norm = F.rms_norm

    def arithmetic(x, normalized_shape, weight=None, eps=None):
        dims = tuple(range(-len(normalized_shape), 0))
        eps = torch.finfo(x.dtype).eps if eps is None else eps
        y = x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)
        return y * weight if weight is not None else y

    F.rms_norm = arithmetic
    try:
        yield
    finally:
        F.rms_norm = rms_norm


def graph_module(model: nn.Module, half: bool = False) -> nn.Module:
    return UNetGraph(model, half) if is_unet(model) else TransformerGraph(model, half)
