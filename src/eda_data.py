"""What the EDA notebook explores: both index splits (+ folds.csv), and the domain-balanced samples every
image-based statistic uses, so a run takes about a minute even on the 77k real patches.

DATA is a folder holding index_train.csv / index_test.csv (+ optionally folds.csv and class_hist.csv,
written by `make index` / `make folds`), or a raw data root whose index is then built in memory
(docs/data-format.md, "The index").
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from src.errors import DataError
from src.index_scan import build_index
from src.tables import load_folds, load_index

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
