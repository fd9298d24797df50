"""What a training run leaves in runs/<name>/fold<k>/: where that folder is, metrics.csv and curves.png,
and setting an earlier run aside on a fresh start (so an old best.pt is never taken for the new run's)."""
from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from src.classes import CLASS_NAMES
from src.fileio import atomic_write, save_figure

IOU_COLS = [f"iou_{k}_{name.replace(' ', '_')}" for k, name in enumerate(CLASS_NAMES)]
CSV_COLS = ["epoch", "step", "lr", "train_loss", "train_s2_loss", "val_loss", "miou", *IOU_COLS,
            "img_s", "epoch_s", "nan_steps", "val_skipped"]
RUN_FILES = ("config.yaml", "metrics.csv", "curves.png", "best.pt", "last.pt", "skipped.tsv", "domains.csv",
             "domains.png")
TB_EVENTS = "events.out.tfevents.*"  # TensorBoard event files (src.tracking), set aside with the rest


def run_dir_of(cfg: dict[str, Any], fold: str) -> Path:
    return Path(cfg["runs_dir"]) / cfg["name"] / f"fold{fold}"


def set_aside_previous_run(run_dir: Path, log: Callable[[str], None] = print) -> None:
    """A fresh start (--resume 0) in a used folder moves the old outputs to previous/ (replacing
    what was there), so an old best.pt is never mistaken for the new run's, nor silently lost."""
    old = [run_dir / name for name in RUN_FILES if (run_dir / name).exists()]
    old += sorted(run_dir.glob(TB_EVENTS))
    if not any(p.suffix == ".pt" for p in old):
        return
    keep = run_dir / "previous"
    keep.mkdir(exist_ok=True)
    for p in keep.iterdir():
        p.unlink()
    for p in old:
        os.replace(p, keep / p.name)
    log(f"note: {run_dir} held an earlier run: moved to {keep}/ (use --resume 1 to continue a run)")


def _blank_nan(v: Any) -> Any:
    return "" if isinstance(v, float) and math.isnan(v) else v


def write_metrics(history: list[dict[str, Any]], run_dir: Path, plot: bool = True) -> None:
    """metrics.csv (one row per epoch, rewritten whole so a resumed run stays consistent) + curves.png.

    `plot=False` leaves curves.png as it is: drawing it costs ~0.4 s, as much as a short CPU epoch, and
    only validated epochs add a point to its mIoU panel (TensorBoard has the live curves)."""
    with atomic_write(run_dir / "metrics.csv") as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLS, extrasaction="ignore")
            writer.writeheader()
            for row in history:
                writer.writerow({k: _blank_nan(v) for k, v in row.items()})
    if plot or not (run_dir / "curves.png").exists():
        plot_curves(history, run_dir / "curves.png")


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key: str) -> tuple[list[int], list[float]]:  # validated epochs only (val_every)
        rows = [r for r in history if isinstance(r[key], float) and math.isfinite(r[key])]
        return [r["epoch"] for r in rows], [r[key] for r in rows]

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot(*series("train_loss"), "o-", label="train")
    ax1.plot(*series("val_loss"), "o-", label="validation")
    ax1.set_yscale("log")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.legend()
    ax2.plot(*series("miou"), "o-", color="C2")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("validation mIoU (classes 0..11)")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
