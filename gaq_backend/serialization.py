"""Save a quantized UNet as a self-contained folder and load it back as a fake-quant torch model.

Folder layout (one contract: what ``save_quantized`` writes, ``load_quantized`` reads, and export needs
nothing else): ``quantized_unet.safetensors`` (integer weights as int8, scales, zero-points, activation
ranges, and the float weights of layers kept in full precision), ``unet_config.json`` (the diffusers
config with ``_class_name``), ``scheduler_config.json``, ``recipe.yaml`` (the quantization settings),
``inputs.json`` (the recorded forward-input signature) and ``held_out_inputs.safetensors`` (up to 64
held-out recorded inputs with the FP outputs, for the export parity check).
"""
from __future__ import annotations

import dataclasses
import json
import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import QuantConfig
from .quantizers import output_correction
from .sampling import model_dtype
from .utils.errors import library_logs_as_warnings, one_line
from .utils.inputs import check_input, read_json_object
from .utils.io import read_manifest
from .wrapping import quant_layers

WEIGHTS_FILE = "quantized_unet.safetensors"
UNET_CONFIG_FILE = "unet_config.json"
SCHEDULER_FILE = "scheduler_config.json"
SIGNATURE_FILE = "inputs.json"
HELD_OUT_FILE = "held_out_inputs.safetensors"


def denoiser_class(name: str):
    """The diffusers model class of that name (any ``ModelMixin``: UNets and diffusion transformers), or None.
    Built from its JSON config, never unpickled."""
    import diffusers

    cls = getattr(diffusers, name, None) if name.isidentifier() else None
    return cls if isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin) else None
FOLDER_FILES = (WEIGHTS_FILE, UNET_CONFIG_FILE, SCHEDULER_FILE, "recipe.yaml", SIGNATURE_FILE, HELD_OUT_FILE)


def quantized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict without the float weights that integer weights replace; integer weights as int8 / uint8 codes."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for name, layer in quant_layers(model):
        if layer.weight_int is not None:
            del state[f"{name}.weight"]
            state[f"{name}.weight_int"] = layer.weight_int.to("cpu")
    return state


def save_quantized(model: nn.Module, folder: str, scheduler_config: dict | None = None, recipe=None,
                   overwrite: bool = False) -> str:
    """Save the quantized ``model`` (from :func:`gaq_backend.quantize`) as a ``gaq quantize``-style folder,
    atomically, through gaq's output writer (an existing folder only if it is a gaq output, or with
    ``overwrite``; see :mod:`gaq_backend.utils.io`). Returns the folder."""
    from .utils.io import output_dir

    with output_dir(folder, "quantized", overwrite, files=FOLDER_FILES) as tmp:
        write_quantized(model, tmp, scheduler_config, recipe)
    return folder


