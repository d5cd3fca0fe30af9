"""temporal's time path on diffusion transformers (docs/benchmarks.md, "temporal on transformers").
Reproduces: docs/benchmarks.md, "Diffusion transformers".

    python benchmarks/transformer_temporal.py --seeds 0:8

For each tiny zoo transformer (tests/transformer_zoo.py; the seed picks the class), W4A8, the zoo's calibration
and budget: relative MSE against the FP model on held-out calls of
  uniform, the default keep_fp (the conditioning path kept in float by role, as ModelOpt keeps it),
  uniform with the time path quantized (the role-found layers minus the time path temporal finds),
  temporal with the same keep_fp (its TIB reconstructed on the time path, ranges per timestep).
One JSON line per seed.
"""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import argparse
import json
import tempfile


def main() -> None:
    from gaq_backend.algorithms.temporal import time_path_layers
    from gaq_backend.api import record, with_role_keep_fp, wrap_for_config
    from transformer_zoo import build, generate, quant_config, run_case, sampling_loop

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0:8", help="a:b")
    args = ap.parse_args()
    lo, hi = map(int, args.seeds.split(":"))
    for seed in range(lo, hi):
        case = generate(seed)
        cfg = quant_config("temporal", 4, 8)
        calib = record(build(case), cfg, sampling_loop(case, 0))
        role = with_role_keep_fp(build(case), cfg, calib).keep_fp
        probe = build(case)
        wrap_for_config(probe, quant_config("temporal", 4, 8, keep_fp=[]))
        tib = list(time_path_layers(probe, calib))
        keep = [k for k in role if k.lstrip("=") not in tib]
        out = dict(seed=seed, model=case.describe(), time_path=tib)
        with tempfile.TemporaryDirectory() as tmp:
            for label, algo, kw in (("uniform, time path in float", "uniform", {}),
                                    ("uniform, time path quantized", "uniform", dict(keep_fp=keep)),
                                    ("temporal, time path quantized", "temporal", dict(keep_fp=keep))):
                out[label] = run_case(case, os.path.join(tmp, label[:8] + str(len(kw))), algo, 4, 8, **kw)["rel_error"]
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
