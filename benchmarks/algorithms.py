"""Compare calibration algorithms on the embedded default: noise_mse, sample_mse_vs_fp and wall times.

    python benchmarks/algorithms.py --algorithms minmax uniform temporal --bits w4a8 w4a32 --json runs/bench/algorithms.json

Each row runs the shipped recipe of that algorithm (recipes/ddpm-mnist-w4a8[-ALGO].yaml) with the bit widths
overridden, the same calibration set (seed 0, cached after the first run) and the same report seeds.
Prints a markdown table; --json keeps every report.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gaq_backend.pipeline import run_recipe  # noqa: E402
from gaq_backend.recipe import load_recipe  # noqa: E402

BITS = {"w4a8": (4, 8), "w4a32": (4, 32), "w8a8": (8, 8)}


def recipe_path(algorithm: str) -> str:
    suffix = "" if algorithm == "minmax" else f"-{algorithm.replace('_', '-')}"
    return os.path.join("recipes", f"ddpm-mnist-w4a8{suffix}.yaml")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--algorithms", nargs="+", default=["minmax", "uniform", "temporal"])
    ap.add_argument("--bits", nargs="+", default=["w4a8", "w4a32"], choices=sorted(BITS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0], help="algorithm seeds (settings.seed)")
    ap.add_argument("--set", action="append", default=[], help="extra recipe overrides for every row")
    ap.add_argument("--out", default="runs/bench")
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    for bits in args.bits:
        w, a = BITS[bits]
        for algo in args.algorithms:
            for seed in args.seeds:
                overrides = [f"quantization.w_bits={w}", f"quantization.a_bits={a}"] + args.set
                if algo != "minmax":
                    overrides.append(f"settings.seed={seed}")
                recipe = load_recipe(recipe_path(algo), overrides)
                t0 = time.perf_counter()
                rep = run_recipe(recipe, os.path.join(args.out, f"{algo}-{bits}-s{seed}"), progress=False, log=lambda *_: None)
                rows.append(dict(bits=bits, algorithm=algo, seed=seed, noise_mse=rep["metrics"]["noise_mse"],
                                 sample_mse_vs_fp=rep["metrics"]["sample_mse_vs_fp"], calibration_s=rep["timings"]["calibration"],
                                 total_s=time.perf_counter() - t0, report=rep))
                r = rows[-1]
                print(f"{bits} {algo} seed {seed}: noise_mse {r['noise_mse']:.5f} sample_mse_vs_fp {r['sample_mse_vs_fp']:.5f} "
                      f"calibration {r['calibration_s']:.0f}s", flush=True)
    print()
    print("| bits | algorithm | seed | noise_mse | sample_mse_vs_fp | calibration s | total s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['bits'].upper()} | {r['algorithm']} | {r['seed']} | {r['noise_mse']:.5f} | {r['sample_mse_vs_fp']:.5f} | "
              f"{r['calibration_s']:.0f} | {r['total_s']:.0f} |")
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
