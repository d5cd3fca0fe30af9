"""Per-layer sensitivity: how much of a quantized UNet's output error each quantized layer causes.

Every quantized layer has two switches (its weight and its input quantizers) and every attention module
with quantized matmuls one (its four operand quantizers); with the FP weights swapped back in, each
switch turns one source of error on or off without touching the calibrated state. On held-out calls
the report measures, per layer, the relative error of the noise prediction against the FP model's

- with everything quantized except that layer (``all_but``): ``1 - all_but / error`` is its share;
- for the layers with the largest shares, with only their weights quantized (``weight_alone``) and only
  their inputs (``act_alone``): which of the two carries the share;

and then a ``keep_fp`` suggestion: layers are kept in FP one at a time, largest share first, until the
measured error (with exactly the layers those ``keep_fp`` entries match) reaches the target. ModelOpt
and NNCF users tune ``keep_fp`` / ignored scopes by hand; this makes the choice measured. The suggestion is
measured on the calibrated model with the kept layers switched off; quantizing again with that ``keep_fp``
recalibrates the other layers too (reconstruction algorithms see different inputs), so re-measure then.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from typing import Iterator

import torch
from torch import nn
from tqdm import tqdm

from ..calibration import CalibrationSet
from ..sampling import unet_forward
from ..wrapping import QuantLayerMixin
from ..wrapping.attention import QuantAttnProcessor
from ..wrapping.wrap import is_kept, quant_layers


@dataclass
class LayerSensitivity:
    name: str
    kind: str                    # conv, linear or attention (the four matmul operands of an Attention module)
    # relative error with only this layer's weights (inputs) quantized; measured for the ``detail`` largest
    # shares (None otherwise, or where the layer has no such quantizer)
    weight_alone: float | None
    act_alone: float | None
    all_but: float               # ... with everything quantized except this layer
    share: float = 0.0           # 1 - all_but / error: the part of the full error that keeping it in FP removes


@dataclass
class SensitivityReport:
    rows: int                    # held-out calls measured on
    error: float                 # relative error of the whole quantized model
    target: float
    layers: list[LayerSensitivity] = field(default_factory=list)   # largest share first
    suggested_keep_fp: list[str] = field(default_factory=list)     # add these to quantization.keep_fp
    error_with_suggestion: float = 0.0                              # measured with exactly those layers in FP
    reached: bool = True

    def to_dict(self) -> dict:
        d = asdict(self)
        d["metric"] = ("relative MSE of the noise prediction against the FP model's, sum((q - fp)^2) / sum(fp^2), "
                       f"on {self.rows} held-out calibration calls")
        return d

    def table(self, n: int = 10) -> str:
        fmt = lambda v: "-" if v is None else f"{v:.2e}"  # noqa: E731
        lines = [f"sensitivity on {self.rows} held-out calls: relative error {self.error:.2e} (target {self.target:.0e})",
                 f"  {'layer':<52} {'kind':<9} {'share':>6} {'w alone':>9} {'a alone':>9} {'all but':>9}"]
        for s in self.layers[:n]:
            lines.append(f"  {s.name[-52:]:<52} {s.kind:<9} {s.share:>6.1%} {fmt(s.weight_alone):>9} "
                         f"{fmt(s.act_alone):>9} {s.all_but:>9.2e}")
        if self.suggested_keep_fp:
            verdict = "reaches" if self.reached else "does not reach"
            lines.append(f"  keep_fp suggestion ({verdict} the target): {self.suggested_keep_fp} -> "
                         f"relative error {self.error_with_suggestion:.2e}")
        elif self.error <= self.target:
            lines.append("  within the target with nothing kept in FP")
        return "\n".join(lines)


def float_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The Conv2d / Linear weights by layer name, on the host: take this before ``quantize`` (which rounds the
    weights in place) to measure sensitivity afterwards."""
    return {n: m.weight.detach().to("cpu", copy=True) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


@dataclass
class _Switch:
    unit: str            # the keep_fp name that turns it off: the layer, or the Attention module for its matmuls
    module: nn.Module
    attr: str            # use_weight_quant or use_act_quant


def _switches(model: nn.Module) -> list[_Switch]:
    out = []
    for name, m in model.named_modules():
        if isinstance(m, QuantLayerMixin):
            if m.weight_quantizers[0].enabled:
                out.append(_Switch(name, m, "use_weight_quant"))
            if m.act_quantizers[0].enabled:
                out.append(_Switch(name, m, "use_act_quant"))
        elif isinstance(getattr(m, "processor", None), QuantAttnProcessor) and any(q.enabled for q in m.processor.quantizers.values()):
            out.append(_Switch(name, m.processor, "use_act_quant"))
    return out


@contextlib.contextmanager
def _float_weights_in(model: nn.Module, fp: dict[str, torch.Tensor]) -> Iterator[None]:
    """Each quantized layer's float weight replaced by its FP weight (the quantized one comes from its integer
    codes), and every switch restored on exit."""
    layers = quant_layers(model)
    missing = [n for n, m in layers if n not in fp or fp[n].shape != m.weight.shape]
    if missing:
        raise ValueError(f"the FP weights do not match the quantized model at {missing[0]} "
                         f"(and {len(missing) - 1} more); take them with float_weights(model) before quantize")
    saved = [(m, m.weight.data, m.use_weight_quant, m.use_act_quant) for _, m in layers]
    attns = [(m.processor, m.processor.use_act_quant) for m in model.modules() if isinstance(getattr(m, "processor", None), QuantAttnProcessor)]
    try:
        for n, m in layers:
            if m.weight_int is None and m.weight_quantizers[0].enabled:
                raise ValueError(f"{n} has no integer weights: measure sensitivity on a model quantize() has finished")
            m.weight.data = fp[n].to(m.weight.device, m.weight.dtype)
        yield
    finally:
        for m, data, w, a in saved:
            m.weight.data, m.use_weight_quant, m.use_act_quant = data, w, a
        for p, a in attns:
            p.use_act_quant = a


@torch.no_grad()
def layer_sensitivity(model: nn.Module, fp_weights: dict[str, torch.Tensor] | nn.Module, data: CalibrationSet | None = None,
                      target: float = 0.01, rows: int = 16, batch_size: int = 16, max_keep: int = 16,
                      detail: int = 10, progress: bool = True) -> SensitivityReport:
    """Measure each quantized layer's part of the output error (see the module docstring).

    ``fp_weights``: :func:`float_weights` of the model taken before ``quantize``, or the FP model itself.
    ``data``: held-out calls; default ``model.gaq_info.held_out``. ``rows`` of them, spread over the timesteps.
    Costs one forward pass of ``rows`` per layer, two more for each of the ``detail`` largest shares, and one
    per ``keep_fp`` entry tried."""
    if isinstance(fp_weights, nn.Module):
        fp_weights = float_weights(fp_weights)
    if data is None:
        info = getattr(model, "gaq_info", None)
        data = getattr(info, "held_out", None)
        if data is None or len(data) == 0:
            raise ValueError("no held-out calls to measure on: pass data= (a CalibrationSet)")
    data = data.spread(rows)
    switches = _switches(model)
    units = list(dict.fromkeys(s.unit for s in switches))
    was_training = model.training
    model.eval()

    def run(on) -> torch.Tensor:
        for s in switches:
            setattr(s.module, s.attr, on(s))
        return torch.cat([unet_forward(model, b.x, b.t, b.cond).float().cpu() for b in data.batches(batch_size)])

    with _float_weights_in(model, fp_weights):
        ref = run(lambda s: False)
        power = float(ref.pow(2).sum()) or 1e-30
        error_of = lambda on: float((run(on) - ref).pow(2).sum()) / power  # noqa: E731
        error = error_of(lambda s: True)
        layers = []
        for unit in tqdm(units, desc="sensitivity", unit="layer", disable=not progress, leave=False):
            module = next(s.module for s in switches if s.unit == unit)
            kind = "attention" if isinstance(module, QuantAttnProcessor) else "conv" if isinstance(module, nn.Conv2d) else "linear"
            all_but = error_of(lambda s: s.unit != unit)
            layers.append(LayerSensitivity(unit, kind, None, None, all_but, 1 - all_but / error if error > 0 else 0.0))
        layers.sort(key=lambda s: -s.share)
        for s in layers[:detail]:  # what the table shows: which of its quantizers carries the share
            mine = {sw.attr for sw in switches if sw.unit == s.name}
            if "use_weight_quant" in mine:
                s.weight_alone = error_of(lambda sw: sw.unit == s.name and sw.attr == "use_weight_quant")
            if "use_act_quant" in mine:
                s.act_alone = error_of(lambda sw: sw.unit == s.name and sw.attr == "use_act_quant")
        keep: list[str] = []
        kept_error = error
        for s in layers[:max_keep]:
            if kept_error <= target:
                break
            keep.append(s.name)
            kept_error = error_of(lambda sw: not is_kept(sw.unit, keep))  # what keep_fp with these entries keeps
    model.train(was_training)
    return SensitivityReport(len(data), error, target, layers, keep, kept_error, kept_error <= target)

