"""Typed configuration (torchao ``AOBaseConfig`` style): one dataclass per concern, validated on construction."""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

# Layers NVIDIA ModelOpt's diffusers recipes keep in full precision (see docs/ecosystem facts in README).
DEFAULT_KEEP_FP = ["conv_in", "conv_out", "time_embedding", "time_emb_proj", "conv_shortcut"]


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the key."""


class GaqBaseConfig:
    """Base of every config dataclass. ``check`` raises :class:`ConfigError` naming the bad key."""

    def check(self, where: str = "") -> None:
        pass

    def __post_init__(self) -> None:
        self.check()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _bits(value: Any, key: str, allow_32: bool) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and (2 <= value <= 8 or (allow_32 and value == 32))
    if not ok:
        raise ConfigError(f"{key} must be an integer from 2 to 8{' or 32 (no quantization)' if allow_32 else ''}; got {value!r}")


@dataclass
class SamplerConfig(GaqBaseConfig):
    """The FP sampler used for calibration capture, reports and evaluation."""
    kind: Literal["ddim"] = "ddim"
    num_inference_steps: int = 50
    eta: float = 0.0

    def check(self, where: str = "sampler") -> None:
        if self.num_inference_steps < 1:
            raise ConfigError(f"{where}.num_inference_steps must be >= 1; got {self.num_inference_steps}")
        if not 0.0 <= self.eta <= 1.0:
            raise ConfigError(f"{where}.eta must be in [0, 1]; got {self.eta}")


@dataclass
class CalibrationConfig(GaqBaseConfig):
    """Calibration capture (algorithm.md section 1)."""
    n_per_step: int = 64          # seeds, i.e. samples recorded per recorded step
    interval: int = 5             # record every interval-th sampler step
    val_fraction: float = 0.05    # per recorded step, held out for validation
    n_groups: int = 5             # timestep groups over the recorded steps
    seed: int = 0
    batch_size: int = 256         # sampler batch during capture
    cache_dir: str = ".cache/gaq"

    def check(self, where: str = "calibration") -> None:
        for k in ("n_per_step", "interval", "n_groups", "batch_size"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{where}.{k} must be >= 1; got {getattr(self, k)}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"{where}.val_fraction must be in (0, 1); got {self.val_fraction}")


@dataclass
class AlgorithmConfig(GaqBaseConfig):
    """Base of the per-algorithm settings; subclasses set ``name`` and register with the algorithm registry."""
    name: ClassVar[str] = ""


@dataclass
class QuantConfig(GaqBaseConfig):
    """What to quantize and how; ``algorithm`` selects and configures the calibrator."""
    w_bits: int = field(default=4, metadata={"allowed": "an integer from 2 to 8"})
    a_bits: int = field(default=8, metadata={"allowed": "an integer from 2 to 8 or 32 (no quantization)"})
    weight_symmetric: bool = True
    act_symmetric: bool = True   # symmetric INT8 activations export as zero-point-0 Q/DQ, which TensorRT requires
    quantize_attention_matmuls: bool = True
    split_skip: bool = True
    keep_fp: list[str] = field(default_factory=lambda: list(DEFAULT_KEEP_FP))
    algorithm: AlgorithmConfig | None = None

    def check(self, where: str = "quantization") -> None:
        _bits(self.w_bits, f"{where}.w_bits", allow_32=False)
        _bits(self.a_bits, f"{where}.a_bits", allow_32=True)

    @property
    def preset_name(self) -> str:
        return f"W{self.w_bits}A{self.a_bits}"


def preset(name: str, **overrides: Any) -> QuantConfig:
    """``preset("W4A8", algorithm=MinMaxConfig())``: the named bit widths with the default layer policy."""
    presets = {"W4A32": (4, 32), "W4A8": (4, 8), "W8A8": (8, 8)}
    if name.upper() not in presets:
        raise ConfigError(f"unknown preset {name!r} (allowed: {', '.join(presets)})")
    w, a = presets[name.upper()]
    return QuantConfig(w_bits=w, a_bits=a, **overrides)


# ---------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts (YAML), with errors that name the key and allowed values.

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), key)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(map(str, allowed))}; got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list; got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false; got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer; got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number; got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string; got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {_type_name(tp)}")


def from_dict(cls: type, data: Any, where: str = "", skip: tuple[str, ...] = ()) -> Any:
    """Build ``cls`` from ``data``, rejecting unknown keys and wrongly typed values."""
    prefix = f"{where}." if where else ""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'recipe'} must be a mapping of keys to values; got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in skip]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(f"unknown key '{prefix}{unknown[0]}' (allowed: {', '.join(names)})")
    required = [f.name for f in dataclasses.fields(cls)
                if f.init and f.name not in skip and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [k for k in required if k not in data]
    if missing:
        raise ConfigError(f"missing required key '{prefix}{missing[0]}'")
    allowed = {f.name: f.metadata.get("allowed") for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        try:
            kwargs[k] = _coerce(v, hints[k], prefix + k)
        except ConfigError:
            if not allowed.get(k):
                raise
            raise ConfigError(f"{prefix}{k} must be {allowed[k]}; got {v!r}") from None
    try:
        # ``check`` runs in __post_init__ with its default ``where``: the key's section in a recipe.
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where or 'recipe'}: {e}") from None
