"""Calibration capture (algorithm.md section 1), cached on disk, with a timestep-balanced split."""
from __future__ import annotations

import hashlib
import json
import os

import torch

from .. import distributed
from ..config import CalibrationConfig, SamplerConfig
from ..sampling import ddim_sample, initial_noise, make_scheduler
from .calibration_set import CalibrationSet, RecordingSampler, calibration_from_tensors, check_finite
from .recorder import Recorder, gathered_tensors
from ..utils.cache import prepare_cache_dir, read_tensors, write_tensors

CACHE_FORMAT = 3


def class_conditioning(unet: torch.nn.Module, class_labels: list[int], n: int) -> dict[str, torch.Tensor]:
    """``class_labels`` input for ``n`` images cycling through the recipe's labels (none for unconditional UNets)."""
    needs = bool(getattr(unet.config, "num_class_embeds", None) or getattr(unet.config, "class_embed_type", None))
    if needs and not class_labels:
        raise ValueError("this UNet is class-conditional: set calibration.class_labels (e.g. [0, 1, 2]) to sample it")
    if not needs:
        if class_labels:
            raise ValueError("calibration.class_labels is set, but this UNet takes no class labels")
        return {}
    n_classes = getattr(unet.config, "num_class_embeds", None)
    if n_classes and max(class_labels) >= n_classes:
        raise ValueError(f"calibration.class_labels must be below num_class_embeds={n_classes}; got {max(class_labels)}")
    return {"class_labels": torch.tensor([class_labels[i % len(class_labels)] for i in range(n)], device="cpu")}


def model_fingerprint(unet: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(unet.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # any dtype, bf16 included
    return h.hexdigest()[:16]


def _cache_key(fingerprint: str, scheduler_config: dict, sampler: SamplerConfig, cfg: CalibrationConfig, shape: tuple) -> str:
    settings = dict(format=CACHE_FORMAT, model=fingerprint, scheduler=scheduler_config, sampler=sampler.to_dict(),
                    n_per_step=cfg.n_per_step, interval=cfg.interval, seed=cfg.seed, shape=list(shape))
    if cfg.class_labels:
        settings["class_labels"] = list(cfg.class_labels)
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:20]


def unet_sampling_loop(unet: torch.nn.Module, scheduler_config: dict, sampler: SamplerConfig, cfg: CalibrationConfig,
                       progress: bool | str = True):
    """The capture's sampling run as a forward loop: ``n_per_step`` seeded images of this (unconditional or
    class-conditional) ``UNet2DModel``, the whole DDIM pass (under torchrun each rank samples its share). Capture
    records it with the FP model; ``output_correction_fit: trajectory`` re-runs it with the quantized one."""
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    cond = class_conditioning(unet, cfg.class_labels, cfg.n_per_step)

    def loop(model: torch.nn.Module) -> None:
        ddim_sample(model, scheduler_config, sampler, initial_noise(cfg.n_per_step, shape, cfg.seed), cfg.batch_size,
                    progress=progress, seed=cfg.seed, cond=cond, shard=True)
    return loop


def capture_calibration(unet: torch.nn.Module, scheduler_config: dict, sampler: SamplerConfig, cfg: CalibrationConfig,
                        progress: bool = True) -> tuple[CalibrationSet, bool]:
    """Record ``(x_t, t, eps_fp)`` at every ``interval``-th step of one FP DDIM pass from ``n_per_step`` seeds.

    Returns the set and whether it came from the cache. The cache is keyed by the model's weights,
    the scheduler, the sampler and the capture settings; split and grouping are recomputed each time.
    """
    if hasattr(unet.config, "cross_attention_dim"):
        raise ValueError("gaq's own capture samples unconditional and class-conditional UNet2DModels; give the pipeline "
                         "folder of a text-conditioned UNet, or use a Python front door with your own loop")
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    key = _cache_key(model_fingerprint(unet), scheduler_config, sampler, cfg, shape)
    path = os.path.join(prepare_cache_dir(cfg.cache_dir, "calibration.cache_dir"), f"calib-{key}.safetensors")
    raw = read_tensors(path)
    cached = distributed.agree(raw is not None)   # every rank reads the cache, or every rank samples its share
    if not cached:
        sched = make_scheduler(scheduler_config, sampler)
        recorded = {float(t) for t in sched.timesteps[::cfg.interval]}
        recorder = Recorder(unet, max_per_step=cfg.n_per_step, seed=cfg.seed, keep=recorded.__contains__)
        was_training = unet.training
        unet.eval()
        with recorder:
            unet_sampling_loop(unet, scheduler_config, sampler, cfg, "capture" if progress else False)(unet)
        unet.train(was_training)
        raw = gathered_tensors(recorder)
        raw["timesteps"] = sched.timesteps.clone()  # every timestep the sampler visits, for per-timestep ranges
        check_finite(raw)  # a diverged model's data is refused, never cached
        if distributed.is_main():
            write_tensors(path, raw)
    calib = calibration_from_tensors(raw, cfg.val_fraction, cfg.n_groups, cfg.seed)
    calib.recorded_by = RecordingSampler(dict(scheduler_config), sampler)
    return calib, cached
