"""What a model is fed: per-band normalisation of the aerial image, and the per-patch Sentinel-2 statistics
of norm=s2_stats.

Per-band input normalisation of the aerial image: the one definition of what a model is fed.

`norm=mean_std` subtracts the train mean and divides by the train std of each band (0..255 scale);
`norm=scale` divides by 255 (the official baseline); `norm=s2_stats` (the 2nd place's "Sentinel-2
normalisation", docs/recipes.md) standardises each patch with statistics of its own Sentinel-2 series:
R, G, B, NIR use the mean and spatial std of the matching S2 band (B4, B3, B2, B8) under the patch,
brought to the aerial grey-level scale by `S2_TO_DN` (reflectance x 10000 of 2000 = grey level 255, the
team's scaling); E, and every band of a patch without usable S2, keep the train mean/std. Those per-patch
numbers are computed in the DataLoader worker (src.data.normalize, sample key "norm_stats") and applied here.
Applied to raw band values (uint8, or float grey levels after the device-side augmentation), on the
device, to whole batches (src.data.device_augment).

Per-patch normalisation statistics from the patch's own Sentinel-2 series (norm=s2_stats).

The 2nd place of FLAIR #2 normalised each aerial patch with the mean and std of its S2 data
(docs/recipes.md, "2nd place"): a temporal mean of the clear dates, cropped to the S2 pixels under the
patch, whose spatial mean and std per band replace the dataset's mean/std. This module computes those
numbers for one patch, in the DataLoader worker, from the memory-mapped super-area (numpy only); the
mapping to grey levels and the normalisation itself are src.data.normalize's.

Per S2 band b (only B2, B3, B4, B8 are read: the counterparts of B, G, R, NIR):
1. clear dates: t is kept when `(count(snow >= 20) + count(cloud >= 20)) / n < 0.2` over the n in-bounds
   pixels of the `s2_size` window around the centroid (the team's thresholds; the kit's series filter,
   60 / 0.5 by default, is for the model's input and is not used here);
2. composite `c_b(y, x)` = mean over the clear dates of the stored value (reflectance x 10000);
3. over the whole S2 pixels under the patch (`geometry.centred_s2_box`: the centre 10 x 10 of the 40 x 40
   window; pixels outside the super-area left out): `mean_b` = mean of c_b, `std_b` = population std.
No usable S2 (no clear date, box or window outside the super-area) gives None: the caller falls back to
the train mean/std. Cost: the masks of the window (T x 2 x 40 x 40 bytes) and 4 bands of the box on the
clear dates, read from the memmaps (tests/test_s2_norm.py measures it); with use_s2 nothing more than the
series' own read of the window (`series_and_stats`). Which S2 pixels make the window is src.data.sentinel's
(`window_spans`); the box is placed in it."""
from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch

from src.core.flair import (
    BAND_MEAN,
    BAND_NAMES,
    BAND_STD,
    PATCH_SHAPE,
    S2_WINDOW,
    band_indices,
    centred_s2_box,
)
from src.core.settings import NORMS, Settings
from src.data.sentinel import (
    BASELINE,
    SeriesOptions,
    Span,
    cloud_cover,
    plan_series,
    series_of_crop,
    window_spans,
)

# Aerial band -> index of the matching Sentinel-2 band (order B2 B3 B4 B5 B6 B7 B8 B8A B11 B12). E has none.
S2_BAND_OF = {"R": 2, "G": 1, "B": 0, "NIR": 6}
# Stored S2 value (reflectance x 10000) -> aerial grey level: 2000 (reflectance 0.2) -> 255, as the 2nd
# place's code compares image/255 with reflectance/2000.
S2_TO_DN = 255.0 / 2000.0
# Smallest per-patch std (grey levels) norm=s2_stats divides by: an S2 box of uniform values (std 0)
# would otherwise divide by zero. 1 grey level = 8 reflectance units, below the S2 L2A noise.
S2_STD_MIN = 1.0


