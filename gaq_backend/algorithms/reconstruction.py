"""Block reconstruction (BRECQ / Q-Diffusion) shared by ``uniform``, ``temporal`` and ``gradient_aligned``.

Per unit, in forward order: cache inputs from the already-quantized model and targets from the FP
model; learn AdaRound rounding with activations off inside the unit; hard-round; then learn the unit's
activation step sizes LSQ-style. Every loss takes an optional weight per calibration sample.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Literal

import torch
from torch import nn
from tqdm import tqdm

from ..calibration import CalibrationSet
from ..config import SEED, AlgorithmConfig, QuantConfig, above, at_least, within
from ..quantizers.adaround import AdaRound
from ..quantizers.uniform import at_least_float32
from ..utils.memory import release_free_memory
from .block_cache import BlockData, concat, spill_to_disk
from .blocks import ReconUnit, reconstruction_units
from .common import full_precision, set_quant_state
from .fp_targets import RecordedTargets
from .memory_plan import MemoryPlan, plan_memory, probe_units
from .minmax import MinMaxConfig, fit_activations, fit_weights
from .result import UnitRecord
from .unit_stream import UnitStream


@dataclass
class ReconstructionConfig(AlgorithmConfig):
    """Published values (Q-Diffusion / BRECQ): iters 20000, act_iters 5000, batch 32, lr 1e-3,
    act_lr 4e-4, reg_weight 0.01, warmup 0.2, beta 20 -> 2, p 2.4. The defaults here are a CPU budget."""
    name: ClassVar[str] = ""
    iters: int = field(default=300, metadata=at_least(0))       # AdaRound iterations per unit
    act_iters: int = field(default=150, metadata=at_least(0))   # activation step-size iterations per unit (when a_bits < 32)
    batch_size: int = field(default=32, metadata=at_least(1))
    lr: float = field(default=1e-3, metadata=above(0))          # Adam on AdaRound's V
    act_lr: float = field(default=4e-4, metadata=above(0))      # Adam on activation step sizes, cosine schedule
    reg_weight: float = field(default=0.01, metadata=at_least(0))  # lambda of the rounding regulariser
    warmup: float = field(default=0.2, metadata=within(0, 1, hi_open=True))  # fraction of iters without the rounding term
    beta_start: float = field(default=20.0, metadata=above(0))
    beta_end: float = field(default=2.0, metadata=above(0))
    p: float = field(default=2.4, metadata=above(0))            # Lp norm of the activation-step loss (weights use p = 2)
    weight_range: Literal["max", "mse"] = "mse"
    act_range: Literal["minmax", "percentile"] = "minmax"   # initial activation ranges before LSQ
    percentile: float = field(default=99.99, metadata=within(50, 100, lo_open=True))
    cache_batch_size: int = field(default=64, metadata=at_least(1))  # rows per paused forward pass
    cache_memory_gib: float = field(default=0.0, metadata=at_least(0))  # unit cache above this goes to disk; 0: what free memory allows
    # FP targets: paused FP passes beside the quantized ones ("pass"), or recorded to disk by one FP pass
    # first ("disk": half the paused-pass memory); "auto": disk when the paused passes would crowd the cache
    fp_targets: Literal["auto", "pass", "disk"] = "auto"
    seed: int = field(default=0, metadata=SEED)
    # Our extension (issue 29), not in the papers: "sampling" weights each calibration sample by how far an error
    # at its timestep moves the final sample (calibration/step_sensitivity.py, measured on timestep_weight_rows FP
    # rows per recorded step), to the power timestep_weight_power; "none": every sample alike, as the papers do.
    timestep_weighting: Literal["none", "sampling"] = "none"
    timestep_weight_power: float = field(default=0.5, metadata=at_least(0))
    timestep_weight_rows: int = field(default=8, metadata=at_least(1))
    # Our extension (issue 29), not in the papers: > 0 runs that many Adam steps on every activation step size
    # jointly, against the FP noise prediction through the whole model, after the units (network_phase.py)
    network_iters: int = field(default=0, metadata=at_least(0))


def per_sample_lp(out: torch.Tensor, target: torch.Tensor, p: float) -> torch.Tensor:
    """BRECQ's Lp loss per sample: |d|^p summed over channels (dim 1), averaged over the rest."""
    d = (at_least_float32(out) - at_least_float32(target)).abs().pow(p).sum(1)  # float32 for half-precision models
    return d.flatten(1).mean(1) if d.dim() > 1 else d


