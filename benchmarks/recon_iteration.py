"""Steady-state time of one AdaRound iteration on one unit of the embedded model.
Reproduces: docs/benchmarks.md, "The calibration budget and reconstruction throughput".

    python benchmarks/recon_iteration.py --unit up_blocks.2.resnets.0 --mode eager --batch-size 32
    python benchmarks/recon_iteration.py --unit up_blocks.2.resnets.0 --mode compile

Wraps the embedded UNet W4A8, takes the unit's inputs from one FP forward pass of 256 seeded noise
inputs, and runs ``learn_rounding`` (the reconstruction's AdaRound phase, activations off) on them,
timing every iteration. Prints the median after the first 20 iterations (so a compiled unit's compile
time and warm-up are left out, and shown apart) and the loss curve's ends. One variant per process, so
that runs in alternating order give a fair comparison on a shared machine.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    import torch

    from gaq_backend.algorithms import UniformConfig
    from gaq_backend.algorithms.block_cache import BlockData, output_tensor
    from gaq_backend.algorithms.blocks import reconstruction_units
    from gaq_backend.algorithms.common import set_quant_state
    from gaq_backend.algorithms.minmax import fit_weights
    from gaq_backend.algorithms.reconstruction import learn_rounding, per_sample_lp
    from gaq_backend.models.embedded import load_unet
    from gaq_backend.wrapping import wrap_unet

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--unit", default="up_blocks.2.resnets.0")
    ap.add_argument("--mode", choices=["eager", "compile"], default="eager")
    ap.add_argument("--autocast", choices=["none", "bf16"], default="none")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--iters", type=int, default=120)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = load_unet()
    wrap_unet(model, 4, 8, [])
    model.requires_grad_(False)
    fit_weights(model, "max")
    unit = next(u for u in reconstruction_units(model) if u.name == args.unit)
    seen = {}
    hook = unit.module.register_forward_pre_hook(lambda m, a, k: seen.setdefault("in", (a, k)), with_kwargs=True)
    with torch.no_grad():
        set_quant_state(model, weight=False, act=False)
        model(torch.randn(256, 1, 32, 32), torch.randint(0, 1000, (256,)))
        hook.remove()
        inputs, kw = seen["in"]
        target = output_tensor(unit.module(*inputs, **kw)).clone()
    data = BlockData(list(inputs), dict(kw), target, torch.zeros(256))
    set_quant_state(unit.module, weight=True, act=False)
    module = torch.compile(unit.module) if args.mode == "compile" else unit.module
    stamps: list[float] = []

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        stamps.append(time.perf_counter())
        if args.autocast == "bf16":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out, tgt = data.run(module, idx)
            return per_sample_lp(out.float(), tgt, 2.0).mean()
        return per_sample_lp(*data.run(module, idx), 2.0).mean()

    cfg = UniformConfig(iters=args.iters, batch_size=args.batch_size)
    t0 = time.perf_counter()
    curve = learn_rounding([l for _, l in unit.layers()], len(data), args.iters, cfg, torch.Generator().manual_seed(0), batch_loss)
    total = time.perf_counter() - t0
    steady = [b - a for a, b in zip(stamps[20:], stamps[21:])]
    print(f"{args.unit} {args.mode} autocast={args.autocast} batch {args.batch_size} {args.threads} thread(s): "
          f"{args.iters} iterations in {total:.1f} s (first 20: {stamps[20] - t0:.1f} s); "
          f"steady {1000 * statistics.median(steady):.1f} ms per iteration; loss {curve[0]:.4g} -> {curve[-1]:.4g}")


if __name__ == "__main__":
    main()
