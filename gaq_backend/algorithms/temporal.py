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
from ..sampling import unet_forward
from .common import full_precision, set_quant_state
from .reconstruction import ReconstructionConfig, WeightFn, init_ranges, learn_rounding, per_sample_lp, plan_sweep, sweep
from .registry import register_algorithm
from .result import CalibrationRecord, TemporalBlockRecord


@dataclass
class TemporalConfig(ReconstructionConfig):
    name: ClassVar[str] = "temporal"
    tib_iters: int = field(default=300, metadata=at_least(0))   # TIAR iterations on the temporal information block


def is_unet_time_path(model: nn.Module) -> bool:
    """A diffusers UNet's time path: ``time_proj`` -> ``time_embedding`` -> each ResNet's ``time_emb_proj``,
    callable directly from t (the fast path TFMQ-DM's code takes)."""
    return hasattr(model, "time_proj") and hasattr(model, "time_embedding")


def time_path_layers(model: nn.Module, calib: CalibrationSet | None = None) -> dict[str, QuantLayerMixin]:
    """The wrapped layers of the temporal information block. A UNet's: time_embedding.* and every *.time_emb_proj.
    Any other model's (diffusion transformers), found from its inputs: the layers whose input is one vector per
    row and the same for every row at one timestep, whatever else differs (latent, text, class), in one probe
    call on the calibration rows of one step: the timestep (and per-call guidance) embedders. Their order is
    the order they run in."""
    if is_unet_time_path(model):
        return {n: m for n, m in model.named_modules() if isinstance(m, QuantLayerMixin)
                and (n.startswith("time_embedding.") or n.endswith(".time_emb_proj"))}
    if calib is None:
        return {}
    step = int(torch.mode(calib.step).values)   # the step with the most rows: a probe needs two or more
    rows = calib.subset(calib.step == step).spread(8)
    if len(rows) < 2:
        return {}
    names = {m: n for n, m in model.named_modules() if isinstance(m, QuantLayerMixin)}
    seen: dict[str, list] = {}

    def record(module, args):
        seen.setdefault(names[module], []).append(args[0].detach())

    handles = [m.register_forward_pre_hook(record) for m in names]
    try:
        with torch.no_grad(), full_precision(model):
            unet_forward(model, rows.x, rows.t, rows.cond)
    finally:
        for h in handles:
            h.remove()
    # equal up to float noise: a batched matmul need not give bit-identical rows for identical inputs
    # (a layer may run more than once: DiT's last layer reuses the first block's timestep embedder)
    pure = [n for n, ins in seen.items() if all(v.dim() == 2 and float((v - v[:1]).abs().max()) <= 1e-5 * float(v.abs().max()) + 1e-12
                                                  for v in ins)]
    return {n: model.get_submodule(n) for n in pure}


class _TimePathDone(Exception):
    """Raised by the hook of the time path's last layer: the rest of the forward is not needed."""


def time_features(model: nn.Module, t: torch.Tensor, layers: dict[str, QuantLayerMixin] | None = None,
                  rows: CalibrationSet | None = None) -> list[torch.Tensor]:
    """The TIB's outputs for timesteps ``t``: a UNet's ResNet time projections, computed from t; for other models
    every time-path layer's output in a forward of ``rows`` (one calibration row per entry of ``t``), stopped
    after the last of them."""
    if is_unet_time_path(model):
        temb = model.time_embedding(model.time_proj(t).to(next(model.parameters()).dtype))
        return [res.time_emb_proj(res.nonlinearity(temb)) for _, res in _resnets_with_time(model)]
    outs: dict[str, torch.Tensor] = {}
    last = list(layers)[-1]

    def keep(name):
        def hook(module, args, out):
            outs.setdefault(name, out)   # a layer's first call (the last one ends the pass at its first)
            if name == last:
                raise _TimePathDone
        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in layers.items()]
    try:
        unet_forward(model, rows.x, rows.t, rows.cond)
    except _TimePathDone:
        pass
    finally:
        for h in handles:
            h.remove()
    return [outs[n] for n in layers]


def rows_per_timestep(calib: CalibrationSet) -> CalibrationSet:
    """One calibration row for each recorded timestep, in ``calib.timesteps`` order."""
    idx = [int(torch.nonzero(calib.t == t)[0]) for t in calib.timesteps]
    return calib.subset(torch.tensor(idx, device="cpu"))


def _resnets_with_time(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if getattr(m, "time_emb_proj", None) is not None]


def reconstruct_tib(model: nn.Module, layers: dict[str, QuantLayerMixin], t_all: torch.Tensor,
                    cfg: TemporalConfig, a_bits: int, gen: torch.Generator, rows: CalibrationSet | None = None) -> TemporalBlockRecord:
    """TIAR; ``rows``: one calibration row per timestep of ``t_all`` (models without a UNet's time path)."""
    def features(idx=None):
        return time_features(model, t_all if idx is None else t_all[idx], layers,
                             None if rows is None else (rows if idx is None else rows.subset(idx)))

    with torch.no_grad(), full_precision(model):
        targets = features()
    tib = list(layers.values())
    for l in tib:
        l.use_act_quant = False

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        return sum(per_sample_lp(o, tg[idx], 2.0).mean() for o, tg in zip(features(idx), targets))

    curve = learn_rounding(tib, len(t_all), cfg.tib_iters, cfg, gen, batch_loss, keep_float=True)  # the FP passes run them
    for l in tib:
        l.use_act_quant = True
    if a_bits < 32:
        fit_timestep_ranges(model, tib, t_all, lambda i: features(torch.tensor([i], device="cpu")))
    with torch.no_grad(), current_timesteps(t_all):
        err = sum(float((o - tg).pow(2).mean()) for o, tg in zip(features(), targets))
    return TemporalBlockRecord(len(t_all), len(tib), curve[0] if curve else None, curve[-1] if curve else None, err)


@torch.no_grad()
def fit_timestep_ranges(model: nn.Module, tib: list[QuantLayerMixin], t_all: torch.Tensor, features) -> None:
    """Finite-set calibration: for each timestep, the exact range of each TIB input activation (``features(i)``
    runs the time path at timestep ``t_all[i]``)."""
    qs = [q for l in tib for q in l.act_quantizers if q.enabled]
    per_t = {id(q): ([], []) for q in qs}
    for i in range(len(t_all)):
        obs = {id(q): MinMaxObserver() for q in qs}
        for q in qs:
            q.observer = obs[id(q)]
        try:
            features(i)
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
    layers = time_path_layers(model, calib)
    units, plan = plan_sweep(model, config, calib, cfg, exclude=tuple(layers), log=print if progress else None)
    init_ranges(model, config, calib, cfg, progress)
    tib: TemporalBlockRecord | str = "all time-path layers are kept in full precision (keep_fp); nothing to reconstruct"
    if layers:
        install_timestep_hook(model)
        t0 = time.perf_counter()
        set_quant_state(model, weight=True, act=True)
        rows = None if is_unet_time_path(model) else rows_per_timestep(calib)
        tib = reconstruct_tib(model, layers, calib.timesteps.float(), cfg, config.a_bits, torch.Generator().manual_seed(cfg.seed + 1),
                              rows)
        tib.seconds = time.perf_counter() - t0
    blocks = sweep(model, config, calib, cfg, progress, units, plan, weight_fn=weight_fn)
    return CalibrationRecord(plan.to_dict(), blocks, temporal_block=tib)
