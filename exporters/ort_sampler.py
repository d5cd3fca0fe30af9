"""DDIM sampling with onnxruntime and NumPy only: ``gaq sample --onnx model.onnx``.

The scheduler follows diffusers' ``DDIMScheduler`` (the one ``gaq`` calibrates and evaluates with), in
float32 as diffusers computes it; its settings come from the ONNX file's metadata, which ``gaq export``
fills from the quantized directory. Nothing here imports torch.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from gaq_backend.utils.memory import check_fits

from .ort_runtime import metadata, predict_noise
from .runtimes import open_session


@dataclass
class DDIMSchedule:
    alphas_cumprod: np.ndarray      # float32, one per training timestep
    timesteps: np.ndarray           # int64, the visited timesteps in sampling order
    final_alpha_cumprod: np.float32
    step_size: int
    prediction_type: str
    clip_sample: bool
    clip_range: float

    @classmethod
    def from_config(cls, cfg: dict, num_inference_steps: int) -> "DDIMSchedule":
        for key, bad in (("thresholding", True), ("rescale_betas_zero_snr", True)):
            if cfg.get(key, False) == bad:
                raise ValueError(f"scheduler option {key}={bad} is not supported by the onnxruntime sampler")
        n = int(cfg.get("num_train_timesteps", 1000))
        b0, b1, kind = cfg.get("beta_start", 1e-4), cfg.get("beta_end", 0.02), cfg.get("beta_schedule", "linear")
        if cfg.get("trained_betas") is not None:
            betas = np.asarray(cfg["trained_betas"], dtype=np.float32)
        elif kind == "linear":
            betas = np.linspace(b0, b1, n, dtype=np.float32)
        elif kind == "scaled_linear":
            betas = np.linspace(b0**0.5, b1**0.5, n, dtype=np.float32) ** 2
        elif kind == "squaredcos_cap_v2":
            bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
            betas = np.array([min(1 - bar((i + 1) / n) / bar(i / n), 0.999) for i in range(n)], dtype=np.float32)
        else:
            raise ValueError(f"beta_schedule {kind!r} is not supported by the onnxruntime sampler")
        ac = np.cumprod(1.0 - betas, dtype=np.float32)
        if not 0 < num_inference_steps <= n:
            raise ValueError(f"num_inference_steps must be in 1..{n}; got {num_inference_steps}")
        spacing, offset = cfg.get("timestep_spacing", "leading"), int(cfg.get("steps_offset", 0))
        if spacing == "leading":
            ts = (np.arange(0, num_inference_steps) * (n // num_inference_steps)).round()[::-1].astype(np.int64) + offset
        elif spacing == "trailing":
            ts = np.round(np.arange(n, 0, -n / num_inference_steps)).astype(np.int64) - 1
        elif spacing == "linspace":
            ts = np.linspace(0, n - 1, num_inference_steps).round()[::-1].astype(np.int64)
        else:
            raise ValueError(f"timestep_spacing {spacing!r} is not supported by the onnxruntime sampler")
        final = np.float32(1.0) if cfg.get("set_alpha_to_one", True) else ac[0]
        return cls(ac, ts, final, n // num_inference_steps, cfg.get("prediction_type", "epsilon"),
                   bool(cfg.get("clip_sample", True)), float(cfg.get("clip_sample_range", 1.0)))

    def step(self, eps: np.ndarray, t: int, x: np.ndarray, eta: float = 0.0, noise: np.ndarray | None = None) -> np.ndarray:
        prev = t - self.step_size
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod
        b_t = np.float32(1) - a_t
        if self.prediction_type == "epsilon":
            x0, e = (x - b_t**0.5 * eps) / a_t**0.5, eps
        elif self.prediction_type == "sample":
            x0 = eps
            e = (x - a_t**0.5 * x0) / b_t**0.5
        elif self.prediction_type == "v_prediction":
            x0, e = a_t**0.5 * x - b_t**0.5 * eps, a_t**0.5 * eps + b_t**0.5 * x
        else:
            raise ValueError(f"prediction_type {self.prediction_type!r} is not supported")
        if self.clip_sample:
            x0 = np.clip(x0, -self.clip_range, self.clip_range)
        var = (np.float32(1) - a_prev) / b_t * (np.float32(1) - a_t / a_prev)
        std = np.float32(eta) * var**0.5
        out = a_prev**0.5 * x0 + (np.float32(1) - a_prev - std**2) ** 0.5 * e
        if eta > 0:
            out = out + std * noise
        return out.astype(np.float32)


def sample(model_path: str, num_samples: int = 16, seed: int = 0, steps: int | None = None, eta: float | None = None,
           noise: np.ndarray | None = None, batch_size: int = 64, provider: str = "cpu", progress: bool = True,
           runtime: str = "onnxruntime", precision: str = "default", session=None) -> np.ndarray:
    """Images in [-1, 1], shape (N, C, H, W), from a gaq-exported ONNX UNet.

    Initial (and, for eta > 0, step) noise comes from NumPy's generator seeded by ``seed``; pass ``noise``
    (N, C, H, W) to start from given noise, e.g. the torch sampler's, for a like-for-like comparison.
    """
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"--num-samples and --batch-size must be at least 1; got {num_samples} and {batch_size}")
    meta = metadata(model_path)
    missing = [k for k in ("gaq.scheduler_config", "gaq.sampler", "gaq.sample_shape") if k not in meta]
    if missing:
        raise ValueError(f"{model_path} lacks gaq metadata ({', '.join(missing)}); export it with gaq export")
    sampler = json.loads(meta["gaq.sampler"])
    steps = steps or int(sampler["num_inference_steps"])
    eta = float(sampler.get("eta", 0.0)) if eta is None else eta
    sched = DDIMSchedule.from_config(json.loads(meta["gaq.scheduler_config"]), steps)
    rng = np.random.default_rng(seed)
    shape = tuple(json.loads(meta["gaq.sample_shape"]))
    check_fits(num_samples * int(np.prod(shape)) * 4 * 4, f"{num_samples} samples", "--num-samples")
    if noise is None:
        noise = rng.standard_normal((num_samples, *shape), dtype=np.float32)
    elif noise.ndim != 4 or tuple(noise.shape[1:]) != shape:
        raise ValueError(f"--noise has shape {tuple(noise.shape)}; the model samples (N, {', '.join(map(str, shape))})")
    x = np.asarray(noise, dtype=np.float32).copy()
    # ``session``: an open session of another graph of the same UNet (e.g. NNCF's IR); the DDIM loop's
    # scheduler and sampler still come from ``model_path``'s metadata
    session = session or open_session(model_path, runtime, provider, precision=precision)
    extra = [i.name for i in session.get_inputs() if i.name not in ("sample", "timestep")]
    if extra:
        raise ValueError(f"gaq sample runs unconditional UNets only; {model_path} also takes {', '.join(extra)} "
                         "(run it in your pipeline, e.g. Optimum's ORTDiffusionPipeline)")
    from tqdm import tqdm

    for t in tqdm(sched.timesteps, desc="sample (onnxruntime)", unit="step", disable=not progress, leave=False):
        eps = predict_noise(session, x, np.full(len(x), t, dtype=np.int64), batch_size)
        step_noise = rng.standard_normal(x.shape, dtype=np.float32) if eta > 0 else None
        x = sched.step(eps, int(t), x, eta, step_noise)
    return x
