"""Steps of benchmarks/optimum_check.sh; each runs in the environment the script names.
Reproduces: docs/benchmarks.md, "Deployment: OpenVINO, Optimum's pipeline, the GPU kit".

    build   (deploy env)    the tiny StableDiffusionPipeline the tests use, and the initial latents of the check
    ort     (deploy env)    Optimum's ORTDiffusionPipeline on an ONNX pipeline folder -> images .npy
    torch   (gaq's env)     diffusers' pipeline with gaq's fake-quant UNet (or none: FP) -> images .npy
    compare (gaq's env)     a markdown table of the image differences
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT, STEPS, GUIDANCE = "a red cat on the blue sea", 10, 5.0


def build(args) -> None:
    import torch

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from tiny_pipeline import make_tiny_sd_pipeline

    pipe_dir = make_tiny_sd_pipeline(args.out)
    with open(os.path.join(pipe_dir, "unet", "config.json")) as f:
        cfg = json.load(f)
    latents = torch.randn(1, cfg["in_channels"], cfg["sample_size"], cfg["sample_size"], generator=torch.Generator().manual_seed(0))
    np.save(args.latents, latents.numpy())


def _call(pipe, latents: np.ndarray):
    import torch

    return pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=torch.from_numpy(latents),
                output_type="np").images


def ort(args) -> None:
    from optimum.onnxruntime import ORTDiffusionPipeline

    pipe = ORTDiffusionPipeline.from_pretrained(args.pipeline, provider="CPUExecutionProvider")
    used = pipe.unet.session.get_providers() if hasattr(pipe.unet, "session") else ["?"]
    images = _call(pipe, np.load(args.latents))
    np.save(args.out, images)
    print(json.dumps(dict(pipeline=args.pipeline, class_name=type(pipe).__name__, unet_providers=used, shape=list(images.shape))))


def torch_images(args) -> None:
    from diffusers import StableDiffusionPipeline

    import gaq_backend as gaq

    pipe = StableDiffusionPipeline.from_pretrained(args.pipeline)
    if args.quantized:
        pipe.unet = gaq.load_quantized(args.quantized)[0]
    np.save(args.out, _call(pipe, np.load(args.latents)))


def compare(args) -> None:
    imgs = {name: np.load(path).astype(np.float64) for name, path in (p.split("=", 1) for p in args.images)}
    lines = ["| images | against | mean abs diff (of [0, 1]) | max abs diff | PSNR dB |", "|---|---|---|---|---|"]
    for pair in args.pairs:
        a, b = pair.split(":")
        d = np.abs(imgs[a] - imgs[b])
        mse = float((d ** 2).mean())
        psnr = "inf" if mse == 0 else f"{10 * np.log10(1 / mse):.1f}"
        lines.append(f"| {a} | {b} | {d.mean():.2e} | {d.max():.2e} | {psnr} |")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="step", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", required=True)
    b.add_argument("--latents", required=True)
    o = sub.add_parser("ort")
    t = sub.add_parser("torch")
    for p in (o, t):
        p.add_argument("--pipeline", required=True)
        p.add_argument("--latents", required=True)
        p.add_argument("--out", required=True)
    t.add_argument("--quantized", help="a gaq quantize output folder whose UNet replaces the pipeline's")
    c = sub.add_parser("compare")
    c.add_argument("--images", nargs="+", required=True, metavar="NAME=PATH")
    c.add_argument("--pairs", nargs="+", required=True, metavar="A:B")
    args = ap.parse_args()
    {"build": build, "ort": ort, "torch": torch_images, "compare": compare}[args.step](args)


if __name__ == "__main__":
    main()
