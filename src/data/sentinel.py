"""Sentinel-2 time series for one aerial patch: crop, cloud/snow filter, monthly composites, date encoding.

Pure numpy (no torch), so the exact baseline procedure (docs/data-format.md, "S2 matching and the cloud
filter") can be tested against a slow reimplementation and reused by any caller. With the defaults,
`s2_series` reproduces the official FLAIR #2 baseline for series inside one calendar year; where the
baseline crashes or silently misbehaves, the kit does something defined instead (listed in
`s2_series`' docstring).

CLI (inspection): `python -m src.data.sentinel --data X_data.npy --masks X_masks.npy --products X_products.txt
--centroid ROW COL [--size 40] [--no-filter] [--no-monthly]` prints the kept dates and their encoding."""
from __future__ import annotations

import argparse
import datetime as dt
import functools
import os
from collections import Counter, OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np

from src.core.errors import DataError, machine_limit
from src.core.settings import Settings
from src.core.workers import open_files_limit

# Reference day of the baseline date encoding: days are counted before 15 May.
REF_MONTH, REF_DAY = 5, 15
# Fallback when no date passes the cloud/snow filter: keep every date whose cover is within this
# tolerance of the least covered date (so at least one date, usually a handful, survive).
FALLBACK_TOL = 0.1
# Day-of-year in a 365-day calendar (the baseline forces every date into the year 2021).
_DOY365 = np.cumsum([0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30])


@functools.lru_cache(maxsize=1 << 17)
def product_date(name: str) -> dt.date:
    """Acquisition date of an L2A product name, e.g. `S2A_MSIL2A_20210415T105021_...` -> 2021-04-15.

    The date is characters 11..18 of the name (docs/data-format.md, "Sentinel-2 super-areas").
    """
    stem = os.path.basename(str(name).strip())
    digits = stem[11:19]
    try:
        if len(digits) != 8 or not digits.isdigit():
            raise ValueError
        return dt.date(int(digits[:4]), int(digits[4:6]), int(digits[6:8]))
    except ValueError:
        raise ValueError(f"S2 product name {name!r}: no YYYYMMDD date at characters 11..18") from None


def read_products(path: str | os.PathLike) -> list[str]:
    """Product names of a `_products.txt`, one per line in time-axis order (blank lines ignored)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise machine_limit(err, path) or DataError(f"{path}: unreadable products list ({err})") from None
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise DataError(f"{path}: empty products list")
    return names


def open_zone(data_path: str | os.PathLike, masks_path: str | os.PathLike, products_path: str | os.PathLike
              ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(data, masks, products) of one S2 super-area: the two arrays memory-mapped (only the windows that
    are used get read), the triple checked for agreement. Errors name the file at fault.

    The arrays are plain ndarray views of the np.memmap objects (which they keep alive): slicing a memmap
    runs numpy's Python-level memmap.__getitem__, ~2.5 us each, 0.05 ms of a patch's series."""
    arrays = []
    for p in (data_path, masks_path):
        try:
            arrays.append(np.load(p, mmap_mode="r").view(np.ndarray))
        except FileNotFoundError:
            raise DataError(f"{p}: file not found") from None
        except (OSError, ValueError, MemoryError) as err:
            raise machine_limit(err, p) or DataError(f"{p}: unreadable .npy ({err})") from None
    data, masks = arrays
    products = read_products(products_path)
    if data.ndim != 4 or masks.ndim != 4 or masks.shape[0] != data.shape[0] \
            or masks.shape[2:] != data.shape[2:] or len(products) != data.shape[0]:
        raise DataError(f"{data_path}: S2 triple does not match: data {data.shape}, "
                        f"masks {masks.shape}, {len(products)} products in {products_path}")
    return data, masks, products


# Descriptors a process keeps free for everything but S2 zones: the DataLoader's pipes, batches passed
# between processes (one descriptor per tensor in flight), TIFF reads, libraries. Never fewer zones open
# than MIN_OPEN_ZONES.
FD_RESERVE, MIN_OPEN_ZONES = 256, 8


