"""What block reconstruction holds in memory, estimated from one calibration row before the long work.

A probe runs one row through the model and measures, per reconstruction unit, the bytes per row of its
inputs and output (the unit cache), of what its forward keeps for the backward pass (module outputs and
attention scores), and what the forward pass keeps alive when it pauses there (skip connections). Everything
else scales from that with the number of rows, the batch size and the unit's weights; see docs/memory.md.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, fields

import torch
from torch import nn

from ..calibration import CalibrationSet
from ..sampling import unet_forward
from ..utils.memory import free_bytes
from .block_cache import output_tensor
from .blocks import ReconUnit

GiB = 2**30
ADAROUND_BYTES_PER_WEIGHT = 24


def _nbytes(v) -> int:
    return v.numel() * v.element_size() if isinstance(v, torch.Tensor) else 0


def _first_tensor(out) -> torch.Tensor | None:
    if isinstance(out, (tuple, list)):
        out = out[0] if out else None
    out = getattr(out, "sample", out)
    return out if isinstance(out, torch.Tensor) else None


@dataclass
class UnitFootprint:
    cache_row: int = 0    # inputs and FP output, bytes per row
    out_row: int = 0      # FP output alone, bytes per row (what recording the targets to disk writes)
    work_row: int = 0     # kept for the backward pass, bytes per row
    weights: int = 0      # elements of the weights the unit rounds


@dataclass
class Probe:
    order: list[ReconUnit]            # units in the order the forward pass calls them
    footprint: dict[str, UnitFootprint]
    live_row: int                     # most bytes per row a forward pass keeps alive at a unit boundary


@torch.no_grad()
def probe_units(model: nn.Module, units: list[ReconUnit], calib: CalibrationSet) -> Probe:
    row = calib.subset(slice(0, 1))
    seen: list[str] = []
    foot = {u.name: UnitFootprint(weights=sum(l.weight.numel() for _, l in u.layers())) for u in units}
    owner = {id(m): u.name for u in units for m in u.module.modules()}
    outputs: list[weakref.ref] = []
    live = [0]

    def alive_bytes() -> int:
        storages = {}
        for r in outputs:
            t = r()
            if t is not None:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return sum(storages.values())

    def on_unit(name):
        def pre(m, args, kwargs):
            if name not in seen:
                seen.append(name)
            inputs = sum(_nbytes(v) for v in [*args, *kwargs.values()])
            foot[name].cache_row += inputs
            live[0] = max(live[0], alive_bytes() + inputs)

        def post(m, args, kwargs, out):
            n = _nbytes(output_tensor(out))
            foot[name].cache_row += n
            foot[name].out_row += n
        return pre, post

    def on_any(m, args, kwargs, out):
        out = _first_tensor(out)
        if out is not None:
            outputs.append(weakref.ref(out))
            if id(m) in owner:
                foot[owner[id(m)]].work_row += _nbytes(out)
        heads = getattr(m, "heads", None)
        if id(m) in owner and isinstance(heads, int) and args and isinstance(args[0], torch.Tensor):
            q = args[0]
            lq = q.shape[1] if q.dim() == 3 else q[0, 0].numel()
            ctx = kwargs.get("encoder_hidden_states")
            lk = ctx.shape[1] if isinstance(ctx, torch.Tensor) else lq
            foot[owner[id(m)]].work_row += 2 * heads * lq * lk * q.element_size()  # scores and probabilities

    hooks = []
    for u in units:
        pre, post = on_unit(u.name)
        hooks += [u.module.register_forward_pre_hook(pre, with_kwargs=True), u.module.register_forward_hook(post, with_kwargs=True)]
    hooks += [m.register_forward_hook(on_any, with_kwargs=True) for m in model.modules()]
    try:
        unet_forward(model, row.x, row.t, row.cond)
    finally:
        for h in hooks:
            h.remove()
    rank = {n: i for i, n in enumerate(seen)}
    missing = [u.name for u in units if u.name not in rank]
    if missing:
        raise RuntimeError(f"reconstruction units never called in the forward pass: {missing[:3]}")
    return Probe(sorted(units, key=lambda u: rank[u.name]), foot, live[0])


@dataclass
class MemoryPlan:
    """Bytes each part of block reconstruction holds, and the unit-cache budget above which it goes to disk."""
    device: str
    rows: int
    model: int
    calibration: int        # on the host
    paused_passes: int      # what the paused forward passes keep alive (quantized, and FP unless on disk)
    unit_cache: int         # the largest unit's inputs and FP targets over all rows
    reconstruction: int     # the largest working set: a unit's training (activations at batch_size, AdaRound
                            # state) or a forward pass's batch (cache_batch_size rows through the largest unit)
    codes: int              # the integer weights (one byte each) the final freeze adds beside the float weights
    largest_unit: str
    budget: int             # unit cache held in memory up to this; above it, memory-mapped from disk
    free: int               # free memory on the device when the plan was made
    per_row: int            # bytes per row of calibration data, paused passes and unit cache together
    fp_targets: str = "pass"  # where the FP targets come from: "pass" (paused FP passes) or "disk" (recorded)
    fp_disk: int = 0        # bytes of every unit's FP targets on disk when recorded

    @property
    def spills(self) -> bool:
        return self.unit_cache > self.budget

    @property
    def peak(self) -> int:
        """Peak on the model's device (the host too when that is the CPU)."""
        sweep = self.paused_passes + min(self.unit_cache, self.budget) + self.reconstruction
        return self.model + max(sweep, self.codes) + (self.calibration if self.device == "cpu" else 0)

    def to_dict(self) -> dict:
        return {**{f.name: getattr(self, f.name) for f in fields(self)}, "peak": self.peak, "spills": self.spills}

    def summary(self) -> str:
        g = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
        cache = f"{g(self.unit_cache)} ({self.largest_unit})" + (" -> memory-mapped from disk" if self.spills else "")
        disk = f" (FP targets recorded to disk: {g(self.fp_disk)})" if self.fp_targets == "disk" else ""
        return (f"memory estimate on {self.device} for {self.rows} calibration rows: model {g(self.model)}, calibration "
                f"inputs {g(self.calibration)} (host), paused forward passes {g(self.paused_passes)}{disk}, largest unit "
                f"cache {cache}, reconstruction {g(self.reconstruction)}; peak {g(self.peak)} of {g(self.free)} free")


