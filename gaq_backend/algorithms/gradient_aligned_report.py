"""Files ``gradient_aligned`` writes beside the quantized model: the learned weights and the paper's two figures."""
from __future__ import annotations

import numpy as np
import torch

from ..utils.plots import heatmap_panels, scatter_panels


def write_weights(learner, path: str) -> None:
    """``{unit: {"factors": N*w, "alignment": ..., "t": ..., "group": ...}}`` over the training samples."""
    mask = learner.train_mask
    out = {name: {"factors": r.factors, "alignment": r.alignment, "t": learner.t[mask], "group": learner.group[mask]}
           for name, r in learner.units.items() if r.factors is not None}
    torch.save(out, path)


def write_plots(learner, path: str, kind: str) -> None:
    learned = [(name, r) for name, r in learner.units.items() if r.factors is not None]
    if kind == "alignment":  # Figure 2: a sample's weight rises with its gradient's alignment to the groups'
        panels = [(f"{name} r={r.stats.get('corr_weight_alignment', float('nan')):.2f}",
                   r.alignment.numpy().astype(np.float64), r.factors.numpy().astype(np.float64)) for name, r in learned]
        scatter_panels(path, panels, "grad l_i . G_g / |G_g|, mean over groups and over the outer steps that drew i",
                       "learned factor N * w_i")
    else:  # Figure 1a: pairwise cosine distance of per-group gradients, uniform weights (left) vs learned (right)
        panels = []
        for name, r in learned:
            if "cos_dist_matrix_before" in r.stats:
                panels += [(f"{name[-18:]} before", r.stats["cos_dist_matrix_before"]),
                           (f"{name[-18:]} after", r.stats["cos_dist_matrix_after"])]
        heatmap_panels(path, panels, vmax=1.0)
