"""What `python -m src.blend` reads: the out-of-fold stores of several runs (src.oof_store), checked to
cover the same training ids fold by fold, a fixed random pixel subsample of them held in memory for the
search, and the full-pixel confusion matrices of a recipe, streamed patch by patch.

Why a subsample: the FLAIR #2 training set is 61,712 patches x 13 x 512 x 512 probabilities per run and
TTA level (~220 GB as uint8), far beyond memory, while the search scores hundreds of candidates. A fixed
set of `pixels` pixels per patch (uniform, without replacement, the same pixels for every run and level:
a function of (seed, id)) keeps every patch and every domain in the sample in proportion, so the sampled
confusion matrix is an unbiased estimate of the full one up to a constant factor; 128 pixels per patch
are 7.9 M pixels (~100 MB per run and level as uint8). The chosen recipe is then scored on every pixel.
"""
from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from src.blend_search import mix_predict
from src.classes import NUM_CLASSES, remap
from src.errors import DataError, PredictError
from src.metrics import confusion_from_raw
from src.oof_store import TTA_LEVELS, fold_dirs, read_store_manifest, store_ids, store_name
from src.probstore import load_prob, prob_path
from src.rasters import read_label
from src.submission import short_list


@dataclass
class RunStores:
    """One run's out-of-fold stores: level -> fold -> store folder (every fold of the split present)."""

    run: Path
    stores: dict[str, dict[int, Path]]


def find_stores(run: Path, folds: Sequence[int], checkpoint: str) -> RunStores:
    """The TTA levels stored for every fold of `run`; errors name the missing fold or store."""
    dirs = fold_dirs(run)
    if not run.is_dir():
        raise PredictError(f"{run}: no such run folder")
    for k in folds:
        if k not in dirs:
            raise PredictError(f"{run}: no fold{k}/ folder (the split has folds {list(folds)}): every fold "
                               "must be trained for out-of-fold predictions")
    stores = {lvl: {k: dirs[k] / store_name(lvl, checkpoint) for k in folds} for lvl in TTA_LEVELS}
    stores = {lvl: s for lvl, s in stores.items() if all(d.is_dir() for d in s.values())}
    if not stores:
        lacking = next(dirs[k] for k in folds if not (dirs[k] / store_name("none", checkpoint)).is_dir())
        raise PredictError(f"{lacking}: no out-of-fold store {store_name('none', checkpoint)}/ (written at "
                           f"the end of training with oof=true, or by python -m src.oof --runs {run})")
    return RunStores(run, stores)


def check_store(store: Path, expected: set[str], fold: int, run: Path, level: str) -> set[str]:
    """The ids that the store's manifest declares unreadable; an error naming the store when ids are
    missing without being declared, or when the store holds ids of another fold (another split)."""
    manifest = read_store_manifest(store) or {}
    if manifest.get("fold") not in (None, str(fold)):
        raise PredictError(f"{store}: made for fold {manifest.get('fold')}, found in fold{fold}/")
    have = store_ids(store)
    declared = set(manifest.get("missing") or []) & expected
    extra = have - expected
    if extra:
        raise PredictError(f"{store}: {len(extra)} PROB files of ids not in fold {fold} of folds.csv "
                           f"({short_list(sorted(extra))}): the run was made with another fold split or data")
    lacking = expected - have - declared
    if lacking:
        raise PredictError(f"{store}: {len(lacking)} of {len(expected)} held-out ids have no PROB file "
                           f"({short_list(sorted(lacking))}); complete it: python -m src.oof --runs {run} "
                           f"--tta {level}")
    return declared


def common_levels(runs: Sequence[RunStores]) -> list[str]:
    levels = [lvl for lvl in TTA_LEVELS if all(lvl in r.stores for r in runs)]
    if not levels:
        have = "; ".join(f"{r.run}: {', '.join(r.stores)}" for r in runs)
        raise PredictError(f"no TTA level is stored by every run ({have}): python -m src.oof --tta ...")
    return levels