def zone_budget() -> int:
    """How many S2 zones this process may keep open (memory-mapped): each holds two descriptors. A worker
    that kept every zone it visited would hold ~1,450 for the 727 training zones of FLAIR #2, past the
    common `ulimit -n` of 1024; within the (raised) limit minus FD_RESERVE, every zone stays open where the
    limit allows it, and the least recently used ones are closed where it does not."""
    return max(MIN_OPEN_ZONES, (open_files_limit() - FD_RESERVE) // 2)


class ZoneCache:
    """The S2 super-areas one process reads (`open_zone`), at most `size` open at once (`zone_budget()`):
    opening one more closes the least recently used (its descriptors and mapping go with its last
    reference).

    Why not close every zone at once: a reopened zone costs its headers and, above all, the page faults of
    a fresh mapping (4.6 ms instead of 2.3 ms for a real-size series, BENCHMARKS.md, "Real scale").
    Validation and prediction read rows zone after zone and hit; shuffled training rows hit as often as
    the budget covers the zones."""

    def __init__(self, size: int):
        self.size = size
        self._open: OrderedDict[int, tuple[np.ndarray, np.ndarray, list[str]]] = OrderedDict()

    def get(self, key: int, paths: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(data, masks, products) of the zone `key` whose files are `paths` (data, masks, products)."""
        zone = self._open.get(key)
        if zone is not None:
            self._open.move_to_end(key)
            return zone
        zone = open_zone(*paths)
        self._open[key] = zone
        if len(self._open) > self.size:
            self._open.popitem(last=False)
        return zone

    def __len__(self) -> int:
        return len(self._open)


def encode_days(dates: list[dt.date], ref_year: int) -> np.ndarray:
    """Days before 15 May of `ref_year` in a 365-day calendar, int64.

    For dates of `ref_year` this is exactly the baseline's `(2021-05-15 - 2021-MM-DD).days` (the
    baseline forces every year to 2021, so leap days never count; 29 February is treated as the
    28th, where the baseline crashes). Each year after `ref_year` subtracts 365 days, each year
    before adds 365, so a series across New Year stays monotonic.
    """
    ref = _DOY365[REF_MONTH - 1] + REF_DAY
    out = np.empty(len(dates), dtype=np.int64)
    for i, d in enumerate(dates):
        day = min(d.day, 28) if d.month == 2 else d.day
        out[i] = ref - (_DOY365[d.month - 1] + day) + 365 * (ref_year - d.year)
    return out


def reference_year(dates: list[dt.date]) -> int:
    """Year holding most acquisitions (the earliest such year on a tie): the year of the series."""
    counts = Counter(d.year for d in dates)
    best = max(counts.values())
    return min(y for y, n in counts.items() if n == best)


Span = tuple[int, int, int, int]  # (src_start, src_stop, dst_start, dst_stop) along one axis


def window_span(centre: int, size: int, extent: int) -> Span:
    """(src_start, src_stop, dst_start, dst_stop) of a `size` window starting at centre - size//2, clipped
    to [0, extent): which S2 pixels lie around a patch (src.data.normalize takes the box under it from
    here)."""
    start = int(centre) - size // 2
    lo, hi = max(start, 0), min(start + size, extent)
    if hi <= lo:
        return 0, 0, 0, 0
    return lo, hi, lo - start, hi - start


def window_spans(centroid: tuple[int, int], size: int, hw: tuple[int, ...]) -> tuple[Span, Span]:
    """`window_span` of the rows and of the columns of a super-area of `hw` (H, W); ValueError when the
    window lies entirely outside it."""
    rows, cols = window_span(centroid[0], size, hw[0]), window_span(centroid[1], size, hw[1])
    if rows[1] == rows[0] or cols[1] == cols[0]:
        raise ValueError(f"S2 window of size {size} at centroid {tuple(centroid)} lies outside the "
                         f"super-area ({hw[0]}x{hw[1]})")
    return rows, cols


def window_in_bounds(masks: np.ndarray, centroid: tuple[int, int], size: int = 40) -> np.ndarray:
    """The in-bounds part of the `size` window around `centroid` of a (T, C, H, W) array (what the cloud
    filter looks at; a view: nothing is read); ValueError when the window lies entirely outside the
    super-area."""
    rows, cols = window_spans(centroid, size, masks.shape[-2:])
    return masks[..., rows[0]:rows[1], cols[0]:cols[1]]


@dataclass(frozen=True)
class SeriesOptions:
    """How a patch's series is made: the settings s2_size, s2_filter_clouds, s2_cover_max, s2_prob_min,
    s2_monthly and s2_cloud_pixels (src.core.settings; `BASELINE` holds their defaults, the official
    processing)."""

    size: int
    filter_clouds: bool
    cover_max: float
    prob_min: int
    monthly: bool
    fill_clouds: bool = False  # s2_cloud_pixels=fill

    @classmethod
    def of(cls, cfg: Settings) -> SeriesOptions:
        return cls(cfg.s2_size, cfg.s2_filter_clouds, cfg.s2_cover_max, cfg.s2_prob_min, cfg.s2_monthly,
                   cfg.s2_cloud_pixels == "fill")


BASELINE = SeriesOptions.of(Settings())


def cloud_cover(window_masks: np.ndarray, prob_min: int) -> np.ndarray:
    """Per-date cover of a (T, 2, h, w) snow/cloud window: (count(snow >= p) + count(cloud >= p)) / (h*w).

    float64 (T,), as the baseline computes it; `h*w` are the valid (in-bounds) pixels of the window. The
    counts are int32 sums of the comparison's bytes: numpy's count_nonzero along axes was 1.5-3x slower.
    """
    m = np.asarray(window_masks)
    counts = np.add.reduce((m[:, :2] >= prob_min).view(np.uint8), axis=(1, 2, 3), dtype=np.int32)
    return counts / float(m.shape[2] * m.shape[3])


def select_dates(dates: list[dt.date], cover: np.ndarray | None, cover_max: float) -> np.ndarray:
    """Indices of the dates kept, ordered by true date (stable).

    `cover` None keeps every date; otherwise dates with `cover < cover_max`, or, when none passes,
    every date within FALLBACK_TOL of the least covered one.
    """
    order = np.argsort(np.array([d.toordinal() for d in dates]), kind="stable")
    if cover is None:
        return order
    cover = np.asarray(cover)
    keep = order[cover[order] < cover_max]
    if keep.size == 0:
        keep = order[cover[order] <= cover.min() + FALLBACK_TOL]
    return keep


def s2_series(data: np.ndarray, masks: np.ndarray, products: list[str], centroid: tuple[int, int],
              opts: SeriesOptions = BASELINE) -> tuple[np.ndarray, np.ndarray]:
    """S2 series of one patch: `x` float32 (T',10,size,size) in stored reflectance units, `days` int64 (T',).

    `data` (T,10,H,W) and `masks` (T,2,H,W, channel 0 snow, 1 cloud, 0..100) may be memmaps: only the
    window (and only the kept dates of `data`) is read. `products` are the T product names in the
    time-axis order of the arrays, `centroid` the (row, col) of the patch centre in the super-area.

    Baseline procedure (docs/data-format.md, "S2 matching and the cloud filter"), reproduced exactly for
    a window inside the super-area and a series inside one calendar year:
    1. window `[r - size/2 : r + size/2, c - size/2 : c + size/2]`;
    2. when `filter_clouds`, keep date t if `(count(snow >= prob_min) + count(cloud >= prob_min)) /
       (size*size) < cover_max` (a pixel both snowy and cloudy counts twice, as in the baseline);
    3. days = `(2021-05-15 - 2021-MM-DD).days`, positive before 15 May (year forced to 2021);
    4. when `monthly`, average the kept dates of each calendar month present (months without a kept
       date are skipped; mean of the integer reflectances, computed in float32 -- exact sums, one
       rounding, equal to the baseline's float64 mean cast to float32), dated the 15th of the month.
    No scaling: the dataset divides by 10000.

    Differences from the baseline (which crashes or silently misbehaves in these cases):
    - Window leaving the super-area: the missing pixels are NaN in `x` (the dataset turns them into
      0 plus a validity mask). The cover of step 2 is computed over the valid pixels only
      (cloudy count / number of valid pixels), so pads count neither as cloud nor as clear. A window
      entirely outside the super-area raises ValueError.
    - No date passes the filter: keep every date whose cover is within FALLBACK_TOL (0.1) of the
      least covered one (at least one date; the baseline crashes on an empty series).
    - Dates are ordered by true acquisition date (stable; the official products lists are already
      in time order, so nothing changes there) and a monthly composite is per (year, month).
    - Date encoding uses the real year relative to 15 May of the series' reference year (the year
      holding most acquisitions) in a 365-day calendar (`encode_days`): identical to the baseline for
      single-year series of any year, leap years included, and monotonic across New Year, where the
      baseline's forced 2021 would fold December before January.
    """
    plan = plan_series(data, masks, products, centroid, opts)
    crop = KeptWindows(data, plan.keep, plan.spans)  # only the kept dates of the window are read
    return series_of_crop(crop, plan, opts)


class KeptWindows:
    """The window of each kept date of a (memory-mapped) super-area, read when used: `self[j]` is
    `data[keep[j], :, rows, cols]`, np.asarray(self) all of them. The monthly composites add each date
    straight from the memmap into its month (`monthly_means`), never writing and re-reading a crop of
    every kept date (~0.06 ms of 0.55 per patch in a DataLoader worker, bench/loader_bench.py)."""

    def __init__(self, data: np.ndarray, keep: np.ndarray, spans: tuple[Span, Span]):
        (r0, r1, _, _), (c0, c1, _, _) = spans
        self.data, self.keep, self.rows, self.cols = data, keep, slice(r0, r1), slice(c0, c1)

    def __getitem__(self, j: int) -> np.ndarray:
        return self.data[self.keep[j], :, self.rows, self.cols]

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        return np.asarray(self.data[self.keep, :, self.rows, self.cols], dtype=dtype)


class SeriesPlan(NamedTuple):
    """What `s2_series` decides before reading any data: the window, the dates and the ones it keeps."""
    spans: tuple[Span, Span]   # the window's rows and columns (`window_spans`)
    window_masks: np.ndarray   # (T, 2+, h, w) masks in the window (read with the cloud filter, else a view)
    dates: list[dt.date]       # every date of the super-area
    keep: np.ndarray           # indices of the dates kept (step 2), in date order


def plan_series(data: np.ndarray, masks: np.ndarray, products: list[str], centroid: tuple[int, int],
                opts: SeriesOptions) -> SeriesPlan:
    """Steps 1-2 of `s2_series` (its checks, window and date selection; the same ValueErrors), shared with
    src.data.normalize.series_and_stats, which reads the same window once for the series and its
    statistics."""
    check_series_args(data, masks, products, opts.size)
    spans = window_spans(centroid, opts.size, data.shape[-2:])  # raises when entirely outside
    (r0, r1, _, _), (c0, c1, _, _) = spans
    window_masks = masks[:, :, r0:r1, c0:c1]
    if opts.filter_clouds or opts.fill_clouds:  # read the window's masks once, for the caller too
        window_masks = np.asarray(window_masks)
    dates = [product_date(p) for p in products]
    return SeriesPlan(spans, window_masks, dates, series_dates(dates, window_masks, opts))


def check_series_args(data: np.ndarray, masks: np.ndarray, products: list[str], size: int) -> None:
    """ValueError unless (data, masks, products, size) can make a series (shapes, counts, size > 0)."""
    if data.ndim != 4 or masks.ndim != 4:
        raise ValueError(f"S2 data must be (T,C,H,W) and masks (T,2,H,W); got {data.shape} and {masks.shape}")
    n_dates = data.shape[0]
    if masks.shape[0] != n_dates or masks.shape[1] < 2 or masks.shape[2:] != data.shape[2:]:
        raise ValueError(f"S2 masks shape {masks.shape} does not match data shape {data.shape}")
    if len(products) != n_dates:
        raise ValueError(f"{len(products)} product names for {n_dates} S2 dates")
    if n_dates == 0:
        raise ValueError("empty S2 series (0 dates)")
    if size <= 0:
        raise ValueError(f"S2 crop size must be positive, got {size}")


def series_dates(dates: list[dt.date], window_masks: np.ndarray, opts: SeriesOptions) -> np.ndarray:
    """Indices of the dates `s2_series` keeps (step 2), in date order, from the (T, 2, h, w) masks of the
    window."""
    cover = cloud_cover(window_masks[:, :2], opts.prob_min) if opts.filter_clouds else None
    return select_dates(dates, cover, opts.cover_max)


def series_of_crop(crop: np.ndarray | KeptWindows, plan: SeriesPlan, opts: SeriesOptions
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Steps 3-4 of `s2_series` and its NaN pads, from `crop`: the in-bounds window (`plan.spans`) of the
    data on the dates `plan.keep`, in that order (an array, or `KeptWindows` that read it when used)."""
    (_, _, dr0, dr1), (_, _, dc0, dc1) = plan.spans
    kept_dates = [plan.dates[i] for i in plan.keep]
    size = opts.size
    clear = clear_pixels(plan.window_masks[plan.keep], opts.prob_min) if opts.fill_clouds else None
    if opts.monthly:
        month_key = np.array([d.year * 12 + d.month - 1 for d in kept_dates])
        values, starts, clear = monthly_means(crop, month_key, clear)
        out_dates = [dt.date(int(k) // 12, int(k) % 12 + 1, 15) for k in month_key[starts]]
    else:
        values = np.asarray(crop).astype(np.float32, copy=clear is not None)  # filled in place below
        out_dates = kept_dates
    if clear is not None:
        fill_cloudy(values, clear, np.array([d.toordinal() for d in out_dates], dtype=np.float64))

    if (dr0, dr1, dc0, dc1) == (0, size, 0, size):
        x = np.ascontiguousarray(values, dtype=np.float32)
    else:
        x = np.full((values.shape[0], values.shape[1], size, size), np.nan, dtype=np.float32)
        x[:, :, dr0:dr1, dc0:dc1] = values
    return x, encode_days(out_dates, reference_year(plan.dates))


def clear_pixels(window_masks: np.ndarray, prob_min: int) -> np.ndarray:
    """(T, h, w) bool: the pixels of each date that are neither snowy nor cloudy (both probabilities below
    `prob_min`, the threshold the cloud filter counts with)."""
    m = np.asarray(window_masks)
    return (m[:, 0] < prob_min) & (m[:, 1] < prob_min)


def fill_cloudy(values: np.ndarray, clear: np.ndarray, days: np.ndarray) -> None:
    """Replace, in place, each pixel's values (T, C, h, w) on the steps where it is not `clear` (T, h, w) by
    the linear interpolation in time (`days`, increasing) of its clear steps before and after; before the
    first or after the last clear step, the nearest clear value. A pixel clear on no step keeps its values
    (the documented fallback: nothing better to fill with).

    Why (s2_cloud_pixels=fill, BENCHMARKS.md "Short events"): a kept date still holds the cloudy pixels of
    a window under the filter's cover limit; their NDVI falls to about 0 and fakes a harvest drop or a dip,
    which hides the short events that tell agricultural land and plowed land apart. Only the entries to fill
    are computed (a few percent of a window's)."""
    n = clear.shape[0]
    flat = clear.reshape(n, -1)
    t = np.arange(n)[:, None]
    prev = np.maximum.accumulate(np.where(flat, t, -1), axis=0)
    nxt = np.minimum.accumulate(np.where(flat, t, n)[::-1], axis=0)[::-1]
    steps, pixels = np.nonzero(~flat & (prev[-1] >= 0))  # cloudy entries of pixels clear at least once
    if not steps.size:
        return
    lo, hi = prev[steps, pixels], nxt[steps, pixels]
    lo = np.where(lo < 0, hi, lo)  # before the first clear step: the first
    hi = np.where(hi >= n, lo, hi)  # after the last: the last
    span = days[hi] - days[lo]
    w = np.divide(days[steps] - days[lo], span, out=np.zeros(span.shape), where=span > 0).astype(np.float32)
    if not values.flags.c_contiguous:  # the reshape below must be a view to write in place
        raise ValueError("fill_cloudy: values must be C-contiguous")
    v = values.reshape(n, values.shape[1], -1)
    a, b = v[lo, :, pixels], v[hi, :, pixels]  # (K, C)
    v[steps, :, pixels] = a + (b - a) * w[:, None]


def monthly_means(crop: np.ndarray | KeptWindows, month_key: np.ndarray, clear: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(float32 means (M, ...), index of each group's first date, which pixels of each month had a clear
    date or None) of the runs of equal `month_key` along the first axis of `crop` (step 4 of `s2_series`).
    With `clear` (T, h, w), a month's mean is over its clear dates of each pixel (all of them where none
    is: `fill_cloudy` replaces those).

    One pass: each date is cast to float32 while it is added to its month's accumulator, which is written
    once and divided while still in cache (2.6x faster than casting the whole crop, then summing and
    dividing). The arithmetic is unchanged: float32 sums, in date order, of the dates cast to float32 (exact
    for integers below 2**24), then one float32 division by the count, so the result is bit-identical to
    the baseline's float64 mean cast to float32."""
    bounds = (np.flatnonzero(month_key[1:] != month_key[:-1]) + 1).tolist()
    starts, ends = np.array([0, *bounds]), [*bounds, month_key.size]
    out = np.empty((starts.size, *crop[0].shape), dtype=np.float32)
    found = []
    for acc, a, b in zip(out, starts, ends):
        if clear is not None and not clear[a:b].all():
            found.append(clear_mean(acc, crop, a, b, clear[a:b]))
            continue
        acc[...] = crop[a]  # every pixel clear (the usual case) or no `clear`: the plain mean
        for t in range(a + 1, b):
            np.add(acc, crop[t], out=acc, dtype=np.float32)
        if b - a > 1:
            acc /= np.float32(b - a)
        if clear is not None:
            found.append(clear[a])
    return out, starts, np.stack(found) if clear is not None else None


def clear_mean(acc: np.ndarray, crop: np.ndarray | KeptWindows, a: int, b: int, clear: np.ndarray
               ) -> np.ndarray:
    """Write into `acc` (C, h, w) the per-pixel mean of crop[a:b] over the dates where the pixel is `clear`
    (b - a, h, w), the plain mean where it is clear on none; (h, w) bool: which pixels had a clear date."""
    weights = clear.astype(np.float32)
    count = weights.sum(axis=0)
    block = np.stack([np.asarray(crop[t], np.float32) for t in range(a, b)])
    plain = block.mean(axis=0)
    acc[...] = np.divide((block * weights[:, None]).sum(axis=0), count, out=plain, where=count > 0)
    return count > 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Print the S2 series kept for one patch centroid.")
    parser.add_argument("--data", required=True)
    parser.add_argument("--masks", required=True)
    parser.add_argument("--products", required=True)
    parser.add_argument("--centroid", type=int, nargs=2, required=True, metavar=("ROW", "COL"))
    parser.add_argument("--size", type=int, default=BASELINE.size)
    parser.add_argument("--no-filter", action="store_true")
    parser.add_argument("--no-monthly", action="store_true")
    args = parser.parse_args(argv)
    data = np.load(args.data, mmap_mode="r")
    masks = np.load(args.masks, mmap_mode="r")
    products = read_products(args.products)
    opts = replace(BASELINE, size=args.size, filter_clouds=not args.no_filter, monthly=not args.no_monthly)
    x, days = s2_series(data, masks, products, tuple(args.centroid), opts)
    print(f"{len(products)} dates -> {x.shape[0]} kept, x {x.shape} {x.dtype}")
    for t, d in enumerate(days):
        valid = x[t][~np.isnan(x[t])]
        mean = float(valid.mean()) if valid.size else float("nan")
        print(f"  t={t:2d} days={int(d):5d} mean reflectance {mean:8.1f}")


if __name__ == "__main__":
    main()
