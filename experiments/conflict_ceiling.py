"""How far can per-sample weights move the timestep groups' gradient conflict? (issue 17, the mechanism)

    python experiments/conflict_ceiling.py --json runs/conflict/w4a8.json
    python experiments/conflict_ceiling.py --set quantization.w_bits=3 calibration.n_groups=10 --json runs/conflict/w3a8-g10.json

Runs `gradient_aligned` from its shipped recipe (with --set overrides) and, for every unit, right after its
weights are learned: the per-sample gradients of the unit's reconstruction loss in AdaRound's V (at V's
initial value) for --samples training rows, their Gram matrix K, and from K the conflict (mean pairwise cosine
distance of the per-group gradients, the paper's Figure 1a quantity) under
  - uniform weights (what every baseline uses),
  - the weights gradient_aligned learned,
  - the weights that minimise the conflict directly (Adam on the log-weights, |log N*w_i| <= r for each
    --radius r): a lower bound on what any per-sample weighting with that spread can reach.
Weights scale each group's gradient only through its members' shares, so per-group weights cannot change the
conflict at all and per-(sample, group) weights are per-sample weights here (a sample is in one group).
If the best weighting cannot lower the conflict much, no outer optimiser can make the paper's mechanism show on
this model; if it can and gradient_aligned does not, the optimiser is what fails.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, fields
from typing import ClassVar

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from gaq_backend.algorithms.gradient_aligned import (GradientAlignedConfig, SampleWeightLearner, UnitProbe,  # noqa: E402
                                                     calibrate_with_weights, validation_groups)
from gaq_backend.algorithms.registry import register_algorithm  # noqa: E402


def per_sample_gram(probe: UnitProbe, data, rows: torch.Tensor) -> torch.Tensor:
    """K[i, j] = grad l_i . grad l_j in V (float64), one backward pass per row."""
    th = [t.detach().requires_grad_(True) for t in probe.theta]
    grads = []
    for i in rows:
        g = torch.autograd.grad(probe.losses(th, data, i.view(1)).sum(), th)
        grads.append(torch.cat([x.flatten() for x in g]))
    gm = torch.stack(grads)  # float32 rows; the products in float64, a slice of columns at a time
    return sum(c.double() @ c.double().T for c in gm.split(1 << 16, dim=1))


def conflict(log_f: torch.Tensor, K: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """Mean pairwise cosine distance of the groups' weighted-mean gradients (weights exp(log_f), per group)."""
    a = torch.exp(log_f)[:, None] * onehot
    a = a / a.sum(0, keepdim=True)
    m = a.T @ K @ a
    d = m.diagonal().clamp_min(1e-300).sqrt()
    cos = m / (d[:, None] * d[None, :])
    off = ~torch.eye(len(m), dtype=torch.bool)
    return (1 - cos[off]).mean()


