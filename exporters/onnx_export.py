"""``gaq export``: a quantized output directory -> one ONNX graph with Q/DQ nodes.

The graph is traced by torch's TorchScript exporter through :mod:`exporters.qdq_forms` (opset 20 at
most), then finished here: converted to the requested opset, 4-bit weights narrowed to INT4
initializers when asked, metadata attached, written atomically (external data for large models), and
validated (:mod:`exporters.validate`) before the file is put in place.
"""
from __future__ import annotations

import io
import json
from collections import Counter
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from gaq_backend.utils.io import check_output_file, clean_stale_tmp, tmp_prefix, umask_mode, write_faults_as_errors, write_json
from gaq_backend.wrapping import quant_layers

from .qdq_forms import export_forms, float_block_linear_inputs
from .signature import COND_INPUTS, decomposed_rms_norm, graph_io, graph_module, is_unet

MIN_OPSET = 13          # per-axis DequantizeLinear
INT4_MIN_OPSET = 21     # INT4 / UINT4 tensors
TRACE_MAX_OPSET = 20    # the TorchScript exporter's ceiling; higher opsets are reached by conversion
IR_VERSION = 10         # what onnxruntime 1.2x loads (onnx 1.23 would write 11+)
EXTERNAL_DATA_BYTES = 1 << 30


@dataclass
class ExportResult:
    path: str
    weights: str
    opset: int
    n_quantize: int
    n_dequantize: int
    file_mb: float
    parity: dict[str, Any] = field(default_factory=dict)


def trace_to_onnx(unet: nn.Module, opset: int, half: bool = False) -> onnx.ModelProto:
    """Trace ``unet`` (with whatever forwards it has now) to an in-memory ONNX model with a dynamic batch axis."""
    buf = io.BytesIO()
    # the tracer warns about every shape-dependent Python branch in diffusers; the dynamic-batch check
    # in validation is what tells whether the graph generalises
    names, outputs, example, axes = graph_io(unet)
    with torch.no_grad(), warnings.catch_warnings(), decomposed_rms_norm():
        warnings.simplefilter("ignore")
        torch.onnx.export(graph_module(unet, half).eval(), example, buf, dynamo=False,
                          opset_version=min(opset, TRACE_MAX_OPSET), input_names=names,
                          output_names=outputs, do_constant_folding=True, dynamic_axes=axes)
    model = onnx.load_from_string(buf.getvalue())
    _undo_initializer_sharing(model)
    _quantize_after_transpose(model)
    if opset > TRACE_MAX_OPSET:
        from onnx import version_converter

        model = version_converter.convert_version(model, opset)
    # intermediate shape annotations: runtimes re-infer them (~10% of a small file); an If's outputs keep theirs,
    # which inference cannot derive from its branches (a dynamic squeeze in PixArt's unpatchify)
    if_outputs = {o for n in model.graph.node if n.op_type == "If" for o in n.output}
    kept = [v for v in model.graph.value_info if v.name in if_outputs]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    _shorten_value_names(model)
    model.ir_version = min(model.ir_version, IR_VERSION)
    return model


def _undo_initializer_sharing(model: onnx.ModelProto) -> None:
    """The exporter shares equal initializers through Identity nodes (all zero-points are one tensor);
    give each user its own copy, so that every Q/DQ reads constant initializers (what TensorRT and
    onnxruntime's Q/DQ propagation at opset 21 expect)."""
    inits = {t.name: t for t in model.graph.initializer}
    keep = []
    for node in model.graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[node.input[0]])
            copy.name = node.output[0]
            model.graph.initializer.append(copy)
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)


def _quantize_after_transpose(model: onnx.ModelProto) -> int:
    """Rewrite ``Q -> DQ -> Transpose`` (the attention key, quantized before ``k^T``) as
    ``Transpose -> Q -> DQ``: the same values for a per-tensor quantizer, and DQ then feeds the MatMul
    directly. onnxruntime 1.31 at opset 21 otherwise moves the pair itself and builds an invalid
    QuantizeLinear (zero-point type mismatch) at session creation."""
    nodes = list(model.graph.node)
    consumers: dict[str, list] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    producer = {o: n for n in nodes for o in n.output}
    moved = 0
    for t in [n for n in nodes if n.op_type == "Transpose"]:
        dq = producer.get(t.input[0])
        q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear" or any(a.name == "axis" for a in dq.attribute):
            continue
        if len(consumers[dq.output[0]]) != 1 or len(consumers[q.output[0]]) != 1:
            continue
        src, out = q.input[0], t.output[0]
        t.input[0], t.output[0] = src, out + "_pre_q"
        q.input[0], dq.output[0] = t.output[0], out
        nodes.remove(t)
        nodes.insert(nodes.index(q), t)
        moved += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return moved


