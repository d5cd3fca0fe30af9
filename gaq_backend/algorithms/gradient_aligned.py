"""``gradient_aligned``: meta-learned sample weights for block reconstruction (algorithm.md section 6).

Algorithm 1: for each unit, learn one weight per training calibration sample (Algorithm 2), then
reconstruct the unit exactly as ``uniform`` (or ``temporal``) does, with the loss of sample i scaled
by N * w_i.

Algorithm 2, per unit: logits s, w = softmax(s / tau). Each outer step takes one inner step of the
unit's AdaRound parameters theta on the w-weighted loss of a training batch, evaluates the validation
loss per timestep group at theta', and moves s down the gradient of L_mse(val) + L_gm^(2). To first
order dL_g/dw_i = -eta * grad l_i(theta) . G_g(theta'), so the outer step needs only the dot products
of each batch sample's gradient with each group gradient; central differences give them from 2G
no-grad forwards of the batch, without materialising per-sample gradients. ``order: second``
differentiates through the inner step with autograd instead (exact; about 3.5x the first-order cost per step here).
A probe copy of theta advances with the inner gradient (learning-to-reweight style) and is discarded.

theta is AdaRound's V only: the reconstruction's rounding phase runs with the unit's activation
quantizers off, and with them on the loss would be piecewise constant in V (finite differences and
the first-order identity would see rounding noise). Activation step sizes are still learned with the
weighted loss in the reconstruction's second phase.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import nn

from ..calibration import CalibrationSet
from ..config import ConfigError, QuantConfig, above, at_least
from ..quantizers.adaround import AdaRound
from .block_cache import BlockData
from .blocks import ReconUnit
from .common import set_quant_state
from .reconstruction import Shard, per_sample_lp, sample_factors, sharded_loss
from .registry import register_algorithm
from .result import CalibrationRecord
from .sample_weights import SampleWeights, UnitWeights
from .temporal import TemporalConfig, calibrate_temporal
from .uniform import calibrate_uniform


@dataclass
class GradientAlignedConfig(TemporalConfig):
    """Paper values in brackets. The validation split and the timestep groups are the calibration
    section's ``val_fraction`` [0.05] and ``n_groups`` [5]."""
    name: ClassVar[str] = "gradient_aligned"
    base: Literal["uniform", "temporal"] = "uniform"   # reconstruction the weights plug into
    tau: float = field(default=1.0, metadata=above(0))          # softmax temperature [1; 0.2 collapses]
    outer_iters: int = field(default=16, metadata=at_least(0))  # outer steps per unit [1500]
    # Adam on the logits [5e-6]. Adam moves a logit by about outer_lr per step, so the paper's 1,500 x 5e-6
    # changes weights by < 1%; 16 x 0.05 lets them move by up to e^0.8 (docs/benchmarks.md, ablation rows)
    outer_lr: float = field(default=0.05, metadata=above(0))
    outer_batch_size: int = field(default=32, metadata=at_least(1))  # training samples per inner step
    inner_lr: float = field(default=1e-3, metadata=above(0))    # RMS size of the inner step on V (the gradient is normalised) [not given]
    init_logit: float = 1 / 32        # [1/32]; any constant gives uniform weights
    alignment: Literal["dot", "cosine"] = "dot"          # L_gm^(2) as written, or on cosines (Figure 1a)
    order: Literal["first", "second"] = "first"          # outer gradient: first-order identity or exact autograd
    validation: Literal["mse+gm", "mse"] = "mse+gm"      # "mse" drops L_gm (ablation)
    fd_step: float = field(default=1e-3, metadata=above(0))     # central-difference step: max |change of V| along a group gradient
    diagnostics: bool = True          # entropy, gradient cosine distances, weight-vs-alignment data and plots
    diagnostic_samples: int = field(default=256, metadata=at_least(1))  # training samples used for the per-group gradient cosine distances


def softmax_vjp(w: torch.Tensor, d: torch.Tensor, tau: float) -> torch.Tensor:
    """J^T d for J = dw/ds, w = softmax(s / tau): the gradients dL_g/ds from dL_g/dw (columns of ``d``)."""
    return w[:, None] * (d - (w @ d)[None, :]) / tau


