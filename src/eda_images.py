"""Aerial patches in the EDA notebook: a grid of patches (RGB, false colour, elevation, label) and the
band statistics of a sample against the kit's normalisation constants (docs/data-format.md, "Aerial
images").
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from src.bands import BAND_MEAN, BAND_NAMES, BAND_STD
from src.classes import NUM_CLASSES, colorize, remap
from src.fileio import save_figure
from src.pictures import DPI, class_legend, false_colour_of, pyplot, rgb_of
from src.rasters import read_image, read_label


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
    std (src.bands BAND_MEAN / BAND_STD, the published train statistics): 0 = typical, +-1 = one std."""
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
