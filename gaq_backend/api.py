"""The one entry point, ``quantize(model, config, ...)``, and its three front doors:

- ModelOpt style: ``quantize(unet, config, forward_loop=fn)``, where ``fn(unet)`` runs the user's own
  pipeline or sampling loop;
- NNCF style: ``quantize(unet, config, calibration=nncf.Dataset(items, transform_fn))`` (or any iterable
  of forward-keyword dicts), each item being the UNet's forward inputs;
- torchao style: ``quantize_(unet, GAQConfig(config, step="prepare"))``, the user's passes, then
  ``step="convert"`` (:mod:`gaq_backend.torchao_config`).

All three record the UNet's inputs with the same :class:`~gaq_backend.calibration.recorder.Recorder`,
so the same recorded calls give the same model. A ready :class:`CalibrationSet` is accepted as well.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .algorithms import get_algorithm
from .algorithms.common import freeze_weights
from .algorithms.result import CalibrationRecord
from .calibration import CalibrationSet
from .calibration.calibration_set import calibration_from_tensors
from .calibration.recorder import Recorder
from .config import ConfigError, QuantConfig
from .wrapping import WrapReport, wrap_unet
from .wrapping.mixed_precision import with_mixed_precision


@dataclass
class QuantizationInfo:
    """Attached to a quantized model as ``model.gaq_info``."""
    config: QuantConfig
    wrap: WrapReport
    stats: CalibrationRecord = field(default_factory=CalibrationRecord)
    held_out: CalibrationSet | None = None   # a few validation inputs, saved for the export parity check


def wrap_for_config(model: nn.Module, config: QuantConfig) -> WrapReport:
    return wrap_unet(model, config.w_bits, config.a_bits, config.keep_fp, config.weight_symmetric, config.act_symmetric,
                     config.quantize_attention_matmuls, config.split_skip, config.w_block_size, config.w_bits_by_layer)


def with_role_keep_fp(model: nn.Module, config: QuantConfig, calibration: CalibrationSet) -> QuantConfig:
    """``config`` with the layers :func:`~gaq_backend.wrapping.roles.layers_by_role` finds added to the default
    ``keep_fp`` (as exact ``=name`` entries, so the saved folder reloads without a probe). A ``keep_fp`` the user
    set is taken as written: it may mean to quantize those layers (``temporal`` reconstructs the time path)."""
    from .config import DEFAULT_KEEP_FP

    if not config.keep_fp_by_role or list(config.keep_fp) != DEFAULT_KEEP_FP:   # a keep_fp of the user's own is taken as written
        return config
    from .wrapping.roles import layers_by_role
    from .wrapping.wrap import is_kept

    row = calibration.subset(slice(0, 1))
    found = [n for names in layers_by_role(model, row.x, row.t, row.cond).values() for n in names]
    extra = ["=" + n for n in dict.fromkeys(found) if not is_kept(n, config.keep_fp)]
    return dataclasses.replace(config, keep_fp=[*config.keep_fp, *extra]) if extra else config


def new_recorder(model: nn.Module, config: QuantConfig) -> Recorder:
    return Recorder(model, max_per_step=config.calibration.max_per_step, seed=config.calibration.seed)


def finish_recording(recorder: Recorder, config: QuantConfig) -> CalibrationSet:
    c = config.calibration
    return calibration_from_tensors(recorder.tensors(c.max_samples), c.val_fraction, c.n_groups, c.seed)


def record(model: nn.Module, config: QuantConfig, forward_loop: Callable[[nn.Module], Any] | None = None,
           inputs: Iterable[dict] | None = None) -> CalibrationSet:
    """Calibration data from the user's loop (``forward_loop(model)``) or from forward-keyword dicts."""
    recorder = new_recorder(model, config)
    was_training = model.training
    model.eval()
    with recorder, torch.no_grad():
        if forward_loop is not None:
            forward_loop(model)
        else:
            items = inputs.get_inference_data() if hasattr(inputs, "get_inference_data") else inputs  # nncf.Dataset
            for i, item in enumerate(items):
                if not isinstance(item, dict):
                    raise ConfigError(f"calibration item {i} is a {type(item).__name__}; each item (after nncf's transform_fn) "
                                      "must be a dict of the UNet's forward inputs (sample, timestep, ...)")
                model(**item)
    model.train(was_training)
    return finish_recording(recorder, config)


def check_config(config: QuantConfig) -> None:
    if config.algorithm is None:
        raise ConfigError("QuantConfig.algorithm is not set (e.g. QuantConfig(algorithm=MinMaxConfig()))")
    spec = get_algorithm(config.algorithm.name)
    if not isinstance(config.algorithm, spec.config_cls):
        raise ConfigError(f"algorithm {spec.name!r} needs a {spec.config_cls.__name__}, got {type(config.algorithm).__name__}")


def check_quantizable(model: nn.Module) -> None:
    """Refuse, in one line, UNets whose quantization would silently be wrong. Changes nothing."""
    from .wrapping import QuantLayerMixin

    if type(model).__name__ == "OptimizedModule":
        raise ConfigError("this UNet is torch.compile'd: quantize the original module (model._orig_mod), then compile the result")
    if hasattr(model, "gaq_info") or any(isinstance(m, QuantLayerMixin) for m in model.modules()):
        raise ConfigError("this UNet is already quantized by gaq; load the FP model again")
    for name, m in model.named_modules():
        if type(getattr(m, "processor", None)).__name__.startswith("Fused"):
            raise ConfigError(f"fused QKV projections at {name}: call unet.unfuse_qkv_projections() before quantizing")
        lora = getattr(m, "lora_A", None)
        if (isinstance(lora, nn.ModuleDict) and len(lora)) or getattr(m, "lora_layer", None) is not None:
            raise ConfigError(f"LoRA layer at {name}: fuse the LoRA weights first (pipe.fuse_lora(); pipe.unload_lora_weights())")


