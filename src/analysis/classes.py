"""Classes and images in the EDA notebook: class frequencies per split, domain and fold, and grids of
patches with band statistics.

Class frequencies of the EDA notebook: per-patch pixel counts, the share of each class per split,
domain and fold, how far each domain's class mix is from the training set, and their figures
(docs/data-format.md, "Labels and classes" and "Folds").

Aerial patches in the EDA notebook: a grid of patches (RGB, false colour, elevation, label) and the
band statistics of a sample against the kit's normalisation constants (docs/data-format.md, "Aerial
images")."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from src.analysis.common import DPI, EdaData, class_legend, false_colour_of, pyplot, rgb_of, sample_by_domain
from src.core.errors import DataError
from src.core.files import read_image, read_label, save_figure
from src.core.flair import (
    BAND_MEAN,
    BAND_NAMES,
    BAND_STD,
    CLASS_COLORS_HEX,
    CLASS_NAMES,
    NUM_CLASSES,
    colorize,
    remap,
)
from src.prep.class_hist import HIST_COLS, class_histograms, domain_table
from src.prep.folds import fold_stats, js_divergence, plot_folds


def class_pixels(data: EdaData, cache_dir: str | os.PathLike, max_masks: int = 2000,
                 seed: int = 0) -> pd.DataFrame:
    """Per-patch class pixel counts (id, split, domain, zone, c0..c12) of the labelled patches of both splits.

    Train uses every mask through DATA/class_hist.csv (src.prep.class_hist's cache, filled by `make folds`)
    when it exists; otherwise, and for test, a domain-balanced sample of at most `max_masks` masks per
    split, counted by src.prep.class_hist.class_histograms and cached under `cache_dir`.
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
    """(per-fold stats, per-domain table) as `make folds` reports them (src.prep.folds.fold_stats,
    src.prep.class_hist.domain_table), or None without folds."""
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
    """The fold figure of `make folds` (src.prep.folds.plot_folds: stacked bars per fold + all training
    pixels, JS divergence)."""
    plot_folds(stats, table, path, title="class distribution per fold (folds.csv)")
    return Path(path)


def grid_patches(sample: pd.DataFrame, n: int = 4) -> pd.DataFrame:
    """n rows of a `sample_by_domain` sample for the patch grid, labelled ones first (distinct domains)."""
    labelled = sample["msk_path"].astype(str) != ""
    return pd.concat([sample[labelled], sample[~labelled]]).head(n)


def plot_patch_grid(rows: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Per patch: RGB, false colour (NIR, R, G), elevation (nDSM band) and the label over the RGB."""
    plt = pyplot()
    fig, axes = plt.subplots(len(rows), 4, figsize=(10.5, 2.6 * len(rows)), squeeze=False)
    present: set[int] = set()
    for ax_row, (_, r) in zip(axes, rows.iterrows()):
        img = read_image(r["img_path"])
        rgb = rgb_of(img)
        false = false_colour_of(img)
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
    return save_figure(fig, path, dpi=DPI, bbox_inches="tight")


def band_stats(rows: pd.DataFrame) -> pd.DataFrame:
    """Per sampled patch: id, split, domain and the mean and std of each aerial band (0..255 scale)."""
    records = []
    for _, r in rows.iterrows():
        img = read_image(r["img_path"]).reshape(len(BAND_NAMES), -1).astype(np.float32)
        rec = {"id": r["id"], "split": r["split"], "domain": r["domain"]}
        rec.update({f"mean_{b}": float(m) for b, m in zip(BAND_NAMES, img.mean(axis=1))})
        rec.update({f"std_{b}": float(s) for b, s in zip(BAND_NAMES, img.std(axis=1))})
        records.append(rec)
    return pd.DataFrame(records)


def band_shift(stats: pd.DataFrame) -> pd.DataFrame:
    """Per (split, domain) mean of each band, as a shift from the kit's normalisation mean in units of its
    std (src.core.flair BAND_MEAN / BAND_STD, the published train statistics): 0 = typical, +-1 = one std."""
    means = stats.groupby(["split", "domain"])[[f"mean_{b}" for b in BAND_NAMES]].mean()
    z = (means - BAND_MEAN) / BAND_STD
    return z.set_axis(list(BAND_NAMES), axis=1)


def plot_band_stats(stats: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Heat map of each domain's band means (shift from the normalisation mean, in std units) and the
    sample's band means next to the normalisation constants."""
    plt = pyplot()
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
    return save_figure(fig, path, dpi=DPI, bbox_inches="tight")
