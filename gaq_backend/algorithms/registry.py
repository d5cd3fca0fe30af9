"""Name -> calibration algorithm (NVIDIA ModelOpt's calibration registry style)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..config import AlgorithmConfig, ConfigError


class UnknownAlgorithmError(ConfigError):
    pass


@dataclass(frozen=True)
class AlgorithmSpec:
    name: str
    config_cls: type[AlgorithmConfig]
    # run(model, quant_config, calibration, fp_model, progress) -> CalibrationRecord (a plain dict of JSON
    # figures, or None, is accepted from third-party algorithms and kept as the record's ``extra``).
    # gaq's own algorithms get the FP model from the same module (algorithms.common.full_precision);
    # needs_fp_model=True hands a deep copy instead, for an algorithm that cannot work that way.
    run: Callable[..., Any]
    needs_fp_model: bool = False


_REGISTRY: dict[str, AlgorithmSpec] = {}


def register_algorithm(config_cls: type[AlgorithmConfig], needs_fp_model: bool = False):
    """Decorator: ``@register_algorithm(MyConfig)`` registers ``run`` under ``MyConfig.name``."""
    def deco(run: Callable[..., Any]):
        name = config_cls.name
        if not name:
            raise ValueError(f"{config_cls.__name__}.name is empty")
        if name in _REGISTRY:
            raise ValueError(f"algorithm {name!r} is already registered")
        _REGISTRY[name] = AlgorithmSpec(name, config_cls, run, needs_fp_model)
        return run
    return deco


def available_algorithms() -> list[str]:
    return sorted(_REGISTRY)


def get_algorithm(name: str) -> AlgorithmSpec:
    if name not in _REGISTRY:
        raise UnknownAlgorithmError(f"unknown algorithm {name!r} (available: {', '.join(available_algorithms())})")
    return _REGISTRY[name]
