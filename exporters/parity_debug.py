"""Where do onnxruntime and the PyTorch fake-quant model part ways? (``gaq export --diagnose``)

The parity check compares the two at the output only. This runs both on the same held-out inputs and
compares every module's output: PyTorch's through forward hooks (in float32, and in float64 for the float
noise floor), onnxruntime's by making every node's output a graph output. The exporter keeps each module's
path in its node names (``/unet/down_blocks.0/resnets.0/conv1/Conv``), so a module's ONNX value is the
output of the last node inside its scope. Modules are listed in PyTorch's call order with

    drift = mean |onnxruntime - torch float32| / mean |torch float64 - torch float32|

(the ONNX graph's difference in units of PyTorch's own float-order noise). The first module whose drift
exceeds ``factor`` is where the divergence starts: everything after it inherits it.

The float64 run rounds every quantizer as the float32 run did (each quantizer's output is pinned to the
float32 one): a value within float rounding of a rounding boundary may round the other way in float64, and
such a flip, carried downstream, would raise the noise floor of every later module by the size of the
quantization step and hide a real defect there (seen on random zoo UNets, and on one CPU and not another).
So the floor is the float-order noise of the ops between quantizers, which is what onnxruntime differs by
when it rounds every quantizer as PyTorch does; where it rounds one the other way, that quantizer's module
is where the drift starts.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch
from torch import nn

from gaq_backend.quantizers import UniformQuantizer
from gaq_backend.sampling import forward_with_hooks

from .parity_reference import in_float64

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


def _module_outputs(unet: nn.Module, x, t, cond, pinned: dict[str, list] | None = None
                    ) -> tuple[dict[str, np.ndarray], dict[str, list]]:
    """(output of every module called exactly once with one tensor out, in call order; every quantizer's outputs,
    in call order). With ``pinned`` (the second item of an earlier call on the same inputs), each quantizer
    returns its pinned output instead of its own, in this model's dtype (see the module docstring)."""
    outs: dict[str, list] = {}
    quantized: dict[str, list] = {}
    is_quantizer = {n for n, m in unet.named_modules() if isinstance(m, UniformQuantizer)}

    def hook(_mod, _args, out, name):
        if name in is_quantizer:
            calls = quantized.setdefault(name, [])
            if pinned is not None:
                out = pinned[name][len(calls)].to(out.dtype)
            calls.append(out.detach())
        outs.setdefault(name, []).append(out)
        return out

    forward_with_hooks(unet, [n for n, _ in unet.named_modules() if n], hook, x, t, cond, replace=True)
    return {n: o[0].detach().double().numpy() for n, o in outs.items() if len(o) == 1 and isinstance(o[0], torch.Tensor)}, quantized


def _ort_session(model: onnx.ModelProto, wanted: list[str]):
    """An onnxruntime session of ``model`` that also returns every wanted value."""
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for name in wanted:
        if name not in have:
            m.graph.output.append(onnx.ValueInfoProto(name=name))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every intermediate value
    if m.ByteSize() < onnx.checker.MAXIMUM_PROTOBUF:
        return ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:   # over protobuf's 2 GB: through a file with external data
        path = f"{tmp}/model.onnx"
        onnx.save_model(m, path, save_as_external_data=True, location="model.onnx.data")
        return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def _ort_values(sess, x: torch.Tensor, t: torch.Tensor, cond: dict) -> dict[str, np.ndarray]:
    """Every output of one call (one timestep, as the exported contract takes it)."""
    from .ort_runtime import make_feed, split_cond

    rows, once = split_cond({k: v.numpy() for k, v in cond.items()})
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, make_feed(sess, x.numpy(), float(t.reshape(-1)[0]), rows, once))))


