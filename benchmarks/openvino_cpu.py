"""Deployment on a CPU through OpenVINO: speed of gaq's INT8 graphs against FP32 and NNCF's INT8, and quality.
Reproduces: docs/benchmarks.md, "Deployment: OpenVINO, Optimum's pipeline, the GPU kit".

    python benchmarks/openvino_cpu.py speed --rounds 3 --json runs/openvino/speed.json
    python benchmarks/openvino_cpu.py quality --samples 1000 --json runs/openvino/quality.json

speed: the embedded MNIST UNet and a UNet of the CIFAR-10 DDPM's shape (35.7M parameters, random weights),
each quantized W8A8 and W4A8 with `minmax` (speed does not depend on the calibration algorithm), through
`gaq bench --runtime openvino` at batch 8, 1 and 2 threads, ``--rounds`` times back to back; ratios are
taken within a round (this machine is shared) and reported as the range over rounds.

quality: on the embedded model, gaq's W8A8 (the shipped recipe) and NNCF's INT8 quantization of the FP32
graph from the same held-out calibration inputs, both compiled by OpenVINO at its default precision (what
a user gets): noise_mse against the FP model's prediction on the held-out inputs saved with gaq's folder,
and FID of their DDIM samples against the FP32 graph's samples from the same noise (n images, 50 steps).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import yaml  # noqa: E402

from benchmarks.export_size import CIFAR10_DDPM_SHAPE  # noqa: E402
from gaq_backend.cli import main as gaq  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quantized_folders(work: str) -> dict[str, list[str]]:
    """{model tag: [W8A8 folder, W4A8 folder]}, minmax, quantized once and reused."""
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    out = {}
    cifar = os.path.join(work, "cifar-shape")
    if not os.path.isdir(cifar):
        torch.manual_seed(0)
        UNet2DModel(**CIFAR10_DDPM_SHAPE).save_pretrained(cifar)
        DDPMScheduler(num_train_timesteps=1000).save_pretrained(cifar)
    recipes = {
        "embedded": dict(model="embedded", sampler=dict(num_inference_steps=50),
                         calibration=dict(n_per_step=128, interval=5, cache_dir=os.path.join(work, "cache"))),
        "cifar-shape": dict(model=cifar, sampler=dict(num_inference_steps=4),
                            calibration=dict(n_per_step=8, interval=1, n_groups=2, val_fraction=0.25, batch_size=8,
                                             cache_dir=os.path.join(work, "cache"))),
    }
    for tag, r in recipes.items():
        out[tag] = []
        for w in (8, 4):
            folder = os.path.join(work, f"{tag}-w{w}a8")
            if not os.path.isfile(os.path.join(folder, "report.json")):
                recipe = dict(r, algorithm="minmax", quantization=dict(w_bits=w, a_bits=8, keep_fp=["conv_in", "conv_out"]),
                              report=dict(num_samples=2, grid=2, batch_size=2))
                with open(os.path.join(work, f"{tag}-w{w}a8.yaml"), "w") as f:
                    yaml.safe_dump(recipe, f)
                if gaq(["quantize", os.path.join(work, f"{tag}-w{w}a8.yaml"), "--out", folder, "--quiet", "--overwrite"]):
                    raise SystemExit(f"quantizing {tag} W{w}A8 failed")
            out[tag].append(folder)
    return out


def speed(args) -> None:
    from exporters.bench import run_bench
    from exporters.openvino_runtime import int8_share

    folders = quantized_folders(args.work)
    rows = []
    for r in range(args.rounds):
        for tag, dirs in folders.items():
            for threads in (1, 2):
                got = run_bench(dirs, ["cpu"], [8], args.repeats, 3, threads, os.path.join(args.work, "bench-tmp.json"),
                                work_dir=os.path.join(args.work, "bench-work"), progress=False, runtime="openvino")
                for g in got:
                    g.update(round=r, model=tag, threads=threads)
                rows += got
                print(f"round {r} {tag} {threads} thread(s) done", file=sys.stderr, flush=True)
    table = ["| model | threads | variant | runs on | ms per batch of 8 (median per round) | x FP32 (f32 hint) | x OpenVINO default (bf16) | INT8 kernels |",
             "|---|---|---|---|---|---|---|---|"]
    for tag in folders:
        for threads in (1, 2):
            sel = [g for g in rows if g["model"] == tag and g["threads"] == threads and g["median_ms"]]
            keys = list(dict.fromkeys((g["variant"], g["requested_precision"], os.path.basename(g["source"])) for g in sel))
            for key in keys:
                mine = [g for g in sel if (g["variant"], g["requested_precision"], os.path.basename(g["source"])) == key]
                ratios = {p: [] for p in ("f32", "default")}
                for g in mine:
                    for p in ratios:
                        ref = [h for h in sel if h["round"] == g["round"] and h["variant"] == "fp32" and h["requested_precision"] == p]
                        ratios[p].append(ref[0]["median_ms"] / g["median_ms"])
                rng = {p: f"{min(v):.2f}-{max(v):.2f}x" for p, v in ratios.items()}
                ms = " / ".join(f"{g['median_ms']:.1f}" for g in mine)
                name = key[0] if key[0] in ("fp32", "quantize_static-w8a8", "nncf-int8") else f"gaq {key[0]} ({key[2]})"
                table.append(f"| {tag} | {threads} | {name} | {mine[0]['provider']} | {ms} | {rng['f32']} | {rng['default']} | "
                             f"{int8_share(mine[0]['executed'])} |")
    print("\n".join(table))
    _write(args.json, dict(rows=rows, table=table, machine=platform.processor() or platform.machine(), cpus=os.cpu_count()))


def quality(args) -> None:
    import torch

    from exporters.bench import _nncf_int8
    from exporters.onnx_export import export_fp
    from exporters.openvino_runtime import OpenVINOSession
    from exporters.ort_runtime import predict_noise
    from exporters.ort_sampler import sample
    from gaq_backend.evaluation.inception import InceptionFeatures
    from gaq_backend.evaluation.metrics import frechet_distance, gaussian_stats
    from gaq_backend.models.loading import load_model
    from gaq_backend.serialization import load_quantized

    work = args.work
    folder = os.path.join(work, "embedded-w8a8-shipped")
    if not os.path.isfile(os.path.join(folder, "report.json")):
        if gaq(["quantize", os.path.join(ROOT, "recipes", "ddpm-mnist-w8a8.yaml"), "--out", folder, "--quiet", "--overwrite"]):
            raise SystemExit("quantizing the shipped W8A8 recipe failed")
    gaq_onnx, fp_onnx, nncf_xml = (os.path.join(work, n) for n in ("gaq-w8a8-int8.onnx", "fp32.onnx", "nncf-int8.xml"))
    if gaq(["export", folder, "--out", gaq_onnx, "--quiet", "--overwrite"]):
        raise SystemExit("export failed")
    unet, _, _ = load_quantized(folder)
    held = unet.gaq_info.held_out
    fp = load_model("embedded").unet
    export_fp(fp, fp_onnx, opset=20)
    x, t = held.x.numpy(), held.t.numpy()
    _nncf_int8(fp_onnx, nncf_xml, x, t)
    meta_onnx = gaq_onnx  # the DDIM loop reads its scheduler and sampler from gaq's metadata
    with torch.no_grad():
        eps = fp(held.x, held.t).sample.numpy()
    sessions = {"FP32 graph (f32 hint)": OpenVINOSession(fp_onnx, precision="f32"),
                "FP32 graph (OpenVINO default)": OpenVINOSession(fp_onnx),
                "gaq W8A8 (int8 graph)": OpenVINOSession(gaq_onnx), "NNCF INT8 (IR)": OpenVINOSession(nncf_xml)}
    noise = np.random.default_rng(args.seed).standard_normal((args.samples, 1, 32, 32), dtype=np.float32)
    net = InceptionFeatures() if args.samples else None
    results, fp_stats = {}, None
    for name, sess in sessions.items():
        pred = predict_noise(sess, x, t)
        results[name] = dict(noise_mse=float(((pred - eps) ** 2).mean()), fid_vs_fp32=None, runs_on=sess.get_providers()[0])
        if args.samples:
            imgs = sample(meta_onnx, args.samples, noise=noise, batch_size=250, progress=False, session=sess)
            stats = gaussian_stats(net(torch.from_numpy(imgs))[0])
            fp_stats = fp_stats or stats
            results[name]["fid_vs_fp32"] = frechet_distance(*stats, *fp_stats)
        print(name, results[name], file=sys.stderr, flush=True)
    table = ["| model | runs on | noise_mse vs FP (held-out inputs) | FID vs FP32 samples |", "|---|---|---|---|"]
    fid = lambda v: "not measured" if v is None else f"{v:.2f}"  # noqa: E731
    table += [f"| {k} | {v['runs_on']} | {v['noise_mse']:.2e} | {fid(v['fid_vs_fp32'])} |" for k, v in results.items()]
    print("\n".join(table))
    _write(args.json, dict(results=results, table=table, samples=args.samples, seed=args.seed, held_out=len(x)))


def _write(path: str | None, obj) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(obj, f, indent=1, default=str)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--rounds", type=int, default=3)
    s.add_argument("--repeats", type=int, default=20)
    q = sub.add_parser("quality")
    q.add_argument("--samples", type=int, default=1000)
    q.add_argument("--seed", type=int, default=0)
    for p in (s, q):
        p.add_argument("--work", default="runs/openvino")
        p.add_argument("--json")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    {"speed": speed, "quality": quality}[args.what](args)


if __name__ == "__main__":
    main()