def alignment_loss(gw: torch.Tensor, kind: str) -> torch.Tensor:
    """L_gm^(2): minus the mean similarity over unordered pairs of the columns of ``gw`` (one per group)."""
    if kind == "cosine":
        gw = gw / gw.norm(dim=0, keepdim=True).clamp_min(1e-300)
    gram = gw.T @ gw
    i, j = torch.triu_indices(gw.shape[1], gw.shape[1], 1)
    return -gram[i, j].mean()


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    return sum((x.double() * y.double()).sum() for x, y in zip(a, b))


def _norm(a: list[torch.Tensor]) -> float:
    return math.sqrt(float(_dot(a, a))) or 1e-300


def _cos_distances(grads: list[list[torch.Tensor]]) -> list[list[float]]:
    norms = [_norm(g) for g in grads]
    return [[1 - float(_dot(a, b)) / (na * nb) for b, nb in zip(grads, norms)] for a, na in zip(grads, norms)]


def _mean_offdiag(m: list[list[float]]) -> float:
    vals = [m[i][j] for i in range(len(m)) for j in range(len(m)) if i != j]
    return sum(vals) / len(vals) if vals else math.nan


class UnitProbe:
    """A unit's AdaRound parameters as plain tensors and its per-sample losses as a function of them."""

    def __init__(self, unit: ReconUnit, train: Shard | None = None, val: Shard | None = None) -> None:
        # train / val: which of all ranks' rows this process's data holds (None: all); the gradients and
        # alignments below are then this rank's parts, summed over ranks (docs/distributed.md)
        self.train, self.val = train, val
        self.sharded = bool(train is not None and (train.split or val.split))
        self.module, self.layers = unit.module, [l for _, l in unit.layers()]
        for l in self.layers:
            l.weight_rounding = AdaRound(l)
        named = [(n, p) for n, p in self.module.named_parameters() if "weight_rounding.V." in n]
        self.names = [n for n, _ in named]
        self.theta = [p.detach().clone().requires_grad_(True) for _, p in named]

    def losses(self, theta: list[torch.Tensor], data: BlockData, idx: torch.Tensor) -> torch.Tensor:
        out, target = data.run(self.module, idx, dict(zip(self.names, theta)))
        return per_sample_lp(out, target, 2.0)

    def grad(self, part: torch.Tensor | None, theta: list[torch.Tensor], create_graph: bool = False,
             retain_graph: bool | None = None) -> list[torch.Tensor]:
        """d part / d theta, summed over ranks when sharded (a rank without rows in it adds zeros)."""
        from .. import distributed

        g = (list(torch.autograd.grad(part, theta, create_graph=create_graph, retain_graph=retain_graph)) if part is not None
             else [torch.zeros_like(t) for t in theta])
        return distributed.sum_tensors(g, theta[0].dtype) if self.sharded else g

    def mean_loss(self, theta: list[torch.Tensor], data: BlockData, idx: torch.Tensor, factors: torch.Tensor | None = None,
                  val: bool = False) -> torch.Tensor | None:
        """This rank's part of the mean loss of rows ``idx`` (of all ranks' training or validation rows)."""
        shard = (self.val if val else self.train) or Shard(torch.arange(len(data), device="cpu"))
        return sharded_loss(lambda i: self.losses(theta, data, i), shard, factors, idx)

    def group_grads(self, theta: list[torch.Tensor], data: BlockData, groups: list[torch.Tensor],
                    create_graph: bool = False) -> tuple[list[list[torch.Tensor]], torch.Tensor]:
        """Gradient of each validation group's mean loss, and the losses (this rank's parts when sharded)."""
        grads, losses = [], []
        for idx in groups:
            loss = self.mean_loss(theta, data, idx, val=True)
            grads.append(self.grad(loss, theta, create_graph))
            losses.append(loss if loss is not None else torch.zeros((), device=theta[0].device))
        return grads, torch.stack(losses)

    @torch.no_grad()
    def alignments(self, theta: list[torch.Tensor], data: BlockData, idx: torch.Tensor,
                   directions: list[list[torch.Tensor]], fd_step: float) -> torch.Tensor:
        """(B, G) matrix of grad l_i(theta) . direction_g by central differences, in float64 (``idx``: training rows;
        when sharded each rank fills the rows it holds and the matrix is summed)."""
        from .. import distributed

        local, held = (self.train.mine(idx) if self.train is not None else (idx, torch.ones(len(idx), dtype=torch.bool)))
        out = torch.zeros(len(idx), len(directions), dtype=torch.float64, device="cpu")
        for g, d in enumerate(directions):
            if not len(local):
                continue
            eps = fd_step / max(max(float(x.abs().max()) for x in d), 1e-30)
            plus = self.losses([t + eps * x for t, x in zip(theta, d)], data, local).double()
            minus = self.losses([t - eps * x for t, x in zip(theta, d)], data, local).double()
            out[held, g] = ((plus - minus) / (2 * eps)).cpu()
        return distributed.sum_tensors([out])[0] if self.sharded else out

    def close(self) -> None:
        for l in self.layers:
            l.weight_rounding = None


