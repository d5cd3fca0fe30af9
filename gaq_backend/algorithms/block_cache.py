"""One unit's cached inputs and FP targets, held in memory or memory-mapped from disk.

Only the current unit's data is ever held (``unit_stream`` produces it unit by unit). Above the memory
budget it is written to a temporary file in the cache folder and memory-mapped, so a large calibration
set reads from disk instead of failing; the file is removed when the unit is done.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from ..quantizers.timestep import current_timesteps
from ..utils.io import tmp_prefix


def output_tensor(out: Any) -> torch.Tensor:
    """A unit's output as one batch-first tensor. A block that returns several tensors (a joint transformer block's
    text and image streams) gives them flattened per row and side by side, so the loss covers every stream; ``None``
    entries (the last SD3 block's unused text stream) are skipped."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    tensors = [o for o in out if isinstance(o, torch.Tensor)]
    return tensors[0] if len(tensors) == 1 else torch.cat([o.flatten(1) for o in tensors], dim=1)


def _pick(v: Any, idx: torch.Tensor, device: torch.device | None) -> Any:
    if not isinstance(v, torch.Tensor):
        return v  # non-tensor arguments (None, flags) are the same for every row
    v = v[idx]
    return v if device is None else v.to(device, non_blocking=True)


@dataclass
class BlockData:
    """Inputs (positional and keyword, batch-first tensors over the calibration set) and FP targets.

    ``rows`` views a subset without copying (the train split of a unit's data is a view, not a second cache);
    ``device`` is where ``run`` computes (the module's), which may differ from where the data lives.
    """
    args: list[Any]
    kwargs: dict[str, Any]
    target: torch.Tensor
    t: torch.Tensor  # each row's timestep, for quantizers with timestep-dependent ranges
    rows: torch.Tensor | None = None
    device: torch.device | None = None

    def __len__(self) -> int:
        return self.target.shape[0] if self.rows is None else len(self.rows)

    def _index(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.dtype == torch.bool:
            idx = idx.nonzero().squeeze(1)
        return idx if self.rows is None else self.rows[idx]

    def subset(self, idx: torch.Tensor) -> "BlockData":
        """A view of the rows ``idx`` (a boolean mask or indices), sharing this data's storage."""
        return BlockData(self.args, self.kwargs, self.target, self.t, self._index(idx.to("cpu")), self.device)

    def run(self, module: nn.Module, idx: torch.Tensor, params: dict[str, torch.Tensor] | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """The unit's output on rows ``idx`` and their FP targets; ``params`` replaces named
        parameters for this call (``torch.func.functional_call``), leaving the module untouched."""
        rows = self._index(idx)
        args = [_pick(a, rows, self.device) for a in self.args]
        kwargs = {k: _pick(v, rows, self.device) for k, v in self.kwargs.items()}
        target = _pick(self.target, rows, self.device)
        with current_timesteps(self.t[rows.to(self.t.device)].to(target.device)):
            out = module(*args, **kwargs) if params is None else functional_call(module, params, tuple(args), kwargs)
            return output_tensor(out), target

    def nbytes(self) -> int:
        tensors = [v for v in [*self.args, *self.kwargs.values(), self.target] if isinstance(v, torch.Tensor)]
        return sum(v.numel() * v.element_size() for v in tensors)


def concat(items: list[Any]) -> Any:
    first = items[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(items)
    return first


def spill_to_disk(data: BlockData, folder: str) -> tuple[BlockData, str]:
    """``data`` written to a temporary file in ``folder`` and memory-mapped back; returns it and the file
    (the caller removes it). The file is named as gaq's temporaries are, so a killed run's is cleaned up later."""
    os.makedirs(folder, exist_ok=True)
    fd, path = tempfile.mkstemp(prefix=tmp_prefix("unit-cache"), suffix=".pt", dir=folder)
    os.close(fd)
    try:
        host = lambda v: v.cpu() if isinstance(v, torch.Tensor) else v  # noqa: E731
        torch.save({"args": [host(a) for a in data.args], "kwargs": {k: host(v) for k, v in data.kwargs.items()},
                    "target": host(data.target)}, path)
        m = torch.load(path, mmap=True, weights_only=True)
    except BaseException:
        os.remove(path)
        raise
    device = data.device or (data.target.device if data.target.device.type != "cpu" else None)
    return BlockData(m["args"], m["kwargs"], m["target"], data.t, data.rows, device), path
