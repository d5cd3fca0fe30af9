"""Where a block-reconstruction iteration spends its time (issue 16's first step), on the embedded model.

    python experiments/recon_profile.py --iters 40 --threads 2 --profile down_blocks.1.resnets.0

Runs `uniform` W4A8 from the shipped recipe's calibration set (captured once, then cached) with --iters
AdaRound and as many step-size iterations per unit, and prints per unit the time per iteration of each
phase (from the report's per-unit timings). With --profile UNIT, torch's profiler records that unit's
reconstruction and the operators taking the most self CPU time are printed.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    import torch

    import gaq_backend.algorithms.reconstruction as recon
    from gaq_backend.api import quantize
    from gaq_backend.calibration import capture_calibration
    from gaq_backend.models.loading import load_model
    from gaq_backend.recipe import load_recipe

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=os.path.join(ROOT, "recipes", "ddpm-mnist-w4a8-uniform.yaml"))
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", help="a unit name whose reconstruction runs under torch.profiler")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--act-iters", type=int, help="step-size iterations per unit (default: --iters)")
    ap.add_argument("--autocast", choices=["none", "bf16"], default="none")
    ap.add_argument("--compile", action="store_true", help="torch.compile each unit for its training iterations")
    ap.add_argument("--batch-size", type=int, help="rows per reconstruction iteration (default: the recipe's)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    act_iters = args.iters if args.act_iters is None else args.act_iters
    sets = [f"settings.iters={args.iters}", f"settings.act_iters={act_iters}"]
    recipe = load_recipe(args.recipe, sets + ([f"settings.batch_size={args.batch_size}"] if args.batch_size else []))
    loaded = load_model(recipe.model, recipe.model_options)
    calib, _ = capture_calibration(loaded.unet, loaded.scheduler_config, recipe.sampler, recipe.calibration, progress=False)

    if args.autocast == "bf16":
        import gaq_backend.algorithms.block_cache as block_cache

        run = block_cache.BlockData.run

        def autocast_run(self, module, idx, params=None):
            if not torch.is_grad_enabled():  # mse_before / mse_after stay float32
                return run(self, module, idx, params)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out, target = run(self, module, idx, params)
            return out.float(), target
        block_cache.BlockData.run = autocast_run
    if args.compile:
        import gaq_backend.algorithms.block_cache as block_cache

        plain_run, compiled = block_cache.BlockData.run, {}

        def compiled_run(self, module, idx, params=None):
            if params is not None or not torch.is_grad_enabled():  # mse_before / mse_after run eagerly
                return plain_run(self, module, idx, params)
            if id(module) not in compiled:
                compiled[id(module)] = torch.compile(module)
            return plain_run(self, compiled[id(module)], idx)
        block_cache.BlockData.run = compiled_run
    profiled = {}
    if args.profile:
        inner = recon.reconstruct_unit

        def traced(unit, *a, **k):
            if unit.name != args.profile:
                return inner(unit, *a, **k)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                out = inner(unit, *a, **k)
            profiled["table"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top)
            return out
        recon.reconstruct_unit = traced
    t0 = time.perf_counter()
    q = quantize(loaded.unet, recipe.quant_config(), calib, progress=False)
    total = time.perf_counter() - t0
    blocks = {k: vars(v) for k, v in q.gaq_info.stats.blocks.items()}
    from gaq_backend.evaluation.noise import noise_mse

    mse, _ = noise_mse(q, calib.val, 256)
    print(f"uniform W4A8, {args.iters} + {act_iters} iterations per unit, batch {recipe.settings.batch_size}, autocast {args.autocast}, "
          f"compile {args.compile}, "
          f"{args.threads} thread(s), {len(calib.train)} training rows: {total:.1f} s in all, noise_mse {mse:.4e}")
    print("| unit | kind | caching s | reconstruct s | ms per iteration (both phases) |")
    print("|---|---|---|---|---|")
    for name, b in blocks.items():
        print(f"| {name} | {b['kind']} | {b['seconds_cache']:.2f} | {b['seconds_reconstruct']:.2f} | "
              f"{1000 * b['seconds_reconstruct'] / (args.iters + act_iters):.1f} |")
    rec = sum(b["seconds_reconstruct"] for b in blocks.values())
    print(f"\nreconstruction {rec:.1f} s of {total:.1f} s; mean {1000 * rec / ((args.iters + act_iters) * len(blocks)):.1f} ms per unit-iteration")
    if "table" in profiled:
        print(f"\ntorch.profiler, {args.profile} (self CPU time):\n{profiled['table']}")


if __name__ == "__main__":
    main()
