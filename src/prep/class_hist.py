"""Per-patch class pixel counts of the training masks, cached in DATA/class_hist.csv.

Reading 61,712 masks takes minutes; folds, EDA and any re-run of `make folds` need the same counts, so
they are computed once (in parallel) and a cached row is reused until its mask changes (same id, path,
size and mtime). Counts use the one raw -> class remap of src.core.flair (docs/data-format.md, "Labels and
classes")."""
from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from src.core.errors import DataError
from src.core.files import atomic_write, read_label
from src.core.flair import NUM_CLASSES, NUM_RAW, remap
from src.core.progress import progress
from src.core.workers import default_workers

HIST_COLS: list[str] = [f"c{i}" for i in range(NUM_CLASSES)]  # pixel counts of classes 0..12
INVALID_COL = "invalid"  # pixels whose raw value is not in 1..NUM_RAW
CACHE_KEY: list[str] = ["id", "msk_path", "size", "mtime_ns"]  # a cached row is reused only if all match
CACHE_COLS: list[str] = CACHE_KEY + HIST_COLS + [INVALID_COL]
MAX_WORKERS = 8  # mask reading is I/O + decode bound: a few processes saturate a disk

# Raw value -> class through the one remap of src.core.flair; only raw 1..NUM_RAW are valid labels.
_RAW_VALUES = np.arange(256, dtype=np.uint8)
_RAW_TO_CLASS = remap(_RAW_VALUES).astype(np.int64)
_VALID_RAW = (_RAW_VALUES >= 1) & (_RAW_VALUES <= NUM_RAW)


def mask_counts(path: str) -> np.ndarray:
    """Pixel counts of classes 0..12 plus the count of invalid raw values, as int64 (14,)."""
    raw = read_label(path)
    if raw.dtype.kind not in "ui":
        raise DataError(f"{path}: label dtype {raw.dtype} is not an integer type")
    raw = raw.ravel().astype(np.int64, copy=False)
    if raw.size and raw.min() < 0:
        raise DataError(f"{path}: negative label values")
    counts = np.bincount(raw, minlength=256)
    per_class = np.bincount(_RAW_TO_CLASS[_VALID_RAW], weights=counts[:256][_VALID_RAW],
                            minlength=NUM_CLASSES).astype(np.int64)
    invalid = int(raw.size - per_class.sum())
    return np.append(per_class, invalid)


def _file_keys(paths: Iterable[str]) -> tuple[list[int], list[int]]:
    """(size, mtime_ns) of every mask: a changed or replaced mask changes at least one of them."""
    sizes, mtimes = [], []
    for path in paths:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise DataError(f"{path}: mask file not found (index out of date? re-run make index)") from None
        sizes.append(st.st_size)
        mtimes.append(st.st_mtime_ns)
    return sizes, mtimes


def _read_cache(cache_path: Path) -> pd.DataFrame | None:
    """The cached rows, or None when there is no usable cache (a broken cache is only a warning)."""
    if not cache_path.is_file():
        return None
    try:
        cache = pd.read_csv(cache_path, dtype={"id": str, "msk_path": str}, keep_default_na=False)
        missing = [c for c in CACHE_COLS if c not in cache.columns]
        if missing:
            raise ValueError(f"missing columns {missing}")
        return cache[CACHE_COLS].astype({c: np.int64 for c in CACHE_COLS[2:]})
    except Exception as err:  # any unreadable cache is simply rebuilt
        warnings.warn(f"{cache_path}: ignoring unreadable histogram cache ({err})", stacklevel=2)
        return None