def plan_memory(model: nn.Module, probe: Probe, rows: int, calibration_bytes: int, batch_size: int,
                budget_gib: float = 0.0, device: torch.device | None = None, forward_batch: int = 64,
                fp_targets: str = "auto") -> MemoryPlan:
    """The plan for ``rows`` calibration rows. ``budget_gib`` 0 gives the unit cache what the free memory
    leaves after everything else, less a tenth of it as headroom. ``fp_targets`` "auto" records the FP
    targets to disk when the paused FP passes would not leave the unit cache room in memory. Refuses (one
    line, naming the setting) work whose unspillable parts cannot fit."""
    device = device or next(model.parameters()).device
    model_bytes = sum(_nbytes(p) for p in model.parameters()) + sum(_nbytes(b) for b in model.buffers())
    name, fp = max(probe.footprint.items(), key=lambda kv: kv[1].cache_row)
    # AdaRound, per weight in float32: floors, V, its gradient, Adam's two moments, the soft weight (and its
    # concatenation for split layers) and the backward's in-place temporaries: 39 bytes measured on the largest
    # SD 1.5 block before the in-place path, which saves 18-20 bytes (benchmarks/adaround_memory.py), rounded
    # up; activations twice (forward and gradients)
    recon = max(2 * min(batch_size, rows) * f.work_row + ADAROUND_BYTES_PER_WEIGHT * f.weights for f in probe.footprint.values())
    # the forward passes (paused passes, activation ranges) run forward_batch rows at a time, one at a time
    recon = max(recon, min(forward_batch, rows) * max(f.work_row for f in probe.footprint.values()))
    free = free_bytes(device)  # the model and the calibration inputs are already resident
    if fp_targets == "auto":
        fp_targets = "pass" if 2 * probe.live_row * rows + recon + fp.cache_row * rows <= 0.9 * free else "disk"
    streams = 2 if fp_targets == "pass" else 1
    paused = streams * probe.live_row * rows
    held = paused + recon
    budget = int(budget_gib * GiB) if budget_gib > 0 else max(0, int(0.9 * free) - held)
    per_row = probe.live_row * streams + fp.cache_row + calibration_bytes // max(1, rows)
    codes = sum(f.weights for f in probe.footprint.values())
    fp_disk = rows * sum(f.out_row for f in probe.footprint.values()) if fp_targets == "disk" else 0
    plan = MemoryPlan(str(device), rows, model_bytes, calibration_bytes, paused, fp.cache_row * rows, recon, codes, name,
                      budget, free, per_row, fp_targets, fp_disk)
    if held > free:
        raise ValueError(f"block reconstruction needs {held / GiB:.1f} GiB on {device} for the paused forward passes of "
                          f"{rows} calibration rows ({paused / GiB:.1f} GiB) and the largest working set (training at "
                          f"batch_size {batch_size}, forward passes at cache_batch_size {forward_batch}: {recon / GiB:.1f} GiB), "
                          f"more than the {free / GiB:.1f} GiB free; lower calibration.n_per_step (or max_samples), "
                          "or the algorithm's batch_size or cache_batch_size"
                          + (", or set its fp_targets: disk" if streams == 2 else ""))
    return plan
