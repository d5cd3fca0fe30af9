"""Peak memory and time of block reconstruction on an SD-1.5-shaped UNet (random weights, no download).
Reproduces: docs/benchmarks.md, "Memory and time at Stable Diffusion size".

    python benchmarks/memory_sd15.py --rows 16 32 64 --json runs/bench/memory_sd15.json

The UNet is diffusers' UNet2DConditionModel built from the public SD 1.5 UNet config (860M parameters,
3.44 GB in float32) with seeded random weights. Calibration rows come in classifier-free-guidance pairs
(unconditional and conditional text embeddings, 77 x 768) at a 32x32 latent, over 4 timesteps. Each size
runs `uniform` W4A8 with a few AdaRound and step-size iterations in its own process, whose peak resident
memory (VmHWM) is the figure reported beside the estimate gaq prints before the work. Prints a markdown table.

    python benchmarks/memory_sd15.py --rows 16 --processes 2     # docs/benchmarks.md, "Distributed reconstruction"

``--processes N`` runs each size under ``torchrun --standalone --nproc-per-node N`` (Gloo, one thread per process
with ``--threads 1``): each rank caches half of every unit's rows; the peak is the largest rank's.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GiB = 2**30
# huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5, unet/config.json (the keys that shape the model)
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
    flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, mid_block_scale_factor=1,
)


def rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_rss() -> int:
    return rss("VmHWM:")


def calibration(rows: int, latent: int, seed: int):
    """``rows`` CFG-paired rows over 4 recorded timesteps, as gaq's pipeline capture records them."""
    import torch

    from gaq_backend.calibration.calibration_set import calibration_from_tensors

    g = torch.Generator().manual_seed(seed)
    timesteps = torch.arange(976, -1, -25)  # a 40-step sampler
    steps = torch.arange(rows) * 4 // rows  # 4 recorded steps (every 10th of 40), rows spread evenly
    uncond, cond = torch.randn(1, 77, 768, generator=g), torch.randn(rows // 2, 77, 768, generator=g)
    text = torch.stack([uncond.expand(rows // 2, -1, -1), cond], 1).reshape(rows, 77, 768)  # (uncond, cond) pairs
    raw = dict(x=torch.randn(rows, 4, latent, latent, generator=g), t=timesteps[steps * 10].float(),
               eps=torch.randn(rows, 4, latent, latent, generator=g), step=steps, timesteps=timesteps.float(),
               encoder_hidden_states=text)
    return calibration_from_tensors(raw, val_fraction=0.1, n_groups=4, seed=seed)


def rows_that_fit(plan: dict, total: int) -> int:
    """Rows whose calibration data, paused passes and unit cache fit in ``total`` bytes beside the model and training."""
    return max(0, (total - plan["model"] - plan["reconstruction"]) // max(1, plan["per_row"]))


def child(args) -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    from gaq_backend.algorithms.uniform import UniformConfig
    from gaq_backend.api import quantize
    from gaq_backend.config import preset

    from gaq_backend import distributed

    torch.set_num_threads(args.threads)
    distributed.init_from_env(args.device)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    unet = UNet2DConditionModel(**SD15_UNET).eval()
    weights = sum(p.numel() * p.element_size() for p in unet.parameters())  # fp32: the target's reference
    unet.to(args.device, getattr(torch, args.dtype))
    rss_model = peak_rss()
    calib = calibration(args.rows[0], args.latent, seed=0)
    if args.dtype != "float32":
        calib = calib.stored_as(getattr(torch, args.dtype))
    algo = UniformConfig(iters=args.iters, act_iters=args.iters, batch_size=args.batch_size, cache_batch_size=args.cache_batch_size,
                         fp_targets=args.fp_targets)
    config = preset("W4A8", algorithm=algo)
    t1 = time.perf_counter()
    if args.trace:  # resident and peak memory after each unit, on stderr
        import gaq_backend.algorithms.reconstruction as recon

        inner = recon.reconstruct_unit

        def traced(unit, *a, **k):
            out = inner(unit, *a, **k)
            print(f"{unit.name}: rss {rss('VmRSS:') / GiB:.2f} GiB, peak {peak_rss() / GiB:.2f} GiB", file=sys.stderr, flush=True)
            return out
        recon.reconstruct_unit = traced
    quantize(unet, config, calib, progress=False)
    t2 = time.perf_counter()
    peaks: list = [peak_rss()] * distributed.world()[1]
    if distributed.active():
        torch.distributed.all_gather_object(peaks, peak_rss())
    stats = unet.gaq_info.stats.to_dict()
    blocks = [b for b in stats["blocks"].values() if b["kind"] == "block"]
    per_iter = [b["seconds_reconstruct"] / (2 * args.iters) for b in blocks]
    return dict(rows=args.rows[0], latent=args.latent, weights_bytes=weights, params=sum(p.numel() for p in unet.parameters()),
                peak_rss=max(peaks), processes=len(peaks), rss_after_model=rss_model, seconds_build=t1 - t0, seconds_quantize=t2 - t1,
                seconds_cache=sum(b["seconds_cache"] for b in stats["blocks"].values()),
                seconds_per_block_iteration_mean=sum(per_iter) / len(per_iter), seconds_per_block_iteration_max=max(per_iter),
                units=len(stats["blocks"]), on_disk=sum(b["on_disk"] for b in stats["blocks"].values()),
                plan=stats["memory_plan"], rows_fit_24gb=rows_that_fit(stats["memory_plan"], 24 * 10**9), device=args.device,
                dtype=args.dtype, peak_gpu=torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else None,
                gpu=torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[16, 32, 64], help="calibration rows (CFG pairs count twice)")
    ap.add_argument("--latent", type=int, default=32)
    ap.add_argument("--iters", type=int, default=2, help="AdaRound iterations per unit (as many step-size iterations)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--cache-batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="where the UNet computes (cuda: the peak GPU memory is reported too)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="the UNet's and calibration inputs' dtype")
    ap.add_argument("--fp-targets", default="auto", choices=["auto", "pass", "disk"], help="the algorithm's fp_targets setting")
    ap.add_argument("--processes", type=int, default=1, help="torchrun processes (data-parallel reconstruction)")
    ap.add_argument("--json")
    ap.add_argument("--trace", action="store_true", help="print resident and peak memory after each unit")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        from gaq_backend import distributed

        result = child(args)
        if distributed.is_main():
            print(json.dumps(result))
        return
    results = []
    for rows in args.rows:
        launch = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.processes)]
                                     if args.processes > 1 else [])
        cmd = launch + [os.path.abspath(__file__), "--child", "--rows", str(rows), "--latent", str(args.latent),
               "--iters", str(args.iters), "--batch-size", str(args.batch_size), "--cache-batch-size", str(args.cache_batch_size),
               "--threads", str(args.threads), "--device", args.device, "--dtype", args.dtype, "--fp-targets", args.fp_targets] + (["--trace"] if args.trace else [])
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
        results.append(json.loads([ln for ln in out.strip().splitlines() if ln.startswith("{")][0]))
        r = results[-1]
        gpu = f", peak GPU memory {r['peak_gpu'] / GiB:.2f} GiB" if r["peak_gpu"] is not None else ""
        print(f"rows {rows}: peak {r['peak_rss'] / GiB:.2f} GiB{gpu} (estimate {r['plan']['peak'] / GiB:.2f}), "
              f"quantize {r['seconds_quantize']:.0f} s", file=sys.stderr, flush=True)
    w = results[0]["weights_bytes"]
    print(f"\nSD-1.5-shaped UNet2DConditionModel, {results[0]['params'] / 1e6:.0f}M parameters ({w / GiB:.2f} GiB fp32); "
          f"{args.latent}x{args.latent} latent, uniform W4A8, {args.iters}+{args.iters} iterations per unit, batch {args.batch_size}, "
          f"{args.threads} thread(s), {args.dtype} on {results[0]['gpu'] or platform.processor() or platform.machine()}\n")
    print("| rows | peak RSS | target 1.5 W + 1 GiB | estimated peak | paused passes | FP targets | largest unit cache | quantize | "
          "of which caching | per block-iteration (mean / max) | rows that fit in 24 GB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        p = r["plan"]
        print(f"| {r['rows']} | {r['peak_rss'] / GiB:.2f} GiB | {(1.5 * w + GiB) / GiB:.2f} GiB | {p['peak'] / GiB:.2f} GiB | "
              f"{p['paused_passes'] / GiB:.2f} GiB | {p.get('fp_targets', 'pass')}"
              + (f" ({p['fp_disk'] / GiB:.2f} GiB on disk)" if p.get("fp_targets") == "disk" else "") + " | "
              f"{p['unit_cache'] / GiB:.2f} GiB | {r['seconds_quantize']:.0f} s | "
              f"{r['seconds_cache']:.0f} s | {r['seconds_per_block_iteration_mean']:.2f} / {r['seconds_per_block_iteration_max']:.2f} s | "
              f"{r['rows_fit_24gb']} |")
    if args.json:
        from gaq_backend.utils.io import atomic_path

        with atomic_path(args.json) as tmp, open(tmp, "w") as f:
            json.dump(dict(results=results, args=vars(args), machine=platform.machine(), cpus=os.cpu_count()), f, indent=1)


if __name__ == "__main__":
    main()
