"""Mean and spread over seeds of benchmark output folders (``runs/bench/{label}-{bits}-s{seed}``).
Reproduces: docs/benchmarks.md, "The algorithms compared".

    python benchmarks/summarize.py runs/bench/*-w4a8-s* runs/bench/*-w4a32-s* [--reference-n 10000] [--paired uniform]

Reads each folder's report.json (noise_mse, sample_mse_vs_fp, calibration time) and, where present,
eval.json (FID / sFID / FID vs FP; only rows whose evaluation used the same reference, sample count and
seed as most of the evaluated folders, or with --reference-n images in the reference, are averaged). Prints one markdown row per (bits, label): mean ± sample standard
deviation over the seeds found, and calibration time relative to the `uniform` rows of the same bits.
With --paired BASE, every other label is compared with BASE seed by seed on FID (the seeds both have):
mean relative change, seeds better, and the two-sided paired t-test and Wilcoxon signed-rank p-values.
"""
from __future__ import annotations

import json
import os
import re
import statistics
import sys
from collections import defaultdict

NAME = re.compile(r"^(?P<label>.+)-(?P<bits>w\d+a\d+)-s(?P<seed>\d+)$")


def fmt(values: list[float], digits: int) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    return f"{mean:.{digits}f}" + (f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else "")


def _eval_key(folder: str) -> tuple | None:
    path = os.path.join(folder, "eval.json")
    if not os.path.isfile(path):
        return None
    ev = json.load(open(path))
    return ev["reference"]["name"], ev["reference"]["n"], ev["n_samples"], ev["seed"]


def _conflict(rep: dict) -> tuple[float, float] | None:
    """gradient_aligned's group-gradient conflict (mean pairwise cosine distance of the timestep groups'
    gradients, averaged over units) with uniform and with the learned weights, when it was measured."""
    units = rep.get("algorithm_stats", {}).get("sample_weights", {}).get("units", {}).values()
    pairs = [(u["cos_dist_before"], u["cos_dist_after"]) for u in units if "cos_dist_before" in u]
    return (statistics.fmean(b for b, _ in pairs), statistics.fmean(a for _, a in pairs)) if pairs else None


def main(argv: list[str]) -> int:
    ref_n = None
    if "--reference-n" in argv:
        i = argv.index("--reference-n")
        ref_n, argv = int(argv[i + 1]), argv[:i] + argv[i + 2:]
    base = None
    if "--paired" in argv:
        i = argv.index("--paired")
        base, argv = argv[i + 1], argv[:i] + argv[i + 2:]
    folders = argv
    rows: dict[tuple[str, str], list[dict]] = defaultdict(list)
    fp = None
    keys = [_eval_key(f) for f in folders]
    keys = [k for k in keys if k and (ref_n is None or k[1] == ref_n)]
    key = max(set(keys), key=keys.count) if keys else None
    for folder in sorted(folders):
        m = NAME.match(os.path.basename(folder.rstrip("/")))
        if not m or not os.path.isfile(os.path.join(folder, "report.json")):
            continue
        rep = json.load(open(os.path.join(folder, "report.json")))
        row = dict(seed=int(m["seed"]), noise=rep["metrics"]["noise_mse"], sample=rep["metrics"]["sample_mse_vs_fp"],
                   calib=rep["timings"]["calibration"], eval=None, conflict=_conflict(rep))
        path = os.path.join(folder, "eval.json")
        if os.path.isfile(path):
            ev = json.load(open(path))
            if _eval_key(folder) == key:
                row["eval"], fp = ev["quantized"], fp or ev["fp"]
        rows[(m["bits"], m["label"])].append(row)
    print("| bits | algorithm | seeds | noise_mse (x1e-4) | sample_mse_vs_fp (x1e-2) | FID | sFID | FID vs FP | FID seeds | calibration s | x uniform |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    if fp:
        print(f"| FP | - | - | - | - | {fp['fid']:.2f} | {fp['sfid']:.2f} | - | - | - | - |")
    for (bits, label), rs in sorted(rows.items()):
        ev = [r for r in rs if r["eval"]]
        uni = [r["calib"] for r in rows.get((bits, "uniform"), [])]
        ratio = f"{statistics.fmean(r['calib'] for r in rs) / statistics.fmean(uni):.2f}" if uni and label != "uniform" else "-"
        print(f"| {bits.upper()} | {label} | {','.join(str(r['seed']) for r in rs)} | {fmt([r['noise'] * 1e4 for r in rs], 2)} | "
              f"{fmt([r['sample'] * 1e2 for r in rs], 2)} | {fmt([r['eval']['fid'] for r in ev], 2)} | "
              f"{fmt([r['eval']['sfid'] for r in ev], 1)} | {fmt([r['eval']['fid_vs_fp'] for r in ev], 2)} | "
              f"{','.join(str(r['seed']) for r in ev) or '-'} | {fmt([r['calib'] for r in rs], 0)} | {ratio} |")
    if base:
        paired(rows, base)
    if key:
        print(f"\nFID: reference {key[0]} ({key[1]} images), n = {key[2]} samples per model, noise seed {key[3]}")
    return 0


def paired(rows: dict[tuple[str, str], list[dict]], base: str) -> None:
    """Seed-by-seed FID of every label against ``base`` at the same bits."""
    from scipy import stats

    print(f"\n| bits | algorithm vs {base} | seeds | FID change (mean of per-seed %) | seeds better | paired t p | Wilcoxon p | "
          "group conflict before -> after |")
    print("|---|---|---|---|---|---|---|---|")
    for (bits, label), rs in sorted(rows.items()):
        ref = {r["seed"]: r["eval"]["fid"] for r in rows.get((bits, base), []) if r["eval"]}
        pairs = [(r["eval"]["fid"], ref[r["seed"]]) for r in rs if r["eval"] and r["seed"] in ref]
        if label == base or len(pairs) < 2:
            continue
        change = [100 * (a / b - 1) for a, b in pairs]
        t_p = stats.ttest_rel([a for a, _ in pairs], [b for _, b in pairs]).pvalue
        w_p = stats.wilcoxon([a - b for a, b in pairs]).pvalue
        conflict = [r["conflict"] for r in rs if r["conflict"]]
        moved = (f"{statistics.fmean(b for b, _ in conflict):.4f} -> {statistics.fmean(a for _, a in conflict):.4f}"
                 if conflict else "-")
        print(f"| {bits.upper()} | {label} | {len(pairs)} | {statistics.fmean(change):+.1f}% | "
              f"{sum(a < b for a, b in pairs)} of {len(pairs)} | {t_p:.3f} | {w_p:.3f} | {moved} |")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
