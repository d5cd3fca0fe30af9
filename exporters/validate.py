"""Every export is checked before it is written: ``onnx.checker`` (full), then onnxruntime on the CPU
against the PyTorch fake-quant model on held-out calibration inputs.

Differences are reported in units of the output's INT8 step, ``max|y_torch| / 127`` over the checked
inputs. onnxruntime computes the same integers and scales in a different float order, and a
pre-activation that lands within float rounding of a quantizer's rounding boundary then rounds the
other way: the activation differs by one step and the change travels to the output. How far such
flips carry depends on the model (a trained UNet damps them; a random deep one amplifies them), so the
bound scales with the model: the same PyTorch model run in float64 differs from its float32 run by
exactly this kind of rounding, and onnxruntime may differ from float32 PyTorch by the larger of a fixed
bound and ``MEAN_FACTOR`` (mean) / ``MAX_FACTOR`` (max) times that float64 difference. A wrong scale,
layout or weight gives differences of the size of the quantization error itself, far above that;
a single missing Q/DQ pair in a trained model may not (its effect is of the size of the flips).
"""
from __future__ import annotations

import copy

import numpy as np
import onnx
import torch
from torch import nn

from .ort_runtime import predict_noise
from .runtimes import open_session

# Measured (docs/benchmarks.md section 5): the onnxruntime / float64 ratio of the mean is 0.9-1.1 on the
# embedded UNet (W4A8, W8A8) and on a random 35.7M-parameter UNet (where float64 itself moves the output
# by 1 step on average), up to 5 on the small random test UNets, whose float64 difference is tiny.
MEAN_FIXED, MEAN_FACTOR = 0.25, 2.0   # mean |onnxruntime - torch| <= max(0.25, 2 x mean |torch64 - torch|) steps
MAX_FIXED, MAX_FACTOR = 16.0, 4.0     # max  |onnxruntime - torch| <= max(16, 4 x max |torch64 - torch|) steps


class ParityError(ValueError):
    pass


def held_out_inputs(unet: nn.Module, n: int) -> tuple[torch.Tensor, torch.Tensor, dict] | None:
    """``n`` of the held-out recorded inputs saved with the quantized folder, ``(x, t, cond)`` (None for
    folders without them)."""
    held = getattr(getattr(unet, "gaq_info", None), "held_out", None)
    if held is None or not len(held):
        return None
    held = held.spread(n)
    return held.x, held.t, held.cond


def parity_inputs(recipe, scheduler_config: dict, n: int, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """``n`` held-out calibration inputs ``(x_t, t)`` spread evenly over the validation split (all timestep
    groups), captured again with the recipe (for folders written before held-out inputs were saved)."""
    from gaq_backend.calibration import capture_calibration
    from gaq_backend.models.loading import load_model

    if n < 1:
        raise ValueError(f"--check-samples must be at least 1; got {n}")
    fp = load_model(recipe.model, recipe.model_options).unet
    calib, _ = capture_calibration(fp, scheduler_config, recipe.sampler, recipe.calibration, progress)
    val = calib.val.spread(n)
    return val.x, val.t, {}


def _run_torch(unet: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict, batch_size: int) -> np.ndarray:
    from gaq_backend.sampling import unet_forward

    return torch.cat([unet_forward(unet, x[i: i + batch_size], t[i: i + batch_size], {k: v[i: i + batch_size] for k, v in cond.items()})
                      for i in range(0, len(x), batch_size)]).double().numpy()


@torch.no_grad()
def compare_with_torch(model: onnx.ModelProto | str, unet: nn.Module, x: torch.Tensor, t: torch.Tensor,
                       cond: dict | None = None, batch_size: int = 64, runtime: str = "onnxruntime") -> dict:
    """|onnxruntime CPU - torch| over the inputs, absolute and in output INT8 steps, with the bounds
    derived from |torch float64 - torch float32| on the same inputs."""
    cond = cond or {}
    ref = _run_torch(unet, x, t, cond, batch_size)
    cond64 = {k: v.double() if v.is_floating_point() else v for k, v in cond.items()}
    ref64 = _run_torch(copy.deepcopy(unet).double(), x.double(), t.double() if t.is_floating_point() else t, cond64, batch_size)
    session = open_session(model, runtime, "cpu", precision="f32")  # OpenVINO's bf16 default is not a parity check
    got = predict_noise(session, x.float().numpy(), t.numpy(), batch_size,
                        {k: v.numpy() for k, v in cond.items()})
    if got.shape != ref.shape:
        raise ParityError(f"onnxruntime output shape {got.shape} differs from torch {ref.shape}")
    if not np.isfinite(got).all():
        raise ParityError("onnxruntime output holds NaN or Inf")
    diff, diff64 = np.abs(got.astype(np.float64) - ref), np.abs(ref64 - ref)
    step = float(np.abs(ref).max()) / 127 or 1.0
    f64 = dict(mean_steps=float(diff64.mean() / step), max_steps=float(diff64.max() / step))
    return dict(runtime=session.get_providers()[0], n_inputs=int(len(x)), output_step=step, max_abs=float(diff.max()), mean_abs=float(diff.mean()),
                max_steps=float(diff.max() / step), mean_steps=float(diff.mean() / step),
                p99_steps=float(np.percentile(diff, 99) / step), frac_over_half_step=float((diff > 0.5 * step).mean()),
                float64_vs_float32=f64,
                bounds=dict(mean_steps=max(MEAN_FIXED, MEAN_FACTOR * f64["mean_steps"]),
                            max_steps=max(MAX_FIXED, MAX_FACTOR * f64["max_steps"])))


def validate(model: onnx.ModelProto | str, unet: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict | None = None,
             runtime: str = "onnxruntime") -> dict:
    """Full checker, then parity, of a model or a written file (a path also checks external data);
    raises :class:`ParityError` naming the bound that failed."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ParityError(f"onnx.checker rejected the exported graph: {str(e).splitlines()[0]}") from e
    res = compare_with_torch(model, unet, x, t, cond, runtime=runtime)
    over = [f"{k} {res[k]:.3g} > {b:.3g}" for k, b in res["bounds"].items() if res[k] > b]
    if over:
        raise ParityError(f"{res['runtime']} differs from the PyTorch fake-quant model by more than the bound, in output INT8 "
                          f"steps ({'; '.join(over)}); nothing was written")
    return res
