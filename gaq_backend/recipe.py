"""Compression recipes: YAML naming model, sampler, bit widths, algorithm and its settings.

Every key is validated on load; errors name the key (as a dotted path) and the allowed values.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from .algorithms import available_algorithms, get_algorithm
from .config import (AlgorithmConfig, CalibrationConfig, ConfigError, GaqBaseConfig, QuantConfig, SamplerConfig,
                     from_dict)


@dataclass
class ReportConfig(GaqBaseConfig):
    """What ``gaq quantize`` measures after calibration."""
    num_samples: int = 64      # images sampled by FP and quantized model from the same seeds
    grid: int = 16             # images per side in samples.png
    seed: int = 1234
    batch_size: int = 64

    def check(self, where: str = "report") -> None:
        if self.num_samples < 1 or self.grid < 1 or self.batch_size < 1:
            raise ConfigError(f"{where}.num_samples, grid and batch_size must be >= 1")


@dataclass
class Recipe:
    model: str                  # "embedded" or a diffusers UNet2DModel folder with scheduler_config.json
    algorithm: str
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    quantization: QuantConfig = field(default_factory=QuantConfig)
    settings: AlgorithmConfig | None = None
    report: ReportConfig = field(default_factory=ReportConfig)
    name: str = ""

    def quant_config(self) -> QuantConfig:
        return dataclasses.replace(self.quantization, algorithm=self.settings)

    def to_dict(self) -> dict[str, Any]:
        d = dict(name=self.name, model=self.model, algorithm=self.algorithm, sampler=self.sampler.to_dict(),
                 calibration=self.calibration.to_dict(), report=self.report.to_dict())
        q = self.quantization.to_dict()
        q.pop("algorithm", None)
        d["quantization"] = q
        d["settings"] = self.settings.to_dict() if self.settings is not None else {}
        return d


def set_override(data: dict, assignment: str) -> None:
    """Apply ``a.b.c=VALUE`` (VALUE parsed as YAML) to the nested dict ``data``."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects KEY=VALUE, got {assignment!r}")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set: bad key {key!r}")
    value = yaml.safe_load(raw) if raw.strip() else ""
    node = data
    for p in parts[:-1]:
        if node.get(p) is None:
            node[p] = {}
        if not isinstance(node[p], dict):
            raise ConfigError(f"--set {key}: '{p}' is not a section")
        node = node[p]
    node[parts[-1]] = value


def recipe_from_dict(data: Any) -> Recipe:
    if not isinstance(data, dict):
        raise ConfigError("recipe must be a YAML mapping")
    data = copy.deepcopy(data)
    if "algorithm" not in data:
        raise ConfigError(f"missing required key 'algorithm' (available: {', '.join(available_algorithms())})")
    if not isinstance(data["algorithm"], str):
        raise ConfigError(f"algorithm must be a name (available: {', '.join(available_algorithms())}); got {data['algorithm']!r}")
    spec = get_algorithm(data["algorithm"])
    settings = from_dict(spec.config_cls, data.pop("settings", None) or {}, "settings")
    if isinstance(data.get("quantization"), dict) and "algorithm" in data["quantization"]:
        raise ConfigError("unknown key 'quantization.algorithm' (the algorithm is the top-level key 'algorithm')")
    recipe = from_dict(Recipe, data, "", skip=("settings",))
    recipe.settings = settings
    return recipe


def load_recipe(path: str, overrides: list[str] | None = None) -> Recipe:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"recipe not found: {path}")
    with open(path) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: recipe must be a YAML mapping")
    for o in overrides or []:
        set_override(data, o)
    data.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    return recipe_from_dict(data)


def dump_recipe(recipe: Recipe, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(recipe.to_dict(), f, sort_keys=False)
