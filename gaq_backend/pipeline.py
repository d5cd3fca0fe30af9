"""Run a recipe end to end: load, capture, quantize, measure, write the output folder atomically."""
from __future__ import annotations

import os
import platform
import time
from typing import Any

import torch

from . import __version__
from .api import quantize
from .calibration import capture_calibration
from .calibration.calibration_set import CalibrationSet
from .calibration.capture import class_conditioning, unet_sampling_loop
from .config import ConfigError
from .evaluation import noise_mse, save_grid, side_by_side, to_uint8
from .evaluation.images import grid
from .evaluation.sensitivity import float_weights, layer_sensitivity
from .calibration.pipeline_capture import capture_from_pipeline, pipeline_example_row, pipeline_images, pipeline_sampling_loop
from .models.loading import LoadedModel, load_model, make_scheduler_for, resolve_model_path
from .recipe import Recipe
from .sampling import ddim_sample, initial_noise, model_dtype
from .algorithms.sample_weights import FILES as SAMPLE_WEIGHT_FILES
from .serialization import FOLDER_FILES, write_quantized
from .utils.cache import prepare_cache_dir
from .utils.io import check_output_dir, output_dir, write_json
from .utils.memory import check_fits
from .wrapping.wrap import check_keep_fp


OUTPUT_FILES = (*FOLDER_FILES, "samples.png", "report.json")
ALGORITHM_FILES = {"gradient_aligned": SAMPLE_WEIGHT_FILES}  # written beside them by CalibrationRecord.write_files


def load_model_and_scheduler(model: str, options=None) -> tuple[torch.nn.Module, dict]:
    """(UNet, scheduler config) of a recipe's ``model:`` (see :func:`gaq_backend.models.loading.load_model`)."""
    loaded = load_model(model, options)
    return loaded.unet, loaded.scheduler_config


def preflight(recipe: Recipe, loaded: LoadedModel) -> None:
    """Checks that need the model, run before any long work: each failure is one line naming the key."""
    unet, sched_cfg = loaded.unet, loaded.scheduler_config
    if loaded.pipeline is None:
        if getattr(unet.config, "cross_attention_dim", None):
            raise ConfigError(f"{loaded.path}: this UNet needs text conditioning; give the pipeline folder "
                              "(model_index.json) as model:, or quantize it from Python with your own loop (README)")
        if recipe.calibration.pipeline_kwargs:
            raise ConfigError(f"calibration.pipeline_kwargs: {loaded.path} is not a pipeline folder (model_index.json)")
        class_conditioning(unet, recipe.calibration.class_labels, 1)
        if recipe.sampler.kind != "ddim":
            raise ConfigError(f"sampler.kind {recipe.sampler.kind!r}: a bare UNet folder is sampled with gaq's DDIM loop "
                              "(kind: ddim); other schedulers need a pipeline folder")
    else:
        from .calibration.pipeline_capture import pipeline_kwargs, read_prompts

        make_scheduler_for(recipe.sampler.kind, sched_cfg, loaded.pipeline)
        pipeline_kwargs(loaded.pipeline, recipe.calibration.pipeline_kwargs)
        if getattr(loaded.pipeline, "text_encoder", None) is not None:
            read_prompts(recipe.calibration.prompts)
        elif not recipe.calibration.class_labels:
            raise ConfigError(f"{loaded.path}: {type(loaded.pipeline).__name__} takes no prompts and calibration.class_labels "
                              "is empty; for an unconditional UNet give model: {path: DIR, subfolder: unet}")
    n_train = int(sched_cfg.get("num_train_timesteps", 1000))
    if recipe.sampler.num_inference_steps > n_train:
        raise ConfigError(f"sampler.num_inference_steps must be at most the scheduler's num_train_timesteps ({n_train}); "
                          f"got {recipe.sampler.num_inference_steps}")
    check_keep_fp(unet, recipe.quantization.keep_fp)
    image = image_elements(recipe, loaded) * 4
    # the report holds the initial noise, FP and quantized images, and a sampler batch's working set
    check_fits(recipe.report.num_samples * image * 3 + recipe.report.batch_size * image * 200,
               f"{recipe.report.num_samples} report samples", "report.num_samples")
    calib = recipe.calibration
    n_recorded = len(range(0, recipe.sampler.num_inference_steps, calib.interval))
    check_fits(calib.n_per_step * n_recorded * image * 2 + calib.batch_size * image * 200,
               f"{calib.n_per_step * n_recorded} calibration samples", "calibration.n_per_step")


def image_elements(recipe: Recipe, loaded: LoadedModel) -> int:
    """Elements of one sampled image for the memory checks: the latent, or for a pipeline the larger of the latent
    and the decoded RGB image (Flux's transformer has no ``sample_size``: the pipeline's default size stands in)."""
    cfg, pipe, cal = loaded.unet.config, loaded.pipeline, recipe.calibration
    size = getattr(cfg, "sample_size", None) or getattr(pipe, "default_sample_size", None) or 64
    h, w = (size, size) if isinstance(size, int) else size[:2]
    if pipe is None:
        return cfg.in_channels * h * w
    scale = getattr(pipe, "vae_scale_factor", None) or 8
    h, w = (cal.height or h * scale) // scale, (cal.width or w * scale) // scale
    return max(cfg.in_channels * h * w, 3 * h * w * scale * scale)


