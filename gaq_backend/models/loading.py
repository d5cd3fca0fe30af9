"""Load what a recipe's ``model:`` names, once: the embedded model, a diffusers UNet folder, or a diffusers
pipeline folder (``model_index.json``; the UNet is its ``unet`` component), and the scheduler to sample with.

``sampler.kind`` picks the scheduler: ``ddim`` (gaq's DDIM loop over the model's noise schedule, as the
embedded recipes use), ``pipeline`` (the folder's own scheduler class and config), or a diffusers scheduler
class name built from the folder's scheduler config. A name diffusers does not have is an error; nothing
is silently substituted.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from ..utils.errors import library_logs_as_warnings, one_line
from ..utils.inputs import check_input, read_json_object
from .embedded import EMBEDDED_MODEL_DIR, load_unet


@dataclass
class LoadedModel:
    unet: torch.nn.Module
    scheduler_config: dict
    pipeline: Any | None = None   # a diffusers DiffusionPipeline when the folder is one
    path: str = ""


def resolve_model_path(model: str) -> str:
    return EMBEDDED_MODEL_DIR if model == "embedded" else model


def _read_scheduler_config(path: str) -> dict:
    for p in (os.path.join(path, "scheduler_config.json"), os.path.join(path, "scheduler", "scheduler_config.json")):
        if os.path.isfile(p):
            return read_json_object(p)
    raise FileNotFoundError(f"model folder has no scheduler_config.json: {path}")


def load_model(model: str, options: Any = None) -> LoadedModel:
    """The UNet (loaded once) and the scheduler config of ``model``; the pipeline too for a pipeline folder.
    ``options``: a recipe's :class:`~gaq_backend.recipe.ModelOptions` (subfolder, variant)."""
    pipeline = os.path.isfile(os.path.join(resolve_model_path(model), "model_index.json"))
    with library_logs_as_warnings(("diffusers", "transformers") if pipeline else ("diffusers",)):
        return _load_model(model, options)


def _load_model(model: str, options: Any = None) -> LoadedModel:
    path = check_input(resolve_model_path(model), "model", "folder")
    subfolder, variant = (options.subfolder, options.variant) if options is not None else ("", "")
    dtype = getattr(torch, options.dtype) if options is not None and options.dtype else None
    if os.path.isfile(os.path.join(path, "model_index.json")) and not subfolder:
        from diffusers import DiffusionPipeline

        try:
            pipe = DiffusionPipeline.from_pretrained(path, variant=variant or None, **({"torch_dtype": dtype} if dtype else {}))
        except Exception as e:  # diffusers / transformers raise many types for a broken folder
            raise ValueError(f"{path}: diffusers cannot load this pipeline ({one_line(e, 200)})") from None
        denoiser = denoiser_of(pipe)
        if denoiser is None:
            raise ValueError(f"{path}: the pipeline has no 'unet' or 'transformer' component (gaq quantizes the denoiser)")
        pipe.set_progress_bar_config(disable=True)
        return LoadedModel(denoiser.eval(), dict(pipe.scheduler.config), pipe, path)
    unet = load_unet(os.path.join(path, subfolder) if subfolder else path, variant or None)
    return LoadedModel(unet.to(dtype) if dtype else unet, _read_scheduler_config(path), None, path)


def denoiser_of(pipe: Any):
    """A pipeline's denoiser: its ``unet`` (SD, SDXL, LDM) or its ``transformer`` (DiT, PixArt, SD3, Flux)."""
    return getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)


def make_scheduler_for(kind: str, scheduler_config: dict, pipeline: Any | None = None):
    """The scheduler ``sampler.kind`` names, built from the model folder's scheduler config."""
    import diffusers

    if kind == "pipeline":
        name = scheduler_config.get("_class_name") or (type(pipeline.scheduler).__name__ if pipeline is not None else "")
    else:
        name = "DDIMScheduler" if kind == "ddim" else kind
    cls = getattr(diffusers, name, None)
    if cls is None or not isinstance(cls, type) or not name.endswith("Scheduler"):
        raise ValueError(f"sampler.kind: diffusers has no scheduler {name!r}")
    return cls.from_config(scheduler_config)