@dataclass
class OuterStep:
    grad_s: torch.Tensor                    # gradient of the validation objective in the logits
    inner_grad: list[torch.Tensor]          # the inner step's gradient on theta (the probe also steps with it)
    eta: float                              # the inner step's SGD learning rate (inner_lr / RMS of inner_grad)
    group_grads: list[list[torch.Tensor]]   # G_g at theta'
    alignments: torch.Tensor                # (B, G): grad l_i(theta) . G_g
    gm_ratio: float | None                  # |grad L_gm| / |grad L_mse| in logit space


def outer_step(probe: UnitProbe, theta: list[torch.Tensor], s: torch.Tensor, idx: torch.Tensor, train: BlockData,
               val: BlockData, val_groups: list[torch.Tensor], p: torch.Tensor, cfg: GradientAlignedConfig) -> OuterStep:
    """d/ds of L_mse(theta'(s); val) [+ L_gm^(2)] for theta' = theta - eta * grad of the batch's N*w-weighted loss."""
    n, b = len(s), len(idx)
    first = cfg.order == "first"
    s_ = s.detach().requires_grad_(True)
    w = torch.softmax(s_ / cfg.tau, 0)
    th = [t.detach().requires_grad_(True) for t in theta]
    inner = probe.mean_loss(th, train, idx, n * w)
    g = probe.grad(inner, th, create_graph=not first)
    # the step's size is fixed (RMS = inner_lr) and its normaliser held constant in the outer gradient
    rms = torch.sqrt(sum(x.detach().pow(2).sum() for x in g) / sum(x.numel() for x in g))
    eta = cfg.inner_lr / max(float(rms), 1e-30)
    if first:
        theta_p = [(t - eta * x).detach().requires_grad_(True) for t, x in zip(th, g)]
        G, _ = probe.group_grads(theta_p, val, val_groups)
        A = probe.alignments([t.detach() for t in th], train, idx, G, cfg.fd_step)
        # the sample weights and their bookkeeping live on the host, beside the calibration data
        d = torch.zeros(n, len(val_groups), dtype=torch.float64, device="cpu").index_add_(0, idx, -(eta * n / b) * A.to("cpu", torch.float64))
        objective = (w * (d @ p)).sum()   # its gradient in s is the validation MSE's, J^T d p
    else:
        theta_p = [t - eta * x for t, x in zip(th, g)]
        G, losses = probe.group_grads(theta_p, val, val_groups, create_graph=True)
        d = torch.stack([torch.autograd.grad(l, w, create_graph=True)[0] for l in losses.double()], 1)
        A = -d[idx].detach() / (eta * n / b)
        objective = losses.double() @ p
    with_gm = cfg.validation == "mse+gm"
    grad_s = torch.autograd.grad(objective, s_, retain_graph=with_gm)[0]
    ratio = None
    if with_gm:
        grad_gm = torch.autograd.grad(alignment_loss(softmax_vjp(w, d, cfg.tau), cfg.alignment), s_)[0]
        ratio = float(grad_gm.norm() / grad_s.norm().clamp_min(1e-300))
        grad_s = grad_s + grad_gm
    return OuterStep(grad_s.detach(), [x.detach() for x in g], eta, [[x.detach() for x in gg] for gg in G], A.detach(), ratio)


