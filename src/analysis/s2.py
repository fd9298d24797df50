"""Sentinel-2 in the EDA notebook: cloud/snow cover and kept series of patch windows, and their figures.

Sentinel-2 numbers of the EDA notebook: the cloud/snow cover of each date of a patch window, the series
the kit's src.data.sentinel.s2_series builds, and a survey of a sample (cover, series lengths, NDVI per class
and month) (docs/data-format.md, "Sentinel-2 super-areas" and "S2 matching and the cloud filter").

Every S2 read goes through src.data.sentinel (open_zone, window_in_bounds, s2_series), so the notebook shows
what the model is fed, not a re-implementation of it.

Sentinel-2 figures of the EDA notebook: true-colour thumbnails of a patch window, its cloud/snow cover
per date, the series before and after monthly compositing, and the NDVI per class and month
(docs/data-format.md, "S2 matching and the cloud filter")."""
from __future__ import annotations

import datetime as dt
import functools
import os
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from src.analysis.common import DPI, MONTHS, block_majority, pyplot
from src.core.errors import DataError
from src.core.files import read_label, save_figure
from src.core.flair import (
    AERIAL_PER_S2,
    CLASS_COLORS_HEX,
    CLASS_NAMES,
    PATCH_SHAPE,
    PATCH_SIZE,
    S2_WINDOW,
    centred_s2_box,
    remap,
)
from src.data.sentinel import (
    BASELINE,
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
                 prob_min: int = BASELINE.prob_min, cover_max: float = BASELINE.cover_max) -> pd.DataFrame:
    """Cloud/snow cover of every date of a patch window (the baseline filter), in time-axis order.

    Columns: date, snow, cloud (fraction of window pixels with probability >= prob_min), cover (their sum,
    src.data.sentinel.cloud_cover), kept (src.data.sentinel.select_dates: what s2_series keeps, fallback
    included). The window is clipped to the super-area like s2_series does (cover over the valid pixels).
    """
    window = np.asarray(window_in_bounds(masks, centroid, size)[:, :2])
    dates = [product_date(p) for p in products]
    cover = cloud_cover(window, prob_min)
    kept = np.zeros(len(dates), dtype=bool)
    kept[select_dates(dates, cover, cover_max)] = True
    return pd.DataFrame({"date": pd.to_datetime(dates), "snow": cloud_cover(window[:, 0:1], prob_min),
                         "cloud": cloud_cover(window[:, 1:2], prob_min), "cover": cover, "kept": kept})


def patch_cover(row: pd.Series, size: int = S2_WINDOW, prob_min: int = BASELINE.prob_min,
                cover_max: float = BASELINE.cover_max) -> pd.DataFrame:
    """`window_cover` of one index row."""
    _, masks, products = open_s2(row)
    return window_cover(masks, products, (int(row["s2_row"]), int(row["s2_col"])), size, prob_min, cover_max)


def patch_series(row: pd.Series, monthly: bool = True, filter_clouds: bool = True,
                 size: int = S2_WINDOW) -> tuple[np.ndarray, list[dt.date]]:
    """src.data.sentinel.s2_series of an index row, with the dates of the returned steps decoded."""
    data, masks, products = open_s2(row)
    opts = replace(BASELINE, size=size, filter_clouds=filter_clouds, monthly=monthly)
    x, days = s2_series(data, masks, products, (int(row["s2_row"]), int(row["s2_col"])), opts)
    return x, days_to_dates(days, reference_year([product_date(p) for p in products]))


def days_to_dates(days: np.ndarray, ref_year: int) -> list[dt.date]:
    """Inverse of src.data.sentinel.encode_days (days before 15 May of ref_year, 365-day calendar)."""
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


def s2_survey(rows: pd.DataFrame, purity: float = 0.8, size: int = S2_WINDOW,
              prob_min: int = BASELINE.prob_min,
              cover_max: float = BASELINE.cover_max) -> dict[str, pd.DataFrame]:
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
        opts = replace(BASELINE, size=size, filter_clouds=True, cover_max=cover_max, prob_min=prob_min,
                       monthly=True)
        x, days = s2_series(data, masks, products, centroid, opts)
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


S2_RGB = (2, 1, 0)  # B4, B3, B2: true colour
S2_RGB_MAX = 3000.0  # reflectance x 10000 shown as white in true-colour thumbnails (0.3 reflectance)


