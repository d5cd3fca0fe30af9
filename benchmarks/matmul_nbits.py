"""MatMulNBits: speed and accuracy of block-wise INT4 Linear weights (docs/benchmarks.md, "MatMulNBits").
Reproduces: docs/benchmarks.md, "Diffusion transformers".

    python benchmarks/matmul_nbits.py                     # SD3- and Flux-shaped blocks, blocks of 32, 1 and 2 threads
    python benchmarks/matmul_nbits.py --small             # a seconds-long dry run of the same path

One transformer block of the real widths, random weights: SD3-medium's JointTransformerBlock (24 heads x 64 =
1536 wide) and Flux's single-stream block (24 heads x 128 = 3072 wide; 141 M parameters), 256 image tokens (a
32 x 32 latent) and 6 text tokens, calibrated with gaq minmax W4A8 on two batches of tests/transformer_zoo.py's
sampling loop. onnxruntime's CPU provider times, interleaved over rounds (the ratios are what to read):

  fp32            the FP model's graph
  w4a8-int8       gaq's W4A8 per-channel export with --weights int8 (the int8 fast path of the CPU provider)
  w4a8-static     blocked INT4 weights with gaq's static A8 input Q/DQ kept (exact; onnxruntime emulates it)
  nbits-fp32      --matmul-nbits at accuracy level 0 (MatMulNBits dequantizes the blocks, float compute)
  nbits-int8      --matmul-nbits at accuracy level 4 (MatMulNBits quantizes its input to int8 per block)

Accuracy: relative MSE of each against the FP model's output on 8 held-out calls (accuracy-level 4 error measured
on onnxruntime's output, the rest on PyTorch's fake-quant model, which the exports match); and first, the relative
weight MSE of per-channel and blocked W4 on one 3072 x 3072 weight drawn from diffusers' uniform init and from
Gaussian and Laplace distributions (random-init models understate what blocks do for trained weights).
"""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import argparse
import json
import statistics
import tempfile
import time

import numpy as np
import torch


