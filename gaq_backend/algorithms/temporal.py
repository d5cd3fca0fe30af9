"""``temporal``: TFMQ-DM (algorithm.md section 5).

As ``uniform``, plus: the time-embedding MLP and every block's time projection form a Temporal
Information Block, reconstructed jointly on the time-feature outputs (TIAR) before the other units;
its activation ranges are fitted per sampler timestep (finite-set calibration) and selected by
timestep at inference. The time path depends on t alone, so the TIB's calibration set is exactly the
sampler's timesteps, and each range is the exact min/max at that step (the fixed point of TFMQ-DM's
EMA with momentum 0.95 over repeated identical batches).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..calibration import CalibrationSet
from ..config import QuantConfig, at_least
from ..quantizers.observers import MinMaxObserver
from ..quantizers.timestep import current_timesteps, install_timestep_hook
from ..wrapping import QuantLayerMixin
from .common import full_precision, set_quant_state
from .reconstruction import ReconstructionConfig, WeightFn, init_ranges, learn_rounding, per_sample_lp, plan_sweep, sweep
from .registry import register_algorithm
from .result import CalibrationRecord, TemporalBlockRecord


@dataclass
class TemporalConfig(ReconstructionConfig):
    name: ClassVar[str] = "temporal"
    tib_iters: int = field(default=300, metadata=at_least(0))   # TIAR iterations on the temporal information block


def time_path_layers(model: nn.Module) -> dict[str, QuantLayerMixin]:
    """The wrapped layers of the temporal information block: time_embedding.* and every *.time_emb_proj."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLayerMixin)
            and (n.startswith("time_embedding.") or n.endswith(".time_emb_proj"))}


def time_features(model: nn.Module, t: torch.Tensor) -> list[torch.Tensor]:
    """Outputs of every ResNet block's time projection for timesteps ``t`` (the TIB's outputs)."""
    temb = model.time_embedding(model.time_proj(t).to(next(model.parameters()).dtype))
    return [res.time_emb_proj(res.nonlinearity(temb)) for _, res in _resnets_with_time(model)]


def _resnets_with_time(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if getattr(m, "time_emb_proj", None) is not None]


def reconstruct_tib(model: nn.Module, layers: dict[str, QuantLayerMixin], t_all: torch.Tensor,
                    cfg: TemporalConfig, a_bits: int, gen: torch.Generator) -> TemporalBlockRecord:
    with torch.no_grad(), full_precision(model):
        targets = time_features(model, t_all)
    tib = list(layers.values())
    for l in tib:
        l.use_act_quant = False

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        return sum(per_sample_lp(o, tg[idx], 2.0).mean() for o, tg in zip(time_features(model, t_all[idx]), targets))

    curve = learn_rounding(tib, len(t_all), cfg.tib_iters, cfg, gen, batch_loss, keep_float=True)  # the FP passes run them
    for l in tib:
        l.use_act_quant = True
    if a_bits < 32:
        fit_timestep_ranges(model, tib, t_all)
    with torch.no_grad(), current_timesteps(t_all):
        err = sum(float((o - tg).pow(2).mean()) for o, tg in zip(time_features(model, t_all), targets))
    return TemporalBlockRecord(len(t_all), len(tib), curve[0] if curve else None, curve[-1] if curve else None, err)


@torch.no_grad()
def fit_timestep_ranges(model: nn.Module, tib: list[QuantLayerMixin], t_all: torch.Tensor) -> None:
    """Finite-set calibration: for each timestep, the exact range of each TIB input activation."""
    qs = [q for l in tib for q in l.act_quantizers if q.enabled]
    per_t = {id(q): ([], []) for q in qs}
    for t in t_all:
        obs = {id(q): MinMaxObserver() for q in qs}
        for q in qs:
            q.observer = obs[id(q)]
        try:
            time_features(model, t.view(1))
        finally:
            for q in qs:
                q.observer = None
        for q in qs:
            lo, hi = obs[id(q)].range()
            per_t[id(q)][0].append(lo); per_t[id(q)][1].append(hi)
    for q in qs:
        q.set_timestep_ranges(t_all, torch.stack(per_t[id(q)][0]), torch.stack(per_t[id(q)][1]))


@register_algorithm(TemporalConfig)
def calibrate_temporal(model: nn.Module, config: QuantConfig, calib: CalibrationSet, fp_model: nn.Module | None = None, progress: bool = True,
                       weight_fn: WeightFn | None = None) -> CalibrationRecord:
    """TIB first, then the other units; ``weight_fn`` (see ``sweep``) weights the units' samples."""
    cfg: TemporalConfig = config.algorithm
    if calib.timesteps is None:
        raise ValueError("temporal calibration needs the sampler's timesteps in the calibration set (re-capture it)")
    layers = time_path_layers(model)
    units, plan = plan_sweep(model, config, calib, cfg, exclude=tuple(layers), log=print if progress else None)
    init_ranges(model, config, calib, cfg, progress)
    tib: TemporalBlockRecord | str = "all time-path layers are kept in full precision (keep_fp); nothing to reconstruct"
    if layers:
        install_timestep_hook(model)
        t0 = time.perf_counter()
        set_quant_state(model, weight=True, act=True)
        tib = reconstruct_tib(model, layers, calib.timesteps.float(), cfg, config.a_bits, torch.Generator().manual_seed(cfg.seed + 1))
        tib.seconds = time.perf_counter() - t0
    blocks = sweep(model, config, calib, cfg, progress, units, plan, weight_fn=weight_fn)
    return CalibrationRecord(plan.to_dict(), blocks, temporal_block=tib)
