"""Exploratory data analysis of FLAIR #2 (real or synthetic): the numbers and figures behind
notebooks/eda.ipynb, and `main()`, which executes that notebook headlessly.

    python -m src.eda [--data DATA] [--out notebooks/out]        (make eda EDA_DATA=DATA)

DATA is a folder holding index_train.csv / index_test.csv (+ optionally folds.csv and class_hist.csv,
written by `make index` / `make folds`), or a raw data root (the index is then built in memory). The
executed notebook goes to OUT/eda.ipynb, its HTML export to OUT/eda.html, every figure to OUT/figures/.

Why a module: the notebook only calls these functions (short cells, nothing computed twice), so the
analysis is tested like the rest of the kit and the conclusions printed under each section are generated
from the numbers, which keeps them true on the real data and on the synthetic data alike. Everything
image-based works on a domain-balanced sample, so a run takes about a minute even on the 77k real patches.
"""
from __future__ import annotations

import argparse
import datetime as dt
import functools
import os
import re
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from src import rasters
from src.bands import BAND_MEAN, BAND_NAMES, BAND_STD
from src.classes import CLASS_COLORS_HEX, CLASS_NAMES, NUM_CLASSES, colorize, remap
from src.folds import HIST_COLS, class_histograms, js_divergence, load_folds
from src.index import build_index, load_index
from src.rasters import DataError, read_image, read_label
from src.sentinel import (
    REF_DAY,
    REF_MONTH,
    cloud_cover,
    product_date,
    read_products,
    reference_year,
    s2_series,
    select_dates,
    window_in_bounds,
)
from src.show import rgb_of

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "eda.ipynb"
DEFAULT_OUT = REPO / "notebooks" / "out"
# Every figure the notebook writes (tests check them; class_folds.png only when folds.csv exists).
FIGURES: tuple[str, ...] = (
    "class_split.png", "class_domains.png", "class_folds.png", "patch_grid.png", "band_stats.png",
    "s2_thumbnails.png", "s2_cover.png", "s2_monthly.png", "s2_ndvi_classes.png", "metadata.png", "map.png",
)
DPI = 80
S2_WINDOW = 40  # baseline S2 crop (spec section 5)
S2_UNDER_PATCH = 10  # S2 pixels under an aerial patch: 512 px * 0.2 m / 10 m = 10.24
AERIAL_PER_S2 = 50  # aerial pixels per S2 pixel side (10 m / 0.2 m)
S2_RGB = (2, 1, 0)  # B4, B3, B2: true colour
S2_RED, S2_NIR = 2, 6  # B4, B8
S2_RGB_MAX = 3000.0  # reflectance x 10000 shown as white in true-colour thumbnails (0.3 reflectance)
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_HOUR_RE = re.compile(r"^\s*(\d{1,2})\s*h\s*(\d{1,2})")

# Rough outline of mainland France and Corsica in Lambert-93 kilometres (EPSG:2154), projected by hand
# from ~60 coastline/border points: enough to place patch centroids, not a boundary.
FRANCE_L93_KM: tuple[tuple[tuple[float, float], ...], ...] = (
    ((668, 7111), (714, 7074), (786, 6995), (832, 7007), (903, 6943), (944, 6934), (992, 6902), (1082, 6887),
     (1045, 6732), (991, 6701), (937, 6616), (929, 6565), (995, 6540), (1002, 6457), (1019, 6358),
     (1064, 6308), (1023, 6281), (993, 6235), (936, 6221), (887, 6253), (830, 6251), (757, 6256), (704, 6211),
     (714, 6148), (659, 6139), (593, 6156), (512, 6197), (430, 6195), (313, 6264), (363, 6398), (381, 6508),
     (376, 6575), (332, 6611), (307, 6696), (241, 6729), (151, 6770), (127, 6834), (152, 6865), (224, 6881),
     (332, 6851), (365, 6849), (343, 6967), (393, 6964), (402, 6924), (490, 6932), (505, 6965), (564, 6985),
     (600, 7018), (601, 7073), (623, 7099)),
    ((1222, 6232), (1239, 6167), (1234, 6077), (1215, 6051), (1185, 6068), (1160, 6116), (1161, 6161),
     (1200, 6199)),
)


# ----------------------------------------------------------------------------------------------- data
@dataclass
class EdaData:
    """The patches the notebook explores: both index splits and the folds when they exist."""

    source: Path
    data_dir: Path | None  # folder of the index CSVs; None when the index was built from a raw root
    train: pd.DataFrame
    test: pd.DataFrame
    folds: pd.DataFrame | None

    @property
    def patches(self) -> pd.DataFrame:
        """Train and test rows together (column `split` tells them apart)."""
        return pd.concat([self.train, self.test], ignore_index=True)

    def describe(self) -> str:
        lines = [f"data: {self.source}" + ("" if self.data_dir else " (raw root, index built in memory)")]
        for split, df in (("train", self.train), ("test", self.test)):
            labelled = int((df["msk_path"] != "").sum())
            lines.append(f"  {split}: {len(df)} patches ({labelled} labelled), "
                         f"{df['domain'].nunique()} domains, {df['zone'].nunique()} zones")
        lines.append(f"  folds: {self.folds['fold'].nunique()} (folds.csv)" if self.folds is not None
                     else "  folds: none (no folds.csv: run `make folds`)")
        return "\n".join(lines)


