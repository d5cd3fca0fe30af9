"""Timestep-dependent activation ranges (TFMQ-DM's finite-set calibration).

A quantizer may carry a :class:`TimestepRanges` table: one scale / zero-point per sampler timestep.
It picks each batch row's entry by that row's timestep, which the UNet's forward pre-hook (installed by
:func:`install_timestep_hook`) publishes in a context variable. A timestep absent from the table uses
the nearest entry.
"""
from __future__ import annotations

import contextlib
import contextvars
import threading
from typing import Iterator

import torch
from torch import nn

_CURRENT_T: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("gaq_current_t", default=None)
# the hooks' tokens, per thread: several forward passes may be in flight at once (algorithms.unit_stream),
# and a token on the module would make it impossible to deepcopy
_TOKENS = threading.local()


@contextlib.contextmanager
def current_timesteps(t: torch.Tensor) -> Iterator[None]:
    token = _CURRENT_T.set(t.reshape(-1))
    try:
        yield
    finally:
        _CURRENT_T.reset(token)


def current_timestep_tensor() -> torch.Tensor:
    """The timesteps (one per batch row) of the UNet call in progress."""
    t = _CURRENT_T.get()
    if t is None:
        raise RuntimeError("timestep-dependent activation ranges need the current timestep; call the UNet (with its "
                           "timestep hook installed) or wrap the call in current_timesteps(t)")
    return t


class TimestepRanges(nn.Module):
    def __init__(self, n: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.register_buffer("t", torch.zeros(n, dtype=torch.float32, device=device))  # float: Euler / Karras timesteps are not integers
        self.register_buffer("scale", torch.ones(n, device=device))
        self.register_buffer("zero_point", torch.zeros(n, device=device))

    def nearest(self, t: torch.Tensor) -> torch.Tensor:
        """Index of the table entry nearest to each of the timesteps ``t``."""
        return (t.view(-1, 1) - self.t.view(1, -1)).abs().argmin(dim=1)

    def lookup(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = current_timestep_tensor()
        if t.numel() == 1:
            t = t.expand(x.shape[0])
        if t.numel() != x.shape[0]:
            raise RuntimeError(f"timestep batch ({t.numel()}) does not match activation batch ({x.shape[0]})")
        idx = self.nearest(t)
        shape = (-1,) + (1,) * (x.dim() - 1)
        return self.scale[idx].view(shape), self.zero_point[idx].view(shape)


def call_sample_and_timestep(module: nn.Module, args, kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """A denoiser call's first input (the sample) and its timestep, from a forward hook's arguments."""
    import inspect

    bound = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments   # timestep's position varies by class
    sample = next(iter(bound.values()))
    return sample, torch.as_tensor(bound["timestep"], device=sample.device)


def _timestep_pre_hook(module, args, kwargs):
    sample, t = call_sample_and_timestep(module, args, kwargs)
    t = t.reshape(-1)
    if t.numel() == 1:
        t = t.expand(sample.shape[0])
    _TOKENS.__dict__.setdefault("stack", []).append(_CURRENT_T.set(t))


def _timestep_post_hook(module, args, kwargs, out):
    _CURRENT_T.reset(_TOKENS.stack.pop())


def install_timestep_hook(unet: nn.Module) -> None:
    """Publish each forward call's timesteps to the quantizers that carry a timestep table (idempotent)."""
    if getattr(unet, "_gaq_t_hooks", None):
        return
    unet._gaq_t_hooks = (unet.register_forward_pre_hook(_timestep_pre_hook, with_kwargs=True),
                         unet.register_forward_hook(_timestep_post_hook, with_kwargs=True, always_call=True))
