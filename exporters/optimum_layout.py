"""``gaq export --optimum-from``: a copy of a Hugging Face Optimum ONNX pipeline folder with gaq's quantized UNet.

Optimum's ``optimum-cli export onnx --task text-to-image`` writes ``model_index.json``, ``scheduler/``,
``tokenizer/``, ``text_encoder/``, ``unet/``, ``vae_decoder/``, ``vae_encoder/`` (each part a ``model.onnx`` and
``config.json``), and ``ORTDiffusionPipeline.from_pretrained`` runs it. Optimum opens ``unet/model.onnx`` with a
plain InferenceSession and feeds it by name, so a Q/DQ UNet that keeps the contract (exporters/signature.py)
runs unchanged. The new folder is built beside its target and renamed into place; the source is only read.
"""
from __future__ import annotations

import os
import shutil
import tempfile

from gaq_backend.utils.inputs import InputError, check_input, read_json_object
from gaq_backend.utils.io import MANIFEST, OutputError, read_manifest, tmp_prefix, write_faults_as_errors, write_json

KIND = "optimum-pipeline"
# the keys that make a UNet the pipeline's: the quantized one must agree with Optimum's unet/config.json
SHAPE_KEYS = ("in_channels", "out_channels", "sample_size", "cross_attention_dim", "block_out_channels",
              "addition_embed_type", "time_cond_proj_dim")


def _files(root: str) -> set[str]:
    """Every file under ``root``, relative to it."""
    return {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs}


def check_optimum_dir(path: str) -> str:
    """The source must be an Optimum pipeline folder whose JSON files all parse: a broken one would be copied into
    a complete-looking folder that Optimum cannot load."""
    path = check_input(path, "--optimum-from", "folder")
    for need in ("model_index.json", os.path.join("unet", "model.onnx"), os.path.join("unet", "config.json")):
        if not os.path.isfile(os.path.join(path, need)):
            raise OutputError(f"--optimum-from {path}: no {need}; expected a folder written by "
                              "optimum-cli export onnx --task text-to-image")
    for name in sorted(f for f in _files(path) if f.endswith(".json")):
        read_json_object(os.path.join(path, name))
    index = read_json_object(os.path.join(path, "model_index.json"))
    unet = index.get("unet")
    if not isinstance(index.get("_class_name"), str) or not (isinstance(unet, list) and len(unet) == 2):
        raise InputError(f"--optimum-from {path}: model_index.json has no pipeline _class_name or no [library, class] "
                         "entry for unet; expected the index optimum-cli export onnx writes")
    return path


def _check_target(target: str, source: str) -> None:
    real, src = os.path.realpath(target), os.path.realpath(source)
    if real == src or real.startswith(src + os.sep) or src.startswith(real + os.sep):
        raise OutputError(f"--out {target} overlaps --optimum-from {source}; name a new folder outside it")
    if os.path.lexists(target):
        m = read_manifest(target) if os.path.isdir(target) else None
        if m is None or m.get("kind") != KIND:
            raise OutputError(f"--out {target} exists and is not a pipeline folder gaq wrote; name a new folder")
        foreign = sorted(_files(target) - {MANIFEST} - set(m.get("files", [])))
        if foreign:
            raise OutputError(f"--out {target} holds {', '.join(foreign[:3])} that gaq did not write; move them or name a new folder")


def _check_same_unet(unet_config: dict, optimum_config_path: str) -> None:
    theirs = read_json_object(optimum_config_path)
    diff = [k for k in SHAPE_KEYS if unet_config.get(k) != theirs.get(k)]
    if diff:
        k = diff[0]
        raise ValueError(f"the quantized UNet is not this pipeline's: {k} is {unet_config.get(k)!r} here and "
                         f"{theirs.get(k)!r} in {optimum_config_path}")


def export_into_optimum(quantized: str, optimum_dir: str, out: str, progress: bool = True, **export_options):
    """Copy ``optimum_dir`` to ``out`` with ``quantized``'s UNet exported into ``unet/`` (``export_options`` go to
    ``export_quantized``: weights, opset, runtime, ...); returns the export's result. ``out`` must be new, or a
    pipeline folder gaq wrote before (then it is replaced as a whole)."""
    from gaq_backend.serialization import UNET_CONFIG_FILE, read_output_configs

    from .onnx_export import export_quantized

    source = check_optimum_dir(optimum_dir)
    target = os.path.abspath(out)
    _check_target(target, source)
    read_output_configs(quantized)  # a complete gaq quantize output, or a one-line error
    _check_same_unet(read_json_object(os.path.join(quantized, UNET_CONFIG_FILE)), os.path.join(source, "unet", "config.json"))
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=tmp_prefix(os.path.basename(target)), dir=parent)
    try:
        built = os.path.join(tmp, "pipeline")
        # Optimum's FP UNet (model.onnx and its external weights) is the one part not copied
        with write_faults_as_errors(target):
            shutil.copytree(source, built, ignore=lambda d, names: names if os.path.samefile(d, os.path.join(source, "unet")) else [])
        result = export_quantized(quantized, os.path.join(built, "unet", "model.onnx"), progress=progress, **export_options)
        files = sorted(_files(built))
        write_json(os.path.join(built, MANIFEST), dict(kind=KIND, complete=True, files=files, source=source))
        if os.path.lexists(target):  # a previous gaq pipeline folder: swap, then remove the old one
            old = os.path.join(tmp, "old")
            os.replace(target, old)
        os.replace(built, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result

