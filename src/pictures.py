"""Pieces shared by the kit's pictures (src.show's prediction grid, the EDA notebook's figures): headless
pyplot, display bands of an aerial image, the class legend in the official colours, the PNG resolution.

Why a module: both the `show` CLI and the EDA analysis draw aerial patches and class legends; keeping the
helpers here lets them agree without one importing the other (a CLI is never imported by a module).
"""
from __future__ import annotations

import numpy as np

from src.classes import CLASS_COLORS_HEX, CLASS_NAMES, NUM_CLASSES

DPI = 80  # resolution of the kit's PNG pictures (small files, still readable)


def pyplot():
    """matplotlib.pyplot on the Agg backend (headless: nbclient, CI, servers without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def rgb_of(image: np.ndarray) -> np.ndarray:
    """(C, H, W) uint8 aerial image -> (H, W, 3) uint8 from its first three bands (R, G, B)."""
    return np.ascontiguousarray(np.moveaxis(image[:3], 0, -1)).astype(np.uint8)


def false_colour_of(image: np.ndarray) -> np.ndarray:
    """(C, H, W) aerial image -> (H, W, 3) false colour (NIR, R, G): vegetation shows red."""
    return np.ascontiguousarray(np.moveaxis(image[[3, 0, 1]], 0, -1))


def class_legend(target, classes: list[int] | None = None, edgecolor: str = "0.4", **kwargs) -> None:
    """Legend of classes (all 13 by default) in the official colours on a figure or an axis."""
    from matplotlib.patches import Patch

    classes = list(range(NUM_CLASSES)) if classes is None else classes
    handles = [Patch(facecolor=CLASS_COLORS_HEX[k], edgecolor=edgecolor, label=f"{k} {CLASS_NAMES[k]}")
               for k in classes]
    kwargs.setdefault("fontsize", 8)
    kwargs.setdefault("frameon", False)
    target.legend(handles=handles, **kwargs)
