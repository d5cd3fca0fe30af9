"""A generated zoo of diffusers UNets and sampling loops: random architecture search as a test.

``generate(seed)`` draws one :class:`ZooCase`: a tiny random ``UNet2DModel`` or ``UNet2DConditionModel``
config (block types, 2-4 levels, widths, layers per block, heads, ``norm_num_groups``, linear
projections, transformer depth, class embeddings, SDXL's ``text_time`` additions, time embedding type,
``resnet_time_scale_shift``, resolution) and the user's own sampling loop (DDIM, DDPM, DPM-Solver,
Euler or PNDM, with or without classifier-free guidance). ``run_case`` takes it the way a user does:
``gaq.quantize(unet, config, forward_loop=loop)``, ``save_quantized``, ``export_quantized`` (which
checks onnxruntime against PyTorch), and measures the noise prediction's relative error against the FP
model on held-out calls of the same loop with other noise.

Used by ``tests/test_unet_zoo.py`` (a small seeded sample) and ``benchmarks/unet_zoo.py`` (hundreds).
"""
from __future__ import annotations

import copy
import os
import random
from dataclasses import dataclass, field
from typing import Any

import torch

# The architecture classes the zoo reports figures for.
FAMILIES = ("unconditional", "class-conditional", "text-conditional", "text_time (SDXL-like)")
SCHEDULERS = ("DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler", "PNDMScheduler")
# matching down / up block types (the up path mirrors the down path)
PLAIN_BLOCKS = [("DownBlock2D", "UpBlock2D"), ("AttnDownBlock2D", "AttnUpBlock2D"), ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D")]
COND_BLOCKS = [("DownBlock2D", "UpBlock2D"), ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D"),
               ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D"), ("SimpleCrossAttnDownBlock2D", "SimpleCrossAttnUpBlock2D")]
TEXT_LEN, BATCH = 5, 2


@dataclass
class ZooCase:
    seed: int
    family: str
    cls: str                      # diffusers class name
    config: dict[str, Any]
    scheduler: str
    steps: int
    guidance: float | None        # classifier-free guidance scale (None: no guidance)
    cond: dict[str, Any] = field(default_factory=dict)   # what the loop feeds: text length / dims, classes

    def describe(self) -> str:
        c = self.config
        blocks = ",".join(b.replace("Block2D", "") for b in c["down_block_types"])
        cfg = f"cfg {self.guidance:g}" if self.guidance else "no cfg"
        return f"seed {self.seed}: {self.family} {self.cls} [{blocks}] {c['block_out_channels']} {self.scheduler} x{self.steps} {cfg}"


def _channels(r: random.Random, levels: int, groups: int) -> tuple[int, ...]:
    base = max(8, groups * r.choice([2, 4]))   # every width a multiple of the groups and of the head sizes below
    widths, w = [], base
    for _ in range(levels):
        widths.append(w)
        w = w * r.choice([1, 2]) if w < 32 else w
    return tuple(widths)


def generate(seed: int) -> ZooCase:
    """One random (UNet config, sampling loop) pair, the same for the same seed."""
    r = random.Random(seed)
    family = FAMILIES[r.randrange(len(FAMILIES))]
    levels = r.choice([2, 2, 3, 4])
    groups = r.choice([1, 2, 4])
    widths = _channels(r, levels, groups)
    size = r.choice([8, 16]) if levels <= 3 else 16
    in_ch = r.choice([1, 3, 4])
    cfg: dict[str, Any] = dict(sample_size=size, in_channels=in_ch, out_channels=in_ch, block_out_channels=widths,
                               layers_per_block=r.choice([1, 1, 2]), norm_num_groups=groups,
                               resnet_time_scale_shift=r.choice(["default", "scale_shift"]))
    cond: dict[str, Any] = {}
    if family in ("unconditional", "class-conditional"):
        cls = "UNet2DModel"
        pairs = [PLAIN_BLOCKS[r.randrange(len(PLAIN_BLOCKS))] for _ in range(levels)]
        head = r.choice([None, 2, 4, widths[0]])
        cfg.update(down_block_types=tuple(p[0] for p in pairs), up_block_types=tuple(p[1] for p in reversed(pairs)),
                   attention_head_dim=head, add_attention=r.random() < 0.7,
                   time_embedding_type=r.choice(["positional", "positional", "fourier"]),
                   downsample_type=r.choice(["conv", "resnet"]), upsample_type=r.choice(["conv", "resnet"]))
        if cfg["time_embedding_type"] == "fourier":  # NCSN++-style: the model takes the noise level sigma as its timestep
            cfg["flip_sin_to_cos"] = False
        if family == "class-conditional":
            n = r.choice([3, 10])
            if r.random() < 0.5 or cfg["time_embedding_type"] == "fourier":  # fourier's log would see label 0
                cfg.update(num_class_embeds=n)
            else:
                cfg.update(class_embed_type="timestep")
            cond["classes"] = n
    else:
        cls = "UNet2DConditionModel"
        pairs = [COND_BLOCKS[r.randrange(len(COND_BLOCKS))] for _ in range(levels)]
        if not any("Attn" in p[0] for p in pairs):
            pairs[r.randrange(levels)] = COND_BLOCKS[1]
        simple = any(p[0].startswith("Simple") for p in pairs)
        head = r.choice([2, 4])
        xdim = r.choice([8, 12, 16])
        cfg.update(down_block_types=tuple(p[0] for p in pairs), up_block_types=tuple(p[1] for p in reversed(pairs)),
                   cross_attention_dim=xdim, attention_head_dim=head,
                   use_linear_projection=r.random() < 0.5, upcast_attention=r.random() < 0.3,
                   transformer_layers_per_block=r.choice([1, 1, 2]),
                   mid_block_type=("UNetMidBlock2DSimpleCrossAttn" if simple else
                                   r.choice(["UNetMidBlock2DCrossAttn", "UNetMidBlock2DCrossAttn", None])))
        if simple:  # diffusers' simple cross-attention blocks: ResNet up/down sampling, no transformer depth
            cfg.update(transformer_layers_per_block=1, only_cross_attention=False)
        cond.update(text_len=TEXT_LEN, text_dim=xdim)
        if family == "text_time (SDXL-like)":
            text_embeds, time_dim = r.choice([4, 8]), 4
            cfg.update(addition_embed_type="text_time", addition_time_embed_dim=time_dim,
                       projection_class_embeddings_input_dim=text_embeds + 6 * time_dim)
            cond.update(text_embeds=text_embeds)
    scheduler = SCHEDULERS[r.randrange(len(SCHEDULERS))]
    if cfg.get("time_embedding_type") == "fourier":   # its loop feeds sigmas: a scheduler that has them
        scheduler = "EulerDiscreteScheduler"
    guidance = None if r.random() < 0.3 or family == "unconditional" else r.choice([1.5, 3.0, 5.0, 7.5])
    return ZooCase(seed, family, cls, cfg, scheduler, r.choice([3, 4, 6]), guidance, cond)


def build_unet(case: ZooCase) -> torch.nn.Module:
    import diffusers

    torch.manual_seed(case.seed)
    return getattr(diffusers, case.cls)(**case.config).eval()


def loop_scheduler(case: ZooCase):
    import diffusers

    kw: dict[str, Any] = dict(num_train_timesteps=1000)
    if case.scheduler == "PNDMScheduler":
        kw["skip_prk_steps"] = True
    if case.cls == "UNet2DConditionModel":  # what SD's schedulers use
        kw.update(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    sched = getattr(diffusers, case.scheduler)(**kw)
    sched.set_timesteps(case.steps)
    return sched


def _conditioning(case: ZooCase, gen: torch.Generator) -> tuple[dict, dict | None]:
    """The conditional inputs of one batch, and their unconditional counterpart (None: no guidance)."""
    c, uncond = {}, {}
    if "classes" in case.cond:
        c["class_labels"] = torch.randint(0, case.cond["classes"] - 1, (BATCH,), generator=gen)
        uncond["class_labels"] = torch.full((BATCH,), case.cond["classes"] - 1)   # the last class as the null label
    if "text_len" in case.cond:
        c["encoder_hidden_states"] = torch.randn(BATCH, case.cond["text_len"], case.cond["text_dim"], generator=gen)
        uncond["encoder_hidden_states"] = torch.zeros_like(c["encoder_hidden_states"])
    if "text_embeds" in case.cond:
        size = case.config["sample_size"] * 8
        ids = torch.tensor([size, size, 0, 0, size, size], dtype=torch.float32).repeat(BATCH, 1)
        text = torch.randn(BATCH, case.cond["text_embeds"], generator=gen)
        c["added_cond_kwargs"] = dict(text_embeds=text, time_ids=ids)
        uncond["added_cond_kwargs"] = dict(text_embeds=torch.zeros_like(text), time_ids=ids)
    return c, (uncond if case.guidance and uncond else None)


def _cat(a: Any, b: Any) -> Any:
    return {k: _cat(a[k], b[k]) for k in a} if isinstance(a, dict) else torch.cat([a, b])


def sampling_loop(case: ZooCase, noise_seed: int):
    """The user's loop: ``loop(unet)`` samples one batch with the case's scheduler (and guidance)."""

    def loop(unet):
        gen = torch.Generator().manual_seed(noise_seed)
        sched = loop_scheduler(case)
        c = case.config
        x = torch.randn(BATCH, c["in_channels"], c["sample_size"], c["sample_size"], generator=gen) * sched.init_noise_sigma
        cond, uncond = _conditioning(case, gen)
        sigma_input = c.get("time_embedding_type") == "fourier"
        with torch.no_grad():
            for i, t in enumerate(sched.timesteps):
                xin = sched.scale_model_input(x, t)
                tin = sched.sigmas[i] if sigma_input else t
                if uncond is not None:
                    u, e = unet(torch.cat([xin, xin]), tin, **_cat(uncond, cond)).sample.chunk(2)
                    eps = u + case.guidance * (e - u)
                else:
                    eps = unet(xin, tin, **cond).sample
                x = sched.step(eps, t, x).prev_sample
        return x

    return loop


def held_out_calls(case: ZooCase, fp: torch.nn.Module, noise_seed: int = 1000, loop=None) -> list[tuple[tuple, dict, torch.Tensor]]:
    """The (args, kwargs, FP output) of every UNet call of the loop (default: the case's ``sampling_loop`` with
    ``noise_seed``) run on the FP model."""
    calls: list = []

    def hook(module, args, kwargs, out):
        calls.append((args, copy.copy(kwargs), out.sample.detach().clone()))

    h = fp.register_forward_hook(hook, with_kwargs=True)
    try:
        (loop or sampling_loop(case, noise_seed))(fp)
    finally:
        h.remove()
    return calls


@torch.no_grad()
def relative_error(model: torch.nn.Module, calls) -> float:
    """Relative MSE of the noise prediction against the FP model's over the held-out calls."""
    num = den = 0.0
    for args, kwargs, ref in calls:
        out = model(*args, **kwargs).sample
        num += float((out - ref).pow(2).sum())
        den += float(ref.pow(2).sum())
    return num / max(den, 1e-30)


# What a seed runs (the test sample and the benchmark): W8A8 minmax with the int8 export, and one more config
# cycling over the seed through the other algorithm, bit width and export form.
CYCLE = (("minmax", 4, 8, "int4"), ("uniform", 4, 8, "int4"), ("uniform", 8, 8, "int8"))


def configs_for(seed: int) -> list[tuple[str, int, int, str]]:
    """(algorithm, w_bits, a_bits, export form) of each config the zoo runs for ``seed``."""
    return [("minmax", 8, 8, "int8"), CYCLE[seed % len(CYCLE)]]


def quant_config(algorithm: str, w_bits: int, a_bits: int):
    import gaq_backend as gaq

    algo = gaq.MinMaxConfig() if algorithm == "minmax" else gaq.UniformConfig(iters=8, act_iters=4, batch_size=8)
    # a quarter of each timestep's rows held out: the export's parity check runs on them, and with the default
    # 5% of one batch these short loops left it 4 inputs, too few to tell float-order rounding flips from a defect
    return gaq.QuantConfig(w_bits=w_bits, a_bits=a_bits, algorithm=algo,
                           calibration=gaq.CalibrationConfig(max_per_step=16, max_samples=256, n_groups=2, val_fraction=0.25))


CALIBRATION_SEEDS = (0, 1, 2)   # run_case calibrates on three batches of the loop: 3-4x the held-out inputs of one


def run_case(case: ZooCase, folder: str, algorithm: str = "minmax", w_bits: int = 8, a_bits: int = 8,
             export: str | None = "int8") -> dict[str, Any]:
    """Quantize, save, reload and (``export``: "int8" / "int4" / None) export the case; the figures."""
    import gaq_backend as gaq
    from exporters.onnx_export import export_quantized

    fp = build_unet(case)
    calls = held_out_calls(case, fp)
    loops = [sampling_loop(case, s) for s in CALIBRATION_SEEDS]
    q = gaq.quantize(build_unet(case), quant_config(algorithm, w_bits, a_bits), forward_loop=lambda u: [f(u) for f in loops], progress=False)
    out: dict[str, Any] = dict(seed=case.seed, family=case.family, algorithm=algorithm, bits=f"W{w_bits}A{a_bits}",
                               rel_error=relative_error(q, calls))
    qdir = os.path.join(folder, "q")
    gaq.save_quantized(q, qdir)
    loaded, _, _ = gaq.load_quantized(qdir)
    out["reload_rel_error"] = relative_error(loaded, calls)
    if export:
        res = export_quantized(qdir, os.path.join(folder, "m.onnx"), export, progress=False)
        out["parity"] = {k: res.parity[k] for k in ("mean_steps", "max_steps")}
        out["parity_checked_with"] = "rounding flips" if "rounding_flips" in res.parity else res.parity.get("checked_with", "default")
    return out