def sample_factors(weights: torch.Tensor) -> torch.Tensor:
    """``N * w`` from normalised weights, via float64 so that uniform weights give exactly 1.0."""
    return (weights.double() * weights.numel()).float()


def rounding_loss(layers: list, it: int, iters: int, cfg: ReconstructionConfig) -> torch.Tensor | float:
    """AdaRound's rounding term: off for the warm-up fraction, then lambda * reg with beta decaying linearly."""
    warm = int(cfg.warmup * iters)
    if it < warm:
        return 0.0
    beta = cfg.beta_end + (cfg.beta_start - cfg.beta_end) * (1 - (it - warm) / max(1, iters - warm))
    return cfg.reg_weight * sum(l.weight_rounding.regularizer(beta) for l in layers)


@dataclass
class Shard:
    """Which of the ``n`` training rows of a unit this process holds (docs/distributed.md): ``local[p]`` is row
    ``p``'s index in this rank's own rows, -1 where another rank holds it. One process holds them all."""
    local: torch.Tensor

    @classmethod
    def of(cls, is_val: torch.Tensor, rows: torch.Tensor) -> "Shard":
        """The training rows (``~is_val``, in order) of which this rank holds the global rows ``rows``."""
        held = torch.zeros(len(is_val), dtype=torch.bool, device="cpu")   # row bookkeeping lives on the host
        held[rows] = True
        mine = held[~is_val]
        local = torch.full((len(mine),), -1, dtype=torch.long, device="cpu")
        local[mine] = torch.arange(int(mine.sum()), device="cpu")
        return cls(local)

    @property
    def n(self) -> int:
        return len(self.local)

    @property
    def split(self) -> bool:
        return bool((self.local < 0).any())

    def mine(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(local indices of the batch rows held here, mask of them in ``idx``)."""
        lp = self.local[idx]
        return lp[lp >= 0], lp >= 0


def sharded_loss(per_sample: Callable[[torch.Tensor], torch.Tensor], shard: Shard, factors: torch.Tensor | None,
                 idx: torch.Tensor) -> torch.Tensor | None:
    """This rank's part of the batch ``idx``'s mean loss (``per_sample(local_idx)`` on its rows, weighted by
    ``factors``): the parts sum over ranks to the mean one process computes. None when it holds no row of it."""
    local, held = shard.mine(idx)
    if not len(local):
        return None
    loss = per_sample(local)
    if factors is not None:
        loss = loss * factors[idx[held]].to(loss.device, loss.dtype)
    return loss.mean() if len(local) == len(idx) else loss.sum() / len(idx)


def _step(opt: torch.optim.Optimizer, params: list[torch.Tensor], loss: torch.Tensor | None, sharded: bool,
          extra: Callable[[], torch.Tensor | float] | None = None) -> float:
    """Backward of ``loss`` (this rank's part when ``sharded``: gradients and loss summed over ranks), then of
    ``extra()`` (a term every rank computes alike, e.g. AdaRound's regulariser), then the step; returns the loss."""
    from .. import distributed

    opt.zero_grad(set_to_none=True)
    if loss is not None:
        loss.backward()
    value = loss.detach() if loss is not None else torch.zeros((), device=params[0].device)
    if sharded:
        (value,) = distributed.sum_gradients(params, [value])
    term = extra() if extra is not None else 0.0
    if isinstance(term, torch.Tensor):
        term.backward()
    opt.step()
    return float(value)


def learn_rounding(layers: list, n: int, iters: int, cfg: ReconstructionConfig, gen: torch.Generator,
                   batch_loss: Callable[[torch.Tensor], torch.Tensor | None], keep_float: bool = False,
                   sharded: bool = False) -> list[float]:
    """AdaRound on ``layers``: Adam on V against ``batch_loss(idx)`` plus the rounding term, then hard rounding.
    ``keep_float`` keeps the FP float weight beside the integer codes, for layers that FP passes still run
    (``full_precision``); otherwise the rounded weight replaces it. ``sharded``: ``batch_loss`` is this rank's part
    of the loss (:func:`sharded_loss`). Returns the reconstruction-loss curve."""
    for l in layers:
        l.weight_rounding = AdaRound(l)
    params = [v for l in layers for v in l.weight_rounding.V]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    curve = []
    for it in range(iters):
        loss = batch_loss(torch.randint(n, (min(cfg.batch_size, n),), generator=gen, device="cpu"))
        curve.append(_step(opt, params, loss, sharded, lambda: rounding_loss(layers, it, iters, cfg)))
    for l in layers:  # hard rounding: h = 1[V >= 0]
        l.freeze_weight(sync_float=False) if keep_float else l.round_in_place()
    return curve


def reconstruct_unit(unit: ReconUnit, data: BlockData, cfg: ReconstructionConfig, a_bits: int,
                     factors: torch.Tensor | None = None, gen: torch.Generator | None = None, shard: Shard | None = None) -> dict:
    """The reconstruction loop for one unit; returns the loss curve of its AdaRound phase. ``shard``: the training
    rows this rank holds of all ranks' (``data`` holds those); the batches are drawn over all of them."""
    mod, layers = unit.module, [l for _, l in unit.layers()]
    shard = shard or Shard(torch.arange(len(data), device="cpu"))
    n, sharded = shard.n, shard.split
    gen = gen or torch.Generator().manual_seed(cfg.seed)
    set_quant_state(mod, weight=True, act=False)
    # an attention unit whose linear layers are all kept has only matmul quantizers: nothing to round
    curve = learn_rounding(layers, n, cfg.iters, cfg, gen,
                           lambda idx: sharded_loss(lambda i: per_sample_lp(*data.run(mod, i), 2.0), shard, factors, idx),
                           sharded=sharded) if layers else []
    set_quant_state(mod, weight=True, act=True)
    act_qs = unit.act_quantizers() if a_bits < 32 else []
    if act_qs and cfg.act_iters:
        scales = [q.scale.requires_grad_(True) for q in act_qs]
        opt = torch.optim.Adam(scales, lr=cfg.act_lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.act_iters, eta_min=0.0)
        for _ in range(cfg.act_iters):
            idx = torch.randint(n, (min(cfg.batch_size, n),), generator=gen, device="cpu")
            _step(opt, scales, sharded_loss(lambda i: per_sample_lp(*data.run(mod, i), cfg.p), shard, factors, idx), sharded)
            sched.step()
            with torch.no_grad():
                for s in scales:
                    s.clamp_(min=1e-8)
        for s in scales:
            s.requires_grad_(False)
    return {"curve": curve}


@torch.no_grad()
def unit_mse(unit: ReconUnit, data: BlockData, batch_size: int, limit: int = 256, shard: Shard | None = None) -> float:
    """The unit's output MSE on its first ``limit`` rows (of all ranks' with ``shard``), in batches (a unit's
    activations, attention scores above all, grow with the rows run at once)."""
    from .. import distributed

    total, count = torch.zeros((), dtype=torch.float64, device="cpu"), torch.zeros((), dtype=torch.float64, device="cpu")
    rows = torch.arange(min(limit, len(data) if shard is None else shard.n), device="cpu")
    if shard is not None:
        rows = shard.mine(rows)[0]
    for idx in rows.split(batch_size):
        out, target = data.run(unit.module, idx)
        total += (at_least_float32(out) - at_least_float32(target)).pow(2).sum().double().cpu()
        count += out.numel()
    if shard is not None and shard.split:
        total, count = distributed.sum_tensors([total, count])
    return float(total / count)


# weight_fn(unit, data, train_mask, held): factors over all ranks' training rows (train_mask: of the whole set); data
# holds the rows ``held`` (None: all of them), as a rank holds its share (docs/distributed.md)
WeightFn = Callable[[ReconUnit, BlockData, torch.Tensor, "torch.Tensor | None"], "torch.Tensor | None"]


def timestep_factors(model: nn.Module, calib: CalibrationSet, cfg: ReconstructionConfig, train_mask: torch.Tensor,
                     log: Callable[[str], None] | None) -> torch.Tensor:
    """``N * w`` over the training rows for ``timestep_weighting: sampling``: sensitivity ** power, mean 1. Every
    rank measures the same rows; the mean over ranks makes the factors bit-identical everywhere."""
    from .. import distributed
    from ..calibration.step_sensitivity import step_sensitivity

    with full_precision(model):
        sens = step_sensitivity(model, calib, cfg.timestep_weight_rows, cfg.seed)
    ts = sorted(sens)
    (per_t,) = distributed.sum_tensors([torch.tensor([sens[t] for t in ts], dtype=torch.float64)])
    per_t = per_t / distributed.world()[1]
    if log is not None:
        log("timestep weighting: sensitivity " + ", ".join(f"t={t:g}: {v:.2g}" for t, v in zip(ts, per_t.tolist())))
    lookup = dict(zip(ts, per_t.clamp_min(1e-12).pow(cfg.timestep_weight_power).tolist()))
    f = torch.tensor([lookup[float(t)] for t in calib.t[train_mask].tolist()], dtype=torch.float64)
    return (f / f.mean()).float()


def _combined(learned: torch.Tensor | None, by_timestep: torch.Tensor | None) -> torch.Tensor | None:
    """Learned factors (gradient_aligned's) on top of the timestep factors, renormalised to mean 1."""
    if learned is None or by_timestep is None:
        return by_timestep if learned is None else learned
    f = learned.double() * by_timestep.double()
    return (f / f.mean()).float()


def init_ranges(model: nn.Module, config: QuantConfig, calib: CalibrationSet, cfg: ReconstructionConfig, progress: bool) -> None:
    fit_weights(model, cfg.weight_range)
    if config.a_bits < 32:
        # one range per quantizer: reconstruction learns the step size itself (a timestep table would bypass it)
        fit_activations(model, calib.train, MinMaxConfig(act_range=cfg.act_range, percentile=cfg.percentile, timestep_ranges="global",
                                                         batch_size=cfg.cache_batch_size), progress)


def plan_sweep(model: nn.Module, config: QuantConfig, calib: CalibrationSet, cfg: ReconstructionConfig,
               exclude: tuple[str, ...] = (), log: Callable[[str], None] | None = print, rows: int | None = None,
               device: torch.device | None = None) -> tuple[list[ReconUnit], MemoryPlan]:
    """The units in forward order and the memory plan for ``rows`` (default: all of ``calib``'s) calibration
    rows shaped like ``calib``'s (under torch.distributed: this rank's share of them), printed with ``log``;
    refused when it cannot fit."""
    from .. import distributed

    units = reconstruction_units(model, exclude)
    with full_precision(model):  # shapes only; the quantizers may not be calibrated yet
        probe = probe_units(model, units, calib)
    rows = len(calib) if rows is None else rows
    calib_bytes = sum(v.numel() * v.element_size() for v in [calib.x, calib.t, calib.eps, *calib.cond.values()]) * rows // len(calib)
    size = distributed.world()[1]   # each rank caches 1/N of the rows (and holds the whole calibration set)
    plan = plan_memory(model, probe, -(-rows // size), calib_bytes, cfg.batch_size, cfg.cache_memory_gib, device, cfg.cache_batch_size,
                       cfg.fp_targets)
    if log is not None:
        log(plan.summary() + (f" (per rank, {size} processes)" if size > 1 else ""))
    return probe.order, plan


def _unit_data(fp: UnitStream | RecordedTargets, quant: UnitStream, calib: CalibrationSet, plan: MemoryPlan, spill_dir: str) -> tuple[BlockData, str | None]:
    """The next unit's FP targets and quantized-model inputs over the calibration set, spilled above the budget."""
    target = fp.next() if isinstance(fp, RecordedTargets) else concat(fp.next())
    inputs = quant.next()
    args = [concat([i[0][k] for i in inputs]) for k in range(len(inputs[0][0]))]
    kwargs = {k: concat([i[1][k] for i in inputs]) for k in inputs[0][1]}
    data = BlockData(args, kwargs, target, calib.t)
    if data.nbytes() <= plan.budget:
        return data, None
    return spill_to_disk(data, spill_dir)


def sweep(model: nn.Module, config: QuantConfig, calib: CalibrationSet, cfg: ReconstructionConfig,
          progress: bool, units: list[ReconUnit], plan: MemoryPlan, weight_fn: WeightFn | None = None) -> dict[str, UnitRecord]:
    """Reconstruct ``units`` (in forward order, from ``plan_sweep``). ``weight_fn(unit, data, train_mask, held)`` may
    return per-sample factors (``N * w_i``) for the unit's training samples; None means uniform weighting."""
    from .. import distributed

    gen = torch.Generator().manual_seed(cfg.seed)   # seeded alike on every rank: the same batches everywhere
    shard = held = None
    all_train = ~calib.is_val
    by_timestep = (timestep_factors(model, calib, cfg, all_train, print if progress else None)
                   if cfg.timestep_weighting == "sampling" else None)
    if distributed.world()[1] > 1:   # this rank's rows only: its unit caches hold 1/N of every unit's data
        held = distributed.owned(len(calib))
        calib, shard = calib.subset(held), Shard.of(calib.is_val, held)
    train_mask = ~calib.is_val
    stats: dict[str, UnitRecord] = {}
    modules = [(u.name, u.module) for u in units]
    fp_mode = lambda: full_precision(model)  # noqa: E731
    fp_source = (RecordedTargets(model, modules, calib, cfg.cache_batch_size, config.calibration.cache_dir, fp_mode, progress)
                 if plan.fp_targets == "disk" else UnitStream(model, modules, calib, cfg.cache_batch_size, "outputs", fp_mode))
    with fp_source as fp, UnitStream(model, modules, calib, cfg.cache_batch_size, "inputs") as quant:
        bar = tqdm(units, desc="reconstruct", unit="block", disable=not progress)
        for unit in bar:
            bar.set_postfix_str(unit.name)
            t0 = time.perf_counter()
            data, spilled = _unit_data(fp, quant, calib, plan, config.calibration.cache_dir)
            try:
                t1 = time.perf_counter()
                factors = _combined(weight_fn(unit, data, all_train, held) if weight_fn is not None else None, by_timestep)
                t2 = time.perf_counter()
                train = data.subset(train_mask)
                before = unit_mse(unit, train, cfg.batch_size, shard=shard)
                info = reconstruct_unit(unit, train, cfg, config.a_bits, factors, gen, shard)
                curve = info["curve"]
                stats[unit.name] = UnitRecord(unit.kind, before, unit_mse(unit, train, cfg.batch_size, shard=shard),
                                              curve[0] if curve else math.nan, curve[-1] if curve else math.nan,
                                              t1 - t0, t2 - t1, time.perf_counter() - t2, on_disk=spilled is not None)
            finally:
                data = train = None  # the last references to a memory-mapped file
                if spilled is not None:
                    os.remove(spilled)
                release_free_memory()
    set_quant_state(model, weight=True, act=True)
    return stats
