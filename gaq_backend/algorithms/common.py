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
