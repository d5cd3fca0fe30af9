"""Typed configuration (torchao ``AOBaseConfig`` style): one dataclass per concern, validated on construction."""
from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

# Layers NVIDIA ModelOpt's diffusers recipes keep in full precision (see docs/ecosystem facts in README).
# the weight bits mixed_precision_budget gives the layers it chooses
HIGH_PRECISION_BITS = 8
DEFAULT_KEEP_FP = ["conv_in", "conv_out", "time_embedding", "time_emb_proj", "conv_shortcut"]


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the key."""


SEED_MAX = 2**32 - 1   # NumPy's and torch's generators both take seeds in [0, 2**32)
INT_MAX = 2**31 - 1    # beyond any useful count, and still an index torch accepts


@dataclass(frozen=True)
class Range:
    """The allowed values of a numeric field, declared once beside it: ``field(default=1, metadata=at_least(1))``."""
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def contains(self, v: float) -> bool:  # ints compare exactly, however large
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)

    def describe(self, integer: bool) -> str:
        kind, fmt = ("an integer", lambda x: str(int(x))) if integer else ("a number", lambda x: f"{x:g}")
        if self.lo is not None and self.hi is not None:
            return f"{kind} in {'(' if self.lo_open else '['}{fmt(self.lo)}, {fmt(self.hi)}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{kind} {'>' if self.lo_open else '>='} {fmt(self.lo)}"
        if self.hi is not None:
            return f"{kind} {'<' if self.hi_open else '<='} {fmt(self.hi)}"
        return "a finite number"


def at_least(lo: float) -> dict:
    return {"range": Range(lo)}


def above(lo: float) -> dict:
    return {"range": Range(lo, lo_open=True)}


def within(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> dict:
    return {"range": Range(lo, hi, lo_open, hi_open)}


SEED = {"range": Range(0, SEED_MAX)}


class GaqBaseConfig:
    """Base of every config dataclass. Each numeric field must be finite and inside its declared
    ``Range`` (integers at most ``INT_MAX``); ``check`` adds rules that span fields. Both raise
    :class:`ConfigError` naming the key (``section.key``) and the allowed values."""
    section: ClassVar[str] = ""   # where the config sits in a recipe

    def check(self, where: str = "") -> None:
        pass

    def check_ranges(self, where: str) -> None:
        prefix = f"{where}." if where else ""
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            rng = f.metadata.get("range") or Range()
            integer = f.type in ("int", int)
            if (isinstance(v, float) and not math.isfinite(v)) or not rng.contains(v):
                raise ConfigError(f"{prefix}{f.name} must be {rng.describe(integer)}; got {v!r}")
            if integer and rng.hi is None and v > INT_MAX:
                raise ConfigError(f"{prefix}{f.name} must be at most {INT_MAX}; got {v!r}")

    def __post_init__(self) -> None:
        self.check_ranges(self.section)
        self.check(self.section)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _bits(value: Any, key: str, allow_32: bool) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and (2 <= value <= 8 or (allow_32 and value == 32))
    if not ok:
        raise ConfigError(f"{key} must be an integer from 2 to 8{' or 32 (no quantization)' if allow_32 else ''}; got {value!r}")


@dataclass
class SamplerConfig(GaqBaseConfig):
    """The FP sampler used for calibration capture, reports and evaluation."""
    section: ClassVar[str] = "sampler"
    # "ddim": gaq's DDIM loop over the model's noise schedule; "pipeline": the model folder's own scheduler
    # class and config; or a diffusers scheduler class name (EulerDiscreteScheduler, ...) built from that config
    kind: str = "ddim"
    num_inference_steps: int = field(default=50, metadata=within(1, 1000))
    eta: float = field(default=0.0, metadata=within(0, 1))

    def check(self, where: str = "sampler") -> None:
        if self.kind not in ("ddim", "pipeline") and not (self.kind.isidentifier() and self.kind.endswith("Scheduler")):
            raise ConfigError(f"{where}.kind must be ddim, pipeline or a diffusers scheduler class name "
                              f"(e.g. EulerDiscreteScheduler); got {self.kind!r}")


@dataclass
class CalibrationConfig(GaqBaseConfig):
    """Calibration capture (algorithm.md section 1)."""
    section: ClassVar[str] = "calibration"
    n_per_step: int = field(default=64, metadata=at_least(2))   # seeds, i.e. samples recorded per recorded step
    interval: int = field(default=5, metadata=at_least(1))      # record every interval-th sampler step
    val_fraction: float = field(default=0.05, metadata=within(0, 1, True, True))  # per recorded step, held out for validation
    n_groups: int = field(default=5, metadata=at_least(1))      # timestep groups over the recorded steps
    seed: int = field(default=0, metadata=SEED)
    batch_size: int = field(default=256, metadata=at_least(1))  # sampler batch during capture
    cache_dir: str = ".cache/gaq"
    # recording from the user's own loop (quantize(forward_loop=...), GAQConfig, nncf.Dataset):
    max_per_step: int = field(default=256, metadata=at_least(2))  # rows kept per distinct timestep (seeded reservoir)
    max_samples: int = field(default=4096, metadata=at_least(2))  # total rows kept, spread evenly over the timesteps
    # conditioning of pipeline capture (a model folder with model_index.json): n_per_step images cycle
    # through the prompts, with classifier-free guidance; class-conditional UNets cycle through class_labels
    prompts: str = ""                   # text file, one prompt a line (pipelines with a text encoder)
    guidance_scale: float = field(default=7.5, metadata=at_least(0))
    height: int = field(default=0, metadata=at_least(0))   # 0: the pipeline's default
    width: int = field(default=0, metadata=at_least(0))
    class_labels: list[int] = field(default_factory=list)
    # further keyword arguments of the pipeline's call, passed as given (e.g. use_resolution_binning: false,
    # max_sequence_length: 64); the ones gaq sets itself (prompt, generator, ...) are refused
    pipeline_kwargs: dict[str, Any] = field(default_factory=dict)
    # float calibration inputs held in this precision during calibration ("model": the model's dtype);
    # float16 / bfloat16 halve their memory for a float32 model (docs/memory.md measures the effect)
    storage_dtype: Literal["model", "float16", "bfloat16"] = "model"

    def n_val(self) -> int:
        """Validation samples held out of each recorded step."""
        return max(1, int(round(self.val_fraction * self.n_per_step)))

    def check(self, where: str = "calibration") -> None:
        if self.prompts and not os.path.isfile(self.prompts):
            raise ConfigError(f"{where}.prompts: no such file: {self.prompts}")
        if any(c < 0 for c in self.class_labels):
            raise ConfigError(f"{where}.class_labels must be non-negative class indices; got {self.class_labels}")
        if self.n_val() >= self.n_per_step:
            raise ConfigError(f"{where}.n_per_step={self.n_per_step} with val_fraction={self.val_fraction} leaves no training "
                              f"sample per step; raise n_per_step or lower val_fraction")
        if not self.cache_dir.strip():
            raise ConfigError(f"{where}.cache_dir must name a folder; got an empty string")
        if os.path.lexists(self.cache_dir) and not os.path.isdir(self.cache_dir):
            raise ConfigError(f"{where}.cache_dir {self.cache_dir} is a file; expected a folder")


@dataclass
class AlgorithmConfig(GaqBaseConfig):
    """Base of the per-algorithm settings; subclasses set ``name`` and register with the algorithm registry."""
    name: ClassVar[str] = ""
    section: ClassVar[str] = "settings"


@dataclass
class QuantConfig(GaqBaseConfig):
    """What to quantize and how; ``algorithm`` selects and configures the calibrator."""
    section: ClassVar[str] = "quantization"
    w_bits: int = field(default=4, metadata={"allowed": "an integer from 2 to 8"})
    a_bits: int = field(default=8, metadata={"allowed": "an integer from 2 to 8 or 32 (no quantization)"})
    weight_symmetric: bool = True
    # 0: weights per output channel. A power of two >= 16: Linear weights get one scale per output feature and
    # block of that many input features (calibrated like per-channel scales), the layout onnxruntime's
    # MatMulNBits kernels run (gaq export --weights int4 --matmul-nbits); Conv2d stays per channel
    w_block_size: int = field(default=0, metadata=at_least(0))
    act_symmetric: bool = True   # symmetric INT8 activations export as zero-point-0 Q/DQ, which TensorRT requires
    quantize_attention_matmuls: bool = True
    split_skip: bool = True
    keep_fp: list[str] = field(default_factory=lambda: list(DEFAULT_KEEP_FP))
    # weight bits by layer, {pattern: bits} with keep_fp's matching rules (the first matching pattern wins; the
    # other layers get w_bits). A model with an entry here is mixed precision, and its report says so
    w_bits_by_layer: dict[str, int] = field(default_factory=dict)
    # > 0: before calibration, give 8-bit weights to the layers whose w_bits weights cost most per byte at the
    # sampler's noisiest steps, while the extra weight bytes stay within this fraction of the w_bits model's weight
    # bytes (wrapping/mixed_precision.py, MixDQ-style). The layers chosen are added to w_bits_by_layer as exact
    # ``=name`` entries, so the saved folder reloads without choosing again. Our extension (issue 29)
    mixed_precision_budget: float = field(default=0.0, metadata={"allowed": "a number from 0 to 1"})
    # with the default keep_fp, also keep the conditioning path, patch embedding and final projection, found in
    # one probe call (wrapping/roles.py); the names found are added to keep_fp of the quantized model's config
    keep_fp_by_role: bool = True
    # after calibration, map the model's output per recorded timestep and output channel to a * out + b * x + c,
    # least squares against the FP output on the calibration rows (quantizers/output_correction.py; exported into
    # the graph): "bias" fits c only (PTQD's bias correction), "affine" all three. Our extension (issue 29)
    output_correction: Literal["none", "bias", "affine"] = "none"
    # where that fit's inputs come from: "calibration" (the FP trajectory's recorded rows) or "trajectory" (then
    # refit on the inputs the corrected quantized model visits when the calibration's sampling loop is re-run with
    # it, against the FP model at those inputs; needs a second FP copy of the model). Our extension (issue 29)
    output_correction_fit: Literal["calibration", "trajectory"] = "calibration"
    algorithm: AlgorithmConfig | None = None
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)  # recording budget, split and groups

    def check(self, where: str = "quantization") -> None:
        _bits(self.w_bits, f"{where}.w_bits", allow_32=False)
        _bits(self.a_bits, f"{where}.a_bits", allow_32=True)
        if self.w_block_size and (self.w_block_size < 16 or self.w_block_size & (self.w_block_size - 1)):
            raise ConfigError(f"{where}.w_block_size must be 0 (per channel) or a power of two >= 16 (onnxruntime's "
                              f"MatMulNBits block sizes); got {self.w_block_size}")
        if self.output_correction_fit == "trajectory" and self.output_correction == "none":
            raise ConfigError(f"{where}.output_correction_fit: trajectory refits the output correction: set "
                              f"{where}.output_correction to bias or affine")
        for i, pattern in enumerate(self.keep_fp):
            if not isinstance(pattern, str) or not pattern.strip():
                raise ConfigError(f"{where}.keep_fp[{i}] must be a layer name or glob; got {pattern!r}")
        for pattern, bits in self.w_bits_by_layer.items():
            if not pattern.strip():
                raise ConfigError(f"{where}.w_bits_by_layer: a key must be a layer name or glob; got {pattern!r}")
            _bits(bits, f"{where}.w_bits_by_layer.{pattern}", allow_32=False)
        if not 0.0 <= self.mixed_precision_budget <= 1.0:
            raise ConfigError(f"{where}.mixed_precision_budget must be a number from 0 to 1 (a fraction of the weight "
                              f"bytes); got {self.mixed_precision_budget!r}")
        if self.mixed_precision_budget and self.w_bits >= HIGH_PRECISION_BITS:
            raise ConfigError(f"{where}.mixed_precision_budget gives layers {HIGH_PRECISION_BITS}-bit weights; "
                              f"w_bits is already {self.w_bits}")

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
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{key} must be a mapping of names to values; got {value!r}")
        _, item = typing.get_args(tp)
        return {k: _coerce(v, item, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        if not isinstance(value, (bool, int, float, str, list, type(None))):
            raise ConfigError(f"{key} must be a number, string, boolean, list or null; got {value!r}")
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
