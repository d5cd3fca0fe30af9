"""Forward passes over the calibration set that pause at every reconstruction unit.

Reconstruction (BRECQ / Q-Diffusion) visits units in forward order. Unit k needs its inputs from the model
whose units before k are already quantized, and its outputs in the FP model. Re-running the model from the
start for every unit costs a partial forward pass per unit (time quadratic in the number of units), and
caching every unit's FP outputs at once costs about 100 MiB per sample on SD 1.5 at a 64x64 latent. Here
each calibration batch runs its forward pass in its own thread, paused at the current unit: a whole sweep
costs one quantized and one FP forward pass over the calibration set, and memory holds only the current
unit's data plus what each paused pass keeps alive (its skip connections).

Only one thread runs at a time (the main thread hands control to one pass and waits for it to pause), so
the passes do not compete for cores, and model state may be switched between unit steps.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, ContextManager, Literal

import torch
from torch import nn

from ..calibration import CalibrationSet
from ..sampling import unet_forward
from ..utils.memory import release_free_memory
from .block_cache import output_tensor


class _Cancelled(BaseException):
    """Raised inside a paused pass when the stream is closed early (BaseException: user code must not catch it)."""


def _detach(v: Any) -> Any:
    return v.detach() if isinstance(v, torch.Tensor) else v


class _Pass:
    """One calibration batch's forward pass, in a thread that runs only while the main thread waits."""

    def __init__(self, stream: "UnitStream", batch: CalibrationSet) -> None:
        self.stream, self.batch = stream, batch
        self.go, self.paused = threading.Semaphore(0), threading.Semaphore(0)
        self.slot: Any = None
        self.error: BaseException | None = None
        self.finished = False
        self.next_unit = 0
        self.thread = threading.Thread(target=self._main, daemon=True, name="gaq-unit-stream")

    def _main(self) -> None:
        self.stream.local.current = self
        self.go.acquire()
        try:
            if not self.stream.cancelled:
                # the caller's default device (thread-local in torch) applies here too
                with torch.no_grad(), torch.device(self.stream.default_device):
                    unet_forward(self.stream.model, self.batch.x, self.batch.t, self.batch.cond)
        except _Cancelled:
            pass
        except BaseException as e:  # handed to the main thread, which raises it
            self.error = e
        finally:
            self.finished = True
            self.paused.release()

    def pause(self, k: int, captured: Any) -> None:
        """Called in this pass's thread at unit ``k``: hand ``captured`` over and wait to be resumed."""
        if k != self.next_unit:
            names = self.stream.names
            seen = names[self.next_unit] if self.next_unit < len(names) else "the end of the forward pass"
            raise RuntimeError(f"reconstruction unit {names[k]} ran when {seen} was expected: units must run once "
                               "each per forward pass, in the order of the first pass (shared or conditionally "
                               "skipped modules cannot be reconstructed block by block)")
        self.next_unit = k + 1
        self.slot = captured
        self.paused.release()
        self.go.acquire()
        if self.stream.cancelled:
            raise _Cancelled

    def step(self) -> Any:
        """Run this pass until its next pause; returns what it captured there."""
        self.go.release()
        self.paused.acquire()
        if self.error is not None:
            raise self.error
        if self.finished:
            raise RuntimeError(f"the forward pass ended before reaching unit {self.stream.names[self.next_unit]}")
        captured, self.slot = self.slot, None
        return captured


class UnitStream:
    """Forward passes over ``calib`` (in batches of ``batch_size``) that pause at each of ``units`` in turn.

    ``capture="inputs"`` pauses before each unit and yields its positional and keyword inputs, so the unit
    can be changed (reconstructed) before the passes run it; ``"outputs"`` pauses after each unit and yields
    its output. ``mode()`` is entered around every step (e.g. ``full_precision`` for the FP passes).
    Use as a context manager: closing cancels passes that have not finished.
    """

    def __init__(self, model: nn.Module, units: list[tuple[str, nn.Module]], calib: CalibrationSet, batch_size: int,
                 capture: Literal["inputs", "outputs"], mode: Callable[[], ContextManager] = contextlib.nullcontext) -> None:
        self.model, self.mode, self.capture = model, mode, capture
        self.names = [n for n, _ in units]
        self.local = threading.local()
        self.cancelled = False
        self.default_device = torch.get_default_device()
        self.passes = [_Pass(self, b) for b in calib.batches(batch_size)]
        index = {id(m): k for k, (_, m) in enumerate(units)}
        if len(index) != len(units):
            raise ValueError("the same module appears twice among the reconstruction units")

        def on_input(module, args, kwargs):
            p = getattr(self.local, "current", None)
            if p is not None:  # the main thread (reconstruction) and other streams' passes run the units freely
                p.pause(index[id(module)], ([_detach(a) for a in args], {k: _detach(v) for k, v in kwargs.items()}))

        def on_output(module, args, kwargs, out):
            p = getattr(self.local, "current", None)
            if p is not None:
                p.pause(index[id(module)], output_tensor(out).detach())

        self.hooks = [m.register_forward_pre_hook(on_input, with_kwargs=True) if capture == "inputs"
                      else m.register_forward_hook(on_output, with_kwargs=True) for _, m in units]
        for p in self.passes:
            p.thread.start()

    def next(self) -> list[Any]:
        """Every pass run to its next unit; what each captured there, in batch order."""
        captured = []
        with self.mode():
            for p in self.passes:
                captured.append(p.step())
                release_free_memory()  # each pass is a thread with its own glibc arena: return its transients now
        return captured

    def close(self) -> None:
        self.cancelled = True
        for p in self.passes:
            if not p.finished:
                p.go.release()
                p.paused.acquire()
        for p in self.passes:
            p.thread.join()
        for h in self.hooks:
            h.remove()

    def __enter__(self) -> "UnitStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
