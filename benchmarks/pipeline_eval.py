"""gaq eval --prompts on full-width random pipelines (docs/benchmarks.md, "Text-to-image evaluation").
Reproduces: docs/benchmarks.md, "Diffusion transformers".

    python benchmarks/pipeline_eval.py --model sd15     # SD-1.5-shaped UNet (860 M), tiny CLIP (768 wide) and VAE
    python benchmarks/pipeline_eval.py --model pixart   # PixArt-alpha-shaped transformer (28 x 1152), tiny T5 and VAE

Random weights, nothing downloaded: the denoiser has the real model's shape, the text encoder one layer of the
width the denoiser reads, the VAE four levels of 8 channels (scale factor 8). 128 x 128 images (a 16 x 16 latent),
the pipeline's own scheduler, 8 steps, guidance 4.5, 8 prompts; W4A8 and W8A8 minmax (calibrated on 4 images,
every other step) and W4A8 uniform at a small budget; then gaq eval --prompts with a tiny random CLIP folder.
Prints one JSON line per variant with the metrics and times.
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
import time

import torch

PROMPTS = ["a red cat on a sofa", "a blue car in the rain", "a bowl of green apples", "a city at night",
           "a dog running on a beach", "a mountain lake at dawn", "a portrait of an old man", "a yellow bird on a branch"]


def vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 8, 8, 8), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=128)


def sd15_pipeline(path: str) -> str:
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    from memory_sd15 import SD15_UNET
    from tiny_pipeline import char_tokenizer

    tokenizer, vocab = char_tokenizer(path)
    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=2, hidden_size=768, intermediate_size=256,
                                        num_attention_heads=12, num_hidden_layers=1, vocab_size=len(vocab), max_position_embeddings=16))
    StableDiffusionPipeline(vae=vae(), text_encoder=text, tokenizer=tokenizer, unet=UNet2DConditionModel(**SD15_UNET),
                            scheduler=PNDMScheduler(skip_prk_steps=True), safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(path)
    return path


def pixart_pipeline(path: str) -> str:
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from tiny_pipeline import _tiny_t5, char_tokenizer

    tokenizer, vocab = char_tokenizer(path)
    torch.manual_seed(0)
    tr = PixArtTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                                  sample_size=16, patch_size=2, cross_attention_dim=1152, caption_channels=64,
                                  norm_type="ada_norm_single", use_additional_conditions=False)
    PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=_tiny_t5(len(vocab), d_model=64), vae=vae(), transformer=tr,
                        scheduler=DPMSolverMultistepScheduler()).save_pretrained(path)
    return path


VARIANTS = [("minmax", 8, {}), ("minmax", 4, {}), ("uniform", 4, dict(iters=40, act_iters=20, batch_size=4))]


def main() -> None:
    import yaml
    from gaq_backend.cli import main as gaq
    from tiny_pipeline import make_tiny_clip

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["sd15", "pixart"], required=True)
    ap.add_argument("--variants", default="0,1,2", help="indices into VARIANTS")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        pipe = (sd15_pipeline if args.model == "sd15" else pixart_pipeline)(os.path.join(tmp, args.model))
        clip = make_tiny_clip(os.path.join(tmp, "clip"))
        prompts = os.path.join(tmp, "prompts.txt")
        with open(prompts, "w") as f:
            f.write("\n".join(PROMPTS) + "\n")
        print(f"# built {args.model} pipeline in {time.perf_counter() - t0:.0f}s", flush=True)
        for i in map(int, args.variants.split(",")):
            algo, w_bits, settings = VARIANTS[i]
            recipe = dict(model=pipe, algorithm=algo, sampler=dict(kind="pipeline", num_inference_steps=8),
                          calibration=dict(n_per_step=4, interval=2, n_groups=2, val_fraction=0.25, batch_size=2, prompts=prompts,
                                           guidance_scale=4.5, height=128, width=128, cache_dir=os.path.join(tmp, "cache"),
                                           pipeline_kwargs=dict(use_resolution_binning=False) if args.model == "pixart" else {}),
                          quantization=dict(w_bits=w_bits, a_bits=8), settings=settings or None,
                          report=dict(num_samples=1, grid=1, batch_size=1, sensitivity=False))
            if not settings:
                recipe.pop("settings")
            path = os.path.join(tmp, f"r{i}.yaml")
            with open(path, "w") as f:
                yaml.safe_dump(recipe, f)
            out = os.path.join(tmp, f"out{i}")
            t1 = time.perf_counter()
            assert gaq(["quantize", path, "--out", out, "--quiet"]) == 0
            t2 = time.perf_counter()
            assert gaq(["eval", out, "--prompts", prompts, "--clip", clip, "--batch-size", "2", "--quiet"]) == 0
            with open(os.path.join(out, "eval.json")) as f:
                ev = json.load(f)
            print(json.dumps(dict(model=args.model, algorithm=algo, w_bits=w_bits, a_bits=8, n=ev["n_samples"],
                                  steps=ev["sampler"]["num_inference_steps"], metrics=ev["metrics"],
                                  quantize_s=round(t2 - t1, 1), eval_s=round(time.perf_counter() - t2, 1))), flush=True)


if __name__ == "__main__":
    main()
