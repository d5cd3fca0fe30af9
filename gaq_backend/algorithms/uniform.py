"""``uniform``: Q-Diffusion / BRECQ block reconstruction with AdaRound, every calibration sample
weighted equally (algorithm.md section 4)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ..calibration import CalibrationSet
from ..config import QuantConfig
from .reconstruction import ReconstructionConfig, WeightFn, init_ranges, plan_sweep, sweep
from .registry import register_algorithm
from .result import CalibrationRecord


@dataclass
class UniformConfig(ReconstructionConfig):
    name: ClassVar[str] = "uniform"


@register_algorithm(UniformConfig)
def calibrate_uniform(model: nn.Module, config: QuantConfig, calib: CalibrationSet, fp_model: nn.Module | None = None, progress: bool = True,
                      weight_fn: WeightFn | None = None) -> CalibrationRecord:
    """``weight_fn`` (see ``sweep``) weights the units' samples; None weights them equally."""
    units, plan = plan_sweep(model, config, calib, config.algorithm, log=print if progress else None)
    init_ranges(model, config, calib, config.algorithm, progress)
    return CalibrationRecord(plan.to_dict(), sweep(model, config, calib, config.algorithm, progress, units, plan, weight_fn=weight_fn))
