"""Calibration capture (algorithm.md section 1), cached on disk, with a timestep-balanced split."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import distributed
from ..config import CalibrationConfig, SamplerConfig
from ..sampling import ddim_sample, initial_noise, make_scheduler
from .recorder import UNBATCHED, Recorder, calibration_from_tensors, gathered_tensors, unbatched_rows
from ..utils.cache import prepare_cache_dir, read_tensors, write_tensors

CACHE_FORMAT = 3


@dataclass(frozen=True)
class RecordingSampler:
    """The sampler that recorded a set (gaq's own capture), so that it can be rerun from recorded rows
    (``timestep_weighting: sampling``); sets recorded by a pipeline or a user's loop have none."""
    scheduler_config: dict
    sampler: SamplerConfig


@dataclass
class CalibrationSet:
    """Recorded UNet inputs ``(x_t, t)`` with the FP output ``eps``.

    ``step`` is the index of the recorded step in time order of the sampler (0 = first, noisiest);
    ``is_val`` marks the validation split and ``group`` the timestep group (0 = smallest t).
    """
    x: torch.Tensor
    t: torch.Tensor
    eps: torch.Tensor
    step: torch.Tensor
    is_val: torch.Tensor
    group: torch.Tensor
    cond: dict[str, torch.Tensor] = field(default_factory=dict)
    timesteps: torch.Tensor | None = None  # every timestep the sampler visits (recorded or not)
    recorded_by: RecordingSampler | None = None

    def __len__(self) -> int:
        return self.x.shape[0]

    def subset(self, mask_or_index: torch.Tensor) -> "CalibrationSet":
        x = self.x[mask_or_index]
        cond = {k: unbatched_rows(v, len(x)) if k.startswith(UNBATCHED) else v[mask_or_index] for k, v in self.cond.items()}
        return CalibrationSet(x, self.t[mask_or_index], self.eps[mask_or_index], self.step[mask_or_index],
                              self.is_val[mask_or_index], self.group[mask_or_index], cond, self.timesteps, self.recorded_by)

    @property
    def train(self) -> "CalibrationSet":
        return self.subset(~self.is_val)

    @property
    def val(self) -> "CalibrationSet":
        return self.subset(self.is_val)

    @property
    def n_groups(self) -> int:
        return int(self.group.max()) + 1 if len(self) else 0

    def spread(self, n: int) -> "CalibrationSet":
        """``n`` samples (at most all) evenly spaced over the set, so every recorded step is represented."""
        return self.subset(torch.linspace(0, len(self) - 1, min(n, len(self)), device="cpu").round().long())

    def batches(self, batch_size: int):
        for i in range(0, len(self), batch_size):
            yield self.subset(slice(i, i + batch_size))

    def stored_as(self, dtype: torch.dtype) -> "CalibrationSet":
        """The same rows with float inputs (x, eps, float conditioning) in ``dtype``; the model casts them back."""
        cast = lambda v: v.to(dtype) if v.is_floating_point() else v  # noqa: E731
        return CalibrationSet(cast(self.x), self.t, cast(self.eps), self.step, self.is_val, self.group,
                              {k: v if k.startswith(UNBATCHED) else cast(v) for k, v in self.cond.items()}, self.timesteps,
                              self.recorded_by)

    def fingerprint(self) -> str:
        """A hash of every row, split and group: equal on ranks that hold the same set."""
        h = hashlib.sha256()
        for k, v in [("x", self.x), ("t", self.t), ("eps", self.eps), ("is_val", self.is_val), ("group", self.group),
                     *sorted(self.cond.items())]:
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]

    def check_finite(self) -> None:
        check_finite(dict(x=self.x, eps=self.eps, t=self.t))


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


def check_finite(data: dict[str, torch.Tensor]) -> None:
    """Refuse calibration inputs or FP outputs with NaN or Inf, naming the first bad sample."""
    for name in ("x", "eps"):
        bad = ~torch.isfinite(data[name]).flatten(1).all(dim=1)
        if bad.any():
            i = int(bad.nonzero()[0])
            raise ValueError(f"calibration data contains NaN or Inf in '{name}' (sample {i}, t={int(data['t'][i])}); "
                             "the FP model or the sampler diverged")


def split_and_group(step: torch.Tensor, t: torch.Tensor, val_fraction: float, n_groups: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per recorded step, hold out ``val_fraction`` (at least one sample) for validation; cut the
    steps, ordered by t, into ``n_groups`` runs of consecutive steps of near-equal size."""
    gen = torch.Generator().manual_seed(seed)
    is_val = torch.zeros_like(step, dtype=torch.bool)
    steps = sorted(set(step.tolist()))
    for s in steps:
        idx = (step == s).nonzero().flatten()
        n_val = max(1, int(round(val_fraction * len(idx))))
        if n_val >= len(idx):
            raise ValueError(f"calibration step {s} has {len(idx)} samples, too few to hold out {n_val} for validation")
        is_val[idx[torch.randperm(len(idx), generator=gen, device="cpu")[:n_val]]] = True
    t_of_step = {s: float(t[step == s][0]) for s in steps}
    by_t = sorted(steps, key=lambda s: t_of_step[s])
    if n_groups > len(by_t):
        raise ValueError(f"n_groups={n_groups} exceeds the {len(by_t)} recorded steps; lower calibration.n_groups or calibration.interval")
    group = torch.zeros_like(step)
    for g, run in enumerate(np.array_split(np.array(by_t), n_groups)):
        for s in run:
            group[step == int(s)] = g
    return is_val, group


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


def capture_calibration(unet: torch.nn.Module, scheduler_config: dict, sampler: SamplerConfig, cfg: CalibrationConfig,
                        progress: bool = True) -> tuple[CalibrationSet, bool]:
    """Record ``(x_t, t, eps_fp)`` at every ``interval``-th step of one FP DDIM pass from ``n_per_step`` seeds.

    Returns the set and whether it came from the cache. The cache is keyed by the model's weights,
    the scheduler, the sampler and the capture settings; split and grouping are recomputed each time.
    """
    if hasattr(unet.config, "cross_attention_dim"):
        raise ValueError("gaq's own capture samples unconditional and class-conditional UNet2DModels; give the pipeline "
                         "folder of a text-conditioned UNet, or use a Python front door with your own loop")
    cond = class_conditioning(unet, cfg.class_labels, cfg.n_per_step)
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
            ddim_sample(unet, scheduler_config, sampler, initial_noise(cfg.n_per_step, shape, cfg.seed), cfg.batch_size,
                        progress="capture" if progress else False, seed=cfg.seed, cond=cond, shard=True)
        unet.train(was_training)
        raw = gathered_tensors(recorder)
        raw["timesteps"] = sched.timesteps.clone()  # every timestep the sampler visits, for per-timestep ranges
        check_finite(raw)  # a diverged model's data is refused, never cached
        if distributed.is_main():
            write_tensors(path, raw)
    calib = calibration_from_tensors(raw, cfg.val_fraction, cfg.n_groups, cfg.seed)
    calib.recorded_by = RecordingSampler(dict(scheduler_config), sampler)
    return calib, cached
