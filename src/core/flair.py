"""The facts of FLAIR #2, written nowhere else: sizes and resolutions, the 19 classes with their 13-class
remap and colours, the aerial bands with their train statistics.

Sizes and resolutions of FLAIR #2 (docs/data-format.md, "Geometry"): the only place they are written.

An aerial patch is 512 x 512 pixels at 0.2 m (102.4 m a side); a Sentinel-2 pixel is 10 m, so one S2
pixel spans 50 aerial pixels and a patch covers 10.24 S2 pixels a side. Pure Python: no numpy, no torch.

FLAIR #2 nomenclature: the only place the 19 classes, the 13-class remap and the colours live.

The aerial bands of FLAIR #2, their train statistics and the parsing of a `bands` setting (torch-free:
the notebook imports it cheaply)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

AERIAL_GSD_M = 0.2          # aerial pixel size (m)
S2_GSD_M = 10.0             # Sentinel-2 pixel size (m)
AERIAL_PER_S2 = 50          # aerial pixels per S2 pixel side: S2_GSD_M / AERIAL_GSD_M
PATCH_SIZE = 512            # aerial patch side (pixels)
PATCH_SHAPE = (PATCH_SIZE, PATCH_SIZE)
S2_WINDOW = 40              # the baseline's S2 crop around a patch centroid (S2 pixels, 400 m)
N_TEST_PATCHES = 16050      # patches in the official test set (10 domains)


def s2_pixels_under(aerial_pixels: float) -> float:
    """How many S2 pixels a run of `aerial_pixels` aerial pixels spans (10.24 for a 512 px patch)."""
    return aerial_pixels * AERIAL_GSD_M / S2_GSD_M


def centred_s2_box(map_hw: tuple[int, int], aerial_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the whole S2 pixels that lie under an aerial image centred on an S2
    map of `map_hw` pixels: the 10 x 10 centre of a 40 x 40 crop for a 512 x 512 patch (rounded, at
    least 1, at most the map)."""
    h = min(map_hw[0], max(1, round(s2_pixels_under(aerial_hw[0]))))
    w = min(map_hw[1], max(1, round(s2_pixels_under(aerial_hw[1]))))
    return (map_hw[0] - h) // 2, (map_hw[1] - w) // 2, h, w


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


def class_argmax(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(class, top) of scores (C, ...) over their first axis (integers, or floats without NaN): uint8 classes
    with ties to the lower class (as np.argmax) and the largest score. A running maximum over the C planes:
    1.9x faster than np.argmax on (13, 512, 512) uint8 or uint16 (BENCHMARKS.md, "Real scale"), and the
    maximum comes free."""
    top = scores[0].copy()
    cls = np.zeros(top.shape, dtype=np.uint8)
    better = np.empty(top.shape, dtype=bool)
    for c in range(1, len(scores)):
        np.greater(scores[c], top, out=better)
        np.copyto(cls, np.uint8(c), where=better)
        np.maximum(top, scores[c], out=top)
    return cls, top


def colorize(labels: np.ndarray) -> np.ndarray:
    """0..12 label array (H, W) -> RGB uint8 (H, W, 3) in the official colours."""
    return PALETTE[np.clip(labels, 0, NUM_CLASSES - 1)]


BAND_NAMES = ("R", "G", "B", "NIR", "E")  # E = nDSM elevation; the order of the bands in IMG_*.tif
# Train mean/std per band on the 0-255 scale, from participants' code (docs/data-format.md, "Aerial images").
BAND_MEAN = np.array([113.78, 118.08, 109.27, 102.36, 16.70], dtype=np.float32)
BAND_STD = np.array([35.41, 32.06, 30.71, 27.09, 15.85], dtype=np.float32)


def band_indices(bands: Sequence[str]) -> list[int]:
    """Band names (R, G, B, NIR, E; case-insensitive) -> indices into the 5-band aerial image.

    ValueError (naming the setting) for an unknown name, a repeat or an empty list."""
    out = []
    for b in bands:
        name = str(b).upper()
        if name not in BAND_NAMES:
            raise ValueError(f"bands: unknown band {b!r}: expected a subset of {', '.join(BAND_NAMES)}")
        out.append(BAND_NAMES.index(name))
    if not out or len(set(out)) != len(out):
        raise ValueError(f"bands must be a non-empty list without repeats, got {list(bands)}")
    return out