def write_quantized(model: nn.Module, folder: str, scheduler_config: dict | None = None, recipe=None) -> None:
    """Write the folder's files into the existing ``folder``. ``recipe`` defaults to one built from
    ``model.gaq_info.config`` (``model: user``: the base model of an API call is not a path gaq knows)."""
    from .recipe import USER_MODEL, Recipe, dump_recipe

    info = getattr(model, "gaq_info", None)
    if info is None:
        raise ValueError("save_quantized needs a model quantized by gaq_backend.quantize (it has no gaq_info)")
    if denoiser_class(type(model).__name__) is None:
        raise ValueError(f"save_quantized supports diffusers models (UNets, diffusion transformers); got {type(model).__name__}")
    save_file(quantized_state_dict(model), os.path.join(folder, WEIGHTS_FILE), metadata={"format": "gaq-fakequant-1"})
    config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    with open(os.path.join(folder, UNET_CONFIG_FILE), "w") as f:
        json.dump({"_class_name": type(model).__name__, "_gaq_dtype": str(model_dtype(model)).replace("torch.", ""), **config},
                  f, indent=2, default=list)
    with open(os.path.join(folder, SCHEDULER_FILE), "w") as f:
        json.dump(dict(scheduler_config or {}), f, indent=2, default=list)
    if recipe is None:
        cfg = info.config
        recipe = Recipe(model=USER_MODEL, algorithm=cfg.algorithm.name, calibration=cfg.calibration, settings=cfg.algorithm,
                        quantization=dataclasses.replace(cfg, algorithm=None), name="user")
    elif (recipe.quantization.keep_fp, recipe.quantization.w_bits_by_layer) != (info.config.keep_fp, info.config.w_bits_by_layer):
        # what was kept (with the layers found by role) and the weight bits by layer (with those mixed precision chose)
        recipe = dataclasses.replace(recipe, quantization=dataclasses.replace(
            recipe.quantization, keep_fp=list(info.config.keep_fp), w_bits_by_layer=dict(info.config.w_bits_by_layer)))
    dump_recipe(recipe, os.path.join(folder, "recipe.yaml"))
    if info.held_out is not None and len(info.held_out):
        held = info.held_out
        tensors = {"x": held.x, "t": held.t, "eps": held.eps, **{f"cond.{k}": v for k, v in held.cond.items()}}
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, os.path.join(folder, HELD_OUT_FILE))
        signature = {"sample": _spec(held.x), "timestep": _spec(held.t), **{k: _spec(v) for k, v in held.cond.items()}}
        with open(os.path.join(folder, SIGNATURE_FILE), "w") as f:
            json.dump(signature, f, indent=2)


