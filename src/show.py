"""A picture of a few predictions: aerial RGB, truth and prediction side by side in the official colours.

    python -m src.show --index data/index_test.csv --pred predictions/x --out predictions/x_grid.png [--n 4]

Looking at predictions catches what a single mIoU hides (a flipped or shifted output, a class never
predicted, blocky S2 artefacts). Patches are taken evenly spaced over the sorted ids that have a PRED
file, so the same call shows the same patches every time.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from src.analysis.common import DPI, class_legend, pyplot, rgb_of
from src.core.errors import DataError
from src.core.files import read_image, read_label, save_figure
from src.core.flair import colorize, remap
from src.core.tables import load_index


def pick_rows(index_df: pd.DataFrame, pred_dir: str | os.PathLike, n: int) -> pd.DataFrame:
    """n rows evenly spaced over the ids that have a PRED file (sorted by id)."""
    pred_dir = Path(pred_dir)
    df = index_df.sort_values("id")
    has = df["id"].astype(str).map(lambda i: (pred_dir / f"PRED_{i}.tif").is_file())
    df = df[has.to_numpy()]
    if df.empty:
        raise DataError(f"{pred_dir}: no PRED_<id>.tif for any id of the index")
    take = np.unique(np.linspace(0, len(df) - 1, num=min(n, len(df))).round().astype(int))
    return df.iloc[take]


def save_prediction_grid(index_df: pd.DataFrame, pred_dir: str | os.PathLike, out_png: str | os.PathLike,
                         n: int = 4) -> Path:
    """One row per patch: RGB image | truth (when the index has a label) | prediction, plus a legend."""
    plt = pyplot()
    rows = pick_rows(index_df, pred_dir, n)
    with_truth = "msk_path" in rows.columns and bool((rows["msk_path"].astype(str) != "").any())
    cols = 3 if with_truth else 2
    fig, axes = plt.subplots(len(rows), cols, figsize=(3.2 * cols + 2.6, 3.2 * len(rows)), squeeze=False)
    for ax_row, (_, r) in zip(axes, rows.iterrows()):
        pid = str(r["id"])
        panels = [(rgb_of(read_image(r["img_path"], bands=None)), f"{pid} RGB")]
        if with_truth:
            msk = str(r.get("msk_path", ""))
            truth = colorize(remap(read_label(msk))) if msk else None
            panels.append((truth, "truth" if msk else "no label"))
        panels.append((colorize(read_label(Path(pred_dir) / f"PRED_{pid}.tif")), "prediction"))
        for ax, (img, title) in zip(ax_row, panels):
            if img is not None:
                ax.imshow(img, interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    class_legend(fig, edgecolor="0.5", loc="center right")
    fig.tight_layout(rect=(0, 0, 1 - 2.4 / (3.2 * cols + 2.6), 1))
    return save_figure(fig, out_png, dpi=DPI)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--index", required=True, help="index CSV (img_path, msk_path)")
    ap.add_argument("--pred", required=True, help="folder of PRED_<id>.tif")
    ap.add_argument("--out", required=True, help="PNG to write")
    ap.add_argument("--n", type=int, default=4, help="number of patches (rows)")
    args = ap.parse_args(argv)
    try:
        out = save_prediction_grid(load_index(args.index), args.pred, args.out, args.n)
    except (DataError, FileNotFoundError) as err:
        print(f"show: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
