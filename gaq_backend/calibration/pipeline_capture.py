"""Calibration capture and report images through the user's own diffusers pipeline (a ``model_index.json``
folder): the pipeline runs as it would for the user, with the recipe's prompts (or class labels),
guidance scale, size and scheduler, while the recorder keeps what its UNet sees.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np
import torch

from .. import distributed
from ..config import ConfigError
from ..utils.cache import prepare_cache_dir, read_tensors, write_tensors
from .calibration_set import calibration_from_tensors, check_finite
from .capture import model_fingerprint
from .recorder import Recorder, gathered_tensors

CACHE_FORMAT = 2   # 2: steps kept by call index (was: by timestep value)


def read_prompts(path: str) -> list[str]:
    if not path:
        raise ValueError("calibration.prompts must name a text file of prompts (one a line) for a pipeline with a text encoder")
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [ln.strip() for ln in f if ln.strip()]
    except UnicodeDecodeError:
        raise ValueError(f"calibration.prompts {path}: not UTF-8 text") from None
    if not prompts:
        raise ValueError(f"calibration.prompts {path}: no prompt in it")
    return prompts


def call_kwargs(pipe: Any, recipe, n: int, seed: int) -> list[dict]:
    """One pipeline call per batch of ``calibration.batch_size`` images, each image with its own seeded generator."""
    cal = recipe.calibration
    base: dict = dict(num_inference_steps=recipe.sampler.num_inference_steps)
    if getattr(pipe, "text_encoder", None) is not None:
        prompts = read_prompts(cal.prompts)
        per_image = [{"prompt": prompts[i % len(prompts)]} for i in range(n)]
        base["guidance_scale"] = cal.guidance_scale
    elif cal.class_labels:
        per_image = [{"class_labels": cal.class_labels[i % len(cal.class_labels)]} for i in range(n)]
    else:
        raise ValueError(f"{type(pipe).__name__} takes neither prompts nor class labels gaq knows how to pass; for an "
                         "unconditional UNet give model: {path: DIR, subfolder: unet}")
    if cal.height or cal.width:
        base.update(height=cal.height or None, width=cal.width or None)
    if "eta" in _parameters(pipe):
        base["eta"] = recipe.sampler.eta
    base.update(pipeline_kwargs(pipe, cal.pipeline_kwargs))
    calls = []
    for b0 in range(0, n, cal.batch_size):
        items = per_image[b0: b0 + cal.batch_size]
        kw = {k: [it[k] for it in items] for k in items[0]}
        calls.append(dict(base, **kw, generator=[torch.Generator().manual_seed(seed + b0 + i) for i in range(len(items))]))
    return calls


# the call arguments gaq sets itself, from the recipe (a pipeline_kwargs entry may not override them)
GAQ_SETS = ("prompt", "class_labels", "generator", "num_inference_steps", "guidance_scale", "height", "width", "eta",
            "output_type", "latents")


def pipeline_kwargs(pipe: Any, extra: dict) -> dict:
    """``calibration.pipeline_kwargs``, checked against the pipeline's call signature."""
    params = _parameters(pipe)
    for k in extra:
        if k in GAQ_SETS:
            raise ConfigError(f"calibration.pipeline_kwargs.{k}: gaq sets {k} itself (from the recipe); remove it")
        if k not in params:
            raise ConfigError(f"calibration.pipeline_kwargs.{k}: {type(pipe).__name__}.__call__ takes no argument {k!r}")
    return dict(extra)


def _parameters(pipe: Any) -> set[str]:
    import inspect

    return set(inspect.signature(type(pipe).__call__).parameters)


def use_scheduler(pipe: Any, recipe) -> None:
    """Put the scheduler ``sampler.kind`` names into the pipeline (``pipeline``: keep its own)."""
    from ..models.loading import make_scheduler_for

    if recipe.sampler.kind != "pipeline":
        pipe.scheduler = make_scheduler_for(recipe.sampler.kind, dict(pipe.scheduler.config), pipe)


