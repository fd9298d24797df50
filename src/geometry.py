"""Sizes and resolutions of FLAIR #2 (docs/data-format.md, "Geometry"): the only place they are written.

An aerial patch is 512 x 512 pixels at 0.2 m (102.4 m a side); a Sentinel-2 pixel is 10 m, so one S2
pixel spans 50 aerial pixels and a patch covers 10.24 S2 pixels a side. Pure Python: no numpy, no torch.
"""
from __future__ import annotations

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
