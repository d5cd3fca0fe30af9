"""The generated UNet zoo at scale.
Reproduces: docs/benchmarks.md, "Generated UNets: W8A8 fidelity and export parity".

    python benchmarks/unet_zoo.py --seeds 0:300 --jsonl runs/zoo.jsonl     # appends; a rerun skips seeds done
    python benchmarks/unet_zoo.py --summary runs/zoo.jsonl                 # the tables for the docs

Every seed draws one (UNet config, sampling loop) from ``tests/unet_zoo.py`` and runs two configs through
quantize -> save_quantized -> load_quantized (-> export_quantized with its onnxruntime parity check):

- W8A8 ``minmax`` with the int8 export: the per-class W8A8 error distribution and int8 parity;
- one more, cycling over the seed: W4A8 ``minmax`` (int4 export), W4A8 ``uniform`` (int4), W8A8 ``uniform`` (int8).

A config fails when it raises, its reload does not reproduce the error, or its export is refused. The JSON
lines hold the figures and, for a failure, the one-line error; ``--summary`` prints what the docs show.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from unet_zoo import CYCLE, FAMILIES, configs_for, generate, run_case  # noqa: E402


def run_seed(seed: int) -> list[dict]:
    import torch

    torch.set_num_threads(1)
    case = generate(seed)
    rows = []
    for algorithm, w, a, export in configs_for(seed):
        t0 = time.perf_counter()
        row = dict(seed=seed, family=case.family, case=case.describe(), algorithm=algorithm, bits=f"W{w}A{a}", export=export)
        try:
            with tempfile.TemporaryDirectory() as tmp:
                row.update(run_case(case, tmp, algorithm, w, a, export))
            reload_ok = abs(row["reload_rel_error"] - row["rel_error"]) <= 1e-4 * row["rel_error"] + 1e-9
            row["failure"] = None if reload_ok else f"reload changed the error ({row['rel_error']} -> {row['reload_rel_error']})"
        except Exception as e:  # noqa: BLE001 - a failure is a result here
            row["failure"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            row["traceback"] = traceback.format_exc(limit=3)
        row["seconds"] = round(time.perf_counter() - t0, 2)
        rows.append(row)
    return rows


def _pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]


def summary(path: str) -> str:
    rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    seeds = sorted({r["seed"] for r in rows})
    failed = [r for r in rows if r["failure"]]
    out = [f"{len(rows)} configs from {len(seeds)} generated UNets (seeds {seeds[0]}-{seeds[-1]}); failures: {len(failed)}"]
    for r in failed:
        out.append(f"  FAILED {r['case']} {r['algorithm']} {r['bits']} {r['export']}: {r['failure']}")
    out += ["", "| class | UNets | W8A8 minmax relative error: median | p95 | max | <= 1% |", "|---|---|---|---|---|---|"]
    for fam in FAMILIES:
        errs = [r["rel_error"] for r in rows if r["family"] == fam and r["bits"] == "W8A8" and r["algorithm"] == "minmax" and not r["failure"]]
        if errs:
            ok = sum(e <= 0.01 for e in errs)
            out.append(f"| {fam} | {len(errs)} | {statistics.median(errs):.2e} | {_pct(errs, 0.95):.2e} | {max(errs):.2e} | {ok}/{len(errs)} |")
    out += ["", "| config | runs | relative error: median | max | parity mean steps: median | max | max steps: max | seconds: median |",
            "|---|---|---|---|---|---|---|---|"]
    for algorithm, w, a, export in (("minmax", 8, 8, "int8"),) + CYCLE:
        sel = [r for r in rows if (r["algorithm"], r["bits"], r["export"]) == (algorithm, f"W{w}A{a}", export) and not r["failure"]]
        if sel:
            err, mean, mx = ([r["rel_error"] for r in sel], [r["parity"]["mean_steps"] for r in sel],
                             [r["parity"]["max_steps"] for r in sel])
            out.append(f"| {algorithm} W{w}A{a} {export} | {len(sel)} | {statistics.median(err):.2e} | {max(err):.2e} | "
                       f"{statistics.median(mean):.3f} | {max(mean):.3f} | {max(mx):.1f} | {statistics.median(r['seconds'] for r in sel):.1f} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0:300", help="START:END (END excluded)")
    ap.add_argument("--jsonl", default="runs/zoo.jsonl")
    ap.add_argument("--summary", metavar="JSONL", help="print the tables of a finished run and exit")
    args = ap.parse_args()
    if args.summary:
        print(summary(args.summary))
        return 0
    start, end = (int(v) for v in args.seeds.split(":"))
    done = set()
    if os.path.exists(args.jsonl):
        done = {json.loads(line)["seed"] for line in open(args.jsonl, encoding="utf-8") if line.strip()}
    os.makedirs(os.path.dirname(os.path.abspath(args.jsonl)), exist_ok=True)
    for seed in range(start, end):
        if seed in done:
            continue
        rows = run_seed(seed)
        with open(args.jsonl, "a", encoding="utf-8") as f:  # one seed's rows at once: an interrupted run resumes cleanly
            f.write("".join(json.dumps(r) + "\n" for r in rows))
        for r in rows:
            status = "FAILED " + r["failure"] if r["failure"] else f"rel {r['rel_error']:.2e} parity {r['parity']['mean_steps']:.3f}"
            print(f"{r['case']} | {r['algorithm']} {r['bits']} {r['export']}: {status} ({r['seconds']} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
