"""Every export is checked before it is written: ``onnx.checker`` (full), then onnxruntime on the CPU
against the PyTorch fake-quant model on held-out calibration inputs, at the output and layer by layer.

Differences are reported in units of the output's INT8 step, ``max|y_torch| / 127`` over the checked
inputs. onnxruntime computes the same integers and scales in a different float order, and a
pre-activation that lands within float rounding of a quantizer's rounding boundary then rounds the
other way: the activation differs by one step and the change travels to the output. How far such
flips carry depends on the model (a trained UNet damps them; a random deep one amplifies them), so the
bound scales with the model: the same PyTorch model run in float64 differs from its float32 run by
exactly this kind of rounding, and onnxruntime may differ from float32 PyTorch by the larger of a fixed
bound and ``MEAN_FACTOR`` (mean) / ``MAX_FACTOR`` (max) times that float64 difference. A wrong scale,
layout or weight gives differences of the size of the quantization error itself, far above that;
a single missing Q/DQ pair in a trained model may not (its effect is of the size of the flips), and on
small random UNets a 5% scale error in one conv often stays inside the bound (benchmarks/parity_power.py).

So every quantized layer is also checked on its own (``parity_debug.layer_check``), on the input where the
output differs most: PyTorch's layer fed the dequantized activation onnxruntime's Conv/MatMul consumes
reproduces onnxruntime's integers exactly, so the two differ by float order (~1e-7 relative) or by a defect
of that layer (a 5% scale error: 5e-2); a layer over ``parity_debug.LAYER_TOL`` refuses the export. And
where the output bound fails with every layer exact, the per-module comparison tells a rounding flip from a
defect in the ops between layers: if the first module that drifts beyond float noise is a quantized layer
(exact on its own inputs: only its input quantizer rounded differently), the difference is a flip the model
carried, and the export passes with the figures under ``rounding_flips``; if it is any other module, it
is refused naming that module. (Modules after the first flip are then seen only through the output.)

onnxruntime's CPU provider fuses Q/DQ pairs into int8 kernels. On x86 CPUs without VNNI (AVX2 only) its
u8 x s8 kernels add pairs of products in int16 with saturation, so full-range 8-bit weights against uint8
activations can overflow (measured: a tiny W8A8 UNet moves by 1.9 output steps on average, by 0.09 at W7A8,
and by 0.0 with the fusion off). That is the runtime on this machine, not the graph: where the fused run
fails the bound, the check runs the same graph again with ``session.disable_quant_qdq=1`` (onnxruntime
computes the Q/DQ arithmetic as written); if that passes, the export is correct and the result records the
int8 kernels' deviation under ``int8_kernels`` for the caller to report.
"""
from __future__ import annotations

import numpy as np
import onnx
import torch
from torch import nn

from .ort_runtime import predict_noise
from .parity_reference import in_float64, torch_outputs
from .runtimes import open_session

# Measured (docs/benchmarks.md, "ONNX export: parity, size and onnxruntime speed"): the onnxruntime / float64 ratio of the mean is 0.9-1.1 on the
# embedded UNet (W4A8, W8A8) and on a random 35.7M-parameter UNet (where float64 itself moves the output
# by 1 step on average), up to 5 on the small random test UNets, whose float64 difference is tiny.
MEAN_FIXED, MEAN_FACTOR = 0.25, 2.0   # mean |onnxruntime - torch| <= max(0.25, 2 x mean |torch64 - torch|) steps
MAX_FIXED, MAX_FACTOR = 16.0, 4.0     # max  |onnxruntime - torch| <= max(16, 4 x max |torch64 - torch|) steps


class ParityError(ValueError):
    pass


