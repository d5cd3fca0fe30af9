"""INT4 / INT8 export size against FP32 for a UNet of the CIFAR-10 DDPM's shape (35.7M parameters).
Reproduces: docs/benchmarks.md, "ONNX export: parity, size and onnxruntime speed".

    python benchmarks/export_size.py --work runs/export-size

Random weights (no CIFAR-10 checkpoint exists offline), quantized W4A8 with `minmax` on a small
calibration set (4 DDIM steps x 8 seeds), exported with `gaq export` (parity checked as usual) in both
weight forms, and the FP32 graph exported as `gaq bench` does. Prints sizes and ratios. About 2 minutes
on the 2-core CPU.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from exporters.onnx_export import export_fp  # noqa: E402
from gaq_backend.cli import main as gaq  # noqa: E402
from gaq_backend.models import load_unet  # noqa: E402

CIFAR10_DDPM_SHAPE = dict(
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=256, norm_num_groups=32)


def main() -> int:
    from diffusers import DDPMScheduler, UNet2DModel

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/export-size")
    args = ap.parse_args()
    w = args.work
    torch.manual_seed(0)
    unet = UNet2DModel(**CIFAR10_DDPM_SHAPE)
    print(f"{sum(p.numel() for p in unet.parameters()) / 1e6:.1f}M parameters")
    unet.save_pretrained(f"{w}/model")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(f"{w}/model")
    recipe = dict(model=f"{w}/model", algorithm="minmax", sampler=dict(num_inference_steps=4),
                  calibration=dict(n_per_step=8, interval=1, n_groups=2, val_fraction=0.25, cache_dir=f"{w}/cache", batch_size=8),
                  quantization=dict(w_bits=4, a_bits=8, keep_fp=["conv_in", "conv_out"]), settings=dict(batch_size=8),
                  report=dict(num_samples=2, grid=2, batch_size=2))
    with open(f"{w}/recipe.yaml", "w") as f:
        yaml.safe_dump(recipe, f)
    if gaq(["quantize", f"{w}/recipe.yaml", "--out", f"{w}/w4a8", "--quiet"]):
        return 1
    for form in ("int4", "int8"):
        if gaq(["export", f"{w}/w4a8", "--out", f"{w}/w4a8-{form}.onnx", "--weights", form, "--check-samples", "8", "--quiet"]):
            return 1
    fp32 = export_fp(load_unet(f"{w}/model"), f"{w}/fp32.onnx", opset=20)
    base = os.path.getsize(fp32)
    print(f"fp32: {base / 2**20:.2f} MB")
    for form in ("int4", "int8"):
        size = os.path.getsize(f"{w}/w4a8-{form}.onnx")
        print(f"w4a8-{form}: {size / 2**20:.2f} MB, {size / base:.3f}x fp32")
    return 0


if __name__ == "__main__":
    sys.exit(main())