def drop_stale_fused_projections(model: nn.Module) -> list[str]:
    """Delete the fused QKV layers that diffusers' ``unfuse_qkv_projections`` leaves behind, unused, so that they are
    neither wrapped (they would see no calibration data) nor saved; returns their names. The one change the front
    doors make to the FP model before wrapping it, after :func:`check_quantizable` has passed."""
    dropped = []
    for name, m in model.named_modules():
        for stale in ("to_qkv", "to_kv"):
            if hasattr(m, stale) and getattr(m, "processor", None) is not None:
                delattr(m, stale)
                m.fused_projections = False
                dropped.append(f"{name}.{stale}")
    return dropped


def quantize(model: nn.Module, config: QuantConfig, calibration: CalibrationSet | Iterable[dict] | None = None,
             progress: bool = True, *, forward_loop: Callable[[nn.Module], Any] | None = None,
             sampling_loop: Callable[[nn.Module], Any] | None = None) -> nn.Module:
    """Quantize a diffusers UNet in place with ``config.algorithm``; returns the model.

    Calibration data comes from ``forward_loop(model)`` (the user's own sampling code), from
    ``calibration`` as a :class:`CalibrationSet`, an ``nncf.Dataset`` or an iterable of forward-keyword
    dicts. The result is a fake-quant model whose integer weights are fixed (``layer.weight_int``) and
    whose activation ranges are calibrated; ``model.gaq_info`` records what was wrapped and kept.
    ``sampling_loop``: what ``config.output_correction_fit = "trajectory"`` re-runs with the quantized model
    (default: ``forward_loop``; needed when the data comes as ``calibration``).
    """
    check_config(config)
    if (forward_loop is None) == (calibration is None):
        raise ConfigError("give exactly one of calibration= (CalibrationSet, nncf.Dataset or iterable of input dicts) and forward_loop=")
    check_quantizable(model)
    drop_stale_fused_projections(model)
    sampling_loop = sampling_loop or forward_loop
    check_sampling_loop(config, sampling_loop)
    if not isinstance(calibration, CalibrationSet):
        calibration = record(model, config, forward_loop, calibration)
    return quantize_recorded(model, config, calibration, progress, sampling_loop)


def check_sampling_loop(config: QuantConfig, sampling_loop) -> None:
    if config.output_correction_fit == "trajectory" and sampling_loop is None:
        raise ConfigError("output_correction_fit='trajectory' re-runs a sampling loop with the quantized model: "
                          "give forward_loop= or sampling_loop=")


def quantize_recorded(model: nn.Module, config: QuantConfig, calibration: CalibrationSet, progress: bool = True,
                      sampling_loop: Callable[[nn.Module], Any] | None = None) -> nn.Module:
    from . import distributed

    spec = get_algorithm(config.algorithm.name)
    check_sampling_loop(config, sampling_loop)
    calibration.check_finite()
    if len(calibration.train) == 0:
        raise ValueError("calibration set has no training samples")
    if distributed.world()[1] > 1:   # each rank reconstructs its rows of one shared set (docs/distributed.md)
        distributed.check_same(calibration.fingerprint(), "calibration set",
                               "every rank must pass the same CalibrationSet or run the same forward_loop")
    held_out = calibration.val.spread(64)  # up to 64 held-out inputs spread over all timesteps, for the export parity check
    if config.calibration.storage_dtype != "model":
        calibration = calibration.stored_as(getattr(torch, config.calibration.storage_dtype))
    model.eval()
    config = with_role_keep_fp(model, config, calibration)
    config, mixed = with_mixed_precision(model, config, calibration, progress)
    on_trajectory = config.output_correction_fit == "trajectory"
    fp_model = copy.deepcopy(model).requires_grad_(False) if spec.needs_fp_model or on_trajectory else None
    report = wrap_for_config(model, config)
    model.requires_grad_(False)
    stats = spec.run(model, config, calibration, fp_model=fp_model if spec.needs_fp_model else None, progress=progress)
    if not isinstance(stats, CalibrationRecord):  # a third-party algorithm's own figures
        stats = CalibrationRecord(extra=dict(stats or {}))
    freeze_weights(model)
    if mixed is not None:
        stats.mixed_precision = mixed.to_dict()
    if getattr(config.algorithm, "network_iters", 0) and config.a_bits < 32:   # as act_iters: nothing to tune at A32
        from .algorithms.network_phase import tune_step_sizes

        stats.network_phase = tune_step_sizes(model, calibration, config.algorithm, progress)
    if config.output_correction != "none":
        from .quantizers.output_correction import fit_output_correction

        stats.output_correction = fit_output_correction(model, calibration, config.output_correction)
        if on_trajectory:
            from .quantizers.output_correction import refit_on_trajectory

            stats.output_correction["trajectory"] = refit_on_trajectory(model, fp_model, sampling_loop, config.output_correction)
    model.gaq_info = QuantizationInfo(config, report, stats, held_out)
    return model