def example_row(recipe: Recipe, loaded: LoadedModel) -> tuple[CalibrationSet, int]:
    """(one zero calibration row shaped as the capture will record it (latent size, prompt length), the rows the
    capture records per image and step); a pipeline runs its first step to tell."""
    from exporters.signature import cond_inputs, example_inputs

    unet, pipe = loaded.unet, loaded.pipeline
    if pipe is not None:
        return pipeline_example_row(pipe, recipe)
    inputs = example_inputs(unet, batch=1)
    zero, dtype = torch.zeros(1, dtype=torch.long), model_dtype(unet)
    cond = {k: v.to(dtype) if v.is_floating_point() else v for k, v in zip(cond_inputs(unet), inputs[2:])}
    x = inputs[0].to(dtype)
    return CalibrationSet(x, inputs[1].reshape(1), x, zero, zero.bool(), zero, cond), 1


def print_memory_estimate(recipe: Recipe, loaded: LoadedModel, device: torch.device, log=print):
    """``--dry-run``: the memory plan calibration would print, from one zero row, without capturing anything."""
    from .algorithms.reconstruction import ReconstructionConfig, plan_sweep
    from .api import with_role_keep_fp, wrap_for_config

    qcfg = recipe.quant_config()
    if not isinstance(qcfg.algorithm, ReconstructionConfig):
        log(f"memory estimate: {recipe.algorithm} holds no per-unit cache (model and calibration inputs only)")
        return None
    row, per_image = example_row(recipe, loaded)
    qcfg = with_role_keep_fp(loaded.unet, qcfg, row)   # the layers the real run keeps
    wrap_for_config(loaded.unet, qcfg)
    cal = recipe.calibration
    rows = cal.n_per_step * len(range(0, recipe.sampler.num_inference_steps, cal.interval)) * per_image
    return plan_sweep(loaded.unet, qcfg, row, qcfg.algorithm, log=log, rows=rows, device=device)[1]


def weight_bytes(model: torch.nn.Module, w_bits: int) -> dict:
    """The quantized layers' weight bytes as stored (each at its own bits) and with every one at ``w_bits``."""
    from .wrapping import weight_sizes

    sizes = weight_sizes(model).values()
    stored, plain = sum(n * b for n, b in sizes) / 8, sum(n for n, _ in sizes) * w_bits / 8
    return dict(stored=stored, at_w_bits=plain, extra_fraction=stored / plain - 1 if plain else 0.0)


def default_out_dir(recipe: Recipe) -> str:
    return os.path.join("out", f"{recipe.name or 'recipe'}-{recipe.algorithm}")


def _report_images(loaded: LoadedModel, recipe: Recipe, label: str, progress: bool) -> torch.Tensor:
    """``report.num_samples`` images from seed ``report.seed``: gaq's DDIM loop, or the pipeline itself."""
    rep, unet = recipe.report, loaded.unet
    if loaded.pipeline is not None:
        return pipeline_images(loaded.pipeline, recipe, rep.num_samples, rep.seed, shard=True)
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    return ddim_sample(unet, loaded.scheduler_config, recipe.sampler, initial_noise(rep.num_samples, shape, rep.seed), rep.batch_size,
                       progress=f"sample {label}" if progress else False, seed=rep.seed,
                       cond=class_conditioning(unet, recipe.calibration.class_labels, rep.num_samples), shard=True)


def output_protect(recipe: Recipe, recipe_path: str | None = None) -> list[str]:
    """Folders an output must never replace or contain: the model's, the cache, the recipe's."""
    return [resolve_model_path(recipe.model), recipe.calibration.cache_dir] + ([os.path.dirname(os.path.abspath(recipe_path))] if recipe_path else [])


def resolve_device(device: str | None) -> torch.device:
    """``--device``: a torch device name; the default is CUDA when available, else the CPU."""
    if not device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device}: gaq runs on cpu or cuda")
    return dev


