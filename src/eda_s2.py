"""Sentinel-2 numbers of the EDA notebook: the cloud/snow cover of each date of a patch window, the series
the kit's src.sentinel.s2_series builds, and a survey of a sample (cover, series lengths, NDVI per class
and month) (docs/data-format.md, "Sentinel-2 super-areas" and "S2 matching and the cloud filter").

Every S2 read goes through src.sentinel (open_zone, window_in_bounds, s2_series), so the notebook shows
what the model is fed, not a re-implementation of it.
"""
from __future__ import annotations

import datetime as dt
import functools
from collections import defaultdict

import numpy as np
import pandas as pd

from src.classes import CLASS_NAMES, remap
from src.errors import DataError
from src.geometry import AERIAL_PER_S2, PATCH_SHAPE, PATCH_SIZE, S2_WINDOW, centred_s2_box
from src.label_blocks import block_majority
from src.rasters import read_label
from src.sentinel import (
    REF_DAY,
    REF_MONTH,
    cloud_cover,
    open_zone,
    product_date,
    reference_year,
    s2_series,
    select_dates,
    window_in_bounds,
)

S2_RED, S2_NIR = 2, 6  # B4, B8
# Zones opened so far (memory-mapped): the sampled patches share few zones.
_open_zone = functools.lru_cache(maxsize=32)(open_zone)


def under_patch(size: int = S2_WINDOW) -> slice:
    """Rows (or columns) of the whole S2 pixels under the aerial patch in a `size` window centred on its
    centroid: 15:25 of the 40 x 40 window (docs/data-format.md, "Geometry")."""
    top, _, height, _ = centred_s2_box((size, size), PATCH_SHAPE)
    return slice(top, top + height)


