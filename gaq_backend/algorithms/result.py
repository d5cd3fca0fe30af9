"""What a calibration algorithm returns: a typed record of what it did, per unit, that ``report.json``
serialises (``to_dict``) and ``model.gaq_info.stats`` keeps for API users.

Files an algorithm writes beside the model (``gradient_aligned``'s learned weights and figures) are
written from the data held here (``write_files``), so the record stays plain data: no callbacks.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .sample_weights import SampleWeights


@dataclass
class UnitRecord:
    """One reconstruction unit: its output MSE before and after, the loss curve's ends and where time went."""
    kind: str
    mse_before: float
    mse_after: float
    loss_first: float
    loss_last: float
    seconds_cache: float        # producing its inputs and FP targets
    seconds_weights: float      # learning per-sample weights (gradient_aligned), 0 otherwise
    seconds_reconstruct: float
    on_disk: bool = False       # its cache was memory-mapped from disk


@dataclass
class TemporalBlockRecord:
    """TFMQ-DM's temporal information block, reconstructed before the other units."""
    n_timesteps: int
    n_layers: int
    loss_first: float | None
    loss_last: float | None
    mse_after: float
    seconds: float = 0.0


@dataclass
class CalibrationRecord:
    memory_plan: dict | None = None                                 # MemoryPlan.to_dict() of a reconstruction sweep
    blocks: dict[str, UnitRecord] = field(default_factory=dict)     # per reconstruction unit, in forward order
    temporal_block: TemporalBlockRecord | str | None = None         # a string says why there was none
    sample_weights: SampleWeights | None = None                     # gradient_aligned's learned weights
    output_correction: dict | None = None                           # quantization.output_correction's table figures
    mixed_precision: dict | None = None                             # the layers quantization.mixed_precision_budget chose
    network_phase: dict | None = None                               # settings.network_iters' figures (network_phase.py)
    extra: dict[str, Any] = field(default_factory=dict)             # a registered third-party algorithm's own (JSON) figures

    def to_dict(self) -> dict:
        out: dict[str, Any] = dict(self.extra)
        if self.memory_plan is not None:
            out["memory_plan"] = self.memory_plan
        if self.blocks:
            out["blocks"] = {k: asdict(v) for k, v in self.blocks.items()}
        if self.temporal_block is not None:
            tb = self.temporal_block
            out["temporal_block"] = tb if isinstance(tb, str) else asdict(tb)
        if self.sample_weights is not None:
            out["sample_weights"] = self.sample_weights.summary()
        if self.output_correction is not None:
            out["output_correction"] = self.output_correction
        if self.mixed_precision is not None:
            out["mixed_precision"] = self.mixed_precision
        if self.network_phase is not None:
            out["network_phase"] = self.network_phase
        return out

    def write_files(self, folder: str) -> list[str]:
        """Write the algorithm's files into ``folder``; returns their names."""
        return self.sample_weights.write(folder) if self.sample_weights is not None else []
