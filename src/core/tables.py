"""The kit's two CSV tables, read and written in one place: the data index (one row per patch) and the
folds (one row per training patch with its validation fold). See docs/data-format.md, "The index".

Every job that needs patches (train, predict, folds, eda, evaluate) reads them through here, so a
malformed or missing table is reported the same way everywhere."""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from src.core.errors import ConfigError, DataError
from src.core.files import atomic_write

COLUMNS = ["id", "split", "domain", "zone", "img_path", "msk_path", "s2_data", "s2_masks", "s2_products",
           "s2_row", "s2_col", "camera", "date", "time",
           "patch_centroid_x", "patch_centroid_y", "patch_centroid_z"]
STR_COLUMNS = ["id", "split", "domain", "zone", "img_path", "msk_path", "s2_data", "s2_masks", "s2_products",
               "camera", "date", "time"]
META_FLOATS = ["patch_centroid_x", "patch_centroid_y", "patch_centroid_z"]
FOLDS_COLS = ["id", "domain", "zone", "fold"]
# Written beside the index CSVs by a `make index` that failed: every reader refuses the index until one
# succeeds
INDEX_FAILED = "index_failed.txt"


def empty_index() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="int64" if c in ("s2_row", "s2_col") else
                                      "float64" if c in META_FLOATS else "object") for c in COLUMNS})


def load_index(path: str | os.PathLike) -> pd.DataFrame:
    """Read an index CSV: id stays a 6-digit string, empty paths and text fields are "" (never NaN)."""
    path = Path(path)
    failed = path.parent / INDEX_FAILED
    if failed.is_file():
        raise DataError(f"{path}: the last `make index` of this folder failed "
                        f"({failed.read_text().strip()}); fix the data and run it again")
    if not path.is_file():
        raise DataError(f"{path}: index not found (run `make index`)")
    df = pd.read_csv(path, dtype={c: str for c in STR_COLUMNS})
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{path}: not an index CSV, missing columns {missing}")
    for c in STR_COLUMNS:
        df[c] = df[c].fillna("")
    for c in ("s2_row", "s2_col"):
        df[c] = df[c].fillna(-1).astype("int64")
    return df


def write_index(frames: dict[str, pd.DataFrame], out: str | os.PathLike) -> list[Path]:
    """Write index_<split>.csv atomically for each split; returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for split, df in frames.items():
        path = out / f"index_{split}.csv"
        with atomic_write(path) as tmp:
            df.to_csv(tmp, index=False)
        written.append(path)
    return written


def split_index(data_dir: str | os.PathLike, split: str, index: str | os.PathLike | None = None
                ) -> pd.DataFrame:
    """The rows of DATA/index_<split>.csv (or an explicit index file); an error when missing or empty."""
    path = Path(index) if index else Path(data_dir) / f"index_{split}.csv"
    if not path.is_file():
        raise DataError(f"{path}: index not found (run `make index`, or pass data_dir=... / --index)")
    df = load_index(path)
    if df.empty:
        raise DataError(f"{path}: the index has no rows")
    return df


def has_labels(index_df: pd.DataFrame) -> bool:
    """Does every row of an index have a label file (a scored split)?"""
    return "msk_path" in index_df.columns and bool((index_df["msk_path"].astype(str) != "").all())


def write_folds(folds: pd.DataFrame, path: str | os.PathLike) -> None:
    """folds.csv (id, domain, zone, fold), written atomically."""
    with atomic_write(path) as tmp:
        folds[FOLDS_COLS].to_csv(tmp, index=False)


def load_folds(data_dir: str | os.PathLike) -> pd.DataFrame:
    """DATA/folds.csv as a DataFrame (id as str, fold as int); a clear error when missing or malformed."""
    path = Path(data_dir) / "folds.csv"
    if not path.is_file():
        raise DataError(f"{path}: not found; run `make folds` (python -m src.folds --data {data_dir})")
    folds = pd.read_csv(path, dtype={"id": str, "domain": str, "zone": str})
    missing = [c for c in FOLDS_COLS if c not in folds.columns]
    if missing:
        raise DataError(f"{path}: missing columns {missing}")
    if folds["fold"].isna().any() or folds["id"].duplicated().any():
        raise DataError(f"{path}: every id must appear once with a fold")
    folds["fold"] = folds["fold"].astype(int)
    if (folds.groupby("domain")["fold"].nunique() > 1).any():
        raise DataError(f"{path}: a domain is split across folds")
    return folds[FOLDS_COLS]


def train_index(data_dir: str | os.PathLike) -> pd.DataFrame:
    """DATA/index_train.csv, with one error naming the file when it is missing or has no rows."""
    index_path = Path(data_dir) / "index_train.csv"
    if not index_path.is_file():
        raise DataError(f"{index_path}: not found; run `make index` first (data_dir={data_dir})")
    index = load_index(index_path)
    if index.empty:
        raise DataError(f"{index_path}: no training rows")
    return index


def fold_rows(data_dir: str | os.PathLike, fold: str) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """(training rows, validation rows) of DATA/index_train.csv for `fold`; validation is None for "all"."""
    data_dir = Path(data_dir)
    index_path = data_dir / "index_train.csv"
    index = train_index(data_dir)
    unlabeled = index["msk_path"].astype(str).eq("")
    if unlabeled.any():
        raise DataError(f"{index_path}: {int(unlabeled.sum())} training rows have no label, "
                        f"e.g. id {index.loc[unlabeled, 'id'].iloc[0]}")
    if fold == "all":
        return index.reset_index(drop=True), None
    folds = load_folds(data_dir)
    rows = index.merge(folds[["id", "fold"]], on="id", how="inner")
    present = sorted(rows["fold"].unique().tolist())
    if int(fold) not in present:
        raise ConfigError(f"fold {fold} not in {data_dir / 'folds.csv'} (folds: {present})")
    train_df = rows[rows["fold"] != int(fold)].reset_index(drop=True)
    val_df = rows[rows["fold"] == int(fold)].reset_index(drop=True)
    if train_df.empty:
        raise ConfigError(f"fold {fold} is the only fold: nothing left to train on (use --fold all)")
    return train_df, val_df