def load_data(path: str | os.PathLike) -> EdaData:
    """Index CSVs of a data folder (plus folds.csv when present), or a raw root's index built in memory."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: data folder not found (give a folder holding index_train.csv, or a raw "
                        "data root; e.g. `make synth index` then `make eda EDA_DATA=data`)")
    if (path / "index_train.csv").is_file():
        train = load_index(path / "index_train.csv")
        test_csv = path / "index_test.csv"
        test = load_index(test_csv) if test_csv.is_file() else train.iloc[:0].copy()
        folds = load_folds(path) if (path / "folds.csv").is_file() else None
        data = EdaData(path, path, train, test, folds)
    else:
        frames = build_index(path)
        data = EdaData(path, None, frames["train"], frames["test"], None)
    if data.train.empty and data.test.empty:
        raise DataError(f"{path}: the index holds no patch")
    return data


def sample_by_domain(df: pd.DataFrame, n: int, seed: int = 0, labelled: bool = False) -> pd.DataFrame:
    """Up to `n` rows spread evenly over the domains, in round-robin order (the first k rows come from k
    different domains when there are k), reproducible for a seed."""
    if labelled:
        df = df[df["msk_path"].astype(str) != ""]
    if df.empty or n <= 0:
        return df.iloc[:0].copy()
    rng = np.random.default_rng(seed)
    work = df.assign(_r=rng.random(len(df)))
    work["_rank"] = work.groupby("domain")["_r"].rank(method="first")
    domains = sorted(work["domain"].unique())
    order = dict(zip(domains, rng.permutation(len(domains))))
    work["_d"] = work["domain"].map(order)
    work = work.sort_values(["_rank", "_d"], kind="stable").head(n)
    return work.drop(columns=["_r", "_rank", "_d"]).reset_index(drop=True)


# ------------------------------------------------------------------------------------- class frequencies
def class_pixels(data: EdaData, cache_dir: str | os.PathLike, max_masks: int = 2000,
                 seed: int = 0) -> pd.DataFrame:
    """Per-patch class pixel counts (id, split, domain, zone, c0..c12) of the labelled patches of both splits.

    Train uses every mask through DATA/class_hist.csv (src.folds' cache, filled by `make folds`) when it
    exists; otherwise, and for test, a domain-balanced sample of at most `max_masks` masks per split,
    counted by src.folds.class_histograms and cached under `cache_dir`. attrs["masks"] = {split: (counted,
    labelled)} says how much was sampled.
    """
    parts, info = [], {}
    for split, df in (("train", data.train), ("test", data.test)):
        labelled = df[df["msk_path"].astype(str) != ""]
        if labelled.empty:
            continue
        cache = data.data_dir / "class_hist.csv" if data.data_dir is not None and split == "train" else None
        if cache is None or not cache.is_file():
            if len(labelled) > max_masks:
                labelled = sample_by_domain(labelled, max_masks, seed)
            cache = Path(cache_dir) / f"class_hist_{split}.csv"
            cache.parent.mkdir(parents=True, exist_ok=True)
        hist = class_histograms(labelled, cache)
        hist.insert(1, "split", split)
        info[split] = (len(hist), int((df["msk_path"].astype(str) != "").sum()))
        parts.append(hist)
    if not parts:
        raise DataError(f"{data.source}: no labelled patch: class frequencies need masks")
    out = pd.concat(parts, ignore_index=True)
    out.attrs["masks"] = info
    return out


def percent_table(hist: pd.DataFrame, by: str | list[str]) -> pd.DataFrame:
    """% of the labelled pixels of each group in each class (columns = class names), rounded to 0.01."""
    pixels = hist.groupby(by)[HIST_COLS].sum()
    pct = 100 * pixels.div(pixels.sum(axis=1).clip(lower=1), axis=0)
    return pct.set_axis(CLASS_NAMES, axis=1).round(2)


def split_shift(hist: pd.DataFrame) -> pd.DataFrame:
    """Per class: % of train and test pixels, difference in points and ratio; largest |difference| first."""
    pct = percent_table(hist, "split").T
    for split in ("train", "test"):
        if split not in pct.columns:
            pct[split] = np.nan
    out = pd.DataFrame({"class": range(NUM_CLASSES), "name": CLASS_NAMES,
                        "train_pct": pct["train"].to_numpy(), "test_pct": pct["test"].to_numpy()})
    out["diff_pts"] = out["test_pct"] - out["train_pct"]
    out["ratio"] = (out["test_pct"] + 0.01) / (out["train_pct"] + 0.01)
    return out.reindex(out["diff_pts"].abs().sort_values(ascending=False, kind="stable").index)


def domain_divergence(hist: pd.DataFrame) -> pd.DataFrame:
    """Per (split, domain): patches counted, Jensen-Shannon divergence (bits) of its class distribution
    from all training pixels, and its most frequent class; most divergent first."""
    ref = hist.loc[hist["split"] == "train", HIST_COLS].sum().to_numpy(float)
    if ref.sum() == 0:
        ref = hist[HIST_COLS].sum().to_numpy(float)
    grouped = hist.groupby(["split", "domain"])
    pixels = grouped[HIST_COLS].sum()
    out = pd.DataFrame(index=pixels.index)
    out["patches"] = grouped.size()
    out["js_bits"] = js_divergence(pixels.to_numpy(float), ref).round(4)
    top = pixels.to_numpy().argmax(axis=1)
    share = pixels.to_numpy().max(axis=1) / pixels.to_numpy().sum(axis=1).clip(min=1)
    out["top_class"] = [f"{CLASS_NAMES[k]} ({100 * s:.0f}%)" for k, s in zip(top, share)]
    return out.sort_values("js_bits", ascending=False)


def fold_summary(hist: pd.DataFrame, data: EdaData) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """(per-fold stats, per-domain table) of src.folds (fold_stats / domain_table), or None without folds."""
    if data.folds is None:
        return None
    from src.folds import domain_table, fold_stats

    table = domain_table(data.train, hist[hist["split"] == "train"])
    assignment = data.folds.groupby("domain")["fold"].first().to_dict()
    return fold_stats(table, assignment), table


# ---------------------------------------------------------------------------------------------- figures
def _plt():
    """pyplot on the Agg backend (headless: nbclient, CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike, dpi: int = DPI) -> Path:
    """Save a figure as PNG atomically, close it, return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return rasters.save_figure(fig, path, dpi=dpi, bbox_inches="tight")


def class_legend(target, classes: list[int] | None = None, **kwargs) -> None:
    """Legend of classes (all 13 by default) in the official colours on a figure or an axis."""
    from matplotlib.patches import Patch

    classes = list(range(NUM_CLASSES)) if classes is None else classes
    handles = [Patch(facecolor=CLASS_COLORS_HEX[k], edgecolor="0.4", label=f"{k} {CLASS_NAMES[k]}")
               for k in classes]
    kwargs.setdefault("fontsize", 8)
    kwargs.setdefault("frameon", False)
    target.legend(handles=handles, **kwargs)


def _stacked_bars(ax, pixels: np.ndarray, labels: list[str]) -> None:
    pct = 100 * pixels / np.maximum(pixels.sum(axis=1, keepdims=True), 1)
    x = np.arange(len(labels))
    bottom = np.zeros(len(labels))
    for k in range(NUM_CLASSES):
        ax.bar(x, pct[:, k], bottom=bottom, color=CLASS_COLORS_HEX[k], edgecolor="0.3", linewidth=0.2,
               width=0.8)
        bottom += pct[:, k]
    ax.set_xticks(x, labels)
    ax.set_xlim(-0.6, len(labels) - 0.4)
    ax.set_ylim(0, 100)
    ax.set_ylabel("% of labelled pixels")


def plot_class_split(hist: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Class distribution of train vs test (stacked bars) and the change of each class share."""
    plt = _plt()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [1, 2.2]})
    splits = [s for s in ("train", "test") if (hist["split"] == s).any()]
    pixels = np.stack([hist.loc[hist["split"] == s, HIST_COLS].sum().to_numpy(float) for s in splits])
    _stacked_bars(ax, pixels, [f"{s}\n{int((hist['split'] == s).sum())} masks" for s in splits])
    ax.set_title("class distribution")
    shift = split_shift(hist).sort_values("class")
    y = np.arange(NUM_CLASSES)[::-1]
    if "test" in splits:
        bx.barh(y, shift["diff_pts"], color=CLASS_COLORS_HEX, edgecolor="0.3")
        for yi, (_, r) in zip(y, shift.iterrows()):
            bx.text(0, yi, f"  {r['train_pct']:.1f}% -> {r['test_pct']:.1f}%  ", va="center", fontsize=7,
                    ha="left" if r["diff_pts"] < 0 else "right")
        bx.axvline(0, color="0.3", linewidth=0.8)
        bx.set_xlabel("test % - train % (percentage points)")
        bx.set_title("train -> test change per class")
    else:
        bx.barh(y, shift["train_pct"], color=CLASS_COLORS_HEX, edgecolor="0.3")
        bx.set_xlabel("% of train pixels")
        bx.set_title("class shares in train (no test labels)")
    bx.set_yticks(y, [f"{k} {n}" for k, n in enumerate(CLASS_NAMES)], fontsize=8)
    return save_figure(fig, path)


