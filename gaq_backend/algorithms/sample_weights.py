"""``gradient_aligned``'s result: the learned weight of every training sample per unit, the summary the
report shows and the files written beside the quantized model (the weights and the paper's two figures)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch

from ..utils.plots import heatmap_panels, scatter_panels

FILES = ("sample_weights.safetensors", "weight_vs_alignment.png", "group_gradient_distance.png")


@dataclass
class UnitWeights:
    factors: torch.Tensor | None      # N * w per training sample (None: nothing to learn, uniform)
    stats: dict                       # JSON figures: entropy, factor range, conflict before/after, seconds
    alignment: torch.Tensor | None = None   # per-sample mean alignment with the unit-norm group gradients (NaN: never drawn)


@dataclass
class SampleWeights:
    t: torch.Tensor                   # every calibration row's timestep and group
    group: torch.Tensor
    train_mask: torch.Tensor | None = None   # the rows the weights are over
    units: dict[str, UnitWeights] = field(default_factory=dict)

    def summary(self) -> dict:
        learned = {k: v.stats for k, v in self.units.items()}
        ent = [s["entropy"] for s in learned.values() if "entropy" in s]
        return dict(units=learned, min_entropy=min(ent) if ent else None,
                    seconds=sum(s.get("seconds", 0.0) for s in learned.values()))

    def learned(self) -> list[tuple[str, UnitWeights]]:
        return [(name, r) for name, r in self.units.items() if r.factors is not None]

    def write(self, folder: str) -> list[str]:
        """``sample_weights.safetensors`` (``factors/<unit>``: N*w, ``alignment/<unit>``, and the rows' ``t`` and
        ``group``, over the training rows; safetensors, not a pickle, so it is safe to load) and the two figures,
        into ``folder``; returns the names written."""
        from safetensors.torch import save_file

        mask = self.train_mask
        tensors = {"t": self.t[mask], "group": self.group[mask]}
        for name, r in self.learned():
            tensors[f"factors/{name}"] = r.factors
            if r.alignment is not None:
                tensors[f"alignment/{name}"] = r.alignment
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, os.path.join(folder, FILES[0]))
        self._plot_alignment(os.path.join(folder, FILES[1]))
        self._plot_distances(os.path.join(folder, FILES[2]))
        return list(FILES)

    def _plot_alignment(self, path: str) -> None:
        """Figure 2: a sample's weight rises with its gradient's alignment to the groups'."""
        panels = [(f"{name} r={r.stats.get('corr_weight_alignment', float('nan')):.2f}",
                   r.alignment.numpy().astype(np.float64), r.factors.numpy().astype(np.float64)) for name, r in self.learned()]
        scatter_panels(path, panels, "grad l_i . G_g / |G_g|, mean over groups and over the outer steps that drew i",
                       "learned factor N * w_i")

    def _plot_distances(self, path: str) -> None:
        """Figure 1a: pairwise cosine distance of per-group gradients, uniform weights (left) vs learned (right)."""
        panels = []
        for name, r in self.learned():
            if "cos_dist_matrix_before" in r.stats:
                panels += [(f"{name[-18:]} before", r.stats["cos_dist_matrix_before"]),
                           (f"{name[-18:]} after", r.stats["cos_dist_matrix_after"])]
        heatmap_panels(path, panels, vmax=1.0)
