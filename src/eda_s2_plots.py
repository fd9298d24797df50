"""Sentinel-2 figures of the EDA notebook: true-colour thumbnails of a patch window, its cloud/snow cover
per date, the series before and after monthly compositing, and the NDVI per class and month
(docs/data-format.md, "S2 matching and the cloud filter").
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from src.classes import CLASS_COLORS_HEX, CLASS_NAMES
from src.eda_data import MONTHS
from src.eda_s2 import ndvi, patch_cover, patch_series, under_patch
from src.fileio import save_figure
from src.pictures import DPI, pyplot

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


def plot_s2_thumbnails(row: pd.Series, path: str | os.PathLike, cover_max: float = 0.5,
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
                  cover_max: float = 0.5) -> Path:
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
