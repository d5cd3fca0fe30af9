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


COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def line_panels(path: str, panels: list[tuple[str, dict[str, list[tuple[float, float]]]]], xlabel: str,
                size: int = 360, cols: int = 3) -> None:
    """One line chart per panel (title, {series: [(x, y), ...]}); the panels share the series' colours,
    listed in a legend under them. Axes are linear, their ranges printed in the corners."""
    from PIL import Image, ImageDraw

    names = list(dict.fromkeys(name for _, series in panels for name in series))
    img, draw, rows = _canvas(len(panels), size, cols)
    legend = Image.new("RGB", (img.width, 18 * (len(names) + 1)), "white")
    m, ml = 36, 60  # margins: top / bottom / right, left (room for the y range)
    for k, (title, series) in enumerate(panels):
        ox, oy = (k % cols) * size, (k // cols) * size
        draw.rectangle([ox + ml, oy + m, ox + size - 10, oy + size - m], outline="black")
        draw.text((ox + ml, oy + 6), title[:50], fill="black")
        pts = [p for s in series.values() for p in s if all(map(math.isfinite, p))]
        if not pts:
            continue
        x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
        y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
        sx, sy = (size - 10 - ml) / ((x1 - x0) or 1), (size - 2 * m) / ((y1 - y0) or 1)
        for name, s in series.items():
            col = COLORS[names.index(name) % len(COLORS)]
            xy = [(ox + ml + (a - x0) * sx, oy + size - m - (b - y0) * sy) for a, b in sorted(s) if math.isfinite(a) and math.isfinite(b)]
            if len(xy) > 1:
                draw.line(xy, fill=col, width=2)
            for px, py in xy:
                draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=col)
        draw.text((ox + ml, oy + size - m + 4), f"{x0:.3g}", fill="gray")
        draw.text((ox + size - 70, oy + size - m + 4), f"{x1:.3g}", fill="gray")
        draw.text((ox + 2, oy + m), f"{y1:.3g}", fill="gray")
        draw.text((ox + 2, oy + size - m - 12), f"{y0:.3g}", fill="gray")
    ld = ImageDraw.Draw(legend)
    for i, name in enumerate(names):
        ld.rectangle([8, 4 + 18 * i, 22, 16 + 18 * i], fill=COLORS[i % len(COLORS)])
        ld.text((30, 4 + 18 * i), name, fill="black")
    ld.text((8, 4 + 18 * len(names)), f"x: {xlabel}", fill="black")
    out = Image.new("RGB", (img.width, img.height + legend.height), "white")
    out.paste(img, (0, 0))
    out.paste(legend, (0, img.height))
    out.save(path, format="PNG")
