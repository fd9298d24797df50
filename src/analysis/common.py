"""What every section of the EDA notebook shares: the data it explores, display helpers, headless pictures
and class blocks of label maps.

What the EDA notebook explores: both index splits (+ folds.csv), and the domain-balanced samples every
image-based statistic uses, so a run takes about a minute even on the 77k real patches.

DATA is a folder holding index_train.csv / index_test.csv (+ optionally folds.csv and class_hist.csv,
written by `make index` / `make folds`), or a raw data root whose index is then built in memory
(docs/data-format.md, "The index").

What the EDA notebook displays besides tables: saved figures inline, generated Markdown, and the list
of the figures written (IPython imported only when called, so the analysis modules stay kernel-free).

Pieces shared by the kit's pictures (src.show's prediction grid, the EDA notebook's figures): headless
pyplot, display bands of an aerial image, the class legend in the official colours, the PNG resolution.

Why a module: both the `show` CLI and the EDA analysis draw aerial patches and class legends; keeping the
helpers here lets them agree without one importing the other (a CLI is never imported by a module).

Class counts and majority class of square blocks of a label map (numpy): which class covers a coarse
pixel, e.g. the 50 x 50 aerial pixels under one Sentinel-2 pixel (docs/data-format.md, "Geometry").

Torch-free on purpose: the EDA reads it without importing torch. The training loss pools its S2 target
on the device with torch (src.models.losses.downsample_mask: adaptive bins of any size ratio, no purity), a
different operation on a different array type."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from src.core.errors import DataError
from src.core.flair import CLASS_COLORS_HEX, CLASS_NAMES, NUM_CLASSES
from src.core.tables import load_folds, load_index
from src.prep.index_scan import build_index

MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


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


DPI = 80  # resolution of the kit's PNG pictures (small files, still readable)


def pyplot():
    """matplotlib.pyplot on the Agg backend (headless: nbclient, CI, servers without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def rgb_of(image: np.ndarray) -> np.ndarray:
    """(C, H, W) uint8 aerial image -> (H, W, 3) uint8 from its first three bands (R, G, B)."""
    return np.ascontiguousarray(np.moveaxis(image[:3], 0, -1)).astype(np.uint8)


def false_colour_of(image: np.ndarray) -> np.ndarray:
    """(C, H, W) aerial image -> (H, W, 3) false colour (NIR, R, G): vegetation shows red."""
    return np.ascontiguousarray(np.moveaxis(image[[3, 0, 1]], 0, -1))


def class_legend(target, classes: list[int] | None = None, edgecolor: str = "0.4", **kwargs) -> None:
    """Legend of classes (all 13 by default) in the official colours on a figure or an axis."""
    from matplotlib.patches import Patch

    classes = list(range(NUM_CLASSES)) if classes is None else classes
    handles = [Patch(facecolor=CLASS_COLORS_HEX[k], edgecolor=edgecolor, label=f"{k} {CLASS_NAMES[k]}")
               for k in classes]
    kwargs.setdefault("fontsize", 8)
    kwargs.setdefault("frameon", False)
    target.legend(handles=handles, **kwargs)


def block_class_counts(labels: np.ndarray, block: int, n_classes: int = NUM_CLASSES) -> np.ndarray:
    """(H, W) class map -> (H // block, W // block, n_classes) pixels of each class 0..n_classes-1 in
    each whole `block` x `block` block (a partial last row/column of blocks is left out; values outside
    0..n_classes-1 are not counted)."""
    rows, cols = labels.shape[0] // block, labels.shape[1] // block
    blocks = labels[:rows * block, :cols * block].reshape(rows, block, cols, block)
    blocks = blocks.transpose(0, 2, 1, 3).reshape(rows, cols, block * block)
    return (blocks[..., None] == np.arange(n_classes, dtype=labels.dtype)).sum(axis=2)


def block_majority(labels: np.ndarray, block: int, purity: float = 0.0, ignore: int = -1) -> np.ndarray:
    """Most frequent class of each whole block (ties: lowest class); `ignore` where it covers less than
    `purity` of the block's pixels or where the block holds no valid label."""
    counts = block_class_counts(labels, block)
    top = counts.max(axis=-1)
    keep = (top >= purity * block * block) & (top > 0)
    return np.where(keep, counts.argmax(axis=-1), ignore)
