"""Tiny random diffusion transformers with their own sampling loops: the transformer half of the zoo.

``generate(seed)`` draws one :class:`DiTCase`: a diffusers transformer class (``DiTTransformer2DModel``,
``PixArtTransformer2DModel``, ``SD3Transformer2DModel``, ``FluxTransformer2DModel``, cycling over the seed),
a tiny random config of it (heads, head size, depth, patch size, resolution drawn from the seed) and the loop
its pipeline runs: DiT's class-conditional DDIM with guidance on the null class, PixArt's text-conditional
DPM-Solver with an attention mask, SD3's flow-matching Euler with pooled text, Flux's packed tokens with rotary
ids (no batch axis), a [0, 1] timestep and the guidance input. The loops call the model the way the pipelines
do (keyword inputs, CFG-doubled batches), so the recorder sees what it sees in a real pipeline.

``run_case`` quantizes, saves, reloads and (optionally) exports it like ``unet_zoo.run_case``.
"""
from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from typing import Any

import torch

CLASSES = ("DiTTransformer2DModel", "PixArtTransformer2DModel", "SD3Transformer2DModel", "FluxTransformer2DModel")
TEXT_LEN, TEXT_DIM, POOLED_DIM, BATCH = 6, 32, 16, 2


@dataclass
class DiTCase:
    seed: int
    cls: str
    config: dict[str, Any]
    steps: int
    guidance: float

    def describe(self) -> str:
        c = self.config
        return (f"seed {self.seed}: {self.cls} heads {c['num_attention_heads']}x{c['attention_head_dim']} "
                f"layers {c.get('num_layers')} patch {c.get('patch_size')} x{self.steps} cfg {self.guidance:g}")