def checked_ids(runs: Sequence[RunStores], levels: Sequence[str], folds_df: pd.DataFrame,
                log: Callable[[str], None]) -> dict[str, int]:
    """id -> fold of every training patch that every run's stores cover (the `levels` checked); patches a
    store declares unreadable are left out for every run, with a note."""
    dropped: set[str] = set()
    by_fold = {int(k): set(g["id"].astype(str)) for k, g in folds_df.groupby("fold")}
    for r in runs:
        for level in levels:
            for k, store in r.stores[level].items():
                dropped |= check_store(store, by_fold[k], k, r.run, level)
    if dropped:
        log(f"blend: {len(dropped)} unreadable patches left out ({short_list(sorted(dropped))})")
    return {i: k for k, ids in by_fold.items() for i in sorted(ids) if i not in dropped}


def sample_index(pid: str, n_pixels: int, size: int, seed: int) -> np.ndarray:
    """The fixed pixels of a patch: a function of (seed, id) only, the same for every run and level."""
    rng = np.random.default_rng([seed, zlib.crc32(pid.encode())])
    return np.sort(rng.choice(size, size=min(n_pixels, size), replace=False))


def _sample_patch(path: Path, pid: str, n_pixels: int, seed: int) -> np.ndarray:
    q = load_prob(path).reshape(NUM_CLASSES, -1)
    return q[:, sample_index(pid, n_pixels, q.shape[1], seed)]


def load_sample(stores: dict[int, Path], ids: dict[str, int], n_pixels: int, seed: int,
                threads: int = 8) -> np.ndarray:
    """(13, n_ids * n_pixels) uint8 sampled probabilities of one run at one level, ids in `ids` order
    (class-major: the search reads one class of every pixel at a time)."""
    def one(pid: str) -> np.ndarray:
        return _sample_patch(prob_path(stores[ids[pid]], pid), pid, n_pixels, seed)

    with ThreadPoolExecutor(threads) as pool:
        return np.concatenate(list(pool.map(one, ids)), axis=1)


def load_truth(labels: dict[str, str], ids: Sequence[str], n_pixels: int, seed: int,
               threads: int = 8) -> np.ndarray:
    """(n_ids * n_pixels,) uint8 truth 0..12 (official rule) at the sampled pixels."""
    def one(pid: str) -> np.ndarray:
        raw = read_label(labels[pid]).ravel()
        t = remap(raw)[sample_index(pid, n_pixels, raw.size, seed)]
        if (t > NUM_CLASSES - 1).any():
            raise DataError(f"{labels[pid]}: label values outside 1..19")
        return t

    with ThreadPoolExecutor(threads) as pool:
        return np.concatenate(list(pool.map(one, ids)))


def stream_confusions(sources: Sequence[dict[int, Path]], ids: dict[str, int], labels: dict[str, str],
                      domain_of: dict[str, int], n_domains: int, matrix: np.ndarray, biases: np.ndarray,
                      threads: int = 8) -> np.ndarray:
    """(M + 2, D, 13, 13) full-pixel confusion matrices per domain of each run alone, their plain mean
    and the recipe (`matrix` (M, 13) class weights, `biases` (13,)), one patch at a time."""
    m = len(sources)

    def one(pid: str) -> np.ndarray:
        raw = read_label(labels[pid])
        flat = [load_prob(prob_path(s[ids[pid]], pid)).reshape(NUM_CLASSES, -1) for s in sources]
        preds = [p.argmax(0) for p in flat]  # on the stored uint8 probabilities
        preds.append(np.sum(flat, axis=0, dtype=np.uint16).argmax(0))
        preds.append(mix_predict(flat, matrix, biases))  # the search's own scoring, on every pixel
        return np.stack([confusion_from_raw(p.astype(np.uint8), raw.ravel(), f"{pid}", str(labels[pid]))
                         for p in preds])

    out = np.zeros((m + 2, max(n_domains, 1), NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    with ThreadPoolExecutor(threads) as pool:
        for pid, conf in zip(ids, pool.map(one, ids)):
            out[:, domain_of[pid]] += conf
    return out