def best_log_weights(K: torch.Tensor, onehot: torch.Tensor, radius: float, steps: int) -> torch.Tensor:
    """The log-weights of the lowest conflict Adam finds with |log N*w_i| <= radius."""
    u = torch.zeros(len(K), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([u], lr=0.05)
    best, best_log_f = math.inf, torch.zeros(len(K), dtype=torch.float64)
    for _ in range(steps):
        log_f = radius * torch.tanh(u)
        c = conflict(log_f, K, onehot)
        if c.item() < best:
            best, best_log_f = c.item(), log_f.detach()
        opt.zero_grad()
        c.backward()
        opt.step()
    return best_log_f


@dataclass
class CeilingConfig(GradientAlignedConfig):
    name: ClassVar[str] = "gradient_aligned_conflict_ceiling"   # benchmark only: registered by this script
    samples: int = 256
    radii: tuple = (0.8, 2.0, 5.0)
    steps: int = 400
    apply: float | None = None   # reconstruct with the best weights within this radius instead of the learned ones


class CeilingLearner(SampleWeightLearner):
    """gradient_aligned's learner, plus the conflict of uniform, learned and best weights per unit."""

    def __init__(self, cfg: CeilingConfig, group: torch.Tensor, t: torch.Tensor) -> None:
        super().__init__(cfg, group, t)
        self.rows: dict[str, dict] = {}

    def __call__(self, unit, data, train_mask, held=None):
        if held is not None:
            raise ValueError("conflict_ceiling runs in one process")
        factors = super().__call__(unit, data, train_mask)
        if factors is None:
            return None
        t0 = time.perf_counter()
        cfg: CeilingConfig = self.cfg
        train, g_train = data.subset(train_mask), self.result.group[train_mask]
        sub = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:cfg.samples]
        present = sorted(set(g_train[sub].tolist()))
        onehot = (g_train[sub][:, None] == torch.tensor(present)[None, :]).double()
        probe = UnitProbe(unit)  # V at AdaRound's initial value, as every weighting sees it first
        try:
            K = per_sample_gram(probe, train, sub)
        finally:
            probe.close()
        zero = torch.zeros(len(sub), dtype=torch.float64)
        learned = factors[sub].double().log()
        row = dict(uniform=float(conflict(zero, K, onehot)), learned=float(conflict(learned, K, onehot)),
                   learned_spread=float(learned.std()), groups=len(present), samples=len(sub))
        if cfg.apply is not None and len(sub) != len(train):
            raise ValueError("--apply needs every training row in the Gram matrix: raise --samples")
        best = {r: best_log_weights(K, onehot, r, cfg.steps) for r in {*cfg.radii, *([cfg.apply] if cfg.apply is not None else [])}}
        for r in cfg.radii:
            row[f"best_r{r:g}"], row[f"best_r{r:g}_spread"] = float(conflict(best[r], K, onehot)), float(best[r].std())
        if cfg.apply is not None:
            log_f = best[cfg.apply]
            row["applied"] = float(conflict(log_f, K, onehot))
            factors = torch.zeros(len(train)).index_copy_(0, sub, log_f.exp().float())
            factors /= factors.mean()
        row["seconds"] = time.perf_counter() - t0
        self.rows[unit.name] = row
        print(f"{unit.name}: " + " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
        return factors


LEARNERS: list[CeilingLearner] = []


@register_algorithm(CeilingConfig)
def calibrate_ceiling(model, config, calib, fp_model=None, progress=True):
    validation_groups(calib.group, calib.is_val)
    learner = CeilingLearner(config.algorithm, calib.group, calib.t)
    LEARNERS.append(learner)
    return calibrate_with_weights(model, config, calib, fp_model, progress, learner)


def main() -> None:
    from gaq_backend.api import quantize
    from gaq_backend.calibration import capture_calibration
    from gaq_backend.models.loading import load_model
    from gaq_backend.evaluation.noise import noise_mse
    from gaq_backend.recipe import load_recipe
    from gaq_backend.serialization import save_quantized
    from gaq_backend.utils.io import write_json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=os.path.join(ROOT, "recipes", "ddpm-mnist-w4a8-gradient-aligned.yaml"))
    ap.add_argument("--set", nargs="*", default=[], help="recipe overrides, as gaq quantize --set")
    ap.add_argument("--samples", type=int, default=256, help="training rows per unit in the Gram matrix")
    ap.add_argument("--radius", type=float, nargs="+", default=[0.8, 2.0, 5.0], help="bounds on |log N*w_i| to search within")
    ap.add_argument("--steps", type=int, default=400, help="Adam steps of the direct search")
    ap.add_argument("--apply", type=float, metavar="R",
                    help="our extension, an experiment: reconstruct with the conflict-minimising weights within radius R "
                         "(with --samples at least the training rows, and usually --set settings.outer_iters=0)")
    ap.add_argument("--out", help="with --apply: also write the quantized folder here (for gaq eval)")
    ap.add_argument("--json", help="write the per-unit rows and their means here")
    args = ap.parse_args()
    recipe = load_recipe(args.recipe, ["settings.diagnostics=false"] + args.set)
    loaded = load_model(recipe.model, recipe.model_options)
    calib, _ = capture_calibration(loaded.unet, loaded.scheduler_config, recipe.sampler, recipe.calibration, progress=False)
    config = recipe.quant_config()
    ga = config.algorithm
    config.algorithm = CeilingConfig(**{f.name: getattr(ga, f.name) for f in fields(ga)},
                                     samples=args.samples, radii=tuple(args.radius), steps=args.steps, apply=args.apply)
    t0 = time.perf_counter()
    quantize(loaded.unet, config, calib, progress=False)
    seconds = time.perf_counter() - t0
    rows = LEARNERS[0].rows
    keys = [k for k in next(iter(rows.values())) if k not in ("groups", "samples")]
    means = {k: sum(r[k] for r in rows.values()) / len(rows) for k in keys}
    label = f"W{config.w_bits}A{config.a_bits}, {calib.n_groups} groups, base {ga.base}, seed {ga.seed}, {args.samples} rows per unit"
    mse, _ = noise_mse(loaded.unet, calib.val, 256)
    print(f"\n{label}; {len(rows)} units; calibration {seconds:.0f} s; noise_mse {mse:.4e}"
          + (f"; reconstructed with the best weights within {args.apply:g} (conflict {means['applied']:.4f})" if args.apply else ""))
    radii = [f"best_r{r:g}" for r in args.radius]
    print("| conflict (mean over units) | uniform | gradient_aligned | " + " | ".join(f"best, |log N*w| <= {r:g}" for r in args.radius) + " |")
    print("|---|---|---|" + "---|" * len(radii))
    print(f"| {label} | {means['uniform']:.4f} | {means['learned']:.4f} | " + " | ".join(f"{means[k]:.4f}" for k in radii) + " |")
    print("| sd of log N*w | 0 | " + f"{means['learned_spread']:.3f} | " + " | ".join(f"{means[k + '_spread']:.3f}" for k in radii) + " |")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        write_json(args.json, dict(label=label, overrides=args.set, apply=args.apply, seconds=seconds, noise_mse=mse,
                                   units=rows, means=means))
    if args.out:
        save_quantized(loaded.unet, args.out, loaded.scheduler_config, recipe)


if __name__ == "__main__":
    main()