def _s2_rgb(x: np.ndarray) -> np.ndarray:
    """(10, h, w) reflectance x 10000 -> (h, w, 3) float true colour in 0..1; pixels outside grey."""
    rgb = np.moveaxis(np.asarray(x, dtype=np.float32)[list(S2_RGB)], 0, -1) / S2_RGB_MAX
    return np.where(np.isnan(rgb), 0.5, np.clip(rgb, 0, 1))


def _footprint(ax, size: int) -> None:
    """White square over the S2 pixels under the aerial patch in a `size` window."""
    from matplotlib.patches import Rectangle

    under = under_patch(size)
    lo, side = under.start - 0.5, under.stop - under.start
    ax.add_patch(Rectangle((lo, lo), side, side, fill=False, edgecolor="w", linewidth=0.6))


def plot_s2_thumbnails(row: pd.Series, path: str | os.PathLike, cover_max: float = BASELINE.cover_max,
                       max_dates: int = 60, cols: int = 10) -> Path:
    """True-colour thumbnails (B4, B3, B2) of every date of a patch's 40x40 window, with the cover; dates the
    cloud/snow filter drops are framed in red. The white square is the aerial patch's footprint."""
    plt = pyplot()
    x, dates = patch_series(row, monthly=False, filter_clouds=False)
    cov = patch_cover(row, cover_max=cover_max).sort_values("date", kind="stable").reset_index(drop=True)
    idx = np.arange(len(dates))
    if len(idx) > max_dates:
        idx = np.unique(np.linspace(0, len(dates) - 1, max_dates).round().astype(int))
    n_rows = int(np.ceil(len(idx) / cols))
    fig, axes = plt.subplots(n_rows, cols, figsize=(1.35 * cols, 1.55 * n_rows + 0.5), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, t in zip(axes.ravel(), idx):
        ax.axis("on")
        ax.imshow(_s2_rgb(x[t]), interpolation="nearest")
        _footprint(ax, x.shape[-1])
        ax.set_xticks([])
        ax.set_yticks([])
        dropped = not bool(cov.loc[t, "kept"])
        for spine in ax.spines.values():
            spine.set_edgecolor("red" if dropped else "0.7")
            spine.set_linewidth(2.5 if dropped else 0.5)
        ax.set_title(f"{dates[t]:%Y-%m-%d}\ncover {100 * cov.loc[t, 'cover']:.0f}%", fontsize=7,
                     color="red" if dropped else "k")
    shown = "" if len(idx) == len(dates) else f" ({len(idx)} of them shown)"
    fig.suptitle(f"patch {row['id']} ({row['domain']}/{row['zone']}): {len(dates)} S2 dates{shown}, "
                 f"{int((~cov['kept']).sum())} dropped by the cloud/snow filter (red); "
                 "white square: the aerial patch", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, dpi=DPI, bbox_inches="tight")


def plot_s2_cover(row: pd.Series, survey: dict[str, pd.DataFrame], path: str | os.PathLike,
                  cover_max: float = BASELINE.cover_max) -> Path:
    """Snow + cloud cover per date of one patch with the filter threshold; cover of every sampled
    (patch, date); series lengths raw / filtered / monthly over the sampled patches."""
    plt = pyplot()
    cov = survey["cover"]
    mine = cov[cov["id"] == row["id"]].sort_values("date", kind="stable")
    lengths = survey["lengths"]
    fig, (ax, bx, cx) = plt.subplots(1, 3, figsize=(16, 4.2), gridspec_kw={"width_ratios": [2.2, 1, 1]})
    x = mine["date"].to_numpy().astype("datetime64[D]")  # bar widths in days
    snow, cloud = mine["snow"].to_numpy(), mine["cloud"].to_numpy()
    ax.bar(x, snow, width=3, color="tab:cyan", label="snow (p >= 60)")
    ax.bar(x, cloud, width=3, bottom=snow, color="0.55", label="cloud (p >= 60)")
    drop = ~mine["kept"].to_numpy()
    ax.scatter(x[drop], np.minimum(mine["cover"].to_numpy()[drop], 1.5) + 0.04, marker="v", color="red",
               s=14, label="dropped")
    ax.axhline(cover_max, color="red", linestyle="--", linewidth=1, label=f"threshold {cover_max:g}")
    ax.set_ylabel("cover of the 40x40 window")
    ax.set_title(f"patch {row['id']}: cover per date", fontsize=10)
    ax.legend(fontsize=7, loc="upper right")
    fig.autofmt_xdate()
    bx.hist(np.clip(cov["cover"], 0, 2), bins=np.linspace(0, 2, 41), color="0.5")
    bx.axvline(cover_max, color="red", linestyle="--", linewidth=1)
    bx.set_yscale("log")
    bx.set_xlabel("cover (snow + cloud, clipped at 2)")
    bx.set_title(f"{len(cov)} (patch, date) pairs, {cov['id'].nunique()} patches", fontsize=10)
    top = int(max(lengths[["raw", "filtered", "monthly"]].to_numpy().max(), 1))
    bins = np.arange(0, top + 2) - 0.5
    for col, colour in (("raw", "0.6"), ("filtered", "tab:blue"), ("monthly", "tab:red")):
        cx.hist(lengths[col], bins=bins, histtype="step", linewidth=1.5, color=colour,
                label=f"{col} (median {lengths[col].median():g})")
    cx.set_xlabel("dates per patch series")
    cx.set_ylabel("patches")
    cx.legend(fontsize=7)
    cx.set_title("series length", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, dpi=DPI, bbox_inches="tight")


def plot_s2_monthly(row: pd.Series, path: str | os.PathLike) -> Path:
    """Before/after monthly compositing for one patch: NDVI of the pixels under the patch on every date
    (kept / dropped) and on the monthly composites, plus true-colour thumbnails of the composites."""
    plt = pyplot()
    raw, raw_dates = patch_series(row, monthly=False, filter_clouds=False)
    comp, comp_dates = patch_series(row, monthly=True, filter_clouds=True)
    centre = under_patch()
    cov = patch_cover(row).sort_values("date", kind="stable")
    kept = cov["kept"].to_numpy()
    raw_nd = np.nanmean(ndvi(raw[:, :, centre, centre]).reshape(len(raw), -1), axis=1)
    comp_nd = np.nanmean(ndvi(comp[:, :, centre, centre]).reshape(len(comp), -1), axis=1)
    n = max(len(comp), 1)
    fig = plt.figure(figsize=(max(10.0, 1.2 * n), 6))
    grid = fig.add_gridspec(2, n, height_ratios=[2.2, 1])
    ax = fig.add_subplot(grid[0, :])
    rd = np.array(raw_dates, dtype="datetime64[D]")
    ax.plot(rd[~kept], raw_nd[~kept], "x", color="0.6", label=f"dropped dates ({int((~kept).sum())})")
    ax.plot(rd[kept], raw_nd[kept], "o", color="k", markersize=4, label=f"kept dates ({int(kept.sum())})")
    ax.plot(np.array(comp_dates, dtype="datetime64[D]"), comp_nd, "-s", color="tab:red",
            label=f"monthly composites ({len(comp)}, dated the 15th)")
    ax.set_ylabel("mean NDVI under the patch")
    ax.set_title(f"patch {row['id']}: {len(raw)} dates -> {int(kept.sum())} after the cloud/snow filter -> "
                 f"{len(comp)} monthly composites", fontsize=10)
    ax.legend(fontsize=8)
    for t in range(len(comp)):
        tx = fig.add_subplot(grid[1, t])
        tx.imshow(_s2_rgb(comp[t]), interpolation="nearest")
        _footprint(tx, comp.shape[-1])
        tx.set_title(f"{comp_dates[t]:%Y-%m}", fontsize=8)
        tx.axis("off")
    fig.tight_layout()
    return save_figure(fig, path, dpi=DPI, bbox_inches="tight")


def plot_ndvi_classes(ndvi_table: pd.DataFrame, path: str | os.PathLike, min_pixels: int = 5) -> Path:
    """Monthly NDVI per class (mean over the pure S2 pixels under labelled patches), official colours."""
    plt = pyplot()
    from matplotlib import patheffects

    fig, ax = plt.subplots(figsize=(10, 5))
    ax.set_facecolor("0.88")
    for k, grp in ndvi_table.groupby("class"):
        grp = grp[grp["pixels"] >= min_pixels].sort_values("month")
        if grp.empty:
            continue
        ax.plot(grp["month"], grp["mean"], "-o", color=CLASS_COLORS_HEX[k], markersize=4, linewidth=2,
                label=f"{k} {CLASS_NAMES[k]} ({int(grp['pixels'].sum())} px-months)",
                path_effects=[patheffects.withStroke(linewidth=3.5, foreground="0.25")])
    ax.set_xticks(range(1, 13), MONTHS)
    ax.set_xlim(0.5, 12.5)
    ax.set_ylabel("NDVI (B8 - B4) / (B8 + B4)")
    ax.set_title("NDVI per class and month (cloud-filtered monthly composites, S2 pixels >= 80% one class)",
                 fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return save_figure(fig, path, dpi=DPI, bbox_inches="tight")