def _last_nodes(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Scope -> the last node inside it (graph order: that node produces the module's output)."""
    last: dict[str, onnx.NodeProto] = {}
    for node in model.graph.node:
        scope = node.name.rsplit("/", 1)[0]
        while scope.startswith(ROOT_SCOPE + "/"):
            last[scope] = node
            scope = scope.rsplit("/", 1)[0]
    return last


def diagnose(model: onnx.ModelProto, unet: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict | None = None,
             factor: float = 10.0, rows: int = 1) -> tuple[ModuleDrift | None, list[ModuleDrift]]:
    """(first module whose drift exceeds ``factor``, or None; every matched module in call order), summed over the
    first ``rows`` input rows, one call each (the exported graph takes one timestep per call)."""
    cond = cond or {}
    modules, last = dict(unet.named_modules()), _last_nodes(model)
    unet64 = in_float64(unet)
    sums: dict[str, np.ndarray] = {}   # module -> [sum |ref|, sum |ort - ref|, sum |ref64 - ref|]
    sess, nodes = None, {}
    for i in range(min(rows, len(x))):
        xi = x[i: i + 1].float()
        ti = t.reshape(-1)[i: i + 1]
        ci = {k: (v[i: i + 1].float() if v.is_floating_point() else v[i: i + 1]) for k, v in cond.items()}  # what onnxruntime is fed
        t32, rounded = _module_outputs(unet, xi, ti, ci)   # unet_forward casts the float inputs to each model's dtype
        t64, _ = _module_outputs(unet64, xi, ti.double() if ti.is_floating_point() else ti, ci, pinned=rounded)
        if sess is None:
            nodes = {n: last[scope_of(n)] for n in t32 if scope_of(n) in last and n in t64}
            sess = _ort_session(model, [node.output[0] for node in nodes.values()])
        got_all = _ort_values(sess, xi, ti, ci)
        for name, node in nodes.items():
            got, ref, ref64 = got_all.get(node.output[0]), t32.get(name), t64.get(name)
            if got is None or ref is None or ref64 is None or got.shape != ref.shape:
                continue
            acc = sums.setdefault(name, np.zeros(3))
            acc += [np.abs(ref).mean(), np.abs(got - ref).mean(), np.abs(ref64 - ref).mean()]
    out: list[ModuleDrift] = []
    for name, (scale, diff, noise) in sums.items():
        scale = scale or 1.0
        rel, fnoise = diff / scale, noise / scale
        out.append(ModuleDrift(name, type(modules[name]).__name__, nodes[name].name, float(rel), float(fnoise),
                               float(rel / max(fnoise, 1e-7))))  # float32's resolution as the floor
    first = next((r for r in out if r.drift > factor), None)
    return first, out


LAYER_CHECK_BYTES = 1 << 30   # onnxruntime values exposed per run of the layer check
LAYER_TOL = 1e-4     # mean |difference| / mean |output| of one layer on identical inputs (float order alone: ~1e-6)
COMPUTE_OPS = ("Conv", "MatMul", "Gemm", "MatMulNBits")


@dataclass
class LayerParity:
    name: str
    onnx_node: str
    rel_diff: float        # mean |ort - torch| / mean |torch|, torch fed onnxruntime's own input to the layer


def layer_check(model: onnx.ModelProto, unet: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict | None = None,
                budget_bytes: int = LAYER_CHECK_BYTES) -> list[LayerParity]:
    """Every quantized layer on its own: PyTorch's layer fed the value onnxruntime's Conv/MatMul consumes (the
    dequantized activation) against onnxruntime's output of the layer, on the first input row.

    Downstream of a rounding flip the two runtimes no longer see the same activations, so whole-model
    differences mix flips with defects. Fed identical on-grid inputs, PyTorch's quantizer reproduces onnxruntime's
    integers exactly, and what is left is float order (~1e-7) or a defect in this layer's weights, scales, zero
    points, bias or input quantizer (a 5% scale error: ~5e-2; a missing activation Q/DQ: the quantization error).
    Layers go in groups whose exposed values fit ``budget_bytes`` (one onnxruntime run per group)."""
    from gaq_backend.wrapping.wrap import quant_layers

    cond = {k: v[:1].float() if v.is_floating_point() else v[:1] for k, v in (cond or {}).items()}
    x, t = x[:1].float(), t.reshape(-1)[:1]
    by_module = _nodes_by_module(model, unet)
    io: dict[str, tuple[str, list[str], str]] = {}    # layer -> (compute node name, their data inputs, the scope's last output)
    for name, _ in quant_layers(unet):
        nodes = by_module.get(name, [])
        compute = [n for n in nodes if n.op_type in COMPUTE_OPS]   # two convolutions for split skip quantizers (qdq_forms)
        if compute:
            io[name] = (compute[0].name, [n.input[0] for n in compute], nodes[-1].output[0])
    results: list[LayerParity] = []
    for group in _groups(unet, x, t, cond, list(io), budget_bytes):
        vals = _ort_values(_ort_session(model, [v for n in group for v in (*io[n][1], io[n][2])]), x, t, cond)

        def check(mod, _args, out, name):
            node, fed, produced = io[name]
            fed_in = torch.cat([torch.from_numpy(vals[v]) for v in fed], dim=1)   # the split parts are channel ranges
            mine = mod.forward(fed_in.to(out.dtype)).detach().double().numpy().reshape(-1)  # forward: no hooks again
            got = vals[produced].astype(np.float64).reshape(-1)
            if got.shape == mine.shape:
                results.append(LayerParity(name, node, float(np.abs(got - mine).mean() / (np.abs(mine).mean() or 1.0))))

        forward_with_hooks(unet, group, check, x, t, cond)
    return results


def module_of_scope(scope: str, names: set[str]) -> str | None:
    """The module an ONNX node scope belongs to. The scope is the call stack, and a module may be called by a sibling
    (an attention processor calls its attention's ``to_q``: ``.../attentions.0/processor/to_q``), so a segment that
    is not a child of the module so far is looked up as a child of its ancestors."""
    path: list[str] = []
    for seg in scope_of_parts(scope):
        for k in range(len(path), -1, -1):
            if ".".join(path[:k] + [seg]) in names:
                path = path[:k] + [seg]
                break
        else:
            return None
    return ".".join(path) or None


def scope_of_parts(scope: str) -> list[str]:
    return scope[len(ROOT_SCOPE) + 1:].split("/") if scope.startswith(ROOT_SCOPE + "/") else []


def _nodes_by_module(model: onnx.ModelProto, unet: nn.Module) -> dict[str, list[onnx.NodeProto]]:
    """Module name -> the nodes directly in its scope, in graph order."""
    names = {n for n, _ in unet.named_modules() if n}
    out: dict[str, list[onnx.NodeProto]] = {}
    cache: dict[str, str | None] = {}
    for node in model.graph.node:
        scope = node.name.rsplit("/", 1)[0]
        if scope not in cache:
            cache[scope] = module_of_scope(scope, names)
        if cache[scope]:
            out.setdefault(cache[scope], []).append(node)
    return out


def _groups(unet: nn.Module, x, t, cond, names: list[str], budget_bytes: int) -> list[list[str]]:
    """``names`` in call order, cut where the float32 inputs and outputs onnxruntime exposes would exceed the budget."""
    size: dict[str, int] = {}
    forward_with_hooks(unet, names, lambda mod, a, o, n: size.setdefault(n, 4 * (a[0].numel() + o.numel())), x, t, cond)
    groups: list[list[str]] = [[]]
    used = 0
    for n in size:   # call order
        if groups[-1] and used + size[n] > budget_bytes:
            groups.append([])
            used = 0
        groups[-1].append(n)
        used += size[n]
    return [g for g in groups if g]


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
    from .parity_reference import held_out_inputs

    unet, _, _ = load_quantized(folder)
    if model_dtype(unet) != torch.float32:
        cast_model_weights(unet, torch.float32)  # the graph computes in float32, as gaq export's does
    inputs = held_out_inputs(unet, 1)
    if inputs is None:
        raise ValueError(f"{folder} holds no held-out inputs (held_out_inputs.safetensors); quantize it again with this gaq")
    model = build_quantized_onnx(unet, weights, opset, {})
    return report(*diagnose(model, unet, *inputs, factor=factor), factor=factor)
