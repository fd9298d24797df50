"""Per-patch normalisation statistics from the patch's own Sentinel-2 series (norm=s2_stats).

The 2nd place of FLAIR #2 normalised each aerial patch with the mean and std of its S2 data
(docs/recipes.md, "2nd place"): a temporal mean of the clear dates, cropped to the S2 pixels under the
patch, whose spatial mean and std per band replace the dataset's mean/std. This module computes those
numbers for one patch, in the DataLoader worker, from the memory-mapped super-area (numpy only); the
mapping to grey levels and the normalisation itself are src.normalize's.

Per S2 band b (only B2, B3, B4, B8 are read: the counterparts of B, G, R, NIR):
1. clear dates: t is kept when `(count(snow >= 20) + count(cloud >= 20)) / n < 0.2` over the n in-bounds
   pixels of the `s2_size` window around the centroid (the team's thresholds; the kit's series filter,
   60 / 0.5 by default, is for the model's input and is not used here);
2. composite `c_b(y, x)` = mean over the clear dates of the stored value (reflectance x 10000);
3. over the whole S2 pixels under the patch (`geometry.centred_s2_box`: the centre 10 x 10 of the 40 x 40
   window; pixels outside the super-area left out): `mean_b` = mean of c_b, `std_b` = population std.
No usable S2 (no clear date, box or window outside the super-area) gives None: the caller falls back to
the train mean/std. Cost: the masks of the window (T x 2 x 40 x 40 bytes) and 4 bands of the box on the
clear dates, read from the memmaps (tests/test_s2_norm.py measures it).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from src.geometry import PATCH_SHAPE, S2_WINDOW, centred_s2_box
from src.normalize import S2_BAND_OF, s2_patch_stats
from src.sentinel import cloud_cover, window_in_bounds

CLOUD_PROB_MIN = 20  # snow/cloud probability (0..100) from which a pixel counts as covered (2nd place)
COVER_MAX = 0.2      # a date is clear when less than this share of the window is covered (2nd place)
READ_BANDS = tuple(sorted(set(S2_BAND_OF.values())))  # B2, B3, B4, B8


def clear_dates(masks: np.ndarray, centroid: tuple[int, int], size: int = S2_WINDOW) -> np.ndarray:
    """Indices of the dates whose `size` window around `centroid` is clear enough (see the module
    docstring); ValueError when the window lies entirely outside the super-area."""
    window = window_in_bounds(masks, centroid, size)
    return np.flatnonzero(cloud_cover(window[:, :2], CLOUD_PROB_MIN) < COVER_MAX)


def box_slices(centroid: tuple[int, int], size: int, hw: tuple[int, int]) -> tuple[slice, slice] | None:
    """Rows and columns of the super-area holding the S2 pixels under the patch (the centred box of the
    `size` window, clipped to the super-area); None when nothing of it is inside."""
    top, left, h, w = centred_s2_box((size, size), PATCH_SHAPE)
    r0, c0 = int(centroid[0]) - size // 2 + top, int(centroid[1]) - size // 2 + left
    rows = slice(max(r0, 0), min(r0 + h, hw[0]))
    cols = slice(max(c0, 0), min(c0 + w, hw[1]))
    if rows.stop <= rows.start or cols.stop <= cols.start:
        return None
    return rows, cols


def s2_box_stats(data: np.ndarray, masks: np.ndarray, centroid: tuple[int, int], size: int = S2_WINDOW,
                 bands: Sequence[int] = READ_BANDS) -> tuple[np.ndarray, np.ndarray] | None:
    """(mean, std), each (C_s2,) float64 in stored units (NaN for bands not in `bands`), of the clear-date
    composite over the S2 pixels under the patch; None when the patch has no usable S2.

    `data` (T, 10, H, W) and `masks` (T, 2, H, W) may be memmaps: only the window's masks and the box of
    `bands` on the clear dates are read."""
    try:
        keep = clear_dates(masks, centroid, size)
    except ValueError:  # the window lies outside the super-area
        return None
    box = box_slices(centroid, size, data.shape[-2:])
    if keep.size == 0 or box is None:
        return None
    idx = np.asarray(bands, dtype=np.int64)
    values = np.asarray(data[keep[:, None], idx[None, :], box[0], box[1]], dtype=np.float64)
    composite = values.mean(axis=0)  # (len(bands), h, w)
    mean = np.full(data.shape[1], np.nan)
    std = np.full(data.shape[1], np.nan)
    mean[idx] = composite.mean(axis=(1, 2))
    std[idx] = composite.std(axis=(1, 2))
    return mean, std


def patch_norm_stats(aerial_bands: Sequence[str], data: np.ndarray | None, masks: np.ndarray | None,
                     centroid: tuple[int, int] | None, size: int = S2_WINDOW) -> tuple[np.ndarray, bool]:
    """(norm_stats (C, 2) float32 grey levels for `aerial_bands`, whether S2 was used): the sample key
    of norm=s2_stats. No S2 (`data` None), no centroid or no usable S2 -> the train mean/std (False)."""
    found = None
    if data is not None and masks is not None and centroid is not None:
        found = s2_box_stats(data, masks, centroid, size)
    mean, std = found if found is not None else (None, None)
    return s2_patch_stats(list(aerial_bands), mean, std), found is not None
