"""Where do onnxruntime and the PyTorch fake-quant model part ways? (``gaq export --diagnose``)

The parity check compares the two at the output only. This runs both on the same held-out inputs and
compares every module's output: PyTorch's through forward hooks (in float32, and in float64 for the float
noise floor), onnxruntime's by making every node's output a graph output. The exporter keeps each module's
path in its node names (``/unet/down_blocks.0/resnets.0/conv1/Conv``), so a module's ONNX value is the
output of the last node inside its scope. Modules are listed in PyTorch's call order with

    drift = mean |onnxruntime - torch float32| / mean |torch float64 - torch float32|

(the ONNX graph's difference in units of PyTorch's own float-order noise). The first module whose drift
exceeds ``factor`` is where the divergence starts: everything after it inherits it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch
from torch import nn

from gaq_backend.sampling import unet_forward

from .validate import in_float64

ROOT_SCOPE = "/unet"   # exporters.onnx_export wraps the UNet in UNetGraph, whose attribute is ``unet``


@dataclass
class ModuleDrift:
    name: str
    kind: str
    onnx_node: str
    rel_diff: float        # mean |ort - torch32| / mean |torch32|
    float_noise: float     # mean |torch64 - torch32| / mean |torch32|
    drift: float           # rel_diff / float_noise


def scope_of(module_name: str) -> str:
    """ONNX scope of a module path: ModuleList indices stay with their list (``down_blocks.0/resnets.0/conv1``)."""
    parts: list[str] = []
    for p in module_name.split("."):
        if p.isdigit() and parts:
            parts[-1] += "." + p
        else:
            parts.append(p)
    return ROOT_SCOPE + "/" + "/".join(parts)


def _module_outputs(unet: nn.Module, x, t, cond) -> dict[str, np.ndarray]:
    """Output of every module called exactly once with one tensor out, in call order."""
    outs: dict[str, list] = {}
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: outs.setdefault(n, []).append(o))
             for n, m in unet.named_modules() if n]
    try:
        with torch.no_grad():
            unet_forward(unet, x, t, cond)
    finally:
        for h in hooks:
            h.remove()
    return {n: o[0].detach().double().numpy() for n, o in outs.items() if len(o) == 1 and isinstance(o[0], torch.Tensor)}


def _ort_values(model: onnx.ModelProto, x: torch.Tensor, t: torch.Tensor, cond: dict, wanted: list[str]) -> dict[str, np.ndarray]:
    """Every wanted value of one call (one timestep, as the exported contract takes it)."""
    import onnxruntime as ort

    from .ort_runtime import ORT_DTYPES, onnx_input_name

    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for name in wanted:
        if name not in have:
            m.graph.output.append(onnx.ValueInfoProto(name=name))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every intermediate value
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    declared = {i.name: ORT_DTYPES.get(i.type, np.float32) for i in sess.get_inputs()}
    feeds = {"sample": x.numpy().astype(declared["sample"]), "timestep": np.asarray(float(t.reshape(-1)[0]), dtype=declared["timestep"])}
    feeds.update({onnx_input_name(k): v.numpy().astype(declared[onnx_input_name(k)]) for k, v in cond.items()
                  if onnx_input_name(k) in declared})
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def diagnose(model: onnx.ModelProto, unet: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict | None = None,
             factor: float = 10.0) -> tuple[ModuleDrift | None, list[ModuleDrift]]:
    """(first module whose drift exceeds ``factor``, or None; every matched module in call order), on the first
    input row (the exported graph takes one timestep per call)."""
    cond = {k: v[:1] for k, v in (cond or {}).items()}
    x, t = x[:1], t.reshape(-1)[:1]
    x, cond = x.float(), {k: v.float() if v.is_floating_point() else v for k, v in cond.items()}  # what onnxruntime is fed
    t32 = _module_outputs(unet, x, t, cond)   # unet_forward casts the float inputs to each model's dtype
    t64 = _module_outputs(in_float64(unet), x, t.double() if t.is_floating_point() else t, cond)
    last_node: dict[str, onnx.NodeProto] = {}
    for node in model.graph.node:       # graph order: the last node in a scope produces the module's output
        scope = node.name.rsplit("/", 1)[0]
        while scope.startswith(ROOT_SCOPE + "/"):
            last_node[scope] = node
            scope = scope.rsplit("/", 1)[0]
    matched = [(n, last_node[scope_of(n)]) for n in t32 if scope_of(n) in last_node and n in t64]
    ort_out = _ort_values(model, x, t, cond, [node.output[0] for _, node in matched])
    modules = dict(unet.named_modules())
    rows: list[ModuleDrift] = []
    for name, node in matched:
        got, ref, ref64 = ort_out.get(node.output[0]), t32[name], t64[name]
        if got is None or got.shape != ref.shape:
            continue
        scale = float(np.abs(ref).mean()) or 1.0
        rel, noise = float(np.abs(got - ref).mean()) / scale, float(np.abs(ref64 - ref).mean()) / scale
        rows.append(ModuleDrift(name, type(modules[name]).__name__, node.name, rel, noise, rel / max(noise, 1e-7)))  # float32's resolution as the floor
    first = next((r for r in rows if r.drift > factor), None)
    return first, rows


def report(first: ModuleDrift | None, rows: list[ModuleDrift], factor: float, n: int = 12) -> str:
    lines = [f"parity diagnosis: {len(rows)} modules compared (drift = |onnxruntime - torch| / |torch float64 - float32|)"]
    if first is None:
        lines.append(f"  no module drifts more than {factor:g}x PyTorch's own float noise")
    else:
        lines.append(f"  first divergence: {first.name} ({first.kind}; ONNX node {first.onnx_node}): drift {first.drift:.3g}, "
                     f"relative difference {first.rel_diff:.2e}")
    lines.append(f"  {'module':<50} {'kind':<22} {'drift':>8} {'rel diff':>9}")
    for r in sorted(rows, key=lambda r: -r.drift)[:n]:
        lines.append(f"  {r.name[-50:]:<50} {r.kind[:22]:<22} {r.drift:>8.3g} {r.rel_diff:>9.2e}")
    return "\n".join(lines)


def diagnose_folder(folder: str, weights: str = "int8", opset: int = 21, factor: float = 10.0) -> str:
    """``gaq export DIR --diagnose``: the graph ``gaq export`` would write, diagnosed on the folder's first held-out
    input (nothing is written)."""
    from gaq_backend import load_quantized
    from gaq_backend.sampling import model_dtype
    from gaq_backend.serialization import cast_model_weights

    from .onnx_export import build_quantized_onnx
    from .validate import held_out_inputs

    unet, _, _ = load_quantized(folder)
    if model_dtype(unet) != torch.float32:
        cast_model_weights(unet, torch.float32)  # the graph computes in float32, as gaq export's does
    inputs = held_out_inputs(unet, 1)
    if inputs is None:
        raise ValueError(f"{folder} holds no held-out inputs (held_out_inputs.safetensors); quantize it again with this gaq")
    model = build_quantized_onnx(unet, weights, opset, {})
    return report(*diagnose(model, unet, *inputs, factor=factor), factor=factor)