def open_s2(row: pd.Series) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(data, masks, products) of the zone of an index row."""
    if not str(row["s2_data"]) or int(row["s2_row"]) < 0:
        raise DataError(f"patch {row['id']}: no Sentinel-2 super-area or centroid in the index")
    return _open_zone(str(row["s2_data"]), str(row["s2_masks"]), str(row["s2_products"]))


def window_cover(masks: np.ndarray, products: list[str], centroid: tuple[int, int], size: int = S2_WINDOW,
                 prob_min: int = 60, cover_max: float = 0.5) -> pd.DataFrame:
    """Cloud/snow cover of every date of a patch window (the baseline filter), in time-axis order.

    Columns: date, snow, cloud (fraction of window pixels with probability >= prob_min), cover (their sum,
    src.sentinel.cloud_cover), kept (src.sentinel.select_dates: what s2_series keeps, fallback included).
    The window is clipped to the super-area like s2_series does (cover over the valid pixels).
    """
    window = np.asarray(window_in_bounds(masks, centroid, size)[:, :2])
    dates = [product_date(p) for p in products]
    cover = cloud_cover(window, prob_min)
    kept = np.zeros(len(dates), dtype=bool)
    kept[select_dates(dates, cover, cover_max)] = True
    return pd.DataFrame({"date": pd.to_datetime(dates), "snow": cloud_cover(window[:, 0:1], prob_min),
                         "cloud": cloud_cover(window[:, 1:2], prob_min), "cover": cover, "kept": kept})


def patch_cover(row: pd.Series, size: int = S2_WINDOW, prob_min: int = 60,
                cover_max: float = 0.5) -> pd.DataFrame:
    """`window_cover` of one index row."""
    _, masks, products = open_s2(row)
    return window_cover(masks, products, (int(row["s2_row"]), int(row["s2_col"])), size, prob_min, cover_max)


def patch_series(row: pd.Series, monthly: bool = True, filter_clouds: bool = True,
                 size: int = S2_WINDOW) -> tuple[np.ndarray, list[dt.date]]:
    """src.sentinel.s2_series of an index row, with the dates of the returned steps decoded."""
    data, masks, products = open_s2(row)
    x, days = s2_series(data, masks, products, (int(row["s2_row"]), int(row["s2_col"])), size=size,
                        filter_clouds=filter_clouds, monthly=monthly)
    return x, days_to_dates(days, reference_year([product_date(p) for p in products]))


def days_to_dates(days: np.ndarray, ref_year: int) -> list[dt.date]:
    """Inverse of src.sentinel.encode_days (days before 15 May of ref_year, 365-day calendar)."""
    ref = dt.date(2021, REF_MONTH, REF_DAY).timetuple().tm_yday  # a 365-day year, like encode_days
    out = []
    for d in np.asarray(days, dtype=np.int64):
        doy = ref - int(d)
        year = ref_year + (doy - 1) // 365
        day = dt.date(2021, 1, 1) + dt.timedelta(days=doy - 1 - 365 * (year - ref_year))
        out.append(day.replace(year=year))
    return out


def ndvi(x: np.ndarray) -> np.ndarray:
    """NDVI (B8 - B4) / (B8 + B4) of an S2 array (..., 10, h, w) -> (..., h, w); NaN where undefined."""
    x = np.asarray(x, dtype=np.float32)
    nir, red = x[..., S2_NIR, :, :], x[..., S2_RED, :, :]
    total = nir + red
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (nir - red) / total, np.nan).astype(np.float32)


def s2_pixel_classes(label_raw: np.ndarray, purity: float = 0.8) -> np.ndarray:
    """(10, 10) class of each S2 pixel under the patch (-1 when no class covers `purity` of its 50x50 block).

    The patch is centred on its centroid pixel, so the S2 pixels [c-5, c+5) under it map to the aerial
    blocks [50i, 50i+50) (exact on the synthetic data, within half an S2 pixel on the real data).
    """
    n, b = PATCH_SIZE // AERIAL_PER_S2, AERIAL_PER_S2
    labels = remap(label_raw)
    if labels.shape[0] < n * b or labels.shape[1] < n * b:
        raise DataError(f"label of shape {labels.shape} is smaller than {n * b}x{n * b}")
    return block_majority(labels[:n * b, :n * b], b, purity)


class _NdviSums:
    """Running sum, sum of squares and count of NDVI per (class, month), and the patches seen."""

    def __init__(self) -> None:
        self.acc: dict[tuple[int, int], list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
        self.patches: dict[tuple[int, int], set[str]] = defaultdict(set)

    def add(self, pid: str, classes: np.ndarray, nd: np.ndarray, months: list[int]) -> None:
        """Pixels of `nd` (T, h, w) grouped by their (h, w) class (-1: none) and the month of each step."""
        for k in np.unique(classes[classes >= 0]):
            values = nd[:, classes == k]
            for month, v in zip(months, values):
                v = v[np.isfinite(v)]
                if v.size:
                    a = self.acc[(int(k), month)]
                    a[0] += float(v.sum())
                    a[1] += float((v.astype(np.float64) ** 2).sum())
                    a[2] += v.size
                    self.patches[(int(k), month)].add(pid)

    def table(self) -> pd.DataFrame:
        records = []
        for (k, month), (s, ss, n) in sorted(self.acc.items()):
            mean = s / n
            records.append({"class": k, "name": CLASS_NAMES[k], "month": month, "mean": mean,
                            "std": float(np.sqrt(max(ss / n - mean * mean, 0.0))), "pixels": int(n),
                            "patches": len(self.patches[(k, month)])})
        return pd.DataFrame(records, columns=["class", "name", "month", "mean", "std", "pixels", "patches"])


def s2_survey(rows: pd.DataFrame, purity: float = 0.8, size: int = S2_WINDOW, prob_min: int = 60,
              cover_max: float = 0.5) -> dict[str, pd.DataFrame]:
    """One pass over the sampled patches' S2 series (each window read once).

    Returns {"cover": one row per (patch, date): id, domain, split, date, snow, cloud, cover, kept;
    "lengths": per patch: raw dates, after the cloud filter, after monthly compositing;
    "ndvi": per (class, month): mean and std NDVI of the pure S2 pixels under labelled patches on the
    cloud-filtered monthly composites the model sees, pixels (pixel-months) and patches}.
    """
    covers, lengths, sums = [], [], _NdviSums()
    under = under_patch(size)
    for _, r in rows.iterrows():
        if not str(r["s2_data"]) or int(r["s2_row"]) < 0:
            continue
        data, masks, products = open_s2(r)
        centroid = (int(r["s2_row"]), int(r["s2_col"]))
        cov = window_cover(masks, products, centroid, size, prob_min, cover_max)
        covers.append(cov.assign(id=r["id"], domain=r["domain"], split=r["split"]))
        x, days = s2_series(data, masks, products, centroid, size=size, filter_clouds=True,
                            cover_max=cover_max, prob_min=prob_min, monthly=True)
        lengths.append({"id": r["id"], "domain": r["domain"], "split": r["split"], "raw": len(cov),
                        "filtered": int(cov["kept"].sum()), "monthly": len(days)})
        if not str(r["msk_path"]):
            continue
        months = [d.month for d in days_to_dates(days, reference_year(list(cov["date"].dt.date)))]
        sums.add(str(r["id"]), s2_pixel_classes(read_label(r["msk_path"]), purity),
                 ndvi(x[:, :, under, under]), months)
    cover_cols = ["id", "domain", "split", "date", "snow", "cloud", "cover", "kept"]
    cover = pd.concat(covers, ignore_index=True)[cover_cols] if covers else pd.DataFrame(columns=cover_cols)
    return {
        "cover": cover,
        "lengths": pd.DataFrame(lengths, columns=["id", "domain", "split", "raw", "filtered", "monthly"]),
        "ndvi": sums.table(),
    }


def pick_s2_patch(rows: pd.DataFrame, survey: dict[str, pd.DataFrame]) -> pd.Series:
    """The patch shown in the S2 figures: the longest raw series among those where the filter drops some
    dates and keeps some (else the longest series); ties broken by id."""
    lengths = survey["lengths"]
    if lengths.empty:
        raise DataError("no sampled patch has a Sentinel-2 series")
    both = lengths[(lengths["filtered"] > 0) & (lengths["filtered"] < lengths["raw"])]
    pool = both if not both.empty else lengths
    best = pool.sort_values(["raw", "id"], ascending=[False, True]).iloc[0]["id"]
    return rows[rows["id"] == best].iloc[0]