def norm_stats(bands: Sequence[str], norm: str) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) float32 per band of `bands`, on the 0..255 scale, for a `norm` setting. For s2_stats
    these are the fallback numbers (train mean/std): the per-patch ones travel with each sample."""
    idx = band_indices(bands)
    if norm in ("mean_std", "s2_stats"):
        return BAND_MEAN[idx].copy(), BAND_STD[idx].copy()
    if norm == "scale":
        return np.zeros(len(idx), np.float32), np.full(len(idx), 255.0, np.float32)
    raise ValueError(f"norm {norm!r}: expected one of {', '.join(NORMS)}")


def s2_patch_stats(bands: list[str] | tuple[str, ...], s2_mean: np.ndarray | None,
                   s2_std: np.ndarray | None) -> np.ndarray:
    """(C, 2) float32 (mean, std) in grey levels for `bands` from one patch's S2 statistics.

    `s2_mean`, `s2_std`: (10,) per S2 band, in stored units (reflectance x 10000), NaN where unknown, or
    None when the patch has no usable S2. A band with an S2 counterpart and finite numbers gets
    (S2_TO_DN * mean, max(S2_TO_DN * std, S2_STD_MIN)); E and the others get the train mean/std."""
    idx = band_indices(bands)
    out = np.stack([BAND_MEAN[idx], BAND_STD[idx]], axis=1).astype(np.float32)
    if s2_mean is None or s2_std is None:
        return out
    for c, i in enumerate(idx):
        s2 = S2_BAND_OF.get(BAND_NAMES[i])
        if s2 is not None and np.isfinite(s2_mean[s2]) and np.isfinite(s2_std[s2]):
            out[c] = (S2_TO_DN * s2_mean[s2], max(S2_TO_DN * float(s2_std[s2]), S2_STD_MIN))
    return out


@functools.lru_cache(maxsize=32)
def _stats_on(bands: tuple[str, ...], norm: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) as (1, C, 1, 1) float32 on `device`, copied there once: a copy per batch would make
    the host wait for the device."""
    mean, std = norm_stats(bands, norm)
    return (torch.as_tensor(mean, device=device).view(1, -1, 1, 1),
            torch.as_tensor(std, device=device).view(1, -1, 1, 1))


def normalize(image: torch.Tensor, cfg: Settings, dtype: torch.dtype = torch.float32,
              stats: torch.Tensor | None = None) -> torch.Tensor:
    """(B, C, H, W) raw band values (uint8 or float, 0..255) of cfg's bands -> normalised `dtype`
    ((x - mean) / std computed in float32, then cast).

    With norm=s2_stats, `stats` (B, C, 2) holds each sample's (mean, std) ("norm_stats", src.data.normalize);
    without it (no S2 at all: an ONNX export) every sample gets the fallback, the train mean/std."""
    norm = cfg.norm
    if norm == "s2_stats" and stats is not None:
        s = stats.to(image.device, torch.float32)
        if s.shape != (image.shape[0], image.shape[1], 2):
            raise ValueError(f"norm=s2_stats: norm_stats of shape {tuple(s.shape)} for an image batch of "
                             f"shape {tuple(image.shape)} (expected (B, C, 2))")
        return ((image.float() - s[..., 0, None, None]) / s[..., 1, None, None]).to(dtype)
    bands = tuple(str(b) for b in cfg.bands)
    m, s = _stats_on(bands, norm, image.device)
    return ((image.float() - m) / s).to(dtype)


CLOUD_PROB_MIN = 20  # snow/cloud probability (0..100) from which a pixel counts as covered (2nd place)
COVER_MAX = 0.2      # a date is clear when less than this share of the window is covered (2nd place)
READ_BANDS = tuple(sorted(set(S2_BAND_OF.values())))  # B2, B3, B4, B8
Stats = tuple[np.ndarray, np.ndarray]  # (mean, std), each (C_s2,) float64 in stored units


def clear_dates(window_masks: np.ndarray) -> np.ndarray:
    """Indices of the dates whose window (its in-bounds part, (T, 2, h, w)) is clear enough (see the
    module docstring)."""
    return np.flatnonzero(cloud_cover(window_masks[:, :2], CLOUD_PROB_MIN) < COVER_MAX)


def box_in_window(spans: tuple[Span, Span], size: int) -> tuple[slice, slice] | None:
    """Rows and columns, within the in-bounds part of the `size` window (`sentinel.window_spans`), of the
    S2 pixels under the patch (its centred box); None when none of them is inside the super-area."""
    top, left, h, w = centred_s2_box((size, size), PATCH_SHAPE)
    out = []
    for (_, _, d0, d1), start, n in zip(spans, (top, left), (h, w)):
        lo, hi = max(start, d0), min(start + n, d1)
        if hi <= lo:
            return None
        out.append(slice(lo - d0, hi - d0))
    return out[0], out[1]


