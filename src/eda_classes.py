"""Class frequencies of the EDA notebook: per-patch pixel counts, the share of each class per split,
domain and fold, how far each domain's class mix is from the training set, and their figures
(docs/data-format.md, "Labels and classes" and "Folds").
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from src.class_hist import HIST_COLS, class_histograms, domain_table
from src.classes import CLASS_COLORS_HEX, CLASS_NAMES, NUM_CLASSES
from src.eda_data import EdaData, sample_by_domain
from src.errors import DataError
from src.fileio import save_figure
from src.fold_assign import js_divergence
from src.fold_report import fold_stats, plot_folds
from src.pictures import DPI, class_legend, pyplot


def class_pixels(data: EdaData, cache_dir: str | os.PathLike, max_masks: int = 2000,
                 seed: int = 0) -> pd.DataFrame:
    """Per-patch class pixel counts (id, split, domain, zone, c0..c12) of the labelled patches of both splits.

    Train uses every mask through DATA/class_hist.csv (src.class_hist's cache, filled by `make folds`)
    when it exists; otherwise, and for test, a domain-balanced sample of at most `max_masks` masks per
    split, counted by src.class_hist.class_histograms and cached under `cache_dir`.
    attrs["masks"] = {split: (counted, labelled)} says how much was sampled.
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
    """(per-fold stats, per-domain table) as `make folds` reports them (src.fold_report.fold_stats,
    src.class_hist.domain_table), or None without folds."""
    if data.folds is None:
        return None
    table = domain_table(data.train, hist[hist["split"] == "train"])
    assignment = data.folds.groupby("domain")["fold"].first().to_dict()
    return fold_stats(table, assignment), table


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
    plt = pyplot()
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
    return save_figure(fig, path, dpi=DPI, bbox_inches="tight")


def plot_class_domains(hist: pd.DataFrame, path: str | os.PathLike) -> Path:
    """One stacked bar per domain (train domains, then test domains), official colours."""
    plt = pyplot()
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
    return save_figure(fig, path, dpi=DPI, bbox_inches="tight")


def plot_class_folds(stats: pd.DataFrame, table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """The fold figure of `make folds` (src.fold_report.plot_folds: stacked bars per fold + all training
    pixels, JS divergence)."""
    plot_folds(stats, table, path, title="class distribution per fold (folds.csv)")
    return Path(path)
