"""Which layers get 8-bit weights in a W4 model (``quantization.mixed_precision_budget``).

MixDQ (Zhao et al., 2024) keeps the layers whose low-bit weights hurt most at a higher precision within a size
budget. gaq's rule (our extension, issue 29) measures that hurt where it reaches the samples: a layer's cost is the
squared error of the noise prediction against the FP model's with only that layer's weights at ``w_bits`` (rounded
to nearest with the calibration's initial ranges, everything else in float), on the calibration rows of the
noisiest timestep group. An error there moves the final sample thousands of times more than one at the last steps
(docs/benchmarks.md, "Where the error that reaches the samples comes from"); the per-layer report of ``gaq
quantize`` measures over every timestep, which the last steps dominate. Layers are taken in order of cost per
weight while their extra bits, with those of layers ``w_bits_by_layer`` already widens, fit in ``budget`` times the
weight bits of the all-``w_bits`` model.

Costs a copy of the FP model and one forward pass of ``rows`` calibration rows per candidate layer, before any
calibration; the choice is deterministic given the calibration set.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from ..config import HIGH_PRECISION_BITS, QuantConfig
from ..sampling import unet_forward
from .wrap import fit_weights, is_kept, quant_layers, weight_sizes, wrap_unet


@dataclass
class MixedPrecisionChoice:
    budget: float                  # the extra weight bytes allowed, as a fraction of the w_bits model's
    rows: int                      # calibration rows measured on (the noisiest timestep group)
    chosen: list[str] = field(default_factory=list)          # the layers given HIGH_PRECISION_BITS, in order taken
    extra_fraction: float = 0.0    # the extra weight bytes used, same fraction
    share_of_cost: float = 0.0     # the chosen layers' part of the summed single-layer costs
    costs: dict[str, float] = field(default_factory=dict)    # per candidate: error with only its weights quantized
    seconds: float = 0.0

    def to_dict(self) -> dict:
        top = sorted(self.costs.items(), key=lambda kv: -kv[1])[:10]
        return dict(budget=self.budget, rows=self.rows, bits=HIGH_PRECISION_BITS, chosen=self.chosen,
                    extra_weight_bytes=self.extra_fraction, share_of_summed_cost=self.share_of_cost, seconds=self.seconds,
                    largest_costs=dict(top), metric="sum of squared noise-prediction error against FP, that layer's "
                                                    "weights alone rounded to nearest, noisiest timestep group")


@torch.no_grad()
def choose_high_precision_layers(model: nn.Module, config: QuantConfig, calibration, rows: int = 64,
                                 batch_size: int = 32, progress: bool = False) -> MixedPrecisionChoice:
    """The layers of FP ``model`` that ``config.mixed_precision_budget`` gives 8-bit weights (module docstring).
    Layers ``config.w_bits_by_layer`` already sets are left as they are."""
    start = time.perf_counter()
    probe = copy.deepcopy(model).eval()
    wrap_unet(probe, config.w_bits, 32, config.keep_fp, config.weight_symmetric, config.act_symmetric, False,
              config.split_skip, config.w_block_size, config.w_bits_by_layer)
    fit_weights(probe, getattr(config.algorithm, "weight_range", "mse"))
    layers = quant_layers(probe)
    for _, layer in layers:
        layer.use_weight_quant = False
    train = calibration.train
    noisy = train.subset(train.group == train.group.max()).spread(rows)

    def prediction() -> torch.Tensor:
        return torch.cat([unet_forward(probe, b.x, b.t, b.cond).float() for b in noisy.batches(batch_size)])

    ref = prediction()
    candidates = [(n, m) for n, m in layers if not is_kept(n, list(config.w_bits_by_layer))]
    costs: dict[str, float] = {}
    for name, layer in tqdm(candidates, desc="mixed precision", unit="layer", disable=not progress, leave=False):
        layer.use_weight_quant = True
        costs[name] = float((prediction() - ref).double().pow(2).sum())
        layer.use_weight_quant = False
    sizes = weight_sizes(probe)
    size, bits = {n: k for n, (k, _) in sizes.items()}, {n: b for n, (_, b) in sizes.items()}
    base_bits = sum(size.values()) * config.w_bits
    allowed = config.mixed_precision_budget * base_bits
    choice = MixedPrecisionChoice(config.mixed_precision_budget, len(noisy), costs=costs)
    # layers w_bits_by_layer already widens count against the budget (a saved recipe re-run chooses no more)
    used = sum(size[n] * max(0, bits[n] - config.w_bits) for n in size)
    for name in sorted(costs, key=lambda n: (-costs[n] / size[n], n)):
        extra = size[name] * (HIGH_PRECISION_BITS - bits[name])
        if costs[name] > 0 and used + extra <= allowed:
            choice.chosen.append(name)
            used += extra
    total = sum(costs.values())
    choice.extra_fraction = used / base_bits if base_bits else 0.0
    choice.share_of_cost = sum(costs[n] for n in choice.chosen) / total if total > 0 else 0.0
    choice.seconds = time.perf_counter() - start
    return choice


def with_mixed_precision(model: nn.Module, config: QuantConfig, calibration,
                         progress: bool = False) -> tuple[QuantConfig, MixedPrecisionChoice | None]:
    """``config`` with the chosen layers added to ``w_bits_by_layer`` as exact ``=name`` entries (so the saved
    folder reloads without choosing again), and the choice; ``config`` itself when the budget is 0."""
    if not config.mixed_precision_budget:
        return config, None
    from .. import distributed

    choice = choose_high_precision_layers(model, config, calibration, progress=progress)
    # every rank measures the same model on the same rows; a rank that chose otherwise would build another model
    distributed.check_same(",".join(choice.chosen), "mixed-precision layer choice",
                           "the ranks measured different costs; set quantization.w_bits_by_layer explicitly")
    added = {"=" + n: HIGH_PRECISION_BITS for n in choice.chosen}
    return dataclasses.replace(config, w_bits_by_layer={**config.w_bits_by_layer, **added}), choice
