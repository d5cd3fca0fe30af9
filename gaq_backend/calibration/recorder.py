"""Record what a denoiser sees while the user's own code samples: the calibration data of every front door.

A forward hook on the denoiser (a UNet or a diffusion transformer) binds each call's arguments to its
``forward`` signature and keeps, per batch row: the input (``forward``'s first parameter, whatever it is
called: ``sample`` for UNets, ``hidden_states`` for transformers), the row's timestep (a scalar or ``[1]`` timestep is broadcast; float
timesteps such as Euler's stay float), every tensor conditioning input (``encoder_hidden_states``,
``class_labels``, ``timestep_cond``, ``attention_mask``, ``encoder_attention_mask``, and each entry of
``added_cond_kwargs`` under ``added_cond_kwargs.<name>``; ``None`` entries are left out), and the FP
output. A CFG-doubled batch gives one row per half. An input without a batch axis (Flux's rotary
``img_ids`` / ``txt_ids``: two or more axes, the first neither the batch nor 1) is the same for every row: it
is kept once, under ``unbatched.<name>``, and must be equal in every call. Rows are kept in a seeded reservoir per distinct timestep (``max_per_step`` each),
so memory is bounded however long the user's loop runs and the kept set is timestep-balanced.
``finalize`` orders the timesteps from noisiest to cleanest (the recorded "steps"), caps the total at
``max_samples`` evenly over the steps, and splits and groups them like the CLI's capture.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch import nn

from .calibration_set import UNBATCHED

NESTED = ("added_cond_kwargs",)
IGNORED = ("return_dict",)


def input_name(model: nn.Module) -> str:
    """The name of the denoiser's first forward input (the noisy latent): ``sample`` or ``hidden_states``."""
    params = [p for p in inspect.signature(model.forward).parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not params:
        raise RecordingError(f"{type(model).__name__}.forward takes no positional input to record")
    return params[0].name


class RecordingError(ValueError):
    """A UNet call the recorder cannot keep faithfully (the message names the input)."""


def _is_empty(v: Any) -> bool:
    return v is None or (isinstance(v, (dict, tuple, list)) and not v)


class Recorder:
    """``with Recorder(unet) as rec: user_code(); calib = rec.finalize(...)``."""

    def __init__(self, unet: nn.Module, max_per_step: int = 256, seed: int = 0,
                 keep: Callable[[float], bool] | None = None, keep_call: Callable[[int], bool] | None = None) -> None:
        # keep: which timestep values to record; keep_call: which calls, by their index since start_run() (a
        # pipeline's i-th denoiser call is its scheduler's i-th timestep, whatever scale the model reads t in)
        self.unet, self.max_per_step, self.keep, self.keep_call = unet, max_per_step, keep, keep_call
        self.run_calls = 0
        self.signature = inspect.signature(unet.forward)
        self.input = input_name(unet)
        self.unbatched: dict[str, torch.Tensor] = {}
        self.gen = torch.Generator().manual_seed(seed)
        self.rows: dict[float, list[dict[str, torch.Tensor]]] = {}
        self.seen: dict[float, int] = {}
        self.float_t = False
        self.calls = 0
        self._handle = None

    def __enter__(self) -> "Recorder":
        self._handle = self.unet.register_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    # -- recording ---------------------------------------------------------------------------------
    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        try:
            bound = self.signature.bind(*args, **kwargs).arguments
        except TypeError as e:
            raise RecordingError(f"UNet call does not match {type(module).__name__}.forward: {e}") from None
        x = bound.get(self.input)
        if not isinstance(x, torch.Tensor):
            raise RecordingError(f"{type(module).__name__} call without a tensor '{self.input}'")
        b = x.shape[0]
        t = self._timesteps(bound.get("timestep"), b, x.device)
        cond: dict[str, torch.Tensor] = {}
        for name, v in bound.items():
            if name in (self.input, "timestep") or name in IGNORED or _is_empty(v):
                continue
            if name in NESTED and isinstance(v, dict):
                for k, vv in v.items():
                    if not _is_empty(vv):
                        cond[f"{name}.{k}"] = self._rows(f"{name}.{k}", vv, b)
            elif isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[0] not in (b, 1):   # 1-D inputs are per row
                self._keep_unbatched(name, v)
            elif isinstance(v, torch.Tensor):
                cond[name] = self._rows(name, v, b)
            else:
                raise RecordingError(f"UNet input '{name}' ({type(v).__name__}) cannot be recorded for calibration; "
                                     "gaq records tensors and added_cond_kwargs only")
        eps = output.sample if hasattr(output, "sample") else output[0]
        self.calls, self.run_calls = self.calls + 1, self.run_calls + 1
        if self.keep_call is not None and not self.keep_call(self.run_calls - 1):
            return
        for i in range(b):
            key = float(t[i])
            if self.keep is not None and not self.keep(key):
                continue
            row = {"x": x[i].detach().cpu().clone(), "t": t[i].detach().cpu().clone(), "eps": eps[i].detach().cpu().clone()}
            row.update({k: v[i].detach().cpu().clone() for k, v in cond.items()})
            self._reservoir(key, row)

    def start_run(self) -> None:
        """A new sampling run begins: ``keep_call`` counts its calls from 0."""
        self.run_calls = 0

    def _keep_unbatched(self, name: str, v: torch.Tensor) -> None:
        v = v.detach().cpu()
        kept = self.unbatched.setdefault(name, v.clone())
        if kept.shape != v.shape or not torch.equal(kept, v):
            raise RecordingError(f"input '{name}' has no batch axis ({tuple(v.shape)}) and changes between calls; gaq keeps "
                                 "such an input once (e.g. rotary position ids of one resolution): record calls of one resolution")

    def _timesteps(self, t: Any, b: int, device: torch.device) -> torch.Tensor:
        t = torch.as_tensor(t, device=device)
        if t.numel() == 1:
            t = t.reshape(1).expand(b)
        elif t.shape != (b,):
            raise RecordingError(f"timestep of shape {tuple(t.shape)} for a batch of {b}; expected a scalar or ({b},)")
        self.float_t |= t.is_floating_point()  # kept as recorded: Euler / Karras timesteps are float
        return t

    @staticmethod
    def _rows(name: str, v: Any, b: int) -> torch.Tensor:
        if not isinstance(v, torch.Tensor) or v.dim() == 0:
            raise RecordingError(f"UNet input '{name}' must be a batched tensor to be recorded; got {type(v).__name__}")
        if v.shape[0] == b:
            return v
        if v.shape[0] == 1:
            return v.expand(b, *v.shape[1:])
        raise RecordingError(f"UNet input '{name}' has {v.shape[0]} rows for a batch of {b}")

    def _reservoir(self, key: float, row: dict[str, torch.Tensor]) -> None:
        kept = self.rows.setdefault(key, [])
        n = self.seen.get(key, 0)
        self.seen[key] = n + 1
        if len(kept) < self.max_per_step:
            kept.append(row)
            return
        j = int(torch.randint(0, n + 1, (1,), generator=self.gen, device="cpu"))
        if j < self.max_per_step:
            kept[j] = row

    # -- result ------------------------------------------------------------------------------------
    def tensors(self, max_samples: int | None = None) -> dict[str, torch.Tensor]:
        """The kept rows as batch-first tensors: ``x``, ``t``, ``eps``, ``step`` (0 = noisiest), ``timesteps``
        (every distinct recorded timestep, noisiest first) and the conditioning inputs by name."""
        if not self.rows:
            raise RecordingError("no UNet call was recorded: the forward loop never ran the UNet "
                                 "(did the pipeline use another module than the one passed to gaq?)")
        keys = sorted(self.rows, reverse=True)
        cap = self.max_per_step if max_samples is None else max(1, max_samples // len(keys))
        rows, steps = [], []
        for s, k in enumerate(keys):
            kept = self.rows[k]
            if len(kept) > cap:  # a seeded random subset, not the first calls' rows (e.g. one CFG half)
                kept = [kept[i] for i in sorted(torch.randperm(len(kept), generator=self.gen, device="cpu")[:cap].tolist())]
            rows += kept
            steps += [s] * len(kept)
        names = set(rows[0])
        for r in rows:
            if set(r) != names:
                raise RecordingError(f"UNet calls differ in their inputs ({sorted(names ^ set(r))}); record one kind of call")
        out = {k: torch.stack([r[k] for r in rows]) for k in sorted(names)}
        t_dtype = torch.float32 if self.float_t else torch.long
        out["t"] = out["t"].to(t_dtype)
        out["step"] = torch.tensor(steps, device="cpu")  # calibration data lives on the host
        out["timesteps"] = torch.tensor(keys, dtype=t_dtype, device="cpu")
        out.update({UNBATCHED + k: v.unsqueeze(0) for k, v in self.unbatched.items()})  # one row; expanded as a view
        return out


def gathered_tensors(recorder: Recorder) -> dict[str, torch.Tensor]:
    """:meth:`Recorder.tensors` of every rank's recorder, each of which saw its share of the calls (rank order is
    call order), merged on every rank into what one recorder that saw all the calls keeps: rows by step, noisiest
    first, and within a step in call order. Equal while no timestep holds more than ``max_per_step`` rows (the
    reservoir never replaces a row), as in gaq's own captures; outside a process group, the recorder's own."""
    from .. import distributed

    if distributed.world()[1] == 1:
        return recorder.tensors()
    local = recorder.tensors() if recorder.rows else None
    raw = distributed.gather_rows(None if local is None else {k: v for k, v in local.items() if k not in ("step", "timesteps")})
    if not raw:
        recorder.tensors()   # raises: no rank recorded a call
    order = torch.sort(raw["t"], descending=True, stable=True).indices
    for k, v in raw.items():
        if k.startswith(UNBATCHED):   # one row from each rank that recorded: the same value
            if not all(torch.equal(v[0], r) for r in v[1:]):
                raise RecordingError(f"input '{k[len(UNBATCHED):]}' differs between ranks; record calls of one resolution")
            raw[k] = v[:1]
        else:
            raw[k] = v[order]
    keys, index = torch.unique(raw["t"], sorted=True, return_inverse=True)
    raw["step"], raw["timesteps"] = len(keys) - 1 - index, keys.flip(0)   # step 0: the largest t
    return raw
