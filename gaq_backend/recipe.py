"""Compression recipes: YAML naming model, sampler, bit widths, algorithm and its settings.

Every key is validated on load; errors name the key (as a dotted path) and the allowed values.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import yaml

from .algorithms import available_algorithms, get_algorithm
from .config import (SEED, AlgorithmConfig, CalibrationConfig, ConfigError, GaqBaseConfig, QuantConfig, SamplerConfig,
                     at_least, from_dict, within)
from .utils.errors import one_line
from .utils.inputs import check_input


@dataclass
class ReportConfig(GaqBaseConfig):
    """What ``gaq quantize`` measures after calibration."""
    section: ClassVar[str] = "report"
    num_samples: int = field(default=64, metadata=at_least(1))   # images sampled by FP and quantized model from the same seeds
    grid: int = field(default=16, metadata=at_least(1))          # images in samples.png, per model
    seed: int = field(default=1234, metadata=SEED)
    batch_size: int = field(default=64, metadata=at_least(1))
    # per-layer sensitivity (evaluation/sensitivity.py): each layer's share of the error and a keep_fp suggestion
    sensitivity: bool = True
    sensitivity_rows: int = field(default=16, metadata=at_least(1))          # held-out calls it measures on
    sensitivity_target: float = field(default=0.01, metadata=within(0, 1, True, False))  # relative error the suggestion aims at


@dataclass
class ModelOptions(GaqBaseConfig):
    """``model: {path: DIR, subfolder: unet, variant: fp16}`` (a plain ``model: DIR`` has none)."""
    section: ClassVar[str] = "model"
    subfolder: str = ""     # a UNet inside a larger folder (bare UNet loading only)
    variant: str = ""       # diffusers weight variant, e.g. fp16 (diffusion_pytorch_model.fp16.safetensors)
    dtype: Literal["", "float32", "float16", "bfloat16"] = ""   # "": as stored; the model computes in it, scales stay float32


@dataclass
class Recipe:
    model: str                  # "embedded", a diffusers pipeline folder, or a UNet folder (see models/loading.py)
    algorithm: str
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    quantization: QuantConfig = field(default_factory=QuantConfig)
    settings: AlgorithmConfig | None = None
    report: ReportConfig = field(default_factory=ReportConfig)
    name: str = ""
    model_options: ModelOptions = field(default_factory=ModelOptions)

    def check(self) -> None:
        """Rules that span sections (each section checks its own keys when built)."""
        if self.name and (self.name in (".", "..") or any(sep in self.name for sep in ("/", "\\", os.sep))):
            raise ConfigError(f"name must be a plain name without path separators (it names the default output folder); got {self.name!r}")
        recorded = len(range(0, self.sampler.num_inference_steps, self.calibration.interval))
        if self.model != USER_MODEL and self.calibration.n_groups > recorded:
            raise ConfigError(f"calibration.n_groups={self.calibration.n_groups} exceeds the {recorded} recorded steps "
                              f"({self.sampler.num_inference_steps} sampler steps, one in {self.calibration.interval}); "
                              "lower calibration.n_groups or calibration.interval")

    def quant_config(self) -> QuantConfig:
        return dataclasses.replace(self.quantization, algorithm=self.settings, calibration=self.calibration)

    def to_dict(self) -> dict[str, Any]:
        opts = {k: v for k, v in self.model_options.to_dict().items() if v}
        d = dict(name=self.name, model=dict(path=self.model, **opts) if opts else self.model, algorithm=self.algorithm, sampler=self.sampler.to_dict(),
                 calibration=self.calibration.to_dict(), report=self.report.to_dict())
        q = self.quantization.to_dict()
        q.pop("algorithm", None)
        q.pop("calibration", None)
        d["quantization"] = q
        d["settings"] = self.settings.to_dict() if self.settings is not None else {}
        return d


USER_MODEL = "user"  # the model of a recipe written by save_quantized for a Python API call: no path, no capture
MAX_DEPTH = 8   # recipes are three levels deep; this refuses runaway nesting long before Python's recursion limit


class _RecipeLoader(yaml.SafeLoader):
    """YAML for recipes: no aliases (so no self-reference), no duplicate keys, bounded nesting."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ConfigError(f"line {event.start_mark.line + 1}: YAML aliases (*{event.anchor}) are not allowed in recipes; write the value out")
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise ConfigError(f"line {mark.line + 1}: nested deeper than {MAX_DEPTH} levels; a recipe is sections of keys")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: a key must be a plain name; got {key!r}")
            if key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: duplicate key {key!r}")
            seen.add(key)
        return super().construct_mapping(node, deep)


def parse_yaml(text: str, where: str) -> Any:
    """Parse recipe YAML; any problem is a :class:`ConfigError` that starts with ``where``."""
    try:
        return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 (a SafeLoader subclass)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML ({one_line(e, 160)})") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply") from None


def set_override(data: dict, assignment: str) -> None:
    """Apply ``a.b.c=VALUE`` (VALUE parsed as YAML) to the nested dict ``data``."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects KEY=VALUE, got {assignment!r}")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set: bad key {key!r}")
    value = parse_yaml(raw, f"--set {key.strip()}") if raw.strip() else ""
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
    for key, home in (("algorithm", "the top-level key 'algorithm'"), ("calibration", "the section 'calibration'")):
        if isinstance(data.get("quantization"), dict) and key in data["quantization"]:
            raise ConfigError(f"unknown key 'quantization.{key}' (it is {home})")
    options = ModelOptions()
    if "model_options" in data:
        raise ConfigError("unknown key 'model_options' (write model: {path: DIR, subfolder: ..., variant: ...})")
    if isinstance(data.get("model"), dict):
        spec_ = dict(data["model"])
        if "path" not in spec_:
            raise ConfigError("missing required key 'model.path'")
        data["model"] = spec_.pop("path")
        options = from_dict(ModelOptions, spec_, "model")
    recipe = from_dict(Recipe, data, "", skip=("settings", "model_options"))
    recipe.model_options = options
    recipe.settings = settings
    recipe.check()
    return recipe


def load_recipe(path: str, overrides: list[str] | None = None) -> Recipe:
    check_input(path, "recipe", "file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); save the recipe as UTF-8") from None
    data = parse_yaml(text, path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: recipe must be a YAML mapping")
    for o in overrides or []:
        set_override(data, o)
    data.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    cal = data.get("calibration")
    prompts = cal.get("prompts") if isinstance(cal, dict) else None
    if isinstance(prompts, str) and prompts and not os.path.isabs(prompts):
        beside = os.path.join(os.path.dirname(os.path.abspath(path)), prompts)
        if os.path.isfile(beside):  # a prompt file next to the recipe travels with it; else the working directory's
            cal["prompts"] = beside
    return recipe_from_dict(data)


def dump_recipe(recipe: Recipe, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(recipe.to_dict(), f, sort_keys=False)
