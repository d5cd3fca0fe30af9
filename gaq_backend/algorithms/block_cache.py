"""Cache one unit's inputs (from the quantized model) and targets (from the FP model) once per unit.

Both are captured by hooks in a forward pass that stops right after the unit, so the rest of the
network is never run; the reconstruction loop then only runs the unit itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
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

    def run(self, module: nn.Module, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.subset(idx)
        with current_timesteps(b.t):
            return _output_tensor(module(*b.args, **b.kwargs)), b.target


def _capture(model: nn.Module, module: nn.Module, calib: CalibrationSet, batch_size: int, want: str, desc: str, progress: bool):
    got: list[Any] = []

    def pre(mod, args, kwargs):
        if want == "input":
            got.append(([a.detach() if isinstance(a, torch.Tensor) else a for a in args],
                        {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}))
            raise _Stop

    def post(mod, args, kwargs, out):
        got.append(_output_tensor(out).detach())
        raise _Stop

    handle = module.register_forward_pre_hook(pre, with_kwargs=True) if want == "input" else \
        module.register_forward_hook(post, with_kwargs=True)
    try:
        with torch.no_grad():
            for b in tqdm(list(calib.batches(batch_size)), desc=desc, unit="batch", disable=not progress, leave=False):
                try:
                    unet_forward(model, b.x, b.t, b.cond)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return got


def _cat(items: list[Any]) -> Any:
    first = items[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(items)
    return first  # non-tensor arguments (None, flags) are the same for every batch


def cache_block(qmodel: nn.Module, qmodule: nn.Module, fp_model: nn.Module, fp_module: nn.Module, calib: CalibrationSet,
                batch_size: int = 64, progress: bool = False) -> BlockData:
    ins = _capture(qmodel, qmodule, calib, batch_size, "input", "cache inputs", progress)
    outs = _capture(fp_model, fp_module, calib, batch_size, "output", "cache targets", progress)
    args = [_cat([i[0][k] for i in ins]) for k in range(len(ins[0][0]))]
    kwargs = {k: _cat([i[1][k] for i in ins]) for k in ins[0][1]}
    return BlockData(args, kwargs, torch.cat(outs), calib.t.clone())
