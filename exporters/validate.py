"""Every export is checked before it is written: ``onnx.checker`` (full), then onnxruntime on the CPU
against the PyTorch fake-quant model on held-out calibration inputs.

Differences are reported in units of the output's INT8 step, ``max|y_torch| / 127`` over the checked
inputs: the resolution an 8-bit quantizer would give the UNet's output. The two computations are the
same arithmetic in a different order, so they agree to float rounding, except where that rounding
moves an activation across a rounding boundary of a later quantizer: the activation then differs by
one of its steps, and the change travels to the output. Such flips are rare and small; a wrong scale,
a missing or misplaced Q/DQ, or a wrong weight gives errors of many steps on most outputs.
"""
from __future__ import annotations

import numpy as np
import onnx
import torch
from torch import nn

from .ort_runtime import create_session, predict_noise

# In output INT8 steps. Rounding flips move a few outputs by a step or more (on small random test UNets
# the 99th percentile reaches 2 steps), so the mean is bounded tightly and the single largest
# difference loosely; measured values are in docs/benchmarks.md section 5. A bound this loose catches
# wrong scales, layouts and missing weights, not a single missing Q/DQ pair (whose effect on the output
# is of the size of the flips themselves).
MEAN_STEPS = 0.25    # mean |onnxruntime - torch|
MAX_STEPS = 16.0     # largest |onnxruntime - torch|


class ParityError(ValueError):
    pass


def parity_inputs(recipe, scheduler_config: dict, n: int, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` held-out calibration inputs ``(x_t, t)`` spread evenly over the validation split (all timestep groups)."""
    from gaq_backend.calibration import capture_calibration
    from gaq_backend.models import load_unet
    from gaq_backend.pipeline import resolve_model_path

    if n < 1:
        raise ValueError(f"--check-samples must be at least 1; got {n}")
    fp = load_unet(resolve_model_path(recipe.model))
    calib, _ = capture_calibration(fp, scheduler_config, recipe.sampler, recipe.calibration, progress)
    val = calib.val
    idx = torch.linspace(0, len(val) - 1, min(n, len(val))).round().long()
    return val.x[idx], val.t[idx]


@torch.no_grad()
def compare_with_torch(model: onnx.ModelProto | str, unet: nn.Module, x: torch.Tensor, t: torch.Tensor,
                       batch_size: int = 64) -> dict:
    """Max / mean |onnxruntime CPU - torch| over the inputs, absolute and in output INT8 steps."""
    ref = torch.cat([unet(x[i: i + batch_size], t[i: i + batch_size]).sample for i in range(0, len(x), batch_size)]).numpy()
    got = predict_noise(create_session(model), x.numpy(), t.numpy(), batch_size)
    if got.shape != ref.shape:
        raise ParityError(f"onnxruntime output shape {got.shape} differs from torch {ref.shape}")
    if not np.isfinite(got).all():
        raise ParityError("onnxruntime output holds NaN or Inf")
    diff = np.abs(got.astype(np.float64) - ref)
    step = float(np.abs(ref).max()) / 127 or 1.0
    return dict(n_inputs=int(len(x)), output_step=step, max_abs=float(diff.max()), mean_abs=float(diff.mean()),
                max_steps=float(diff.max() / step), mean_steps=float(diff.mean() / step),
                p99_steps=float(np.percentile(diff, 99) / step), frac_over_half_step=float((diff > 0.5 * step).mean()),
                bounds=dict(mean_steps=MEAN_STEPS, max_steps=MAX_STEPS))


def validate(model: onnx.ModelProto | str, unet: nn.Module, x: torch.Tensor, t: torch.Tensor) -> dict:
    """Full checker, then parity, of a model or a written file (a path also checks external data);
    raises :class:`ParityError` naming the bound that failed."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ParityError(f"onnx.checker rejected the exported graph: {str(e).splitlines()[0]}") from e
    res = compare_with_torch(model, unet, x, t)
    over = [f"{k} {res[k]:.3g} > {b}" for k, b in res["bounds"].items() if res[k] > b]
    if over:
        raise ParityError(f"onnxruntime differs from the PyTorch fake-quant model by more than the bound, in output INT8 "
                          f"steps ({'; '.join(over)}); nothing was written")
    return res
