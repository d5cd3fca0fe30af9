"""``minmax``: naive PTQ (algorithm.md section 3). Round-to-nearest weights; activation ranges from
the FP model's activations on the calibration set. No reconstruction: the floor to beat."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from torch import nn

from ..calibration import CalibrationSet
from ..config import AlgorithmConfig, ConfigError, QuantConfig, at_least, within
from ..quantizers.observers import MinMaxObserver, PercentileObserver, TimestepMinMaxObserver
from ..quantizers.timestep import install_timestep_hook
from ..wrapping import fit_weights
from .common import observing_activations, run_calibration_batches, set_quant_state
from .registry import register_algorithm
from .result import CalibrationRecord


@dataclass
class MinMaxConfig(AlgorithmConfig):
    name: ClassVar[str] = "minmax"
    weight_range: Literal["max", "mse"] = "max"       # per-channel max, or MSE search over clipping ratios
    act_range: Literal["minmax", "percentile"] = "minmax"
    percentile: float = field(default=99.99, metadata=within(50, 100, lo_open=True))  # used when act_range is "percentile"
    # one activation range for all timesteps ("global"), one per sampler timestep for every conv/linear input
    # ("per_timestep", TFMQ-DM's finite-set calibration applied to all layers), or per timestep only where the
    # range over all timesteps is more than ``timestep_spread`` times the narrowest timestep's ("auto"; with
    # act_range percentile, auto is global). Auto is gaq's extension beyond naive PTQ: on 60 generated UNets it
    # never lost against global beyond run-to-run noise and took the worst W8A8 error from 5.7% to 0.5%
    # (docs/models.md)
    timestep_ranges: Literal["global", "per_timestep", "auto"] = "auto"
    timestep_spread: float = field(default=8.0, metadata=at_least(1))
    batch_size: int = field(default=64, metadata=at_least(1))

    def check(self, where: str = "settings") -> None:
        if self.timestep_ranges == "per_timestep" and self.act_range != "minmax":
            raise ConfigError(f"{where}.timestep_ranges 'per_timestep' observes min/max per timestep; it needs act_range: minmax")


def fit_activations(model: nn.Module, calib: CalibrationSet, cfg: MinMaxConfig, progress: bool) -> None:
    """Observe every activation quantizer's input on the FP model and set its range."""
    make = MinMaxObserver if cfg.act_range == "minmax" else (lambda: PercentileObserver(cfg.percentile))
    mode = getattr(cfg, "timestep_ranges", "global")  # a third-party config written before the knob means global
    per_t = mode == "per_timestep" or (mode == "auto" and cfg.act_range == "minmax")
    if per_t:
        install_timestep_hook(model)
        make = TimestepMinMaxObserver
    set_quant_state(model, weight=False, act=True)
    with observing_activations(model, make) as obs:
        run_calibration_batches(model, calib, cfg.batch_size, "activation ranges", progress)
    set_quant_state(model, weight=True, act=True)
    quants = dict(model.named_modules())
    for name, ob in obs.items():
        quants[name].set_range(*ob.range())
        # attention operands keep one range: their rows are batch x heads, and the export has no table for them
        if per_t and ob.usable and ".processor." not in name and (mode == "per_timestep" or ob.spread() > cfg.timestep_spread):
            quants[name].set_timestep_ranges(*ob.table())


@register_algorithm(MinMaxConfig)
def calibrate_minmax(model: nn.Module, config: QuantConfig, calib: CalibrationSet, fp_model=None, progress: bool = True) -> CalibrationRecord:
    cfg: MinMaxConfig = config.algorithm
    fit_weights(model, cfg.weight_range)
    if config.a_bits < 32:
        fit_activations(model, calib.train, cfg, progress)
    return CalibrationRecord()
