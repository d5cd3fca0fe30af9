"""Compare calibration algorithms on the embedded default: noise_mse, sample_mse_vs_fp, FID and wall times.
Reproduces: docs/benchmarks.md, "The algorithms compared".

    python benchmarks/algorithms.py --algorithms minmax uniform temporal --bits w4a8 w4a32 --json runs/bench/algorithms.json
    python benchmarks/algorithms.py --bits w4a32 w4a8 w8a8 --fid 1000 --reuse     # adds FID/sFID/P/R (gaq eval) and an FP row
    python benchmarks/algorithms.py --fid 2000 --sample-only --device cuda         # a GPU box without the feature network:
    python benchmarks/algorithms.py --fid 2000 --from-images --reuse               # ... then score its samples here

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

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gaq_backend.evaluation.fid_eval import evaluate_dir, sample_dir  # noqa: E402
from gaq_backend.evaluation.reference import default_reference  # noqa: E402
from gaq_backend.pipeline import run_recipe  # noqa: E402
from gaq_backend.recipe import load_recipe  # noqa: E402

BITS = {"w4a8": (4, 8), "w4a32": (4, 32), "w8a8": (8, 8)}


def recipe_path(algorithm: str) -> str:
    suffix = "" if algorithm == "minmax" else f"-{algorithm.replace('_', '-')}"
    return os.path.join("recipes", f"ddpm-mnist-w4a8{suffix}.yaml")


def _reusable_eval(folder: str, args: argparse.Namespace) -> dict | None:
    """The folder's eval.json when it was taken with the same sample count and noise seed."""
    path = os.path.join(folder, "eval.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        ev = json.load(f)
    return ev if (ev["n_samples"], ev["seed"]) == (args.fid, args.fid_seed) else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--algorithms", nargs="+", default=["minmax", "uniform", "temporal"])
    ap.add_argument("--bits", nargs="+", default=["w4a8", "w4a32"], choices=sorted(BITS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0], help="algorithm seeds (settings.seed)")
    ap.add_argument("--set", action="append", default=[], help="extra recipe overrides for every row")
    ap.add_argument("--tag", default="", help="suffix of the row label and output folder (for ablations with --set)")
    ap.add_argument("--out", default="runs/bench")
    ap.add_argument("--fid", type=int, default=0, metavar="N", help="also run gaq eval with N samples per model")
    ap.add_argument("--fid-seed", type=int, default=0)
    ap.add_argument("--reference", help="FID reference (default: as gaq eval)")
    ap.add_argument("--reference-count", type=int, help="use only the first N reference images (default: all)")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse an existing output folder instead of re-quantizing, and its eval.json when it has --fid samples")
    ap.add_argument("--device", default="cpu", help="where calibration and sampling run (cpu, cuda)")
    how = ap.add_mutually_exclusive_group()
    how.add_argument("--sample-only", action="store_true", help="with --fid: only sample into eval-images.npz (gaq eval --sample-only)")
    how.add_argument("--from-images", action="store_true", help="with --fid: score eval-images.npz (gaq eval --from-images)")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.sample_only:  # nothing to tabulate but the quantization columns
        args.sample, args.fid = args.fid, 0
    else:
        args.sample = 0
    rows, fp_eval = [], None
    for bits in args.bits:
        w, a = BITS[bits]
        for algo in args.algorithms:
            for seed in args.seeds:
                overrides = [f"quantization.w_bits={w}", f"quantization.a_bits={a}"] + args.set
                if algo != "minmax":
                    overrides.append(f"settings.seed={seed}")
                recipe = load_recipe(recipe_path(algo), overrides)
                label = f"{algo}-{args.tag}" if args.tag else algo
                folder = os.path.join(args.out, f"{label}-{bits}-s{seed}")
                if args.reuse and os.path.exists(os.path.join(folder, "report.json")):
                    with open(os.path.join(folder, "report.json")) as f:
                        rep = json.load(f)
                else:
                    rep = run_recipe(recipe, folder, progress=False, log=lambda *_: None, device=args.device)
                row = dict(bits=bits, algorithm=label, seed=seed, overrides=args.set, noise_mse=rep["metrics"]["noise_mse"],
                           sample_mse_vs_fp=rep["metrics"]["sample_mse_vs_fp"], calibration_s=rep["timings"]["calibration"],
                           quantize_s=rep["timings"]["total"], report=rep)
                if args.sample:
                    sample_dir(folder, args.sample, args.fid_seed, progress=False, device=args.device)
                if args.fid:
                    ev = _reusable_eval(folder, args) if args.reuse else None
                    ev = ev or evaluate_dir(folder, args.reference or default_reference(), args.fid, args.fid_seed, progress=False,
                                            reference_count=args.reference_count, device=args.device, from_images=args.from_images)
                    row["eval"] = ev
                    fp_eval = fp_eval or ev
                rows.append(row)
                print(f"{bits} {label} seed {seed}: noise_mse {row['noise_mse']:.5f} sample_mse_vs_fp {row['sample_mse_vs_fp']:.5f} "
                      f"calibration {row['calibration_s']:.0f}s" + (f" FID {row['eval']['quantized']['fid']:.2f}" if args.fid else ""),
                      flush=True)
    print()
    fid_cols = " FID | sFID | precision | recall | FID vs FP | eval s |" if args.fid else ""
    print("| bits | algorithm | seed | noise_mse | sample_mse_vs_fp | calibration s | quantize s |" + fid_cols)
    print("|---" * (7 + (6 if args.fid else 0)) + "|")
    if fp_eval:
        m = fp_eval["fp"]
        print(f"| FP | - | - | - | - | - | - | {m['fid']:.2f} | {m['sfid']:.2f} | {m['precision']:.3f} | {m['recall']:.3f} | - | - |")
    for r in rows:
        line = (f"| {r['bits'].upper()} | {r['algorithm']} | {r['seed']} | {r['noise_mse']:.5f} | {r['sample_mse_vs_fp']:.5f} | "
                f"{r['calibration_s']:.0f} | {r['quantize_s']:.0f} |")
        if args.fid:
            m = r["eval"]["quantized"]
            line += (f" {m['fid']:.2f} | {m['sfid']:.2f} | {m['precision']:.3f} | {m['recall']:.3f} | {m['fid_vs_fp']:.2f} | "
                     f"{r['eval']['timings']['total']:.0f} |")
        print(line)
    if fp_eval:
        e = fp_eval
        print(f"\nFID: n = {e['n_samples']} samples per model (seed {e['seed']}, {e['sampler']['num_inference_steps']} DDIM steps), "
              f"reference {e['reference']['name']} ({e['reference']['n']} images)")
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
