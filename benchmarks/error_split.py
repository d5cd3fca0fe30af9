"""Where a quantized UNet's noise-prediction error comes from, step by step (docs/benchmarks.md, "the budget paradox").
Reproduces: docs/benchmarks.md, "Where the error that reaches the samples comes from".

    python benchmarks/error_split.py runs/p29/u-300-150 runs/p29/u-900-450 --samples 64 --json runs/p29/split.json

For every folder written by ``gaq quantize`` it samples the same noise twice, 50 DDIM steps:

- on the **FP trajectory** (what calibration sees): x_t from the FP model, error e = eps_q(x_t) - eps_fp(x_t);
- on the **quantized trajectory** (what sampling sees): x_t from the quantized model, same e at its own x_t;

and splits the mean squared error of e at each step three ways:

- ``bias``: the part shared by every sample at a pixel, |mean_n e|^2 averaged over pixels (with the 1/N
  sampling term removed so it is unbiased); ``dc`` is the part of that which is one constant per step;
- ``corr``: PTQD's correlated part, e ~ k * eps_fp + r with one k per step; corr = k^2 * mean(eps_fp^2);
- the rest is variance that neither a per-timestep table nor a per-timestep scale removes.

It also reports how far the quantized trajectory has moved from the FP one (mean |x_q - x_fp|^2 per step),
and what each group of steps does to the final samples: the sampler run with the quantized model in that
group's steps only and the FP model in all others, its final images' MSE against the FP images
(``swap`` per group; their sum against the whole quantized sampler's says how additive the groups are).
Groups are 5 blocks of 10 steps, from high noise (group 0) to the last steps (group 4).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gaq_backend.models.loading import load_model  # noqa: E402
from gaq_backend.sampling import initial_noise, make_scheduler, unet_forward  # noqa: E402
from gaq_backend.serialization import load_quantized  # noqa: E402


def split(e: torch.Tensor, eps_fp: torch.Tensor) -> dict[str, float]:
    """MSE of the error ``e`` [N, ...] and its bias / dc / correlated parts (each a mean over elements)."""
    n = e.shape[0]
    mse = float(e.pow(2).mean())
    mean_n = e.mean(0)
    var_n = e.var(0, unbiased=True)
    bias = float((mean_n.pow(2) - var_n / n).mean())  # E[mean^2] = mu^2 + sigma^2 / n
    dc = float(e.mean()) ** 2
    k = float((e * eps_fp).sum() / eps_fp.pow(2).sum())
    corr = k * k * float(eps_fp.pow(2).mean())
    return dict(mse=mse, bias=bias, dc=dc, corr=corr, k=k)


@torch.no_grad()
def trajectories(folder: str, samples: int, seed: int, n_groups: int = 5) -> dict:
    qmodel, sched_cfg, recipe = load_quantized(folder)
    fp = load_model(recipe.model, recipe.model_options).unet.eval()
    c, s = fp.config.in_channels, fp.config.sample_size
    noise = initial_noise(samples, (c, s, s), seed)
    out = {"fp_trajectory": [], "q_trajectory": [], "drift": []}
    sched_a, sched_b = make_scheduler(sched_cfg, recipe.sampler), make_scheduler(sched_cfg, recipe.sampler)
    xa, xb = noise.clone(), noise.clone()
    for t in sched_a.timesteps:
        tt = torch.full((samples,), int(t), dtype=torch.long)
        fa, qa = unet_forward(fp, xa, tt), unet_forward(qmodel, xa, tt)
        fb, qb = unet_forward(fp, xb, tt), unet_forward(qmodel, xb, tt)
        out["fp_trajectory"].append(dict(t=int(t), **split(qa - fa, fa)))
        out["q_trajectory"].append(dict(t=int(t), **split(qb - fb, fb)))
        out["drift"].append(float((xb - xa).pow(2).mean()))
        xa = sched_a.step(fa, t, xa, eta=0.0).prev_sample
        xb = sched_b.step(qb, t, xb, eta=0.0).prev_sample
    out["sample_mse_vs_fp"] = float((xb.clamp(-1, 1) - xa.clamp(-1, 1)).pow(2).mean())
    steps = len(sched_a.timesteps)
    out["swap"] = []
    for g in range(n_groups):
        quantized_steps = range(g * steps // n_groups, (g + 1) * steps // n_groups)
        sched, x = make_scheduler(sched_cfg, recipe.sampler), noise.clone()
        for i, t in enumerate(sched.timesteps):
            tt = torch.full((samples,), int(t), dtype=torch.long)
            x = sched.step(unet_forward(qmodel if i in quantized_steps else fp, x, tt), t, x, eta=0.0).prev_sample
        out["swap"].append(float((x.clamp(-1, 1) - xa.clamp(-1, 1)).pow(2).mean()))
    return out


def grouped(rows: list[dict], n_groups: int = 5) -> list[dict]:
    size = len(rows) // n_groups
    keys = ("mse", "bias", "dc", "corr")
    return [{k: sum(r[k] for r in rows[g * size:(g + 1) * size]) / size for k in keys} for g in range(n_groups)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="write every step's figures here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    print("| model | trajectory | mse x1e-4 (groups 0-4) | bias share | dc share | corr share | sample_mse_vs_fp | quantized in one group only: sample mse x1e-3 (groups 0-4) |")
    print("|---|---|---|---|---|---|---|---|")
    for folder in args.folders:
        r = results[folder] = trajectories(folder, args.samples, args.seed)
        swaps = " / ".join(f"{v * 1e3:.2f}" for v in r["swap"])
        for which in ("fp_trajectory", "q_trajectory"):
            g = grouped(r[which])
            tot = {k: sum(x[k] for x in g) for k in ("mse", "bias", "dc", "corr")}
            mses = " / ".join(f"{x['mse'] * 1e4:.2f}" for x in g)
            print(f"| {os.path.basename(folder.rstrip('/'))} | {which.split('_')[0]} | {mses} | {tot['bias'] / tot['mse']:.2f} | "
                  f"{tot['dc'] / tot['mse']:.3f} | {tot['corr'] / tot['mse']:.3f} | {r['sample_mse_vs_fp']:.4f} | {swaps} |",
                  flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