def run_recipe(recipe: Recipe, out_dir: str, progress: bool = True, log=print, overwrite: bool = False,
               recipe_path: str | None = None, dry_run: bool = False, device: str | None = None) -> dict[str, Any] | None:
    """Quantize as the recipe says and write ``out_dir`` (see :func:`gaq_backend.utils.io.output_dir`).
    ``dry_run``: run every check that needs no long work, then stop (returns None). Under torchrun every process
    calibrates its share (docs/distributed.md); only rank 0 shows progress and writes ``out_dir``."""
    from . import distributed

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    multi = distributed.init_from_env(device)
    main_rank = distributed.is_main()
    if not main_rank:
        progress, log = False, (lambda *a, **k: None)
    dev = distributed.device_of_rank(resolve_device(device))
    protect = output_protect(recipe, recipe_path)
    files = (*OUTPUT_FILES, *ALGORITHM_FILES.get(recipe.algorithm, ()))
    check_output_dir(out_dir, "quantized", overwrite, protect, files=files)
    if not dry_run:
        prepare_cache_dir(recipe.calibration.cache_dir, "calibration.cache_dir")
    loaded = load_model(recipe.model, recipe.model_options)
    unet, sched_cfg, pipe = loaded.unet, loaded.scheduler_config, loaded.pipeline
    if multi:   # every rank must calibrate the same thing: compared by hash before any long work
        import json

        from .calibration.capture import model_fingerprint

        distributed.check_same(json.dumps(recipe.to_dict(), sort_keys=True, default=str), "recipe")
        distributed.check_same(model_fingerprint(unet), "model weights")
    preflight(recipe, loaded)
    if dry_run:
        print_memory_estimate(recipe, loaded, dev, log)
        return None
    (pipe if pipe is not None else unet).to(dev)  # calibration data stays on the host; the model computes on dev
    rep = recipe.report

    t = time.perf_counter()
    if pipe is None:   # under torchrun each rank samples its share; every rank gets the whole set
        calib, cached = capture_calibration(unet, sched_cfg, recipe.sampler, recipe.calibration, progress)
    else:
        calib, cached = capture_from_pipeline(pipe, recipe, progress)
        sched_cfg = dict(pipe.scheduler.config)
    timings["capture"] = time.perf_counter() - t
    # the FP report images come from the same UNet before it is quantized in place (no second copy)
    t = time.perf_counter()
    fp_imgs = _report_images(loaded, recipe, "fp", progress)
    timings["report"] = time.perf_counter() - t
    log(f"calibration set: {len(calib.train)} train / {len(calib.val)} validation samples from "
        f"{int(calib.step.max()) + 1} steps in {calib.n_groups} groups ({'cache hit' if cached else 'captured'})")

    t = time.perf_counter()
    qcfg = recipe.quant_config()
    fp_weights = float_weights(unet) if rep.sensitivity else None  # quantize rounds the weights in place
    if qcfg.output_correction_fit == "trajectory":
        loop = (unet_sampling_loop(unet, sched_cfg, recipe.sampler, recipe.calibration, "trajectory fit" if progress else False)
                if pipe is None else pipeline_sampling_loop(pipe, recipe))
    else:
        loop = None
    quantize(unet, qcfg, calib, progress=progress, sampling_loop=loop)
    timings["calibration"] = time.perf_counter() - t
    log(unet.gaq_info.wrap.summary())
    sensitivity = None
    if fp_weights is not None:
        t = time.perf_counter()
        sensitivity = layer_sensitivity(unet, fp_weights, calib.val, rep.sensitivity_target, rep.sensitivity_rows,
                                        rep.batch_size, progress=progress)
        del fp_weights
        timings["sensitivity"] = time.perf_counter() - t
        log(sensitivity.table())

    t = time.perf_counter()
    mse, mse_groups = noise_mse(unet, calib.val, recipe.report.batch_size)
    q_imgs = _report_images(loaded, recipe, "quantized", progress)
    timings["report"] += time.perf_counter() - t

    report = dict(
        algorithm=recipe.algorithm, w_bits=qcfg.w_bits, a_bits=qcfg.a_bits, recipe=recipe.name,
        metrics=dict(noise_mse=mse, noise_mse_per_group=mse_groups, sample_mse_vs_fp=float((q_imgs - fp_imgs).pow(2).mean())),
        metrics_info=dict(noise_mse=f"on {len(calib.val)} held-out calibration inputs; groups ordered by increasing t",
                          sample_mse_vs_fp=f"{rep.num_samples} images, seed {rep.seed}, {recipe.sampler.num_inference_steps} "
                                           f"{recipe.sampler.kind} steps, eta {recipe.sampler.eta}"),
        calibration=dict(n_train=len(calib.train), n_val=len(calib.val), n_steps=int(calib.step.max()) + 1, n_groups=calib.n_groups, cache_hit=cached),
        layers=unet.gaq_info.wrap.to_dict(),
        weight_bytes=weight_bytes(unet, qcfg.w_bits),
        algorithm_stats=unet.gaq_info.stats.to_dict(),
        sensitivity=sensitivity.to_dict() if sensitivity is not None else None,
        environment=dict(gaq=__version__, torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.machine(),
                         device=str(dev), processes=distributed.world()[1]),
    )
    if not main_rank:   # the same model as rank 0's; one writer
        return dict(report, written=False)
    with output_dir(out_dir, "quantized", overwrite, protect, files=files) as tmp:
        write_quantized(unet, tmp, sched_cfg, recipe)
        unet.gaq_info.stats.write_files(tmp)  # an algorithm's own files (gradient_aligned's weights and figures)
        n = min(rep.grid, rep.num_samples)
        save_grid(os.path.join(tmp, "samples.png"), side_by_side(grid(to_uint8(fp_imgs[:n])), grid(to_uint8(q_imgs[:n])), labels=("FP", "quantized")))
        timings["total"] = time.perf_counter() - t_start
        report["timings"] = timings
        write_json(os.path.join(tmp, "report.json"), report)
    return report
