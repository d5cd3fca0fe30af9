"""1 vs N processes of block reconstruction on this CPU (docs/benchmarks.md, "Distributed reconstruction").
Reproduces: docs/benchmarks.md, "Distributed reconstruction (torchrun)".

    python benchmarks/distributed_speed.py                       # the embedded model, uniform W4A8, 1 and 2 processes
    python benchmarks/distributed_speed.py --iters 100 --rows 64

Each run is ``gaq quantize recipes/ddpm-mnist-w4a8-uniform.yaml`` at a reduced budget (``--iters`` AdaRound and half as
many step-size iterations per unit, ``--rows`` images per recorded step), one thread per process (OMP_NUM_THREADS=1),
the N-process run under ``torchrun --standalone``; the capture is cached by a first run, so the figures are the
calibration phase. Prints one JSON line per run: calibration seconds, seconds per unit-iteration, noise_mse, and the
gradient bytes all-reduced per iteration (AdaRound's V of the unit's layers, float32).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(n: int, args, tmp: str, cache: str) -> dict:
    out = os.path.join(tmp, f"out{n}")
    gaq = ["-m", "gaq_backend.cli", "quantize", os.path.join(ROOT, "recipes", "ddpm-mnist-w4a8-uniform.yaml"), "--out", out,
           "--quiet", "--device", "cpu", "--set", f"settings.iters={args.iters}", "--set", f"settings.act_iters={args.iters // 2}",
           "--set", f"calibration.n_per_step={args.rows}", "--set", f"calibration.cache_dir={cache}", "--set", "report.sensitivity=false",
           "--set", "report.num_samples=8"]
    launch = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n)] if n > 1 else [])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(launch + gaq, check=True, env=env, cwd=ROOT, capture_output=True, text=True)
    with open(os.path.join(out, "report.json")) as f:
        rep = json.load(f)
    blocks = rep["algorithm_stats"]["blocks"]
    unit_iters = len(blocks) * (args.iters + args.iters // 2)
    return dict(processes=n, calibration_s=round(rep["timings"]["calibration"], 2), unit_iterations=unit_iters,
                s_per_unit_iteration=rep["timings"]["calibration"] / unit_iters, noise_mse=rep["metrics"]["noise_mse"],
                reconstruct_s=round(sum(b["seconds_reconstruct"] for b in blocks.values()), 2),
                cache_s=round(sum(b["seconds_cache"] for b in blocks.values()), 2))


def v_bytes() -> dict:
    """Bytes of AdaRound's V per unit of the embedded model (what one iteration all-reduces, float32)."""
    import gaq_backend as gaq
    from gaq_backend.algorithms.blocks import reconstruction_units
    from gaq_backend.api import wrap_for_config
    from gaq_backend.models.loading import load_model

    unet = load_model("embedded").unet
    wrap_for_config(unet, gaq.QuantConfig(keep_fp=["conv_in", "conv_out"]))
    sizes = [sum(l.weight.numel() for _, l in u.layers()) * 4 for u in reconstruction_units(unet)]
    return dict(units=len(sizes), v_bytes_mean=sum(sizes) / len(sizes), v_bytes_max=max(sizes))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--processes", default="1,2")
    args = ap.parse_args()
    print(json.dumps(v_bytes()), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        cache = os.path.join(tmp, "cache")
        for n in map(int, args.processes.split(",")):
            print(json.dumps(run(n, args, tmp, cache)), flush=True)


if __name__ == "__main__":
    main()