def plot_class_domains(hist: pd.DataFrame, path: str | os.PathLike) -> Path:
    """One stacked bar per domain (train domains, then test domains), official colours."""
    plt = _plt()
    pixels = hist.groupby(["split", "domain"])[HIST_COLS].sum()
    order = sorted(pixels.index, key=lambda k: (k[0] != "train", k[1]))
    pixels = pixels.loc[order]
    fig, ax = plt.subplots(figsize=(max(8.0, 0.3 * len(order) + 4.5), 5))
    _stacked_bars(ax, pixels.to_numpy(float), [d for _, d in order])
    ax.tick_params(axis="x", rotation=90, labelsize=8)
    n_train = sum(1 for s, _ in order if s == "train")
    if 0 < n_train < len(order):
        ax.axvline(n_train - 0.5, color="k", linewidth=1.5)
    ax.set_title(f"class distribution per domain: {n_train} train | {len(order) - n_train} test domains")
    class_legend(ax, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return save_figure(fig, path)


def plot_class_folds(stats: pd.DataFrame, table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """The fold figure of src.folds (stacked bars per fold + all training pixels, JS divergence)."""
    from src.folds import plot_folds

    plot_folds(stats, table, path, title="class distribution per fold (folds.csv)")
    return Path(path)


def grid_patches(sample: pd.DataFrame, n: int = 4) -> pd.DataFrame:
    """n rows of a `sample_by_domain` sample for the patch grid, labelled ones first (distinct domains)."""
    labelled = sample["msk_path"].astype(str) != ""
    return pd.concat([sample[labelled], sample[~labelled]]).head(n)


def plot_patch_grid(rows: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Per patch: RGB, false colour (NIR, R, G), elevation (nDSM band) and the label over the RGB."""
    plt = _plt()
    fig, axes = plt.subplots(len(rows), 4, figsize=(10.5, 2.6 * len(rows)), squeeze=False)
    present: set[int] = set()
    for ax_row, (_, r) in zip(axes, rows.iterrows()):
        img = read_image(r["img_path"])
        rgb = rgb_of(img)
        false = np.ascontiguousarray(np.moveaxis(img[[3, 0, 1]], 0, -1))
        ax_row[0].imshow(rgb)
        ax_row[0].set_title(f"{r['id']} {r['domain']} RGB", fontsize=9)
        ax_row[1].imshow(false)
        ax_row[1].set_title("false colour (NIR, R, G)", fontsize=9)
        top = max(float(np.percentile(img[4], 99.5)), 1.0)
        elev = ax_row[2].imshow(img[4], cmap="viridis", vmin=0, vmax=top)
        fig.colorbar(elev, ax=ax_row[2], fraction=0.046, pad=0.02)
        ax_row[2].set_title("elevation (nDSM band, 0..255)", fontsize=9)
        if str(r["msk_path"]):
            labels = remap(read_label(r["msk_path"]))
            present.update(int(v) for v in np.unique(labels) if v < NUM_CLASSES)
            overlay = (0.4 * rgb + 0.6 * colorize(labels)).astype(np.uint8)
            ax_row[3].imshow(overlay, interpolation="nearest")
            ax_row[3].set_title("label over RGB", fontsize=9)
        else:
            ax_row[3].text(0.5, 0.5, "no label", ha="center", va="center")
        for ax in ax_row:
            ax.set_xticks([])
            ax.set_yticks([])
    class_legend(fig, sorted(present) or None, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return save_figure(fig, path)


def band_constants() -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """(band names, BAND_MEAN, BAND_STD) of src.bands: the kit's aerial normalisation."""
    return tuple(BAND_NAMES), BAND_MEAN, BAND_STD


def band_stats(rows: pd.DataFrame) -> pd.DataFrame:
    """Per sampled patch: id, split, domain and the mean and std of each aerial band (0..255 scale)."""
    band_names = band_constants()[0]
    records = []
    for _, r in rows.iterrows():
        img = read_image(r["img_path"]).reshape(5, -1).astype(np.float32)
        rec = {"id": r["id"], "split": r["split"], "domain": r["domain"]}
        rec.update({f"mean_{b}": float(m) for b, m in zip(band_names, img.mean(axis=1))})
        rec.update({f"std_{b}": float(s) for b, s in zip(band_names, img.std(axis=1))})
        records.append(rec)
    return pd.DataFrame(records)


def band_shift(stats: pd.DataFrame) -> pd.DataFrame:
    """Per (split, domain) mean of each band, as a shift from the kit's normalisation mean in units of its
    std (src.dataset BAND_MEAN / BAND_STD, the published train statistics): 0 = typical, +-1 = one std."""
    band_names, band_mean, band_std = band_constants()
    means = stats.groupby(["split", "domain"])[[f"mean_{b}" for b in band_names]].mean()
    z = (means - band_mean) / band_std
    return z.set_axis(list(band_names), axis=1)


def plot_band_stats(stats: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Heat map of each domain's band means (shift from the normalisation mean, in std units) and the
    sample's band means next to the normalisation constants."""
    BAND_NAMES, BAND_MEAN, BAND_STD = band_constants()  # noqa: N806
    plt = _plt()
    z = band_shift(stats)
    order = sorted(z.index, key=lambda k: (k[0] != "train", k[1]))
    z = z.loc[order]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, max(3.5, 0.22 * len(z) + 1.5)),
                                 gridspec_kw={"width_ratios": [1, 1.3]})
    lim = max(1.0, float(np.nanmax(np.abs(z.to_numpy()))))
    im = ax.imshow(z.to_numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_xticks(range(len(BAND_NAMES)), BAND_NAMES)
    ax.set_yticks(range(len(z)), [f"{d} ({s})" for s, d in z.index], fontsize=7 if len(z) > 20 else 8)
    fig.colorbar(im, ax=ax, label="(domain mean - BAND_MEAN) / BAND_STD")
    ax.set_title(f"band means per domain ({len(stats)} patches)", fontsize=10)
    x = np.arange(len(BAND_NAMES))
    width = 0.25
    bx.bar(x - width, BAND_MEAN, width, yerr=BAND_STD, color="0.6", label="kit normalisation (mean, std)")
    for i, split in enumerate(("train", "test")):
        sel = stats[stats["split"] == split]
        if sel.empty:
            continue
        m = sel[[f"mean_{b}" for b in BAND_NAMES]].mean().to_numpy()
        s = sel[[f"std_{b}" for b in BAND_NAMES]].mean().to_numpy()
        bx.bar(x + i * width, m, width, yerr=s, color=("tab:blue", "tab:orange")[i],
               label=f"{split} sample ({len(sel)} patches): mean, mean of per-patch std")
    bx.set_xticks(x, BAND_NAMES)
    bx.set_ylabel("value (0..255)")
    bx.legend(fontsize=8)
    bx.set_title("band statistics", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


# -------------------------------------------------------------------------------------------- Sentinel-2
@functools.lru_cache(maxsize=32)
def _zone_s2(data_path: str, masks_path: str, products_path: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Memory-mapped data/masks and the product names of one zone (cached: patches share their zone)."""
    arrays = []
    for path in (data_path, masks_path):
        try:
            arrays.append(np.load(path, mmap_mode="r"))
        except FileNotFoundError:
            raise DataError(f"{path}: file not found") from None
        except Exception as err:
            raise DataError(f"{path}: unreadable .npy ({type(err).__name__}: {err})") from None
    products = read_products(products_path)
    if len(products) != arrays[1].shape[0]:
        raise DataError(f"{products_path}: {len(products)} products for {arrays[1].shape[0]} S2 dates")
    return arrays[0], arrays[1], products


def open_s2(row: pd.Series) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(data, masks, products) of the zone of an index row."""
    if not str(row["s2_data"]) or int(row["s2_row"]) < 0:
        raise DataError(f"patch {row['id']}: no Sentinel-2 super-area or centroid in the index")
    return _zone_s2(str(row["s2_data"]), str(row["s2_masks"]), str(row["s2_products"]))


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
    n, b = S2_UNDER_PATCH, AERIAL_PER_S2
    labels = remap(label_raw)
    if labels.shape[0] < n * b or labels.shape[1] < n * b:
        raise DataError(f"label of shape {labels.shape} is smaller than {n * b}x{n * b}")
    blocks = labels[:n * b, :n * b].reshape(n, b, n, b).transpose(0, 2, 1, 3).reshape(n, n, b * b)
    counts = (blocks[..., None] == np.arange(NUM_CLASSES, dtype=np.uint8)).sum(axis=2)
    major = counts.argmax(axis=-1)
    return np.where(counts.max(axis=-1) >= purity * b * b, major, -1)


def s2_survey(rows: pd.DataFrame, purity: float = 0.8, size: int = S2_WINDOW, prob_min: int = 60,
              cover_max: float = 0.5) -> dict[str, pd.DataFrame]:
    """One pass over the sampled patches' S2 series (each window read once).

    Returns {"cover": one row per (patch, date): id, domain, split, date, snow, cloud, cover, kept;
    "lengths": per patch: raw dates, after the cloud filter, after monthly compositing;
    "ndvi": per (class, month): mean and std NDVI of the pure S2 pixels under labelled patches on the
    cloud-filtered monthly composites the model sees, pixels (pixel-months) and patches}.
    """
    covers, lengths = [], []
    acc: dict[tuple[int, int], list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
    patches: dict[tuple[int, int], set[str]] = defaultdict(set)
    lo = size // 2 - S2_UNDER_PATCH // 2
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
        classes = s2_pixel_classes(read_label(r["msk_path"]), purity)
        nd = ndvi(x[:, :, lo:lo + S2_UNDER_PATCH, lo:lo + S2_UNDER_PATCH])
        months = [d.month for d in days_to_dates(days, reference_year(list(cov["date"].dt.date)))]
        for k in np.unique(classes[classes >= 0]):
            values = nd[:, classes == k]
            for month, v in zip(months, values):
                v = v[np.isfinite(v)]
                if v.size:
                    a = acc[(int(k), month)]
                    a[0] += float(v.sum())
                    a[1] += float((v.astype(np.float64) ** 2).sum())
                    a[2] += v.size
                    patches[(int(k), month)].add(str(r["id"]))
    records = []
    for (k, month), (s, ss, n) in sorted(acc.items()):
        mean = s / n
        records.append({"class": k, "name": CLASS_NAMES[k], "month": month, "mean": mean,
                        "std": float(np.sqrt(max(ss / n - mean * mean, 0.0))), "pixels": int(n),
                        "patches": len(patches[(k, month)])})
    cover_cols = ["id", "domain", "split", "date", "snow", "cloud", "cover", "kept"]
    cover = pd.concat(covers, ignore_index=True)[cover_cols] if covers else pd.DataFrame(columns=cover_cols)
    return {
        "cover": cover,
        "lengths": pd.DataFrame(lengths, columns=["id", "domain", "split", "raw", "filtered", "monthly"]),
        "ndvi": pd.DataFrame(records, columns=["class", "name", "month", "mean", "std", "pixels", "patches"]),
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


def _s2_rgb(x: np.ndarray) -> np.ndarray:
    """(10, h, w) reflectance x 10000 -> (h, w, 3) float true colour in 0..1; pixels outside grey."""
    rgb = np.moveaxis(np.asarray(x, dtype=np.float32)[list(S2_RGB)], 0, -1) / S2_RGB_MAX
    return np.where(np.isnan(rgb), 0.5, np.clip(rgb, 0, 1))


def _footprint(ax, size: int) -> None:
    from matplotlib.patches import Rectangle

    lo = size // 2 - S2_UNDER_PATCH // 2 - 0.5
    ax.add_patch(Rectangle((lo, lo), S2_UNDER_PATCH, S2_UNDER_PATCH, fill=False, edgecolor="w",
                           linewidth=0.6))


def plot_s2_thumbnails(row: pd.Series, path: str | os.PathLike, cover_max: float = 0.5,
                       max_dates: int = 60, cols: int = 10) -> Path:
    """True-colour thumbnails (B4, B3, B2) of every date of a patch's 40x40 window, with the cover; dates the
    cloud/snow filter drops are framed in red. The white square is the aerial patch's footprint."""
    plt = _plt()
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
    return save_figure(fig, path)


def plot_s2_cover(row: pd.Series, survey: dict[str, pd.DataFrame], path: str | os.PathLike,
                  cover_max: float = 0.5) -> Path:
    """Snow + cloud cover per date of one patch with the filter threshold; cover of every sampled
    (patch, date); series lengths raw / filtered / monthly over the sampled patches."""
    plt = _plt()
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
    return save_figure(fig, path)


def plot_s2_monthly(row: pd.Series, path: str | os.PathLike) -> Path:
    """Before/after monthly compositing for one patch: NDVI of the pixels under the patch on every date
    (kept / dropped) and on the monthly composites, plus true-colour thumbnails of the composites."""
    plt = _plt()
    lo = S2_WINDOW // 2 - S2_UNDER_PATCH // 2
    centre = slice(lo, lo + S2_UNDER_PATCH)
    raw, raw_dates = patch_series(row, monthly=False, filter_clouds=False)
    comp, comp_dates = patch_series(row, monthly=True, filter_clouds=True)
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
    return save_figure(fig, path)


def plot_ndvi_classes(ndvi_table: pd.DataFrame, path: str | os.PathLike, min_pixels: int = 5) -> Path:
    """Monthly NDVI per class (mean over the pure S2 pixels under labelled patches), official colours."""
    plt = _plt()
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
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------- metadata
def metadata_table(df: pd.DataFrame) -> pd.DataFrame:
    """Metadata columns of the index with parsed types: date (datetime, NaT when missing), hour (float)."""
    cols = ["id", "split", "domain", "zone", "camera", "date", "time",
            "patch_centroid_x", "patch_centroid_y", "patch_centroid_z"]
    out = df[cols].copy()
    out["date"] = pd.to_datetime(out["date"].replace("", None), format="%Y-%m-%d", errors="coerce")

    def hour(text: str) -> float:
        m = _HOUR_RE.match(str(text))
        return int(m.group(1)) + int(m.group(2)) / 60 if m else np.nan

    out["hour"] = out["time"].map(hour).astype(float)
    return out


def plot_metadata(meta: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Acquisition month, hour of day, camera and altitude of the aerial patches, train vs test."""
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(13, 8))
    (ax_m, ax_h), (ax_c, ax_z) = axes
    splits = [s for s in ("train", "test") if (meta["split"] == s).any()]
    colours = {"train": "tab:blue", "test": "tab:orange"}
    width = 0.8 / max(len(splits), 1)
    for i, split in enumerate(splits):
        sel = meta[meta["split"] == split]
        counts = sel["date"].dt.month.value_counts().reindex(range(1, 13), fill_value=0)
        ax_m.bar(np.arange(1, 13) + (i - (len(splits) - 1) / 2) * width, 100 * counts / max(len(sel), 1),
                 width, color=colours[split], label=split)
        hours = sel["hour"].dropna()
        if len(hours):
            ax_h.hist(hours, bins=np.arange(5, 21, 0.5), weights=np.full(len(hours), 100 / len(hours)),
                      histtype="step", linewidth=1.5, color=colours[split], label=split)
        z = sel["patch_centroid_z"].dropna()
        if len(z):
            bins = np.histogram_bin_edges(meta["patch_centroid_z"].dropna(), bins=30)
            ax_z.hist(z, bins=bins, weights=np.full(len(z), 100 / len(z)), histtype="step", linewidth=1.5,
                      color=colours[split], label=split)
    ax_m.set_xticks(range(1, 13), MONTHS)
    ax_m.set_ylabel("% of patches")
    ax_m.set_title("aerial acquisition month", fontsize=10)
    ax_h.set_xlabel("hour of day")
    ax_h.set_ylabel("% of patches")
    ax_h.set_title("acquisition time", fontsize=10)
    ax_z.set_xlabel("altitude of the patch centroid (m)")
    ax_z.set_ylabel("% of patches")
    ax_z.set_title("altitude", fontsize=10)
    cams = meta.assign(camera=meta["camera"].replace("", "(unknown)")).groupby(["camera", "split"]).size()
    cams = cams.unstack(fill_value=0).reindex(columns=splits, fill_value=0)
    cams = cams.loc[cams.sum(axis=1).sort_values().index]
    left = np.zeros(len(cams))
    for split in splits:
        ax_c.barh(range(len(cams)), cams[split], left=left, color=colours[split], label=split)
        left += cams[split].to_numpy()
    ax_c.set_yticks(range(len(cams)), cams.index, fontsize=8)
    ax_c.set_xlabel("patches")
    ax_c.set_title("camera", fontsize=10)
    for ax in axes.ravel():
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def france_paths():
    """matplotlib Paths of the rough France outline (Lambert-93 km)."""
    from matplotlib.path import Path as MplPath

    return [MplPath(np.array(poly, dtype=float)) for poly in FRANCE_L93_KM]


def inside_france(x_m: np.ndarray, y_m: np.ndarray) -> np.ndarray:
    """True for the Lambert-93 points (metres) inside the rough outline."""
    pts = np.column_stack([np.asarray(x_m, float), np.asarray(y_m, float)]) / 1000.0
    out = np.zeros(len(pts), dtype=bool)
    for p in france_paths():
        out |= p.contains_points(pts)
    return out


def domain_positions(meta: pd.DataFrame) -> pd.DataFrame:
    """Median centroid (Lambert-93 m) and patch count of each (split, domain) with coordinates."""
    sel = meta.dropna(subset=["patch_centroid_x", "patch_centroid_y"])
    return sel.groupby(["split", "domain"]).agg(x=("patch_centroid_x", "median"),
                                                y=("patch_centroid_y", "median"),
                                                patches=("id", "size")).reset_index()


def nearest_train_domain(meta: pd.DataFrame) -> pd.DataFrame:
    """For each test domain: the nearest train domain (median centroids) and the distance in km."""
    pos = domain_positions(meta)
    train, test = pos[pos["split"] == "train"], pos[pos["split"] == "test"]
    rows = []
    for _, t in test.iterrows():
        if train.empty:
            break
        d = np.hypot(train["x"] - t["x"], train["y"] - t["y"]).to_numpy() / 1000.0
        i = int(np.argmin(d))
        rows.append({"test_domain": t["domain"], "nearest_train": train.iloc[i]["domain"],
                     "km": round(float(d[i]), 1)})
    return pd.DataFrame(rows, columns=["test_domain", "nearest_train", "km"])


def plot_map(meta: pd.DataFrame, path: str | os.PathLike, max_points: int = 30000, seed: int = 0) -> Path:
    """Patch centroids (Lambert-93) over a rough outline of France, coloured by domain (o train, ^ test)."""
    plt = _plt()
    from matplotlib.lines import Line2D
    from matplotlib.patches import PathPatch

    fig, ax = plt.subplots(figsize=(8.5, 8.5))
    for p in france_paths():
        ax.add_patch(PathPatch(p, facecolor="0.94", edgecolor="0.5", linewidth=1))
    sel = meta.dropna(subset=["patch_centroid_x", "patch_centroid_y"])
    if len(sel) > max_points:
        sel = sel.sample(max_points, random_state=seed)
    cmap = plt.get_cmap("tab20")
    domains = sorted(meta["domain"].unique())
    colour = {d: cmap(i % 20) for i, d in enumerate(domains)}
    for (split, domain), grp in sel.groupby(["split", "domain"]):
        ax.scatter(grp["patch_centroid_x"] / 1000, grp["patch_centroid_y"] / 1000, s=10, color=colour[domain],
                   marker="^" if split == "test" else "o", edgecolors="none", rasterized=True)
    for _, r in domain_positions(meta).iterrows():
        ax.annotate(r["domain"].split("_")[0], (r["x"] / 1000, r["y"] / 1000), fontsize=7, xytext=(3, 3),
                    textcoords="offset points", fontweight="bold" if r["split"] == "test" else "normal")
    ax.set_aspect("equal")
    ax.set_xlim(50, 1300)
    ax.set_ylim(6000, 7180)
    ax.set_xlabel("Lambert-93 x (km)")
    ax.set_ylabel("Lambert-93 y (km)")
    ax.set_title(f"patch centroids of {len(domains)} domains (colour = domain; bold label = test domain)",
                 fontsize=10)
    handles = [Line2D([], [], marker=m, linestyle="", color="0.3", label=s)
               for m, s in (("o", "train"), ("^", "test"))]
    ax.legend(handles=handles, loc="lower left", fontsize=8)
    return save_figure(fig, path)


# ------------------------------------------------------------------------------------------- conclusions
def _pct(v: float) -> str:
    return f"{v:.1f}%" if np.isfinite(v) else "n/a"


def _top_classes(pct: pd.Series, n: int = 3) -> str:
    top = pct.sort_values(ascending=False, kind="stable").head(n)
    return ", ".join(f"{name} ({_pct(v)})" for name, v in top.items())


def conclude_classes(hist: pd.DataFrame) -> str:
    """Markdown summary of the class frequencies (built from the numbers, true on any data)."""
    pct = percent_table(hist, "split")
    info = hist.attrs.get("masks", {})
    counted = "; ".join(f"{s}: {n} of {total} labelled masks" for s, (n, total) in info.items())
    lines = [f"- Masks counted: {counted}."]
    for split in [s for s in ("train", "test") if s in pct.index]:
        lines.append(f"- Most frequent classes in **{split}**: {_top_classes(pct.loc[split])}; "
                     f"'other' (raw 13-19, not scored): {_pct(pct.loc[split, 'other'])}.")
    if {"train", "test"} <= set(pct.index):
        shift = split_shift(hist).head(3)
        parts = [f"{r['name']} {_pct(r['train_pct'])} -> {_pct(r['test_pct'])} ({r['diff_pts']:+.1f} pts, "
                 f"x{r['ratio']:.2f})" for _, r in shift.iterrows()]
        lines.append(f"- Largest train -> test changes of class share: {'; '.join(parts)}.")
    dom = percent_table(hist, "domain")
    spread = (dom.max() - dom.min()).drop("other")
    k = spread.idxmax()
    lines.append(f"- Between domains, the share of **{k}** varies most: {_pct(dom[k].min())} "
                 f"({dom[k].idxmin()}) to {_pct(dom[k].max())} ({dom[k].idxmax()}).")
    div = domain_divergence(hist)
    (split, domain), r = div.index[0], div.iloc[0]
    lines.append(f"- Most atypical domain: {domain} ({split}), Jensen-Shannon divergence "
                 f"{r['js_bits']:.3f} bits from all training pixels (median over domains "
                 f"{div['js_bits'].median():.3f}); its top class is {r['top_class']}.")
    if spread.max() >= 5:
        lines.append(f"- Class shares differ between domains by up to {spread.max():.0f} percentage points, "
                     "so a validation fold must hold out whole domains (what `make folds` does) to estimate "
                     "the score on unseen test domains.")
    return "\n".join(lines)


def _span(values: pd.Series) -> str:
    lo, hi = int(values.min()), int(values.max())
    return str(lo) if lo == hi else f"{lo} to {hi}"


def conclude_folds(stats: pd.DataFrame, hist: pd.DataFrame) -> str:
    """Markdown summary of the fold balance against single domains."""
    div = domain_divergence(hist[hist["split"] == "train"])
    sizes = stats["patches"].astype(int)
    per_fold = stats["domains"].str.split().str.len()
    fold_js, dom_js = float(stats["js"].mean()), float(div["js_bits"].mean())
    if per_fold.max() <= 1:
        verdict = "each fold is a single domain here, so folds cannot be more balanced than domains."
    elif fold_js < dom_js:
        verdict = "grouping domains into folds brings each fold's class mix closer to the whole training set."
    else:
        verdict = "grouping domains does not reduce the divergence here."
    return "\n".join([
        f"- {len(stats)} folds of {_span(per_fold)} domain(s) and {_span(sizes)} patches each.",
        f"- Jensen-Shannon divergence of each fold from all training pixels: "
        f"{', '.join(f'{v:.4f}' for v in stats['js'])} bits (mean {fold_js:.4f}), against a mean of "
        f"{dom_js:.4f} bits for a single training domain: {verdict}",
    ])


def conclude_images(stats: pd.DataFrame) -> str:
    """Markdown summary of the aerial band statistics of the sample."""
    band_names, band_mean, _ = band_constants()
    z = band_shift(stats)
    split, domain, band = z.abs().stack().idxmax()
    value = z.loc[(split, domain), band]
    means = stats[[f"mean_{b}" for b in band_names]].mean().to_numpy()
    pairs = ", ".join(f"{b} {m:.1f} vs {ref:.1f}" for b, m, ref in zip(band_names, means, band_mean))
    far = int((z.abs() > 0.5).to_numpy().sum())
    return "\n".join([
        f"- {len(stats)} sampled patches from {stats['domain'].nunique()} domains.",
        f"- Band means of the sample vs the kit's normalisation means (src.dataset.BAND_MEAN): {pairs}.",
        f"- Largest domain shift: {domain} ({split}) in band {band}, {value:+.2f} std from BAND_MEAN; "
        f"{far} of {z.size} (domain, band) means are more than 0.5 std away"
        + (": radiometry changes from one domain to the next, which colour augmentation has to cover."
           if far else "."),
    ])


def conclude_s2(survey: dict[str, pd.DataFrame], row: pd.Series, cover_max: float = 0.5) -> str:
    """Markdown summary of cloud/snow cover and series lengths."""
    cov, lengths = survey["cover"], survey["lengths"]
    mine = lengths[lengths["id"] == row["id"]].iloc[0]
    none_kept = int((cov.groupby("id")["cover"].min() >= cover_max).sum())
    return "\n".join([
        f"- {len(lengths)} sampled patches, {len(cov)} (patch, date) pairs: "
        f"{100 * (cov['cover'] >= cover_max).mean():.1f}% have a snow + cloud cover >= {cover_max:g} and are "
        f"dropped by the filter (snow alone >= {cover_max:g}: "
        f"{100 * (cov['snow'] >= cover_max).mean():.1f}%).",
        f"- {none_kept} patch(es) have no date under the threshold (the kit then keeps the least covered "
        "dates instead of crashing like the baseline).",
        f"- Dates per series, median (min-max): raw {lengths['raw'].median():g} ({lengths['raw'].min()}-"
        f"{lengths['raw'].max()}), after the filter {lengths['filtered'].median():g} "
        f"({lengths['filtered'].min()}-{lengths['filtered'].max()}), after monthly compositing "
        f"{lengths['monthly'].median():g} ({lengths['monthly'].min()}-{lengths['monthly'].max()}).",
        f"- Patch {row['id']} shown above: {mine['raw']} dates -> {mine['filtered']} kept -> "
        f"{mine['monthly']} monthly composites.",
    ])


def _named(values: pd.Series) -> str:
    return ", ".join(f"{n} ({v:.2f})" for n, v in values.items())


def conclude_ndvi(table: pd.DataFrame, min_pixels: int = 5) -> str:
    """Markdown summary of the NDVI curves per class."""
    t = table[table["pixels"] >= min_pixels]
    if t.empty:
        return "- No S2 pixel under the sampled patches is pure enough for a per-class NDVI curve."
    per_class = t.groupby("name")["mean"]
    year_mean = per_class.mean().sort_values(ascending=False)
    amp = (per_class.max() - per_class.min())
    amp = amp[t.groupby("name")["month"].nunique() >= 3].sort_values(ascending=False)
    lines = [f"- {t['pixels'].sum()} pixel-months from {t['class'].nunique()} classes.",
             f"- Highest mean NDVI over the months: {_named(year_mean.head(3))}; "
             f"lowest: {_named(year_mean.tail(2))}."]
    if len(amp):
        name = amp.index[0]
        c = t[t["name"] == name].set_index("month")["mean"]
        lines.append(f"- Largest seasonal amplitude (classes seen in >= 3 months): {name}, NDVI "
                     f"{c.min():.2f} ({MONTHS[c.idxmin() - 1]}) to {c.max():.2f} ({MONTHS[c.idxmax() - 1]}).")
    a = t[t["class"] == 10].set_index("month")["mean"]  # agricultural land
    h = t[t["class"] == 9].set_index("month")["mean"]  # herbaceous vegetation
    both = a.index.intersection(h.index)
    if len(both):
        diff = (a[both] - h[both]).abs()
        m = int(diff.idxmax())
        verdict = ("the S2 time series tells these two low-vegetation classes apart in some months."
                   if diff.max() >= 0.1 else "their NDVI curves are close.")
        lines.append(f"- Agricultural land vs herbaceous vegetation: monthly NDVI differs by up to "
                     f"{diff.max():.2f} ({MONTHS[m - 1]}: {a[m]:.2f} vs {h[m]:.2f}), {diff.mean():.2f} on "
                     f"average over {len(both)} shared months: {verdict}")
    return "\n".join(lines)


def conclude_metadata(meta: pd.DataFrame) -> str:
    """Markdown summary of acquisition dates, times, cameras and altitude."""
    lines = []
    dates = meta["date"].dropna()
    if len(dates):
        months = dates.dt.month.value_counts(normalize=True)
        top = ", ".join(f"{MONTHS[m - 1]} {100 * v:.0f}%" for m, v in months.head(3).items())
        lines.append(f"- Aerial images taken from {dates.min():%Y-%m-%d} to {dates.max():%Y-%m-%d} "
                     f"(years {', '.join(str(y) for y in sorted(dates.dt.year.unique()))}); "
                     f"busiest months: {top}.")
    else:
        lines.append("- No acquisition dates in the index (metadata JSON missing).")
    hours = meta["hour"].dropna()
    if len(hours):
        med = int(round(hours.median() * 60))
        lines.append(f"- Acquisition time: median {med // 60}h{med % 60:02d}, 5-95% range "
                     f"{hours.quantile(0.05):.1f} h to {hours.quantile(0.95):.1f} h.")
    cams = meta["camera"][meta["camera"] != ""].value_counts(normalize=True)
    if len(cams):
        lines.append(f"- {len(cams)} camera(s); most common {cams.index[0]} "
                     f"({100 * cams.iloc[0]:.0f}% of patches).")
    z = meta.dropna(subset=["patch_centroid_z"])
    parts = [f"{s} median {g.median():.0f} m (5-95%: {g.quantile(0.05):.0f}-{g.quantile(0.95):.0f} m)"
             for s in ("train", "test") if len(g := z.loc[z["split"] == s, "patch_centroid_z"])]
    if parts:
        lines.append(f"- Altitude of the patch centroids: {'; '.join(parts)}.")
    return "\n".join(lines)


def conclude_map(meta: pd.DataFrame) -> str:
    """Markdown summary of where the domains are."""
    sel = meta.dropna(subset=["patch_centroid_x", "patch_centroid_y"])
    if sel.empty:
        return "- No patch centroid coordinates in the index (metadata JSON missing)."
    inside = inside_france(sel["patch_centroid_x"], sel["patch_centroid_y"])
    x, y = sel["patch_centroid_x"] / 1000, sel["patch_centroid_y"] / 1000
    outside = "" if inside.all() else (" (the others lie near the coast, where the outline is coarse, or are "
                                       "misplaced)")
    lines = [f"- {len(sel)} centroids of {sel['domain'].nunique()} domains, x {x.min():.0f}-{x.max():.0f} "
             f"km, y {y.min():.0f}-{y.max():.0f} km; {100 * inside.mean():.1f}% fall inside the rough "
             f"outline drawn here{outside}."]
    near = nearest_train_domain(meta)
    if len(near) == 1:
        r = near.iloc[0]
        lines.append(f"- The nearest training domain to the test domain {r['test_domain']} is "
                     f"{r['nearest_train']}, {r['km']:.0f} km away.")
    elif len(near):
        far = near.sort_values("km").iloc[-1]
        lines.append(f"- Each test domain's nearest training domain lies {near['km'].min():.0f} to "
                     f"{near['km'].max():.0f} km away (median {near['km'].median():.0f} km; farthest: "
                     f"{far['test_domain']}, {far['km']:.0f} km from {far['nearest_train']}).")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------- notebook helpers
def show(path: str | os.PathLike | None) -> None:
    """Display a saved figure inline (notebook)."""
    from IPython.display import Image, display

    if path is not None:
        display(Image(filename=str(path), alt=Path(path).stem.replace("_", " ")))


def md(text: str) -> None:
    """Display generated Markdown (notebook)."""
    from IPython.display import Markdown, display

    display(Markdown(text))


def figure_report(folder: str | os.PathLike) -> pd.DataFrame:
    """The PNGs of a figure folder with their size (the last cell of the notebook)."""
    folder = Path(folder)
    rows = [{"figure": p.name, "kB": round(p.stat().st_size / 1024, 1)} for p in sorted(folder.glob("*.png"))]
    return pd.DataFrame(rows, columns=["figure", "kB"])


# ------------------------------------------------------------------------------------------- execution
def inject_parameters(nb, params: dict) -> None:
    """Insert a cell setting `params` right after the cell tagged "parameters" (papermill's convention),
    so the executed notebook shows the values used; any earlier injected cell is replaced."""
    import nbformat

    cells = [c for c in nb.cells if "injected-parameters" not in c.get("metadata", {}).get("tags", [])]
    at = next((i for i, c in enumerate(cells) if "parameters" in c.get("metadata", {}).get("tags", [])), None)
    if at is None:
        raise ValueError("notebook has no cell tagged 'parameters'")
    lines = [f"{k} = {v!r}" for k, v in params.items()]
    source = "\n".join(["# Parameters injected by `python -m src.eda`", *lines])
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    cells.insert(at + 1, cell)
    nb.cells = cells


def _write_atomic(path: Path, text: str) -> None:
    rasters.write_text(path, text)


def _venv_kernel_manager_class():
    """AsyncKernelManager that only sees ipykernel's own "python3" spec, which launches sys.executable (the
    venv's python), never a user-level or system "python3" kernelspec pointing at another interpreter."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import default

    class VenvKernelManager(AsyncKernelManager):
        @default("kernel_spec_manager")
        def _venv_kernel_spec_manager(self) -> KernelSpecManager:
            return KernelSpecManager(kernel_dirs=[])

    return VenvKernelManager


def run_notebook(data: str | os.PathLike, out: str | os.PathLike = DEFAULT_OUT,
                 notebook: str | os.PathLike = NOTEBOOK, params: dict | None = None, timeout: int = 900,
                 html: bool = True) -> tuple[Path, Path | None]:
    """Execute the notebook on `data` with nbclient in a kernel running this interpreter (the venv's), then
    write OUT/eda.ipynb and OUT/eda.html. Figures go to OUT/figures. On a failing cell the partly executed
    notebook is still written (for reading the traceback) and the error is raised."""
    import nbformat
    from nbclient import NotebookClient
    from traitlets.config import Config

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    nb = nbformat.read(str(notebook), as_version=4)
    values = {"DATA": str(Path(data).resolve()), "FIGURES": str(out / "figures"), "CACHE": str(out / "cache")}
    values.update(params or {})
    inject_parameters(nb, values)
    ipynb = out / f"{Path(notebook).stem}.ipynb"
    with tempfile.TemporaryDirectory(prefix="eda-kernel-") as sockets:
        # IPC sockets in a temp folder: local only, nothing left behind.
        config = Config({"KernelManager": {"transport": "ipc", "ip": os.path.join(sockets, "kernel")}})
        client = NotebookClient(nb, timeout=timeout, kernel_name="python3", config=config,
                                kernel_manager_class=_venv_kernel_manager_class(),
                                resources={"metadata": {"path": str(REPO)}})
        try:
            client.execute()
        finally:
            _write_atomic(ipynb, nbformat.writes(nb))
    html_path = None
    if html:
        from nbconvert import HTMLExporter

        body, _ = HTMLExporter().from_notebook_node(nb)
        html_path = out / f"{Path(notebook).stem}.html"
        _write_atomic(html_path, body)
    return ipynb, html_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Execute notebooks/eda.ipynb headlessly into OUT (+ HTML).")
    p.add_argument("--data", default="data",
                   help="folder with index_train.csv (+ folds.csv), or a raw data root")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (eda.ipynb, eda.html, figures/)")
    p.add_argument("--notebook", default=str(NOTEBOOK))
    p.add_argument("--images", type=int, default=None, help="aerial patches sampled (notebook default 48)")
    p.add_argument("--s2", type=int, default=None, help="patches sampled for S2 statistics (default 150)")
    p.add_argument("--masks", type=int, default=None, help="masks counted per split without class_hist.csv")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    p.add_argument("--no-html", action="store_true")
    args = p.parse_args(argv)
    data = Path(args.data)
    if not data.is_dir():
        print(f"eda: error: {data}: data folder not found (a folder with index_train.csv, or a raw data "
              "root; e.g. make synth index, then make eda EDA_DATA=data)", file=sys.stderr)
        return 1
    params = {k: v for k, v in (("N_IMAGES", args.images), ("N_S2", args.s2), ("N_MASKS", args.masks),
                                ("SEED", args.seed)) if v is not None}
    if not (data / "index_train.csv").is_file():
        print(f"eda: no index_train.csv in {data}: indexing it as a raw data root in memory (slow on the "
              "real data; `make index` writes the index once)", flush=True)
    start = time.perf_counter()
    try:
        ipynb, html = run_notebook(data, args.out, args.notebook, params, args.timeout, not args.no_html)
    except Exception as err:
        from nbclient.exceptions import CellExecutionError

        cell_error = isinstance(err, CellExecutionError)
        what = f"{err.ename}: {err.evalue}" if cell_error else f"{type(err).__name__}: {err}"
        print(f"eda: error: {what}", file=sys.stderr)
        print(f"eda: the partly executed notebook (with the traceback) is "
              f"{Path(args.out) / (Path(args.notebook).stem + '.ipynb')}", file=sys.stderr)
        return 1
    print(f"eda: {ipynb}" + (f", {html}" if html else "") + f", figures in {Path(args.out) / 'figures'} "
          f"({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