@torch.no_grad()
def compare_with_torch(model: onnx.ModelProto | str, unet: nn.Module, x: torch.Tensor, t: torch.Tensor,
                       cond: dict | None = None, batch_size: int = 64, runtime: str = "onnxruntime",
                       config: dict[str, str] | None = None, reference: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """|onnxruntime CPU - torch| over the inputs, absolute and in output INT8 steps, with the bounds
    derived from |torch float64 - torch float32| on the same inputs. ``config``: onnxruntime session entries;
    ``reference``: the torch (float32, float64) outputs of an earlier call on the same inputs (in the result)."""
    cond = cond or {}
    if reference is None:
        cond64 = {k: v.double() if v.is_floating_point() else v for k, v in cond.items()}
        reference = (torch_outputs(unet, x, t, cond, batch_size),
                     torch_outputs(in_float64(unet), x.double(), t.double() if t.is_floating_point() else t, cond64, batch_size))
    ref, ref64 = reference
    session = open_session(model, runtime, "cpu", precision="f32", config=config)  # OpenVINO's bf16 default is not a parity check
    try:
        got = predict_noise(session, x.float().numpy(), t.numpy(), batch_size, {k: v.numpy() for k, v in cond.items()})
    except Exception as e:  # onnxruntime's own error types: the graph does not run on these inputs
        if type(e).__module__.split(".")[0] != "onnxruntime":
            raise
        msg = str(e).replace("\n", " ")
        raise ParityError(f"onnxruntime cannot run the exported graph on the held-out inputs (batches of one timestep's rows): "
                          f"{msg[msg.find('Non-zero'):][:220] if 'Non-zero' in msg else msg[:220]}") from None
    if got.shape != ref.shape:
        raise ParityError(f"onnxruntime output shape {got.shape} differs from torch {ref.shape}")
    if not np.isfinite(got).all():
        raise ParityError("onnxruntime output holds NaN or Inf")
    diff, diff64 = np.abs(got.astype(np.float64) - ref), np.abs(ref64 - ref)
    step = float(np.abs(ref).max()) / 127 or 1.0
    f64 = dict(mean_steps=float(diff64.mean() / step), max_steps=float(diff64.max() / step))
    return dict(runtime=session.get_providers()[0], reference=reference, n_inputs=int(len(x)), output_step=step, max_abs=float(diff.max()), mean_abs=float(diff.mean()),
                worst_input=int(diff.reshape(len(x), -1).mean(1).argmax()),
                max_steps=float(diff.max() / step), mean_steps=float(diff.mean() / step),
                p99_steps=float(np.percentile(diff, 99) / step), frac_over_half_step=float((diff > 0.5 * step).mean()),
                float64_vs_float32=f64,
                bounds=dict(mean_steps=max(MEAN_FIXED, MEAN_FACTOR * f64["mean_steps"]),
                            max_steps=max(MAX_FIXED, MAX_FACTOR * f64["max_steps"])))


def validate(model: onnx.ModelProto | str, unet: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict | None = None,
             runtime: str = "onnxruntime") -> dict:
    """Full checker, the output bound, then every quantized layer on its own (see the module docstring), of a model
    or a written file (a path also checks external data); raises :class:`ParityError` naming what failed."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ParityError(f"onnx.checker rejected the exported graph: {str(e).splitlines()[0]}") from e
    res = compare_with_torch(model, unet, x, t, cond, runtime=runtime)
    over = _over(res)
    if over and runtime == "onnxruntime":  # the graph, or this CPU's int8 kernels? (module docstring)
        unfused = compare_with_torch(model, unet, x, t, cond, runtime=runtime, config={"session.disable_quant_qdq": "1"},
                                     reference=res["reference"])  # the same torch outputs: only onnxruntime runs again
        if not _over(unfused):
            kernels = {k: res[k] for k in ("mean_steps", "p99_steps", "max_steps")}
            res = dict(unfused, checked_with="session.disable_quant_qdq=1",
                       int8_kernels=dict(kernels, cpu_has_vnni=cpu_has_vnni(), over=over))
            over = []
    res.pop("reference")  # arrays, not a figure of the report
    over = _layers_or_flips(model, unet, x, t, cond or {}, res, over)
    if over:
        raise ParityError(f"{res['runtime']} differs from the PyTorch fake-quant model by more than the bound, in output INT8 "
                          f"steps ({'; '.join(over)}); nothing was written (gaq export DIR --diagnose names the module where they part)")
    return res


def _layers_or_flips(model, unet: nn.Module, x, t, cond: dict, res: dict, over: list[str]) -> list[str]:
    """Every quantized layer checked on its own on the worst input (a defect raises here, naming the layer); and where
    the output bound failed, whether the difference starts at a rounding flip: the first module that drifts beyond
    float noise is a quantized layer that is exact on onnxruntime's own input, so only its input quantizer's
    rounding differed. Then the export passes, recorded under ``rounding_flips``. What remains of ``over`` is returned."""
    from .parity_debug import LAYER_TOL, diagnose, layer_check

    if isinstance(model, str):
        model = onnx.load(model)
    i = res["worst_input"]
    one = (x[i: i + 1], t.reshape(-1)[i: i + 1], {k: v[i: i + 1] for k, v in cond.items()})
    layers = layer_check(model, unet, *one)
    res["layers"] = dict(checked=len(layers), max_rel_diff=max((r.rel_diff for r in layers), default=0.0), tolerance=LAYER_TOL)
    wrong = [r for r in layers if r.rel_diff > LAYER_TOL]
    if wrong:
        r = max(wrong, key=lambda r: r.rel_diff)
        raise ParityError(f"layer {r.name} (ONNX node {r.onnx_node}) computes differently in onnxruntime: fed the same input, "
                          f"its output differs from PyTorch's by {r.rel_diff:.2e} relative (float order gives ~1e-7; "
                          f"{len(wrong)} layer(s) over {LAYER_TOL:g}); nothing was written")
    if not over:
        return over
    first, _ = diagnose(model, unet, *one)
    if first is not None and first.name not in {r.name for r in layers}:
        return over + [f"first divergence at {first.name} ({first.kind}), which is not a quantized layer"]
    res["rounding_flips"] = dict(output_over=over, first_divergence=first.name if first else None)
    return []


def _over(res: dict) -> list[str]:
    return [f"{k} {res[k]:.3g} > {b:.3g}" for k, b in res["bounds"].items() if res[k] > b]


def cpu_has_vnni() -> bool | None:
    """Whether this CPU has an int8 dot-product instruction without int16 saturation (AVX-512 VNNI or AVX-VNNI);
    None where /proc/cpuinfo does not say (not Linux, not x86)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        return None
    return None if flags is None else bool({"avx512_vnni", "avx_vnni"} & set(flags))


def rounding_flip_warning(parity: dict) -> str | None:
    """One line for the user when the output bound failed but every layer matched on its own (``_layers_or_flips``)."""
    f = parity.get("rounding_flips")
    if not f:
        return None
    return (f"onnxruntime's output differs from PyTorch's by more than the bound ({'; '.join(f['output_over'])}), but every "
            f"quantized layer matches on its own inputs: the difference starts as a rounding flip at "
            f"{f['first_divergence'] or 'an input'} and this model carries it to the output")


def int8_kernel_warning(parity: dict) -> str | None:
    """One line for the user when the parity check had to turn onnxruntime's int8 fusion off (see the module docstring)."""
    k = parity.get("int8_kernels")
    if not k:
        return None
    why = ("this CPU has no VNNI, and onnxruntime's AVX2 u8 x s8 kernels saturate in int16" if k["cpu_has_vnni"] is False
           else "onnxruntime's int8 kernels on this machine")
    return (f"the graph matches PyTorch, but onnxruntime's fused int8 kernels on this CPU differ by mean {k['mean_steps']:.2f}, "
            f"max {k['max_steps']:.1f} output steps ({why}); on this CPU run it with session.disable_quant_qdq=1, in OpenVINO, "
            "or quantize with quantization.w_bits=7 (CPUs with AVX-512 VNNI or AVX-VNNI accumulate in int32)")