def window_stats(window: np.ndarray, clear: np.ndarray, spans: tuple[Span, Span], size: int,
                 bands: Sequence[int] = READ_BANDS) -> Stats | None:
    """(mean, std) of the composite of `window` (T', C_s2, h, w: the in-bounds window, a memmap view or
    read already) on its dates `clear`, over the S2 pixels under the patch, NaN for bands not in `bands`;
    None without a clear date or pixel. Only the box of `bands` on the dates `clear` is read."""
    box = box_in_window(spans, size)
    if clear.size == 0 or box is None:
        return None
    idx = np.asarray(bands, dtype=np.int64)
    values = np.asarray(window[clear[:, None], idx[None, :], box[0], box[1]], dtype=np.float64)
    composite = values.mean(axis=0)  # (len(bands), h, w)
    mean = np.full(window.shape[1], np.nan)
    std = np.full(window.shape[1], np.nan)
    mean[idx] = composite.mean(axis=(1, 2))
    std[idx] = composite.std(axis=(1, 2))
    return mean, std


def s2_box_stats(data: np.ndarray, masks: np.ndarray, centroid: tuple[int, int], size: int = S2_WINDOW,
                 bands: Sequence[int] = READ_BANDS) -> Stats | None:
    """(mean, std), each (C_s2,) float64 in stored units (NaN for bands not in `bands`), of the clear-date
    composite over the S2 pixels under the patch; None when the patch has no usable S2.

    `data` (T, 10, H, W) and `masks` (T, 2, H, W) may be memmaps: only the window's masks and the box of
    `bands` on the clear dates are read."""
    try:
        rows, cols = window_spans(centroid, size, masks.shape[-2:])
    except ValueError:  # the window lies outside the super-area
        return None
    (r0, r1, _, _), (c0, c1, _, _) = rows, cols
    clear = clear_dates(masks[:, :, r0:r1, c0:c1])
    return window_stats(data[:, :, r0:r1, c0:c1], clear, (rows, cols), size, bands)


def series_and_stats(data: np.ndarray, masks: np.ndarray, products: list[str], centroid: tuple[int, int],
                     opts: SeriesOptions = BASELINE) -> tuple[np.ndarray, np.ndarray, Stats | None]:
    """(x, days) of `sentinel.s2_series` and the `s2_box_stats` of one patch (use_s2 with norm=s2_stats),
    from one read of its window: the masks of every date, then the data of the dates either keeps (the
    clear dates are among the series' with the default filter, so nothing more is read). Bit-identical
    to the two calls; the same ValueErrors as s2_series."""
    plan = plan_series(data, masks, products, centroid, opts)
    (r0, r1, _, _), (c0, c1, _, _) = plan.spans
    clear = clear_dates(plan.window_masks)
    need = np.union1d(plan.keep, clear)
    crop = np.asarray(data[need, :, r0:r1, c0:c1])
    x, days = series_of_crop(crop[np.searchsorted(need, plan.keep)], plan, opts)
    return x, days, window_stats(crop, np.searchsorted(need, clear), plan.spans, opts.size)


def norm_stats_of(aerial_bands: Sequence[str], found: Stats | None) -> tuple[np.ndarray, bool]:
    """(norm_stats (C, 2) float32 grey levels for `aerial_bands`, whether S2 was used): the sample key
    of norm=s2_stats from `s2_box_stats`' result; None -> the train mean/std (False)."""
    mean, std = found if found is not None else (None, None)
    return s2_patch_stats(list(aerial_bands), mean, std), found is not None


def patch_norm_stats(aerial_bands: Sequence[str], data: np.ndarray | None, masks: np.ndarray | None,
                     centroid: tuple[int, int] | None, size: int = S2_WINDOW) -> tuple[np.ndarray, bool]:
    """`norm_stats_of` the patch's S2 (use_s2=false). No S2 (`data` None), no centroid or no usable S2 ->
    the train mean/std (False)."""
    found = None
    if data is not None and masks is not None and centroid is not None:
        found = s2_box_stats(data, masks, centroid, size)
    return norm_stats_of(aerial_bands, found)
