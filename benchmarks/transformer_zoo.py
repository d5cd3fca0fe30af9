"""The generated transformer zoo at scale (docs/benchmarks.md, "Generated transformers").
Reproduces: docs/benchmarks.md, "Diffusion transformers".

    python benchmarks/transformer_zoo.py --seeds 0:40 --jsonl runs/tzoo.jsonl    # appends; a rerun skips seeds done
    python benchmarks/transformer_zoo.py --summary runs/tzoo.jsonl

Every seed draws one tiny transformer and its pipeline loop from ``tests/transformer_zoo.py`` (the class cycles
over the seed: DiT, PixArt, SD3, Flux) and runs two configs through quantize -> save -> load -> export with the
parity check: W8A8 ``minmax`` with the int8 export, and one more cycling over the seed: W4A8 ``uniform`` (int4),
W4A8 ``temporal`` (int8), W4A8 ``minmax`` with blocks of 16 and ``--matmul-nbits``. A config fails when it raises,
its reload changes the error, or its export is refused.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from transformer_zoo import generate, run_case  # noqa: E402

CYCLE = [("uniform", 4, 8, "int4", {}), ("temporal", 4, 8, "int8", {}), ("minmax", 4, 8, "int4-nbits", dict(w_block_size=16))]


def run_seed(seed: int) -> list[dict]:
    import torch

    torch.set_num_threads(1)
    case = generate(seed)
    rows = []
    for algorithm, w, a, export, extra in [("minmax", 8, 8, "int8", {}), CYCLE[(seed // 4) % len(CYCLE)]]:
        t0 = time.perf_counter()
        row = dict(seed=seed, cls=case.cls, case=case.describe(), algorithm=algorithm, bits=f"W{w}A{a}", export=export)
        try:
            with tempfile.TemporaryDirectory() as tmp:
                res = run_case(case, tmp, algorithm, w, a, None, **extra)
                if export:
                    from exporters.onnx_export import export_quantized

                    p = export_quantized(os.path.join(tmp, "q"), os.path.join(tmp, "m.onnx"), export.split("-")[0], progress=False,
                                         matmul_nbits=export.endswith("nbits")).parity
                    res["parity_max_steps"] = p["max_steps"]
            row.update({k: v for k, v in res.items() if k != "model"})
            ok = abs(row["reload_rel_error"] - row["rel_error"]) <= 1e-4 * row["rel_error"] + 1e-9
            row["failure"] = None if ok else f"reload changed the error ({row['rel_error']} -> {row['reload_rel_error']})"
        except Exception as e:  # noqa: BLE001 - a failure is a result here
            row["failure"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            row["traceback"] = traceback.format_exc(limit=3)
        row["seconds"] = round(time.perf_counter() - t0, 2)
        rows.append(row)
    return rows


def summary(path: str) -> str:
    with open(path) as f:
        rows = [json.loads(ln) for ln in f if ln.strip()]
    lines = [f"{len({r['seed'] for r in rows})} seeds, {len(rows)} configs, {sum(bool(r['failure']) for r in rows)} failures", "",
             "| class | config | n | failures | relative error, median / max | parity max output INT8 steps |", "|---|---|---|---|---|---|"]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["cls"], f"{r['bits']} {r['algorithm']} {r['export']}"), []).append(r)
    for (cls, cfg), rs in sorted(groups.items()):
        ok = [r for r in rs if not r["failure"]]
        errs = sorted(r["rel_error"] for r in ok)
        par = max((r.get("parity_max_steps", 0) for r in ok), default=float("nan"))
        med = f"{errs[len(errs) // 2]:.2e} / {errs[-1]:.2e}" if errs else "-"
        lines.append(f"| {cls} | {cfg} | {len(rs)} | {len(rs) - len(ok)} | {med} | {par:.3f} |")
    lines += [f"- seed {r['seed']} ({r['case']}) {r['bits']} {r['algorithm']}: {r['failure']}" for r in rows if r["failure"]]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0:40")
    ap.add_argument("--jsonl", default="runs/tzoo.jsonl")
    ap.add_argument("--summary", metavar="JSONL")
    args = ap.parse_args()
    if args.summary:
        print(summary(args.summary))
        return
    os.makedirs(os.path.dirname(os.path.abspath(args.jsonl)), exist_ok=True)
    done = set()
    if os.path.exists(args.jsonl):
        with open(args.jsonl) as f:
            done = {json.loads(ln)["seed"] for ln in f if ln.strip()}
    lo, hi = map(int, args.seeds.split(":"))
    for seed in range(lo, hi):
        if seed in done:
            continue
        rows = run_seed(seed)
        with open(args.jsonl, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        print(f"seed {seed}: " + ", ".join(f"{r['bits']} {r['algorithm']} {'FAIL ' + r['failure'] if r['failure'] else format(r['rel_error'], '.2e')}"
                                          for r in rows), flush=True)


if __name__ == "__main__":
    main()