def validation_groups(group: torch.Tensor, is_val: torch.Tensor) -> list[torch.Tensor]:
    """Indices into the validation split of each timestep group's validation samples (none may be empty)."""
    g_val = group[is_val]
    groups = [(g_val == g).nonzero().flatten() for g in range(int(group.max()) + 1)]
    if any(len(v) == 0 for v in groups):
        raise ConfigError("gradient_aligned needs validation samples in every timestep group; "
                          "raise calibration.val_fraction or calibration.n_per_step")
    return groups


def learn_sample_weights(unit: ReconUnit, data: BlockData, train_mask: torch.Tensor, group: torch.Tensor,
                         cfg: GradientAlignedConfig, gen: torch.Generator, held: torch.Tensor | None = None) -> UnitWeights:
    """Algorithm 2 for one unit: N * w for the unit's training samples (``train_mask``: of the whole set; ``data``
    holds the rows ``held``, this rank's share under torch.distributed; None: all of them)."""
    if not unit.layers():
        return UnitWeights(None, {"skipped": "no weights to round in this unit"})
    t0 = time.perf_counter()
    held = torch.arange(len(train_mask), device="cpu") if held is None else held
    train, val = data.subset(train_mask[held]), data.subset(~train_mask[held])
    shards = Shard.of(~train_mask, held), Shard.of(train_mask, held)
    if cfg.order == "second" and (shards[0].split or shards[1].split):
        raise ConfigError("gradient_aligned order: second differentiates through the whole unit cache and runs in one "
                          "process; use order: first with torchrun")
    g_train = group[train_mask]
    n_groups = int(group.max()) + 1
    val_groups = validation_groups(group, ~train_mask)
    p = torch.tensor([len(v) for v in val_groups], dtype=torch.float64, device="cpu")
    p /= p.sum()
    n = int(train_mask.sum())
    b = min(cfg.outer_batch_size, n)
    set_quant_state(unit.module, weight=True, act=False)
    probe = UnitProbe(unit, *shards)
    try:
        theta = probe.theta
        opt_theta = torch.optim.Adam(theta, lr=cfg.lr)
        s = torch.full((n,), cfg.init_logit, dtype=torch.float64, device="cpu", requires_grad=True)
        # the outer gradients are O(eta / N): a vanishing eps keeps Adam scale-free, as it is meant to be
        opt_s = torch.optim.Adam([s], lr=cfg.outer_lr, eps=1e-30)
        gm_ratio: list[float] = []   # |grad of L_gm| / |grad of L_mse| in logit space, per outer step
        align_sum, align_cnt = torch.zeros(n, dtype=torch.float64, device="cpu"), torch.zeros(n, dtype=torch.float64, device="cpu")
        for _ in range(cfg.outer_iters):
            idx = torch.randint(n, (b,), generator=gen, device="cpu")
            step = outer_step(probe, theta, s, idx, train, val, val_groups, p, cfg)
            if step.gm_ratio is not None:
                gm_ratio.append(step.gm_ratio)
            s.grad = step.grad_s
            opt_s.step()
            g_norms = torch.tensor([_norm(x) for x in step.group_grads], dtype=torch.float64, device="cpu")
            align_sum.index_add_(0, idx, (step.alignments.to("cpu", torch.float64) / g_norms).mean(1))
            align_cnt.index_add_(0, idx, torch.ones(b, dtype=torch.float64, device="cpu"))
            for t, x in zip(theta, step.inner_grad):
                t.grad = x
            opt_theta.step()
        w = torch.softmax(s.detach() / cfg.tau, 0)
        factors = sample_factors(w)
        entropy = float(-(w * w.clamp_min(1e-300).log()).sum() / math.log(n)) if n > 1 else 1.0
        stats = dict(entropy=entropy, factor_min=float(factors.min()), factor_max=float(factors.max()),
                     outer_iters=cfg.outer_iters, seconds=0.0)
        if gm_ratio:
            stats["gm_to_mse_grad_ratio"] = sum(gm_ratio) / len(gm_ratio)
        alignment = torch.where(align_cnt > 0, align_sum / align_cnt.clamp_min(1), torch.full_like(align_sum, math.nan))
        seen = align_cnt > 0
        if int(seen.sum()) > 2 and float(factors[seen].std()) > 0:
            stats["corr_weight_alignment"] = float(torch.corrcoef(torch.stack([factors[seen].double(), alignment[seen]]))[0, 1])
        if cfg.diagnostics:
            stats.update(_group_gradient_distances(probe, theta, train, g_train, w, n_groups, cfg.diagnostic_samples))
        stats["seconds"] = time.perf_counter() - t0
        return UnitWeights(factors, stats, alignment.float())
    finally:
        probe.close()