def cast_model_weights(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the model's own floating weights and buffers to ``dtype``; quantizer scales, zero-points and
    per-timestep tables stay float32 (half precision would move their rounding boundaries)."""
    from .quantizers import UniformQuantizer
    from .quantizers.timestep import TimestepRanges

    def walk(m: nn.Module) -> None:
        if isinstance(m, (UniformQuantizer, TimestepRanges)):
            return
        for name, p in m.named_parameters(recurse=False):
            if p.is_floating_point():
                p.data = p.data.to(dtype)
        for name, b in m.named_buffers(recurse=False):
            if b is not None and b.is_floating_point():
                setattr(m, name, b.to(dtype))
        for child in m.children():
            walk(child)
    walk(model)


def _spec(v: torch.Tensor) -> dict:
    """A recorded input per row: dtype and shape without the batch axis."""
    return {"dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape[1:])}


def load_held_out(folder: str):
    """The held-out recorded inputs saved with a quantized folder, as a CalibrationSet (None if absent)."""
    from .calibration import CalibrationSet

    path = os.path.join(folder, HELD_OUT_FILE)
    if not os.path.isfile(path):
        return None
    d = _read_weights(path)
    n = d["x"].shape[0]
    zeros = torch.zeros(n, dtype=torch.long, device="cpu")
    cond = {k[len("cond."):]: v for k, v in d.items() if k.startswith("cond.")}
    return CalibrationSet(d["x"], d["t"], d["eps"], zeros, torch.ones(n, dtype=torch.bool, device="cpu"), zeros, cond)


def _prepare_timestep_tables(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give quantizers saved with per-timestep ranges (``temporal``) an empty table to load into."""
    from .quantizers.timestep import TimestepRanges, install_timestep_hook

    suffix = ".timestep_ranges.t"
    tables = {k[: -len(suffix)]: v.numel() for k, v in state.items() if k.endswith(suffix)}
    for name, n in tables.items():
        model.get_submodule(name).timestep_ranges = TimestepRanges(n, device="cpu")  # loading builds on the CPU
    if tables:
        install_timestep_hook(model)


def read_output_configs(folder: str) -> tuple[dict, "object"]:
    """(scheduler config, recipe) of a folder written by ``gaq quantize``, without building the model."""
    from .recipe import load_recipe

    check_input(folder, "the quantized folder", "folder")
    manifest = read_manifest(folder)
    if manifest is not None and (manifest["kind"] != "quantized" or not manifest.get("complete", False)):
        what = f"a gaq {manifest['kind']} output" if manifest["kind"] != "quantized" else "incomplete (a run writing it was interrupted)"
        raise ValueError(f"{folder} is {what}; run gaq quantize again")
    missing = [f for f in (WEIGHTS_FILE, UNET_CONFIG_FILE, SCHEDULER_FILE, "recipe.yaml") if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise FileNotFoundError(f"{folder} is not a gaq quantized output directory (missing {', '.join(missing)})")
    _check_weights_header(os.path.join(folder, WEIGHTS_FILE))
    return read_json_object(os.path.join(folder, SCHEDULER_FILE)), load_recipe(os.path.join(folder, "recipe.yaml"))


def _check_weights_header(path: str) -> None:
    """Cheap: the header must parse and cover the file exactly (catches truncation before any long work)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            f.keys()
    except Exception as e:  # safetensors' own error type
        raise ValueError(f"{path}: not a readable safetensors file ({one_line(e, 160)})") from None


def _read_weights(path: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except Exception as e:  # safetensors' own error type for truncated or garbage files
        raise ValueError(f"{path}: not a readable safetensors file ({one_line(e, 160)})") from None


def load_quantized(folder: str) -> tuple[nn.Module, dict, "object"]:
    """Returns (fake-quant UNet, scheduler config, recipe) from a folder written by ``gaq quantize``."""
    import diffusers

    from .api import QuantizationInfo, wrap_for_config

    sched_cfg, recipe = read_output_configs(folder)
    raw_cfg = read_json_object(os.path.join(folder, UNET_CONFIG_FILE))
    cls_name = raw_cfg.get("_class_name", "UNet2DModel")  # folders written before the class was recorded
    if denoiser_class(cls_name) is None:
        raise ValueError(f"{folder}/{UNET_CONFIG_FILE}: {cls_name!r} is not a diffusers model class gaq can build")
    unet_cfg = {k: v for k, v in raw_cfg.items() if not k.startswith("_")}
    try:
        with torch.device("cpu"), library_logs_as_warnings():  # reloads build on the host; the caller moves the model
            model = denoiser_class(cls_name).from_config(unet_cfg)
    except Exception as e:  # diffusers raises TypeError / ValueError / KeyError for a config it cannot build
        raise ValueError(f"{folder}/{UNET_CONFIG_FILE}: not a {cls_name} config ({one_line(e, 160)})") from None
    qcfg: QuantConfig = recipe.quant_config()
    wrap_report = wrap_for_config(model, qcfg)
    state = _read_weights(os.path.join(folder, WEIGHTS_FILE))
    _prepare_timestep_tables(model, state)
    output_correction.prepare_for_state(model, state)
    for name, layer in quant_layers(model):
        key = f"{name}.weight_int"
        if key in state:
            layer.weight_int = state[key].to(layer.weight_quantizers[0].code_dtype)
            state[key] = layer.weight_int
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches: torch lists every one, over many lines
        first = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
        raise ValueError(f"{folder}: {WEIGHTS_FILE} does not fit the model in {UNET_CONFIG_FILE} ({first})") from None
    expected_missing = {f"{n}.weight" for n, l in quant_layers(model) if l.weight_int is not None}
    if set(result.missing_keys) != expected_missing or result.unexpected_keys:
        bad = sorted(set(result.missing_keys) ^ expected_missing) + list(result.unexpected_keys)
        raise ValueError(f"{folder}: quantized state does not match its recipe's model ({bad[:3]} ...)")
    with torch.no_grad():
        for _, layer in quant_layers(model):
            if layer.weight_int is not None:
                layer.weight.data.copy_(layer.quantized_weight())
    dtype = getattr(torch, raw_cfg.get("_gaq_dtype", "float32"), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{folder}/{UNET_CONFIG_FILE}: _gaq_dtype {raw_cfg.get('_gaq_dtype')!r} is not a float dtype")
    if dtype != torch.float32:  # the weights were stored in the model's dtype; compute in it again
        cast_model_weights(model, dtype)
    model.eval().requires_grad_(False)
    model.gaq_info = QuantizationInfo(qcfg, wrap_report, held_out=load_held_out(folder))
    return model, sched_cfg, recipe
