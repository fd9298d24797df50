"""How balanced a fold assignment is: per-fold class pixel counts and divergence, the text printed by
`make folds`, and DATA/folds.png (stacked class bars per fold, official colours)."""
from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import pandas as pd

from src.class_hist import HIST_COLS
from src.classes import CLASS_COLORS_HEX, CLASS_NAMES, NUM_CLASSES
from src.fileio import save_figure
from src.fold_assign import js_divergence


def fold_stats(table: pd.DataFrame, assignment: Mapping[str, int]) -> pd.DataFrame:
    """Per fold (index 0..K-1): domains (space-separated), patches, c0..c12 pixel counts, js (bits)."""
    missing = [d for d in table.index if d not in assignment]
    if missing:
        raise ValueError(f"domains without a fold: {missing}")
    folds = pd.Series({d: assignment[d] for d in table.index}, name="fold")
    stats = table.groupby(folds)[HIST_COLS + ["patches"]].sum()
    names = {f: " ".join(sorted(d for d in table.index if assignment[d] == f)) for f in stats.index}
    stats.insert(0, "domains", [names[f] for f in stats.index])
    stats["js"] = js_divergence(stats[HIST_COLS].to_numpy(), table[HIST_COLS].sum().to_numpy())
    return stats


def summarize(stats: pd.DataFrame) -> tuple[float, float]:
    """(mean JS divergence in bits, largest relative patch-count deviation from N/K)."""
    sizes = stats["patches"].to_numpy(float)
    return float(stats["js"].mean()), float(np.abs(sizes / sizes.mean() - 1).max())


def report(stats: pd.DataFrame, table: pd.DataFrame) -> str:
    """The per-fold text printed by the CLI: domains, patches, class percentages, divergence."""
    short = [name.split()[0][:6] for name in CLASS_NAMES]
    lines = [f"{'fold':>4} {'patches':>8} {'JS bits':>8} " + " ".join(f"{s:>6}" for s in short)]

    def row(name: str, patches: int, js: str, pixels: np.ndarray) -> str:
        pct = 100 * pixels / max(pixels.sum(), 1)
        return f"{name:>4} {patches:>8} {js:>8} " + " ".join(f"{p:6.2f}" for p in pct)

    for f, r in stats.iterrows():
        lines.append(row(str(f), int(r["patches"]), f"{r['js']:.5f}", r[HIST_COLS].to_numpy(float)))
    lines.append(row("all", int(table["patches"].sum()), "-", table[HIST_COLS].sum().to_numpy(float)))
    lines.append("class columns: % of labelled pixels; JS = Jensen-Shannon divergence (base 2, bits) of the "
                 "fold's class distribution from all training pixels")
    for f, r in stats.iterrows():
        lines.append(f"fold {f}: {len(r['domains'].split())} domains: {r['domains']}")
    return "\n".join(lines)


def plot_folds(stats: pd.DataFrame, table: pd.DataFrame, path: str | os.PathLike, title: str = "") -> None:
    """Stacked bars of the class distribution per fold (plus all training pixels), official colours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pixels = np.vstack([stats[HIST_COLS].to_numpy(float), table[HIST_COLS].sum().to_numpy(float)])
    pct = 100 * pixels / np.maximum(pixels.sum(axis=1, keepdims=True), 1)
    labels = [f"fold {f}\n{int(n)} patches\nJS {js:.4f}"
              for f, n, js in zip(stats.index, stats["patches"], stats["js"])]
    labels.append(f"all\n{int(table['patches'].sum())} patches")
    fig, ax = plt.subplots(figsize=(1.6 * len(labels) + 3.5, 5.5))
    bottom = np.zeros(len(labels))
    for c in range(NUM_CLASSES):
        ax.bar(labels, pct[:, c], bottom=bottom, color=CLASS_COLORS_HEX[c], edgecolor="0.3", linewidth=0.3,
               label=CLASS_NAMES[c])
        bottom += pct[:, c]
    ax.set_ylabel("% of labelled pixels")
    ax.set_ylim(0, 100)
    ax.set_title(title or "class distribution per fold (JS: Jensen-Shannon divergence from all, bits)")
    handles, names = ax.get_legend_handles_labels()  # reversed: legend top = top of the stack
    ax.legend(handles[::-1], names[::-1], loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8,
              frameon=False)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
