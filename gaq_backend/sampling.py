"""The DDIM sampling loop shared by calibration capture, reports and evaluation."""
from __future__ import annotations

from typing import Callable

import torch
from tqdm import tqdm

from .config import SamplerConfig

StepHook = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


def make_scheduler(scheduler_config: dict, sampler: SamplerConfig):
    from diffusers import DDIMScheduler

    with torch.device("cpu"):  # the scheduler's tables live on the host, whatever the default device is
        sched = DDIMScheduler.from_config(scheduler_config)
        sched.set_timesteps(sampler.num_inference_steps, device="cpu")
    return sched


def unet_forward(unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Prediction of a diffusers denoiser (UNet or transformer) for a batch of inputs with one timestep each.
    ``cond`` holds the other forward inputs by recorded name: nested ones (``added_cond_kwargs``) as
    ``"added_cond_kwargs.text_embeds"``, inputs without a batch axis as ``"unbatched.img_ids"`` (rows of one
    value: the first is passed, as recorded)."""
    from .calibration.calibration_set import UNBATCHED
    from .calibration.recorder import input_name

    weight = first_weight(unet)
    device = weight.device  # calibration data lives on the host; the model may not
    dtype = weight.dtype    # and may be stored in another precision (calibration.storage_dtype)
    kwargs: dict = {}
    for k, v in (cond or {}).items():
        if k.startswith(UNBATCHED):
            kwargs[k[len(UNBATCHED):]] = v[0].to(device)   # as recorded: position ids keep their dtype
            continue
        head, _, tail = k.partition(".")
        v = v.to(device, dtype) if v.is_floating_point() else v.to(device)
        if tail:
            kwargs.setdefault(head, {})[tail] = v
        else:
            kwargs[k] = v
    kwargs[input_name(unet)] = x.to(device, dtype)
    return unet(timestep=t.to(device), **kwargs).sample


def forward_with_hooks(model: torch.nn.Module, names: list[str], fn, x: torch.Tensor, t: torch.Tensor,
                       cond: dict[str, torch.Tensor] | None = None, replace: bool = False) -> None:
    """One :func:`unet_forward` call with ``fn(module, args, out, name)`` called after each named module. What it
    returns is dropped unless ``replace``: then a value other than None replaces the module's output."""
    modules = dict(model.named_modules())

    def hook(mod, a, o, n):
        r = fn(mod, a, o, n)
        return r if replace else None

    hooks = [modules[n].register_forward_hook(lambda mod, a, o, n=n: hook(mod, a, o, n)) for n in names]
    try:
        with torch.no_grad():
            unet_forward(model, x, t, cond)
    finally:
        for h in hooks:
            h.remove()


def first_weight(model: torch.nn.Module) -> torch.Tensor:
    """The weight of the model's first Conv2d / Linear: its device and the dtype it computes in (a quantized
    model's scales are float32). Not ``conv_in``: a denoiser need not have one."""
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            return m.weight
    raise ValueError(f"{type(model).__name__} has no Conv2d or Linear layer")


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype the UNet computes in."""
    return first_weight(model).dtype


def initial_noise(n: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed), device="cpu")


@torch.no_grad()
def ddim_sample(unet: torch.nn.Module, scheduler_config: dict, sampler: SamplerConfig, noise: torch.Tensor,
                batch_size: int = 256, on_step: StepHook | None = None, progress: bool | str = True, seed: int = 0,
                cond: dict[str, torch.Tensor] | None = None, shard: bool = False, start_step: int = 0) -> torch.Tensor:
    """Run the DDIM loop from ``noise``; ``on_step(i, t, x_t, eps)`` sees every UNet call (batched) and may change
    ``eps`` in place. ``cond``: other forward inputs, one row per image (e.g. ``class_labels``). ``start_step``:
    ``noise`` is the trajectory at that step (a recorded x_t), the earlier steps are skipped.

    Deterministic: eta = 0 needs no randomness; otherwise the variance noise comes from ``seed`` and the batch's
    first image index. ``shard``: under torch.distributed, run only this rank's share of the batches (each one
    exactly as one process runs it) and return every rank's images, the same as one process samples.
    """
    from . import distributed

    if shard and distributed.world()[1] > 1:
        mine = distributed.share((noise.shape[0] + batch_size - 1) // batch_size)
        a, b = mine.start * batch_size, min(noise.shape[0], mine.stop * batch_size)
        local = ddim_sample(unet, scheduler_config, sampler, noise[a:b], batch_size, on_step, progress, seed + a,
                            {k: v[a:b] for k, v in (cond or {}).items()}, start_step=start_step) if b > a else None
        return distributed.gather_rows(None if local is None else {"x": local})["x"]
    out = []
    desc = progress if isinstance(progress, str) else "sample"
    sched = make_scheduler(scheduler_config, sampler)
    steps = len(sched.timesteps) - start_step
    dtype = model_dtype(unet)  # the loop runs in float32; a half-precision UNet sees its own dtype
    n_batches = (noise.shape[0] + batch_size - 1) // batch_size
    bar = tqdm(total=steps * n_batches, desc=desc, unit="step", disable=not progress, leave=False)
    for b0 in range(0, noise.shape[0], batch_size):
        x = noise[b0: b0 + batch_size].clone()
        gen = torch.Generator().manual_seed(seed + b0)
        sched = make_scheduler(scheduler_config, sampler)
        for i, t in enumerate(sched.timesteps):
            if i < start_step:
                continue
            tt = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
            eps = unet_forward(unet, x.to(dtype), tt, {k: v[b0: b0 + batch_size] for k, v in (cond or {}).items()}).to(x.device, torch.float32)
            if on_step is not None:
                on_step(i, tt, x, eps)
            x = sched.step(eps, t, x, eta=sampler.eta, generator=gen).prev_sample
            bar.update(1)
        out.append(x)
    bar.close()
    return torch.cat(out)