def _shorten_value_names(model: onnx.ModelProto) -> None:
    """Name intermediate tensors ``v0, v1, ...``: the exporter's names repeat the producing node's name
    (which is kept, with its module path), and in a small INT4 model they were a quarter of the file."""
    keep = {o.name for o in model.graph.output} | {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer}
    keep |= {name for node in model.graph.node for a in node.attribute if a.type == onnx.AttributeProto.GRAPH
             for sub in a.g.node for name in sub.input}   # a subgraph (an If branch) reads outer values by name
    keep |= {v.name for v in model.graph.value_info}                  # the annotations trace_to_onnx kept (an If's outputs)
    new: dict[str, str] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in new:
                node.input[i] = new[name]
        for i, name in enumerate(node.output):
            if name and name not in keep:
                new[name] = node.output[i] = f"v{len(new)}"


def _int4_tensor(name: str, arr: np.ndarray, signed: bool) -> onnx.TensorProto:
    """Two values per byte, the first in the low nibble (the ONNX layout), as raw data."""
    nibbles = (arr.astype(np.int8).ravel().view(np.uint8) & 0x0F).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    packed = nibbles[0::2] | (nibbles[1::2] << 4)
    t = onnx.TensorProto(name=name, data_type=TensorProto.INT4 if signed else TensorProto.UINT4, dims=list(arr.shape))
    t.raw_data = packed.tobytes()
    return t


def _narrow_to_int4(model: onnx.ModelProto, wide_layers: set[str] = frozenset()) -> int:
    """Rewrite the int8/uint8 weight initializers of DequantizeLinear nodes (and their zero-points) as
    INT4/UINT4, except those of ``wide_layers`` (a mixed-precision model's layers with more than 4-bit weights,
    which stay INT8). Returns how many were rewritten; refuses values outside the 4-bit range."""
    inits = {t.name: t for t in model.graph.initializer}
    done, found = 0, set()
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        layer = node.input[0].rpartition(".qdq_weight")[0]   # the initializer is named <prefix>.<layer>.qdq_weight<i>
        wide = next((w for w in wide_layers if layer == w or layer.endswith("." + w)), None)
        if wide is not None:
            found.add(wide)
            continue
        names = [node.input[0]] + ([node.input[2]] if len(node.input) > 2 and node.input[2] in inits else [])
        for name in names:
            t = inits[name]
            if t.data_type in (TensorProto.INT4, TensorProto.UINT4):
                continue
            arr = numpy_helper.to_array(t)
            signed = t.data_type == TensorProto.INT8
            lo, hi = (-8, 7) if signed else (0, 15)
            if arr.size and (arr.min() < lo or arr.max() > hi):
                raise ValueError(f"weight {name} holds values in [{arr.min()}, {arr.max()}], outside the 4-bit range "
                                 f"[{lo}, {hi}]; export it with --weights int8")
            t.CopyFrom(_int4_tensor(name, arr, signed))
        done += 1
    if found != set(wide_layers):   # a renamed initializer would otherwise be narrowed and refused as out of range
        raise ValueError(f"the graph has no weight initializer for {sorted(set(wide_layers) - found)[0]}, a layer with "
                         "8-bit weights; cannot tell which weights to keep at 8 bits")
    return done


def _set_metadata(model: onnx.ModelProto, meta: dict[str, Any]) -> None:
    helper.set_model_props(model, {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()})