def models(small: bool):
    from transformer_zoo import DiTCase

    heads, sd3_dim, flux_dim = (2, 16, 16) if small else (24, 64, 128)
    return [
        DiTCase(0, "SD3Transformer2DModel", dict(sample_size=32, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                                                 attention_head_dim=sd3_dim, num_attention_heads=heads, joint_attention_dim=32,
                                                 caption_projection_dim=heads * sd3_dim, pooled_projection_dim=16,
                                                 pos_embed_max_size=32), steps=2, guidance=4.0),
        DiTCase(0, "FluxTransformer2DModel", dict(patch_size=1, in_channels=16, num_layers=0, num_single_layers=1,
                                                  attention_head_dim=flux_dim, num_attention_heads=heads, joint_attention_dim=32,
                                                  pooled_projection_dim=16, guidance_embeds=True,
                                                  axes_dims_rope=[flux_dim // 4, flux_dim // 4, flux_dim // 2], sample_size=32),
                steps=2, guidance=3.5),
    ]


def quantize(case, block: int, folder: str):
    import gaq_backend as gaq
    from transformer_zoo import build, sampling_loop

    loops = [sampling_loop(case, s) for s in (0, 1)]
    cfg = gaq.QuantConfig(w_bits=4, a_bits=8, w_block_size=block, algorithm=gaq.MinMaxConfig(),
                          calibration=gaq.CalibrationConfig(max_per_step=16, max_samples=64, n_groups=1, val_fraction=0.25))
    q = gaq.quantize(build(case), cfg, forward_loop=lambda m: [f(m) for f in loops], progress=False)
    gaq.save_quantized(q, folder)
    return q


def rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(((got - want) ** 2).mean() / (want ** 2).mean())


def time_sessions(sessions: dict, feed_args, rounds: int) -> dict[str, list[float]]:
    from exporters.ort_runtime import predict_noise

    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):   # interleaved: each round runs every variant once
        for name, sess in sessions.items():
            t0 = time.perf_counter()
            predict_noise(sess, *feed_args)
            times[name].append(time.perf_counter() - t0)
    return times


def run(case, block: int, threads: list[int], rounds: int, tmp: str) -> dict:
    import onnx
    from exporters.onnx_export import export_quantized, save_model_atomic, trace_to_onnx
    from exporters.ort_runtime import create_session, predict_noise
    from gaq_backend.calibration.calibration_set import unbatched_rows  # noqa: F401  (held-out rows carry it)
    from transformer_zoo import build

    out: dict = dict(model=case.cls, width=case.config["num_attention_heads"] * case.config["attention_head_dim"], block_size=block)
    qb = quantize(case, block, os.path.join(tmp, "blocked"))
    qc = quantize(case, 0, os.path.join(tmp, "channel"))
    fp = build(case)
    fp.gaq_info = qb.gaq_info   # the FP graph takes the same recorded inputs
    held = qb.gaq_info.held_out.spread(8)
    x, t = held.x.float(), held.t
    cond = {k: v.float() if v.is_floating_point() else v for k, v in held.cond.items()}
    npc = {k: v.numpy() for k, v in cond.items()}
    from gaq_backend.sampling import unet_forward

    with torch.no_grad():
        want = unet_forward(fp, x, t, cond).numpy()
        out["rel_mse_vs_fp"] = {"w4a8 per-channel (torch)": rel(unet_forward(qc, x, t, cond).numpy(), want),
                                "w4a8 blocked (torch)": rel(unet_forward(qb, x, t, cond).numpy(), want)}
    paths = {"fp32": os.path.join(tmp, "fp32.onnx"), "w4a8-int8": os.path.join(tmp, "int8.onnx"),
             "w4a8-static": os.path.join(tmp, "static.onnx"), "nbits": os.path.join(tmp, "nbits.onnx")}
    save_model_atomic(trace_to_onnx(fp, 21), paths["fp32"], overwrite=True)
    export_quantized(os.path.join(tmp, "channel"), paths["w4a8-int8"], "int8", progress=False, overwrite=True)
    export_quantized(os.path.join(tmp, "blocked"), paths["w4a8-static"], "int4", progress=False, overwrite=True)
    res = export_quantized(os.path.join(tmp, "blocked"), paths["nbits"], "int4", progress=False, overwrite=True, matmul_nbits=True)
    out["nbits_parity_max_steps"] = res.parity["max_steps"]
    out["file_mb"] = {k: round(sum(os.path.getsize(p + s) for s in ("", ".data") if os.path.exists(p + s)) / 2**20, 2)
                      for k, p in paths.items()}
    out["latency_s"] = {}
    for n in threads:
        torch.set_num_threads(n)
        sessions = {k: create_session(paths[k], threads=n) for k in ("fp32", "w4a8-int8", "w4a8-static")}
        sessions["nbits-fp32"] = create_session(paths["nbits"], threads=n)
        sessions["nbits-int8"] = create_session(paths["nbits"], threads=n, config={"session.qdq_matmulnbits_accuracy_level": "4"})
        if n == threads[0]:
            got = predict_noise(sessions["nbits-int8"], x.numpy(), t.numpy(), 64, npc)
            out["rel_mse_vs_fp"]["nbits-int8 (onnxruntime)"] = rel(got, want)
            opt = os.path.join(tmp, "opt.onnx")
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.optimized_model_filepath = opt
            so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "4")
            ort.InferenceSession(paths["nbits"], so, providers=["CPUExecutionProvider"])
            ops = [nd.op_type for nd in onnx.load(opt).graph.node]
            out["fused_ops"] = {k: ops.count(k) for k in ("MatMulNBits", "MatMul", "MatMulIntegerToFloat", "DequantizeLinear")}
        feed = (x.numpy(), t.numpy(), 64, npc)
        time_sessions(sessions, feed, 1)   # warm-up
        times = time_sessions(sessions, feed, rounds)
        out["latency_s"][f"{n} thread{'s' if n > 1 else ''}"] = {
            k: dict(median=statistics.median(v), min=min(v), max=max(v)) for k, v in times.items()}
    return out


def weight_error_by_distribution(block: int, shape=(3072, 3072), seed: int = 0) -> dict:
    """Relative weight MSE of W4 per channel and per block (MSE-searched scales) on one Flux-sized weight drawn
    from diffusers' init (uniform) and from two shapes trained weights have (Gaussian, heavy-tailed Laplace)."""
    from gaq_backend.quantizers import UniformQuantizer

    gen = torch.Generator().manual_seed(seed)
    draws = {"uniform (diffusers init)": torch.rand(shape, generator=gen) * 2 - 1, "gaussian": torch.randn(shape, generator=gen),
             "laplace": torch.distributions.Laplace(0.0, 1.0).sample(shape)}
    out = {}
    for name, w in draws.items():
        errs = {}
        for label, q in (("per_channel", UniformQuantizer(4, channel_axis=0, shape=(shape[0], 1))),
                         (f"blocks_of_{block}", UniformQuantizer(4, channel_axis=0, shape=(shape[0], shape[1] // block), block_size=block))):
            q.fit(w, "mse")
            errs[label] = float(((q(w) - w) ** 2).mean() / (w ** 2).mean())
        out[name] = errs
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="tiny widths: a dry run of the path")
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(json.dumps(dict(weight_rel_mse=weight_error_by_distribution(args.block, (64, 64) if args.small else (3072, 3072)))), flush=True)
    for case in models(args.small):
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(run(case, args.block, [int(n) for n in args.threads.split(",")], args.rounds, tmp)), flush=True)


if __name__ == "__main__":
    main()
