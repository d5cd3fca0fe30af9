"""The one entry point: ``quantize(model, config, calibration)``."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .algorithms import get_algorithm
from .algorithms.common import freeze_weights
from .calibration import CalibrationSet
from .config import ConfigError, QuantConfig
from .wrapping import WrapReport, wrap_unet


@dataclass
class QuantizationInfo:
    """Attached to a quantized model as ``model.gaq_info``."""
    config: QuantConfig
    wrap: WrapReport
    stats: dict[str, Any] = field(default_factory=dict)


def wrap_for_config(model: nn.Module, config: QuantConfig) -> WrapReport:
    return wrap_unet(model, config.w_bits, config.a_bits, config.keep_fp, config.weight_symmetric, config.act_symmetric,
                     config.quantize_attention_matmuls, config.split_skip)


def quantize(model: nn.Module, config: QuantConfig, calibration: CalibrationSet, progress: bool = True) -> nn.Module:
    """Quantize a diffusers UNet in place with ``config.algorithm`` on ``calibration``; returns the model.

    The result is a fake-quant model whose integer weights are fixed (``layer.weight_int``) and whose
    activation ranges are calibrated; ``model.gaq_info`` records what was wrapped and kept.
    """
    if config.algorithm is None:
        raise ConfigError("QuantConfig.algorithm is not set (e.g. QuantConfig(algorithm=MinMaxConfig()))")
    spec = get_algorithm(config.algorithm.name)
    if not isinstance(config.algorithm, spec.config_cls):
        raise ConfigError(f"algorithm {spec.name!r} needs a {spec.config_cls.__name__}, got {type(config.algorithm).__name__}")
    calibration.check_finite()
    if len(calibration.train) == 0:
        raise ValueError("calibration set has no training samples")
    model.eval()
    fp_model = copy.deepcopy(model).requires_grad_(False) if spec.needs_fp_model else None
    report = wrap_for_config(model, config)
    model.requires_grad_(False)
    stats = spec.run(model, config, calibration, fp_model=fp_model, progress=progress)
    freeze_weights(model)
    model.gaq_info = QuantizationInfo(config, report, stats or {})
    return model