def save_model_atomic(model: onnx.ModelProto, out: str, external_data: bool | None = None,
                      check: Callable[[str], Any] | None = None, overwrite: bool = False) -> Any:
    """Write ``out`` (and ``out.data`` for external data) under a temporary folder, run ``check`` on the
    written file, and only then move it into place: a failed check or an interrupt leaves no file that
    looks complete, and an earlier ``out`` untouched. Returns what ``check`` returned."""
    out = check_onnx_out(out, overwrite)
    if external_data is None:
        external_data = model.ByteSize() > EXTERNAL_DATA_BYTES
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    clean_stale_tmp(parent)
    tmp = tempfile.mkdtemp(prefix=tmp_prefix(os.path.basename(out)), dir=parent)
    name, data_name = os.path.basename(out), os.path.basename(out) + ".data"
    try:
        with write_faults_as_errors(out):
            onnx.save_model(model, os.path.join(tmp, name), save_as_external_data=external_data,
                            all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
        result = check(os.path.join(tmp, name)) if check else None
        for f in os.listdir(tmp):
            os.chmod(os.path.join(tmp, f), umask_mode(0o666))  # onnx writes external data as 0600
        if external_data:
            os.replace(os.path.join(tmp, data_name), os.path.join(parent, data_name))
        elif os.path.exists(os.path.join(parent, data_name)) and owns_external_data(out):
            os.remove(os.path.join(parent, data_name))  # stale data of an earlier external-data export
        os.replace(os.path.join(tmp, name), out)
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_header(path: str) -> onnx.ModelProto | None:
    try:
        return onnx.load(path, load_external_data=False)
    except Exception:  # not ONNX at all
        return None


def is_gaq_onnx(path: str) -> bool:
    """Whether ``path`` is an ONNX file gaq wrote (its metadata names gaq), so a new export may replace it."""
    model = _load_header(path)
    return model is not None and any(p.key == "gaq.version" for p in model.metadata_props)


def owns_external_data(path: str) -> bool:
    """Whether ``path + ".data"`` is the external data of the gaq ONNX file at ``path``."""
    model = _load_header(path) if is_gaq_onnx(path) else None
    name = os.path.basename(path) + ".data"
    return model is not None and any(e.key == "location" and e.value == name
                                     for t in model.graph.initializer for e in t.external_data)


def _is_gaq_unet_config(path: str) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            return "_gaq_export" in json.load(f)
    except (OSError, ValueError, TypeError):
        return False


def check_onnx_out(out: str, overwrite: bool = False, flag: str = "--out") -> str:
    """The export target and its ``.data`` file may be replaced only if gaq wrote them (or with ``overwrite``)."""
    check_output_file(out, overwrite, is_gaq_onnx, flag=flag)
    check_output_file(out + ".data", overwrite, lambda p: owns_external_data(out), flag=f"{flag} (its .data file)")
    return os.path.abspath(out)


def file_mb(path: str) -> float:
    """Size of an exported model in MiB, its external data included."""
    data = path + ".data"
    return (os.path.getsize(path) + (os.path.getsize(data) if os.path.exists(data) else 0)) / 2**20


def build_quantized_onnx(unet: nn.Module, weights: str, opset: int, metadata: dict[str, Any]) -> onnx.ModelProto:
    """The Q/DQ graph of a loaded fake-quant UNet (no validation, nothing written)."""
    if weights not in ("int4", "int8"):
        raise ValueError(f"--weights must be int4 or int8; got {weights!r}")
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is too old: per-channel DequantizeLinear needs opset {MIN_OPSET} or newer")
    if weights == "int4" and opset < INT4_MIN_OPSET:
        raise ValueError(f"--weights int4 needs opset {INT4_MIN_OPSET} or newer (INT4 tensors); got opset {opset}")
    wide = {n for n, layer in quant_layers(unet) if layer.weight_quantizers[0].enabled and layer.weight_quantizers[0].bits > 4}
    with export_forms(unet):
        model = trace_to_onnx(unet, opset)
    if weights == "int4":
        _narrow_to_int4(model, wide)
    _set_metadata(model, {**metadata, "gaq.weights": weights, "gaq.opset": str(opset)})
    return model


def export_quantized(folder: str, out: str, weights: str = "int8", opset: int = 21, check_samples: int = 64,
                     external_data: bool | None = None, progress: bool = True, overwrite: bool = False,
                     runtime: str = "onnxruntime", matmul_nbits: bool = False) -> ExportResult:
    """Export a ``gaq quantize`` output directory to ``out``; validate before writing; return what was done.
    ``matmul_nbits``: Linear layers with block-wise weights (``quantization.w_block_size``) lose their input Q/DQ so
    that onnxruntime runs them as MatMulNBits (:func:`~exporters.qdq_forms.float_block_linear_inputs`); the
    parity check compares with the model computing those inputs in float."""
    from gaq_backend import __version__, load_quantized
    from gaq_backend.sampling import model_dtype
    from gaq_backend.serialization import cast_model_weights

    from .parity_reference import held_out_inputs, parity_inputs
    from .validate import validate

    check_onnx_out(out, overwrite)
    # Optimum's layout (unet/model.onnx) needs the diffusers config beside the file; other names get none
    config_path = os.path.join(os.path.dirname(os.path.abspath(out)), "config.json") if os.path.basename(out) == "model.onnx" else None
    if config_path:
        check_output_file(config_path, False, _is_gaq_unet_config, flag="--out (the config.json beside it)")
    unet, sched_cfg, recipe = load_quantized(folder)
    source_dtype = model_dtype(unet)
    if source_dtype != torch.float32:
        # the graph computes in float32 with the same integers and scales (half-precision FP weights are exact in float32)
        cast_model_weights(unet, torch.float32)
    qcfg = recipe.quant_config()
    with open(os.path.join(folder, "recipe.yaml")) as f:
        recipe_text = f.read()
    meta = {"gaq.version": __version__, "gaq.algorithm": recipe.algorithm, "gaq.w_bits": str(qcfg.w_bits),
            "gaq.a_bits": str(qcfg.a_bits), "gaq.recipe": recipe_text, "gaq.scheduler_config": sched_cfg,
            "gaq.sampler": recipe.sampler.to_dict(),
            "gaq.sample_shape": sample_shape(unet),
            "gaq.source_dtype": str(source_dtype).replace("torch.", "")}
    if qcfg.w_bits_by_layer:
        meta["gaq.w_bits_by_layer"] = qcfg.w_bits_by_layer
    if weights == "int4" and qcfg.w_bits > 4:
        raise ValueError(f"--weights int4 cannot hold W{qcfg.w_bits} weights; use --weights int8")
    if matmul_nbits:
        if weights != "int4":
            raise ValueError("--matmul-nbits needs --weights int4 (MatMulNBits reads 4-bit weights)")
        n = float_block_linear_inputs(unet)
        if not n:
            raise ValueError(f"--matmul-nbits: {folder} has no Linear layer with block-wise weights; quantize with "
                             "quantization.w_block_size (e.g. 32)")
        meta["gaq.matmul_nbits"] = f"{n} Linear layers: DequantizeLinear(W, blocks of {qcfg.w_block_size}) -> MatMul, float input"
    model = build_quantized_onnx(unet, weights, opset, meta)
    x, t, cond = held_out_inputs(unet, check_samples) or parity_inputs(recipe, sched_cfg, check_samples, progress)
    x, cond = x.float(), {k: v.float() if v.is_floating_point() else v for k, v in cond.items()}
    extra = sorted(set(cond) - set(COND_INPUTS)) if is_unet(unet) else []   # a transformer's contract is what it recorded
    if extra:
        raise ValueError(f"the UNet was calibrated with inputs outside the exported contract ({', '.join(extra)}); "
                         "the ONNX graph could not take them")
    parity = save_model_atomic(model, out, external_data, check=lambda path: validate(path, unet, x, t, cond, runtime), overwrite=overwrite)
    if config_path:
        write_json(config_path, {"_class_name": type(unet).__name__, "_gaq_export": os.path.basename(out),
                                 **{k: v for k, v in dict(unet.config).items() if not k.startswith("_")}})
    ops = Counter(n.op_type for n in model.graph.node)
    return ExportResult(out, weights, opset, ops["QuantizeLinear"], ops["DequantizeLinear"], file_mb(out), parity)


def sample_shape(model: nn.Module) -> list[int]:
    """One input row's shape: the recorded one where there is one (transformers take tokens or latents)."""
    held = getattr(getattr(model, "gaq_info", None), "held_out", None)
    if held is not None and not is_unet(model):
        return list(held.x.shape[1:])
    return [model.config.in_channels, model.config.sample_size, model.config.sample_size]


def export_fp(unet: nn.Module, out: str, opset: int = 21, half: bool = False) -> str:
    """The float baseline (FP32, or FP16 for GPUs) of a plain diffusers UNet, for benchmarks."""
    import copy

    from gaq_backend import __version__

    # tracing leaves the model as it is; only the half-precision cast needs a copy
    model = trace_to_onnx(copy.deepcopy(unet).half() if half else unet, opset, half)
    _set_metadata(model, {"gaq.version": __version__, "gaq.variant": "fp16" if half else "fp32"})
    save_model_atomic(model, out)
    return out
