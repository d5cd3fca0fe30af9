"""Cache one unit's inputs (from the quantized model) and targets (from the FP model) once per unit.

Both are captured by hooks in a forward pass that stops right after the unit, so the rest of the
network is never run; the reconstruction loop then only runs the unit itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from tqdm import tqdm

from ..calibration import CalibrationSet
from ..quantizers.timestep import current_timesteps
from ..sampling import unet_forward


class _Stop(Exception):
    pass


def _output_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    return out[0]


@dataclass
class BlockData:
    """Inputs (positional and keyword, batch-first tensors concatenated over the calibration set) and FP targets."""
    args: list[Any]
    kwargs: dict[str, Any]
    target: torch.Tensor
    t: torch.Tensor  # each sample's timestep, for quantizers with timestep-dependent ranges

    def __len__(self) -> int:
        return self.target.shape[0]

    def subset(self, idx: torch.Tensor) -> "BlockData":
        pick = lambda v: v[idx] if isinstance(v, torch.Tensor) else v  # noqa: E731
        return BlockData([pick(a) for a in self.args], {k: pick(v) for k, v in self.kwargs.items()}, self.target[idx], self.t[idx])

    def run(self, module: nn.Module, idx: torch.Tensor, params: dict[str, torch.Tensor] | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """The unit's output on samples ``idx`` and their FP targets; ``params`` replaces named
        parameters for this call (``torch.func.functional_call``), leaving the module untouched."""
        b = self.subset(idx)
        with current_timesteps(b.t):
            out = module(*b.args, **b.kwargs) if params is None else functional_call(module, params, tuple(b.args), b.kwargs)
            return _output_tensor(out), b.target


def _run(model: nn.Module, calib: CalibrationSet, batch_size: int, desc: str, progress: bool) -> None:
    with torch.no_grad():
        for b in tqdm(list(calib.batches(batch_size)), desc=desc, unit="batch", disable=not progress, leave=False):
            try:
                unet_forward(model, b.x, b.t, b.cond)
            except _Stop:
                pass


def _cat(items: list[Any]) -> Any:
    first = items[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(items)
    return first  # non-tensor arguments (None, flags) are the same for every batch


def cache_inputs(qmodel: nn.Module, qmodule: nn.Module, calib: CalibrationSet, batch_size: int = 64,
                 progress: bool = False) -> tuple[list[Any], dict[str, Any]]:
    """The unit's positional and keyword inputs in the (partly quantized) model; the pass stops at the unit."""
    got: list[Any] = []

    def pre(mod, args, kwargs):
        got.append(([a.detach() if isinstance(a, torch.Tensor) else a for a in args],
                    {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}))
        raise _Stop

    handle = qmodule.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        _run(qmodel, calib, batch_size, "cache inputs", progress)
    finally:
        handle.remove()
    args = [_cat([g[0][k] for g in got]) for k in range(len(got[0][0]))]
    return args, {k: _cat([g[1][k] for g in got]) for k in got[0][1]}


def cache_outputs(fp_model: nn.Module, names: list[str], calib: CalibrationSet, batch_size: int = 64,
                  progress: bool = False) -> dict[str, torch.Tensor]:
    """Every named unit's output in ``fp_model`` (the model inside ``full_precision``), from one pass (FP
    targets do not depend on what is quantized)."""
    got: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [fp_model.get_submodule(n).register_forward_hook(lambda m, a, out, n=n: got[n].append(_output_tensor(out).detach()))
               for n in names]
    try:
        _run(fp_model, calib, batch_size, "cache FP targets", progress)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v) for n, v in got.items()}
