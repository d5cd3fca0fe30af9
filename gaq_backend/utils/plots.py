"""Small PNG charts drawn with Pillow (no plotting library needed): scatter panels and heatmap panels."""
from __future__ import annotations

import math

import numpy as np


def _canvas(n_panels: int, size: int, cols: int):
    from PIL import Image, ImageDraw

    rows = max(1, math.ceil(n_panels / cols))
    img = Image.new("RGB", (cols * size, rows * size), "white")
    return img, ImageDraw.Draw(img), rows


def scatter_panels(path: str, panels: list[tuple[str, np.ndarray, np.ndarray]], xlabel: str, ylabel: str,
                   size: int = 220, cols: int = 6) -> None:
    """One scatter plot per panel (title, x, y); each panel has its own axis ranges, printed in its corners."""
    img, draw, _ = _canvas(len(panels), size, cols)
    m = 28
    for k, (title, x, y) in enumerate(panels):
        ox, oy = (k % cols) * size, (k // cols) * size
        draw.rectangle([ox + m, oy + m, ox + size - 8, oy + size - m], outline="black")
        draw.text((ox + m, oy + 4), title[:34], fill="black")
        ok = np.isfinite(x) & np.isfinite(y)
        if not ok.any():
            continue
        x, y = x[ok], y[ok]
        x0, x1, y0, y1 = x.min(), x.max(), y.min(), y.max()
        sx, sy = (size - 8 - m) / ((x1 - x0) or 1), (size - 2 * m) / ((y1 - y0) or 1)
        for a, b in zip(x, y):
            px, py = ox + m + (a - x0) * sx, oy + size - m - (b - y0) * sy
            draw.ellipse([px - 1.5, py - 1.5, px + 1.5, py + 1.5], fill=(31, 119, 180))
        draw.text((ox + m, oy + size - m + 2), f"{x0:.2g}", fill="gray")
        draw.text((ox + size - 60, oy + size - m + 2), f"{x1:.2g}", fill="gray")
        draw.text((ox + 2, oy + m), f"{y1:.3g}", fill="gray")
        draw.text((ox + 2, oy + size - m - 12), f"{y0:.3g}", fill="gray")
    draw.text((4, img.height - 12), f"x: {xlabel}   y: {ylabel}", fill="black")
    img.save(path, format="PNG")


def heatmap_panels(path: str, panels: list[tuple[str, np.ndarray]], vmax: float = 1.0, size: int = 160, cols: int = 8) -> None:
    """One heatmap per panel (title, square matrix), white = 0, dark red = vmax, value printed in each cell."""
    img, draw, _ = _canvas(len(panels), size, cols)
    m = 22
    for k, (title, mat) in enumerate(panels):
        ox, oy = (k % cols) * size, (k // cols) * size
        draw.text((ox + 4, oy + 4), title[:26], fill="black")
        n = len(mat)
        if n == 0:
            continue
        cell = (size - m - 6) / n
        for i in range(n):
            for j in range(n):
                v = min(max(float(mat[i][j]) / vmax, 0.0), 1.0)
                col = (255, int(255 * (1 - v)), int(255 * (1 - v)))
                x, y = ox + 4 + j * cell, oy + m + i * cell
                draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=col)
                if cell >= 24:
                    draw.text((x + 2, y + cell / 2 - 5), f"{float(mat[i][j]):.2f}", fill="black")
    img.save(path, format="PNG")
