"""Do onnxruntime samples of an exported UNet match the PyTorch fake-quant samples?
Reproduces: docs/benchmarks.md, "ONNX export: parity, size and onnxruntime speed".

    python benchmarks/export_parity.py runs/bench/uniform-w4a8-s0 runs/bench/uniform-w8a8-s0 --json runs/export-parity.json

For each quantized directory and weight form: ``gaq export`` (with its per-call parity check), then the
full DDIM loop from the same initial noise in PyTorch (``gaq_backend.sampling.ddim_sample``) and in
onnxruntime + NumPy (``exporters.ort_sampler.sample``). Reports the final images' difference in 8-bit
pixel levels, next to the quantized-vs-FP difference for scale. Exits 1 when the mean difference exceeds
``SAMPLE_MEAN_LEVELS`` (the documented bound for samples).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from exporters.onnx_export import export_quantized  # noqa: E402
from exporters.ort_sampler import sample  # noqa: E402
from gaq_backend import load_quantized  # noqa: E402
from gaq_backend.evaluation.images import to_uint8  # noqa: E402
from gaq_backend.models import load_unet  # noqa: E402
from gaq_backend.pipeline import resolve_model_path  # noqa: E402
from gaq_backend.sampling import ddim_sample, initial_noise  # noqa: E402

SAMPLE_MEAN_LEVELS = 1.0  # mean |onnxruntime - torch| of final images, in 8-bit pixel levels (of 255)


def levels(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(to_uint8(a).astype(np.int16) - to_uint8(b).astype(np.int16))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--forms", nargs="+", default=["int8", "int4"], choices=["int8", "int4"])
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--seed", type=int, default=1234, help="torch noise seed (the report's seed)")
    ap.add_argument("--onnx-dir", default="runs/onnx")
    ap.add_argument("--json")
    args = ap.parse_args()

    rows = []
    for d in args.dirs:
        model, sched, recipe = load_quantized(d)
        shape = (model.config.in_channels, model.config.sample_size, model.config.sample_size)
        noise = initial_noise(args.num_samples, shape, args.seed)
        t0 = time.perf_counter()
        ref = ddim_sample(model, sched, recipe.sampler, noise, progress=False).numpy()
        torch_s = time.perf_counter() - t0
        fp = ddim_sample(load_unet(resolve_model_path(recipe.model)), sched, recipe.sampler, noise, progress=False).numpy()
        for form in args.forms:
            if form == "int4" and recipe.quant_config().w_bits > 4:
                continue
            out = os.path.join(args.onnx_dir, f"{os.path.basename(os.path.normpath(d))}-{form}.onnx")
            res = export_quantized(d, out, form, progress=False)
            t0 = time.perf_counter()
            got = sample(out, noise=noise.numpy(), progress=False)
            ort_s = time.perf_counter() - t0
            lv, lv_fp = levels(got, ref), levels(ref, fp)
            rows.append(dict(dir=d, form=form, n=args.num_samples, steps=recipe.sampler.num_inference_steps,
                             mean_levels=float(lv.mean()), max_levels=int(lv.max()), frac_over_2_levels=float((lv > 2).mean()),
                             quantized_vs_fp_mean_levels=float(lv_fp.mean()), noise_pred_parity=res.parity,
                             file_mb=res.file_mb, torch_sampling_s=torch_s, ort_sampling_s=ort_s))
            r = rows[-1]
            print(f"{d} {form}: onnxruntime vs torch samples: mean {r['mean_levels']:.3f} levels, max {r['max_levels']}, "
                  f">2 levels {100 * r['frac_over_2_levels']:.2f}% (quantized vs FP: mean {r['quantized_vs_fp_mean_levels']:.2f}); "
                  f"noise pred mean {res.parity['mean_steps']:.3f} / max {res.parity['max_steps']:.2f} steps; "
                  f"sampling torch {torch_s:.1f}s, onnxruntime {ort_s:.1f}s")
    if args.json:
        from gaq_backend.utils.io import write_json

        write_json(args.json, rows)
    bad = [r for r in rows if r["mean_levels"] > SAMPLE_MEAN_LEVELS]
    for r in bad:
        print(f"FAIL {r['dir']} {r['form']}: mean {r['mean_levels']:.3f} levels > {SAMPLE_MEAN_LEVELS}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