def _count_all(paths: list[str], workers: int) -> np.ndarray:
    """Counts for every path (rows in the given order), in `workers` processes with a progress bar."""
    out = np.zeros((len(paths), NUM_CLASSES + 1), dtype=np.int64)
    with progress(total=len(paths), desc="class histograms", unit="mask", disable=len(paths) == 0) as bar:
        if workers <= 1 or len(paths) < 4 * workers:
            for i, path in enumerate(paths):
                out[i] = mask_counts(path)
                bar.update()
        else:
            chunk = max(1, min(64, len(paths) // (workers * 8)))
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for i, counts in enumerate(pool.map(mask_counts, paths, chunksize=chunk)):
                    out[i] = counts
                    bar.update()
    return out


def _labelled_rows(index_df: pd.DataFrame) -> pd.DataFrame:
    """id, domain, zone, msk_path of the rows with a mask, sorted by id; duplicate ids are an error."""
    missing = [c for c in ("id", "domain", "zone", "msk_path") if c not in index_df.columns]
    if missing:
        raise ValueError(f"index is missing columns {missing}")
    rows = index_df.loc[index_df["msk_path"].astype(str) != "", ["id", "domain", "zone", "msk_path"]]
    rows = rows.astype(str).sort_values("id", kind="stable").reset_index(drop=True)
    if rows["id"].duplicated().any():
        dup = rows.loc[rows["id"].duplicated(), "id"].iloc[0]
        raise ValueError(f"index has duplicate patch id {dup}")
    return rows


def class_histograms(index_df: pd.DataFrame, cache_path: str | os.PathLike,
                     workers: int | None = None) -> pd.DataFrame:
    """Per-patch pixel counts of the 13 challenge classes for every labelled row of `index_df`.

    Columns: id, domain, zone, msk_path, c0..c12, invalid; sorted by id. A cached row is reused only
    when its (id, msk_path, file size, mtime_ns) all match, so a changed, replaced or moved mask is
    recounted and nothing else is. The cache is rewritten (atomically) to hold exactly this index's rows.
    `result.attrs` holds "cache_hits" (rows reused) and "computed" (masks read by this call).
    """
    cache_path = Path(cache_path)
    workers = default_workers(limit=MAX_WORKERS) if workers is None else max(1, int(workers))
    rows = _labelled_rows(index_df)
    keys = rows[["id", "msk_path"]].copy()
    keys["size"], keys["mtime_ns"] = _file_keys(keys["msk_path"])
    keys = keys.astype({"size": np.int64, "mtime_ns": np.int64})

    cache = _read_cache(cache_path)
    if cache is not None:
        merged = keys.merge(cache.drop_duplicates(CACHE_KEY), on=CACHE_KEY, how="left", indicator=True)
        hit = (merged["_merge"] == "both").to_numpy()
        counts = merged[HIST_COLS + [INVALID_COL]].fillna(0).to_numpy(dtype=np.int64)
    else:
        hit = np.zeros(len(keys), dtype=bool)
        counts = np.zeros((len(keys), NUM_CLASSES + 1), dtype=np.int64)
    todo = np.flatnonzero(~hit)
    if len(todo):
        counts[todo] = _count_all(keys["msk_path"].iloc[todo].tolist(), workers)
    table = pd.concat([keys, pd.DataFrame(counts, columns=HIST_COLS + [INVALID_COL])], axis=1)
    if len(todo) or cache is None or len(cache) != len(table):
        with atomic_write(cache_path) as tmp:
            table[CACHE_COLS].to_csv(tmp, index=False)
    print(f"class histograms: {int(hit.sum())} cached, {len(todo)} computed ({cache_path})")
    bad = table.loc[table[INVALID_COL] > 0, "msk_path"]
    if len(bad):
        warnings.warn(f"{len(bad)} masks hold values outside 1..{NUM_RAW} (not counted), e.g. "
                      f"{bad.iloc[0]}; run python -m src.index --check", stacklevel=2)
    out = pd.concat([rows[["id", "domain", "zone", "msk_path"]], table[HIST_COLS + [INVALID_COL]]], axis=1)
    out.attrs["cache_hits"] = int(hit.sum())
    out.attrs["computed"] = int(len(todo))
    return out


def domain_table(index_df: pd.DataFrame, hist: pd.DataFrame) -> pd.DataFrame:
    """Per training domain (index, sorted): class pixel counts c0..c12 and `patches` (all rows)."""
    pixels = hist.groupby("domain")[HIST_COLS].sum()
    patches = index_df.groupby(index_df["domain"].astype(str)).size().rename("patches")
    table = pd.concat([pixels, patches], axis=1).fillna(0).astype(np.int64).sort_index()
    unlabelled = int((index_df["msk_path"].astype(str) == "").sum())
    if unlabelled:
        warnings.warn(f"{unlabelled} training rows have no mask: they get a fold but no class counts",
                      stacklevel=2)
    return table
