"""FID / sFID (Frechet distance of Gaussian fits) and k-NN precision / recall (Kynkaanniemi et al. 2019)."""
from __future__ import annotations

import numpy as np
import torch


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features, dtype=np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((S1 S2)^(1/2)) via symmetric eigendecompositions: S1 S2 is similar to S1^(1/2) S2 S1^(1/2), which is
    symmetric PSD, so the trace is the sum of the square roots of its eigenvalues. Same value as scipy's sqrtm
    on the product (as pytorch-fid computes it), about 10x faster at 2048 dimensions."""
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ sigma2 @ root1
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(ev, 0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))."""
    diff = mu1 - mu2
    return float(max(0.0, diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2)))


def _kth_nn_radius(x: torch.Tensor, k: int, batch: int) -> torch.Tensor:
    radii = []
    for xb in x.split(batch):
        d = torch.cdist(xb, x)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # +1: the point itself is at distance 0
    return torch.cat(radii)


def _coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, batch: int) -> float:
    inside = []
    for pb in points.split(batch):
        inside.append((torch.cdist(pb, centres) <= radii.unsqueeze(0)).any(dim=1))
    return float(torch.cat(inside).float().mean())


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3, batch: int = 1000) -> tuple[float, float]:
    """Precision: share of fake samples inside the k-NN balls of the real set; recall: the converse."""
    r = torch.as_tensor(real, dtype=torch.float64)
    f = torch.as_tensor(fake, dtype=torch.float64)
    if len(r) <= k or len(f) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set")
    return (_coverage(f, r, _kth_nn_radius(r, k, batch), batch), _coverage(r, f, _kth_nn_radius(f, k, batch), batch))