def generate(seed: int) -> DiTCase:
    r = random.Random(seed)
    cls = CLASSES[seed % len(CLASSES)]
    heads, head_dim = r.choice([2, 4]), r.choice([8, 16])
    layers = r.choice([1, 2])
    if cls == "DiTTransformer2DModel":
        config = dict(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8, num_layers=layers,
                      sample_size=r.choice([8, 16]), patch_size=2, num_embeds_ada_norm=10, norm_type="ada_norm_zero")
    elif cls == "PixArtTransformer2DModel":
        config = dict(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8, num_layers=layers,
                      sample_size=r.choice([8, 16]), patch_size=2, cross_attention_dim=heads * head_dim, caption_channels=TEXT_DIM,
                      norm_type="ada_norm_single", use_additional_conditions=False)
    elif cls == "SD3Transformer2DModel":
        config = dict(sample_size=r.choice([8, 16]), patch_size=2, in_channels=4, out_channels=4, num_layers=layers,
                      attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=TEXT_DIM,
                      caption_projection_dim=heads * head_dim, pooled_projection_dim=POOLED_DIM, pos_embed_max_size=32)
    else:
        rope = [head_dim // 4, head_dim // 4, head_dim // 2]
        config = dict(patch_size=1, in_channels=16, num_layers=layers, num_single_layers=r.choice([1, 2]), attention_head_dim=head_dim,
                      num_attention_heads=heads, joint_attention_dim=TEXT_DIM, pooled_projection_dim=POOLED_DIM,
                      guidance_embeds=True, axes_dims_rope=rope)
        config["sample_size"] = r.choice([8, 16])   # the latent's side (not a config key of Flux: popped in build)
    return DiTCase(seed, cls, config, steps=r.choice([3, 4]), guidance=r.choice([3.0, 5.0]))


def build(case: DiTCase) -> torch.nn.Module:
    import diffusers

    config = {k: v for k, v in case.config.items() if not (case.cls == "FluxTransformer2DModel" and k == "sample_size")}
    torch.manual_seed(case.seed)
    return getattr(diffusers, case.cls)(**config).eval()


def _flux_ids(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    img = torch.zeros(h, w, 3)
    img[..., 1] = torch.arange(h)[:, None]
    img[..., 2] = torch.arange(w)[None, :]
    return img.reshape(h * w, 3), torch.zeros(TEXT_LEN, 3)


def sampling_loop(case: DiTCase, noise_seed: int):
    """``loop(model)``: one batch of the case's pipeline loop, calling the model as its pipeline does."""
    import diffusers

    def loop(model):
        gen = torch.Generator().manual_seed(noise_seed)
        c, g = case.config, case.guidance
        side = c["sample_size"]
        text = torch.randn(BATCH, TEXT_LEN, TEXT_DIM, generator=gen)
        pooled = torch.randn(BATCH, POOLED_DIM, generator=gen)
        with torch.no_grad():
            if case.cls == "DiTTransformer2DModel":   # DiTPipeline: class labels, the null class for CFG, learned sigma
                sched = diffusers.DDIMScheduler(num_train_timesteps=1000)
                sched.set_timesteps(case.steps)
                x = torch.randn(BATCH, 4, side, side, generator=gen)
                labels = torch.randint(0, 10, (BATCH,), generator=gen)
                both = torch.cat([labels, torch.full((BATCH,), 10)])  # DiT's null class is num_embeds_ada_norm
                for t in sched.timesteps:
                    out = model(torch.cat([x, x]), timestep=t.expand(2 * BATCH), class_labels=both).sample[:, :4]
                    e, u = out.chunk(2)
                    x = sched.step(u + g * (e - u), t, x).prev_sample
            elif case.cls == "PixArtTransformer2DModel":  # PixArtAlphaPipeline: DPM-Solver, masked captions
                sched = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000)
                sched.set_timesteps(case.steps)
                x = torch.randn(BATCH, 4, side, side, generator=gen)
                mask = torch.ones(2 * BATCH, TEXT_LEN, dtype=torch.long)
                mask[:BATCH, TEXT_LEN // 2:] = 0
                for t in sched.timesteps:
                    out = model(torch.cat([x, x]), encoder_hidden_states=torch.cat([torch.zeros_like(text), text]),
                                encoder_attention_mask=mask, timestep=t.expand(2 * BATCH),
                                added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample[:, :4]
                    u, e = out.chunk(2)
                    x = sched.step(u + g * (e - u), t, x).prev_sample
            elif case.cls == "SD3Transformer2DModel":  # StableDiffusion3Pipeline: flow matching, pooled text
                sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
                sched.set_timesteps(case.steps)
                x = torch.randn(BATCH, 4, side, side, generator=gen)
                for t in sched.timesteps:
                    out = model(hidden_states=torch.cat([x, x]), timestep=t.expand(2 * BATCH),
                                encoder_hidden_states=torch.cat([torch.zeros_like(text), text]),
                                pooled_projections=torch.cat([torch.zeros_like(pooled), pooled])).sample
                    u, e = out.chunk(2)
                    x = sched.step(u + g * (e - u), t, x).prev_sample
            else:  # FluxPipeline: packed 2x2 patches as tokens, rotary ids without a batch axis, guidance embedded
                sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0)
                sched.set_timesteps(case.steps)
                h = side // 2
                x = torch.randn(BATCH, h * h, 16, generator=gen)
                img_ids, txt_ids = _flux_ids(h, h)
                for t in sched.timesteps:
                    out = model(hidden_states=x, timestep=(t / 1000).expand(BATCH), guidance=torch.full((BATCH,), g),
                                pooled_projections=pooled, encoder_hidden_states=text, txt_ids=txt_ids, img_ids=img_ids).sample
                    x = sched.step(out, t, x).prev_sample
        return x

    return loop


def held_out_calls(case: DiTCase, fp: torch.nn.Module, noise_seed: int = 1000) -> list[tuple[tuple, dict, torch.Tensor]]:
    calls: list = []

    def hook(module, args, kwargs, out):
        calls.append((args, copy.copy(kwargs), out.sample.detach().clone()))

    h = fp.register_forward_hook(hook, with_kwargs=True)
    try:
        sampling_loop(case, noise_seed)(fp)
    finally:
        h.remove()
    return calls


def quant_config(algorithm: str, w_bits: int, a_bits: int, **quantization):
    import gaq_backend as gaq

    algos = dict(minmax=gaq.MinMaxConfig(), uniform=gaq.UniformConfig(iters=8, act_iters=4, batch_size=8),
                 temporal=gaq.TemporalConfig(iters=8, act_iters=4, batch_size=8),
                 gradient_aligned=gaq.GradientAlignedConfig(iters=8, act_iters=4, batch_size=8))
    return gaq.QuantConfig(w_bits=w_bits, a_bits=a_bits, algorithm=algos[algorithm],
                           calibration=gaq.CalibrationConfig(max_per_step=16, max_samples=256, n_groups=2, val_fraction=0.25),
                           **quantization)


def relative_error(model: torch.nn.Module, calls) -> float:
    """Relative MSE of the prediction against the FP model's over the held-out calls."""
    num = den = 0.0
    with torch.no_grad():
        for args, kwargs, ref in calls:
            out = model(*args, **kwargs).sample
            num += float((out - ref).pow(2).sum())
            den += float(ref.pow(2).sum())
    return num / max(den, 1e-30)


def run_case(case: DiTCase, folder: str, algorithm: str = "minmax", w_bits: int = 8, a_bits: int = 8,
             export: str | None = None, **quantization) -> dict[str, Any]:
    """Quantize with two batches of the loop, save, reload (and ``export``: "int8" / "int4"); the figures.
    ``quantization``: further QuantConfig keys (e.g. w_block_size)."""
    import os

    import gaq_backend as gaq

    calls = held_out_calls(case, build(case))
    loops = [sampling_loop(case, s) for s in (0, 1)]
    q = gaq.quantize(build(case), quant_config(algorithm, w_bits, a_bits, **quantization), forward_loop=lambda m: [f(m) for f in loops], progress=False)
    out: dict[str, Any] = dict(seed=case.seed, cls=case.cls, rel_error=relative_error(q, calls), model=q)
    qdir = os.path.join(folder, "q")
    gaq.save_quantized(q, qdir)
    loaded, _, _ = gaq.load_quantized(qdir)
    out["reload_rel_error"] = relative_error(loaded, calls)
    if export:
        from exporters.onnx_export import export_quantized

        res = export_quantized(qdir, os.path.join(folder, "m.onnx"), export, progress=False)
        out["parity"] = res.parity
    return out
