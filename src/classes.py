"""FLAIR #2 nomenclature: the only place the 19 classes, the 13-class remap and the colours live."""
from __future__ import annotations

import numpy as np

# (value, name, colour) exactly as on the challenge page; values are the raw MSK_*.tif values.
NOMENCLATURE_19: list[tuple[int, str, str]] = [
    (1, "building", "#db0e9a"),
    (2, "pervious surface", "#938e7b"),
    (3, "impervious surface", "#f80c00"),
    (4, "bare soil", "#a97101"),
    (5, "water", "#1553ae"),
    (6, "coniferous", "#194a26"),
    (7, "deciduous", "#46e483"),
    (8, "brushwood", "#f3a60d"),
    (9, "vineyard", "#660082"),
    (10, "herbaceous vegetation", "#55ff00"),
    (11, "agricultural land", "#fff30d"),
    (12, "plowed land", "#e4df7c"),
    (13, "swimming pool", "#3de6eb"),
    (14, "snow", "#ffffff"),
    (15, "clear cut", "#8ab3a0"),
    (16, "mixed", "#6b714f"),
    (17, "ligneous", "#c5dc42"),
    (18, "greenhouse", "#9999ff"),
    (19, "other", "#000000"),
]

NUM_RAW = 19
NUM_CLASSES = 13  # 0..11 scored, 12 = "other" (raw 13..19 merged)
OTHER = 12
NUM_SCORED = 12  # the official mIoU averages classes 0..11

CLASS_NAMES: list[str] = [name for _, name, _ in NOMENCLATURE_19[:12]] + ["other"]
# "other" has no colour of its own on the page; black (raw 19's colour) is used for display.
CLASS_COLORS_HEX: list[str] = [c for _, _, c in NOMENCLATURE_19[:12]] + ["#000000"]


def hex_to_rgb(colour: str) -> tuple[int, int, int]:
    colour = colour.lstrip("#")
    return int(colour[0:2], 16), int(colour[2:4], 16), int(colour[4:6], 16)


# (13, 3) uint8 palette indexed by the 0..12 class, for pictures of labels and predictions.
PALETTE = np.array([hex_to_rgb(c) for c in CLASS_COLORS_HEX], dtype=np.uint8)
PALETTE_19 = np.array([hex_to_rgb(c) for _, _, c in NOMENCLATURE_19], dtype=np.uint8)

# Lookup table raw value -> 0..12: y = min(v, 13) - 1 (IGN). Index 0 (never a valid raw value)
# maps to 255 so that a stray 0 is visible instead of silently becoming a class.
_REMAP_LUT = np.full(256, 255, dtype=np.uint8)
_REMAP_LUT[1:] = np.minimum(np.arange(1, 256), 13) - 1


def remap(raw: np.ndarray) -> np.ndarray:
    """Raw 1..19 label array -> 0..12 uint8 (challenge classes). Vectorised through a 256-entry LUT.

    Values outside 1..19 are not valid labels: 0 maps to 255, 20..255 map to 12 like the
    official `min(v, 13) - 1`; callers that must reject them use `invalid_label_values`.
    """
    raw = np.asarray(raw)
    if raw.dtype != np.uint8:
        if raw.size and (raw.min() < 0 or raw.max() > 255):
            raise ValueError(f"label values outside 0..255: min {raw.min()}, max {raw.max()}")
        raw = raw.astype(np.uint8)
    return np.take(_REMAP_LUT, raw)


def invalid_label_values(raw: np.ndarray) -> list[int]:
    """Values in a raw label array that are not in 1..19 (empty list when the array is valid)."""
    values = np.unique(np.asarray(raw))
    return [int(v) for v in values if v < 1 or v > NUM_RAW]


def colorize(labels: np.ndarray) -> np.ndarray:
    """0..12 label array (H, W) -> RGB uint8 (H, W, 3) in the official colours."""
    return PALETTE[np.clip(labels, 0, NUM_CLASSES - 1)]