def capture_from_pipeline(pipe: Any, recipe, progress: bool = True):
    """``n_per_step`` images through the pipeline; every ``interval``-th of its timesteps is recorded."""
    cal = recipe.calibration
    use_scheduler(pipe, recipe)
    calls = call_kwargs(pipe, recipe, cal.n_per_step, cal.seed)
    # every module the calls run (text encoders, VAE, UNet) and the tokenizers' vocabularies key the cache
    parts = {name: model_fingerprint(c) if isinstance(c, torch.nn.Module) else (type(c).__name__, len(getattr(c, "get_vocab", dict)()))
             for name, c in pipe.components.items() if c is not None and name != "scheduler"}
    settings = dict(format=CACHE_FORMAT, model=parts, scheduler=dict(pipe.scheduler.config),
                    calls=[{k: v for k, v in c.items() if k != "generator"} for c in calls], seed=cal.seed, interval=cal.interval,
                    prompts=read_prompts(cal.prompts) if cal.prompts else [], pipeline=type(pipe).__name__)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:20]
    path = os.path.join(prepare_cache_dir(cal.cache_dir, "calibration.cache_dir"), f"calib-pipe-{key}.safetensors")
    raw = read_tensors(path)
    cached = distributed.agree(raw is not None)   # every rank reads the cache, or every rank records its share
    if not cached:
        # CFG doubles the rows of each call: keep them all (up to the reservoir bound)
        from ..models.loading import denoiser_of

        # the i-th denoiser call of a run is the scheduler's i-th timestep (Flux reads it divided by 1000)
        recorder = Recorder(denoiser_of(pipe), max_per_step=2 * cal.n_per_step, seed=cal.seed,
                            keep_call=lambda i: i % cal.interval == 0)
        mine = distributed.share(len(calls))   # under torchrun each rank runs its share of the calls
        with recorder, torch.no_grad():
            for kw in calls[mine.start: mine.stop]:
                recorder.start_run()
                pipe(**kw, output_type="latent")
        raw = gathered_tensors(recorder)
        check_finite(raw)
        if distributed.is_main():
            write_tensors(path, raw)
    return calibration_from_tensors(raw, cal.val_fraction, cal.n_groups, cal.seed), cached


def pipeline_sampling_loop(pipe: Any, recipe):
    """The capture's pipeline calls as a forward loop (``output_correction_fit: trajectory`` re-runs them with the
    quantized denoiser in place; the loop's argument is that denoiser, already in ``pipe``)."""
    def loop(_denoiser: torch.nn.Module) -> None:
        with torch.no_grad():
            for kw in call_kwargs(pipe, recipe, recipe.calibration.n_per_step, recipe.calibration.seed):
                pipe(**kw, output_type="latent")
    return loop


@torch.no_grad()
def pipeline_example_row(pipe: Any, recipe):
    """(one calibration row exactly as capture records it (any denoiser's inputs, the recipe's size and prompt
    length), the rows each image records per step), from one image's first sampler step: what ``--dry-run`` sizes
    its memory plan with."""
    from ..models.loading import denoiser_of
    from .calibration_set import CalibrationSet

    class FirstCall(Exception):
        pass

    def stop(*_):
        raise FirstCall

    use_scheduler(pipe, recipe)
    denoiser = denoiser_of(pipe)
    recorder = Recorder(denoiser, max_per_step=2**20, seed=0)
    with recorder:
        handle = denoiser.register_forward_hook(stop)   # runs after the recorder's hook: the rest of the run is skipped
        try:
            pipe(**call_kwargs(pipe, recipe, 1, recipe.calibration.seed)[0], output_type="latent")
        except FirstCall:
            pass
        finally:
            handle.remove()
    raw = recorder.tensors()
    per_image = len(raw["x"])   # 2 where the pipeline runs classifier-free guidance as a doubled batch
    raw = {k: v[:1] for k, v in raw.items()}
    zero = torch.zeros(1, dtype=torch.long)
    cond = {k: v for k, v in raw.items() if k not in ("x", "t", "eps", "step", "timesteps")}
    return CalibrationSet(raw["x"], raw["t"], raw["eps"], zero, zero.bool(), zero, cond), per_image


@torch.no_grad()
def pipeline_images(pipe: Any, recipe, n: int, seed: int, shard: bool = False) -> torch.Tensor:
    """``n`` images (N, C, H, W) in [-1, 1] from the pipeline, the recipe's conditioning, seeds ``seed + i``.
    ``shard``: under torch.distributed, this rank runs its share of the calls; every rank gets all the images."""
    calls = call_kwargs(pipe, recipe, n, seed)
    mine = distributed.share(len(calls)) if shard else range(len(calls))
    out = []
    for kw in calls[mine.start: mine.stop]:
        images = pipe(**kw, output_type="np").images  # (B, H, W, C) in [0, 1]
        out.append(torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() * 2 - 1)
    if not shard:
        return torch.cat(out)
    return distributed.gather_rows({"x": torch.cat(out)} if out else None)["x"]
