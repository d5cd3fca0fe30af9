"""Helpers shared by calibration algorithms."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn
from tqdm import tqdm

from ..calibration import CalibrationSet
from ..sampling import unet_forward
from ..wrapping import QuantAttnProcessor, QuantLayerMixin, quant_layers, quantizers


def set_quant_state(model: nn.Module, weight: bool, act: bool) -> None:
    for m in model.modules():
        if isinstance(m, QuantLayerMixin):
            m.use_weight_quant, m.use_act_quant = weight, act
        elif isinstance(m, QuantAttnProcessor):
            m.use_act_quant = act


@contextlib.contextmanager
def full_precision(model: nn.Module) -> Iterator[nn.Module]:
    """The FP model from the same module, so that no copy is needed: every quantizer off (the float weights
    are untouched until ``freeze_weights``) and diffusers' own attention processors back, i.e. bit for bit
    what the model computed before it was wrapped. The previous state is restored on exit."""
    layers = [(m, m.use_weight_quant, m.use_act_quant) for m in model.modules() if isinstance(m, QuantLayerMixin)]
    attns = [(m, m.processor) for m in model.modules()
             if isinstance(getattr(m, "processor", None), QuantAttnProcessor) and hasattr(m, "_gaq_fp_processor")]
    try:
        for m, _, _ in layers:
            m.use_weight_quant = m.use_act_quant = False
        for m, _ in attns:
            m.set_processor(m._gaq_fp_processor)
        yield model
    finally:
        for m, w, a in layers:
            m.use_weight_quant, m.use_act_quant = w, a
        for m, proc in attns:
            m.set_processor(proc)


@contextlib.contextmanager
def observing_activations(model: nn.Module, make_observer: Callable[[], Callable]) -> Iterator[dict]:
    """Attach a fresh observer to every enabled activation quantizer; yields {name: observer}."""
    observed = {n: q for n, q in quantizers(model, "act") if q.enabled}
    obs = {n: make_observer() for n in observed}
    for n, q in observed.items():
        q.observer = obs[n]
    try:
        yield obs
    finally:
        for q in observed.values():
            q.observer = None


@torch.no_grad()
def run_calibration_batches(model: nn.Module, calib: CalibrationSet, batch_size: int, desc: str, progress: bool) -> None:
    for b in tqdm(list(calib.batches(batch_size)), desc=desc, unit="batch", disable=not progress, leave=False):
        unet_forward(model, b.x, b.t, b.cond)


def freeze_weights(model: nn.Module) -> None:
    for _, layer in quant_layers(model):
        layer.freeze_weight()
