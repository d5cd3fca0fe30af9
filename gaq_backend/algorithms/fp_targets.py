"""The FP targets of every reconstruction unit, recorded to disk by one FP forward pass before the sweep.

A unit's FP target does not depend on what has been quantized, so instead of a second set of paused forward
passes (``UnitStream(..., "outputs")``, which keep every batch's skip connections alive for the whole
sweep), one FP pass over the calibration set appends each unit's output, batch by batch, to a file of its
own. The sweep then reads one unit's targets at a time and removes the file. This halves what the paused
passes hold, at the price of disk space for all units' outputs (the memory plan reports it) and one write
and one read of them. Same values as the paused FP passes: the same batches run the same operations.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from ..calibration import CalibrationSet
from ..sampling import unet_forward
from ..utils.io import tmp_prefix
from .block_cache import output_tensor


@dataclass
class _UnitFile:
    path: str
    dtype: torch.dtype | None = None
    shape: tuple[int, ...] = ()   # one row's
    rows: int = 0
    device: torch.device | None = None


class RecordedTargets:
    """``next()`` gives the next unit's FP outputs over the whole calibration set, in batch order. Use as a
    context manager: closing removes the files not read yet."""

    def __init__(self, model: nn.Module, units: list[tuple[str, nn.Module]], calib: CalibrationSet, batch_size: int,
                 folder: str, mode, progress: bool = False) -> None:
        os.makedirs(folder, exist_ok=True)
        self.files: list[_UnitFile] = []
        self.next_unit = 0
        try:
            for _ in units:
                fd, path = tempfile.mkstemp(prefix=tmp_prefix("fp-targets"), suffix=".bin", dir=folder)
                os.close(fd)
                self.files.append(_UnitFile(path))
            self._record(model, units, calib, batch_size, mode, progress)
        except BaseException:
            self.close()
            raise

    @torch.no_grad()
    def _record(self, model, units, calib, batch_size, mode, progress) -> None:
        handles = [open(f.path, "ab") for f in self.files]
        order: list[int] = []

        def on_output(k):
            def hook(module, args, kwargs, out):
                if order and order[-1] >= k:
                    raise RuntimeError(f"reconstruction unit {units[k][0]} ran out of forward order or twice in one pass: "
                                       "its FP targets cannot be recorded unit by unit")
                order.append(k)
                t, f = output_tensor(out).detach(), self.files[k]
                f.dtype, f.shape, f.device, f.rows = t.dtype, tuple(t.shape[1:]), t.device, f.rows + t.shape[0]
                handles[k].write(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
            return hook

        hooks = [m.register_forward_hook(on_output(k), with_kwargs=True) for k, (_, m) in enumerate(units)]
        try:
            with mode():
                for b in tqdm(list(calib.batches(batch_size)), desc="FP targets", unit="batch", disable=not progress):
                    order.clear()
                    unet_forward(model, b.x, b.t, b.cond)
                    if len(order) != len(units):
                        missing = units[len(order)][0] if len(order) < len(units) else "?"
                        raise RuntimeError(f"reconstruction unit {missing} never ran in the FP forward pass")
        finally:
            for h in hooks:
                h.remove()
            for f in handles:
                f.close()

    def next(self) -> torch.Tensor:
        f = self.files[self.next_unit]
        self.next_unit += 1
        nbytes = f.rows * torch.Size(f.shape).numel() * f.dtype.itemsize
        raw = torch.from_file(f.path, shared=False, size=nbytes, dtype=torch.uint8)
        os.remove(f.path)
        return raw.view(f.dtype).view(f.rows, *f.shape).to(f.device)

    def disk_bytes(self) -> int:
        return sum(os.path.getsize(f.path) for f in self.files[self.next_unit:] if os.path.exists(f.path))

    def close(self) -> None:
        for f in self.files[self.next_unit:]:
            if os.path.exists(f.path):
                os.remove(f.path)

    def __enter__(self) -> "RecordedTargets":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