def _group_gradient_distances(probe: UnitProbe, theta: list[torch.Tensor], train: BlockData, g_train: torch.Tensor,
                              w: torch.Tensor, n_groups: int, limit: int) -> dict:
    """The paper's Figure 1a: pairwise cosine distance of the per-group training gradients at the probe's
    parameters, with uniform weights ("before") and with the learned weights ("after")."""
    sub = torch.randperm(len(g_train), generator=torch.Generator().manual_seed(0), device="cpu")[:limit]  # never shifts the learning stream
    before, after = [], []
    th = [t.detach().requires_grad_(True) for t in theta]
    for g in range(n_groups):
        idx = sub[g_train[sub] == g]
        if len(idx) == 0:
            continue
        wi = (w[idx] / w[idx].sum()).float()
        local, held = probe.train.mine(idx) if probe.train is not None else (idx, slice(None))
        loss = probe.losses(th, train, local) if len(local) else None   # this rank's rows of the group
        before.append(probe.grad(None if loss is None else loss.sum() / len(idx), th, retain_graph=True))
        after.append(probe.grad(None if loss is None else (loss * wi[held].to(loss.device)).sum(), th))
    mb, ma = _cos_distances(before), _cos_distances(after)
    return dict(cos_dist_before=_mean_offdiag(mb), cos_dist_after=_mean_offdiag(ma), cos_dist_matrix_before=mb, cos_dist_matrix_after=ma)


class SampleWeightLearner:
    """The ``weight_fn`` handed to ``sweep``: learns each unit's weights into a :class:`SampleWeights`."""

    def __init__(self, cfg: GradientAlignedConfig, group: torch.Tensor, t: torch.Tensor) -> None:
        self.cfg = cfg
        # its own stream, so the reconstruction draws the same batches as ``uniform`` with the same seed
        self.gen = torch.Generator().manual_seed(cfg.seed + 2)
        self.result = SampleWeights(t, group)

    def __call__(self, unit: ReconUnit, data: BlockData, train_mask: torch.Tensor, held: torch.Tensor | None = None) -> torch.Tensor | None:
        self.result.train_mask = train_mask
        weights = learn_sample_weights(unit, data, train_mask, self.result.group, self.cfg, self.gen, held)
        self.result.units[unit.name] = weights
        return weights.factors


def calibrate_with_weights(model: nn.Module, config: QuantConfig, calib: CalibrationSet, fp_model: nn.Module | None,
                           progress: bool, learner: SampleWeightLearner) -> CalibrationRecord:
    """The ``base`` reconstruction with each unit's samples weighted by ``learner`` (gradient_aligned's, or a variant's)."""
    base = calibrate_temporal if config.algorithm.base == "temporal" else calibrate_uniform
    record = base(model, config, calib, fp_model, progress, weight_fn=learner)
    record.sample_weights = learner.result
    return record


@register_algorithm(GradientAlignedConfig)
def calibrate_gradient_aligned(model: nn.Module, config: QuantConfig, calib: CalibrationSet, fp_model: nn.Module | None = None,
                               progress: bool = True) -> CalibrationRecord:
    validation_groups(calib.group, calib.is_val)  # fail before any caching, not at the first block
    return calibrate_with_weights(model, config, calib, fp_model, progress,
                                  SampleWeightLearner(config.algorithm, calib.group, calib.t))
