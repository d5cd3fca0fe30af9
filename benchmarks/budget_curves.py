"""Quality against calibration time over reconstruction budgets: a table and a chart.
Reproduces: docs/benchmarks.md, "The calibration budget and reconstruction throughput".

    python benchmarks/budget_curves.py runs/u100 runs/u300 runs/ga100 ... --png docs/budget-curves.png

Each argument is a `gaq quantize` output folder (report.json; eval.json when `gaq eval` ran on it). Rows are
grouped into curves by algorithm and batch size (from the folder's recipe.yaml) and ordered by the
iterations per unit. The chart has three panels against calibration seconds: noise_mse, FID vs FP samples
and FID against the reference digits.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def read(folder: str) -> dict:
    with open(os.path.join(folder, "report.json")) as f:
        rep = json.load(f)
    with open(os.path.join(folder, "recipe.yaml")) as f:
        settings = yaml.safe_load(f).get("settings", {})
    ev = None
    if os.path.isfile(os.path.join(folder, "eval.json")):
        with open(os.path.join(folder, "eval.json")) as f:
            ev = json.load(f)
    return dict(folder=folder, curve=f"{rep['algorithm']} W{rep['w_bits']}A{rep['a_bits']}, batch {settings.get('batch_size', 32)}",
                iters=settings.get("iters", 0), act_iters=settings.get("act_iters", 0), seconds=rep["timings"]["calibration"],
                noise=rep["metrics"]["noise_mse"], sample=rep["metrics"]["sample_mse_vs_fp"], threads=rep["environment"]["threads"],
                fid=ev["quantized"]["fid"] if ev else float("nan"), fid_vs_fp=ev["quantized"]["fid_vs_fp"] if ev else float("nan"),
                n=ev["n_samples"] if ev else None)


def main() -> int:
    from gaq_backend.utils.plots import line_panels

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--png", help="write the chart here")
    args = ap.parse_args()
    missing = [f for f in args.folders if not os.path.isfile(os.path.join(f, "report.json"))]
    if missing:
        print(f"budget_curves.py: {missing[0]} is not a gaq quantize output folder (no report.json)", file=sys.stderr)
        return 2
    rows = sorted((read(f) for f in args.folders), key=lambda r: (r["curve"], r["iters"]))
    print("| curve | AdaRound + step-size iterations per unit | calibration s | noise_mse | sample_mse_vs_fp | FID | FID vs FP | FID n | folder |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['curve']} | {r['iters']} + {r['act_iters']} | {r['seconds']:.0f} | {r['noise']:.3e} | {r['sample']:.4f} | "
              f"{r['fid']:.2f} | {r['fid_vs_fp']:.2f} | {r['n'] or '-'} | {os.path.basename(r['folder'].rstrip('/'))} |")
    if args.png:
        curves = dict.fromkeys(r["curve"] for r in rows)
        panels = [(title, {c: [(r["seconds"], r[key]) for r in rows if r["curve"] == c] for c in curves})
                  for title, key in [("noise_mse", "noise"), ("FID vs FP samples", "fid_vs_fp"), ("FID vs MNIST test digits", "fid")]]
        line_panels(args.png, panels, "calibration seconds (this CPU, 2 threads)")
        print(f"\nwrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
