"""The recipe search of `make ensemble`: the out-of-fold stores it reads (checked, sampled, streamed) and
the search on the sample (weights, per-class run choice, biases).

What `python -m src.blend` reads: the out-of-fold stores of several runs (src.ensembling.oof), checked to
cover the same training ids fold by fold, a fixed random pixel subsample of them held in memory for the
search, and the full-pixel confusion matrices of a recipe, streamed patch by patch.

Why a subsample: the FLAIR #2 training set is 61,712 patches x 13 x 512 x 512 probabilities per run and
TTA level (~220 GB as uint8), far beyond memory, while the search scores hundreds of candidates. A fixed
set of `pixels` pixels per patch (uniform, without replacement, the same pixels for every run and level:
a function of (seed, id)) keeps every patch and every domain in the sample in proportion, so the sampled
confusion matrix is an unbiased estimate of the full one up to a constant factor; 128 pixels per patch
are 7.9 M pixels (~100 MB per run and level as uint8). The chosen recipe is then scored on every pixel.

The ensemble search of `python -m src.blend`, on a pixel subsample held in memory: per-model weights,
then a per-class model choice, then per-class biases, each step kept only when it raises the official
mIoU (one dataset-level confusion matrix, classes 0..11; docs/data-format.md, "Metric") of the pixels
it is fitted on.

The combined score of class c is sum_m W[m, c] * p_m[c] * exp(b[c]) (b: a bias on the log-probabilities,
applied as a factor, exactly as src.prediction.ensemble.Mix does at test time), with W[:, c] the run weights,
or the one-hot of one run when the search chose that run alone for class c (2nd place's recipe); the
prediction is the argmax. Only one class column changes in a choice or bias step, so a candidate is scored
from the best and second-best of the other columns (two passes over N pixels, not a new N x 13 argmax), which
keeps hundreds of candidates cheap. Greedy coordinate moves with a small tolerance: a move that does not beat
the current mIoU by `TOL` is not taken, so noise alone does not move the recipe."""
from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from src.core.errors import DataError, PredictError
from src.core.files import read_label
from src.core.flair import NUM_CLASSES, class_argmax, remap
from src.core.progress import progress
from src.ensembling.oof import TTA_LEVELS, fold_dirs, read_store_manifest, store_ids, store_name
from src.ensembling.recipe import class_weight_matrix
from src.prediction.stores import load_prob, prob_path
from src.scoring.metrics import confusion_from_raw, miou_from_confusion
from src.scoring.submission import short_list


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


def map_patches(fn: Callable[[str], Any], ids: Sequence[str], threads: int, desc: str) -> Iterator[Any]:
    """fn(id) for every id, in order, in `threads` threads (file reads and inflate release the GIL), with
    a progress line: at full size each pass reads 61,712 files per run (minutes)."""
    with ThreadPoolExecutor(threads) as pool, progress(total=len(ids), desc=desc, unit="patch") as bar:
        for out in pool.map(fn, ids):
            bar.update()
            yield out


def load_sample(stores: dict[int, Path], ids: dict[str, int], n_pixels: int, seed: int,
                threads: int = 8, desc: str = "sampling") -> np.ndarray:
    """(13, n_ids * n_pixels) uint8 sampled probabilities of one run at one level, ids in `ids` order
    (class-major: the search reads one class of every pixel at a time)."""
    def one(pid: str) -> np.ndarray:
        return _sample_patch(prob_path(stores[ids[pid]], pid), pid, n_pixels, seed)

    return np.concatenate(list(map_patches(one, list(ids), threads, desc)), axis=1)


def load_truth(labels: dict[str, str], ids: Sequence[str], n_pixels: int, seed: int,
               threads: int = 8) -> np.ndarray:
    """(n_ids * n_pixels,) uint8 truth 0..12 (official rule) at the sampled pixels."""
    def one(pid: str) -> np.ndarray:
        raw = read_label(labels[pid]).ravel()
        t = remap(raw)[sample_index(pid, n_pixels, raw.size, seed)]
        if (t > NUM_CLASSES - 1).any():
            raise DataError(f"{labels[pid]}: label values outside 1..19")
        return t

    return np.concatenate(list(map_patches(one, list(ids), threads, "sampling labels")))


def stream_confusions(sources: Sequence[dict[int, Path]], ids: dict[str, int], labels: dict[str, str],
                      domain_of: dict[str, int], n_domains: int, matrix: np.ndarray, biases: np.ndarray,
                      threads: int = 8) -> np.ndarray:
    """(M + 2, D, 13, 13) full-pixel confusion matrices per domain of each run alone, their plain mean
    and the recipe (`matrix` (M, 13) class weights, `biases` (13,)), one patch at a time."""
    m = len(sources)

    def one(pid: str) -> np.ndarray:
        raw = read_label(labels[pid])
        flat = [load_prob(prob_path(s[ids[pid]], pid)).reshape(NUM_CLASSES, -1) for s in sources]
        preds = [class_argmax(p)[0] for p in flat]  # on the stored uint8 probabilities
        preds.append(class_argmax(np.sum(flat, axis=0, dtype=np.uint16))[0])
        preds.append(mix_predict(flat, matrix, biases))  # the search's own scoring, on every pixel
        return np.stack([confusion_from_raw(p.astype(np.uint8), raw.ravel(), f"{pid}", str(labels[pid]))
                         for p in preds])

    out = np.zeros((m + 2, max(n_domains, 1), NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    for pid, conf in zip(ids, map_patches(one, list(ids), threads, "scoring every pixel")):
        out[:, domain_of[pid]] += conf
    return out


TOL = 1e-5                                        # smallest mIoU gain that counts as an improvement
WEIGHT_FACTORS = (0.0, 0.5, 0.8, 1.25, 2.0)       # multiplicative moves of one run's weight
BIAS_STEPS = (1.0, 0.5, 0.25, 0.1, 0.05)          # +- moves of one class's bias, coarse to fine


@dataclass
class Fit:
    """A recipe found by the search and its mIoU on the pixels it was fitted on."""

    weights: np.ndarray                            # (M,) sum 1
    choice: list[int | None]                       # (13,) run index or None (the weighted mix)
    biases: np.ndarray                             # (13,) added to the log-probabilities
    miou: float
    steps: list[str] = field(default_factory=list)

    def matrix(self) -> np.ndarray:
        """(M, 13) float32 class weights: the one-hot of the chosen run, else the run weights (the recipe's
        own definition, src.ensembling.recipe)."""
        return class_weight_matrix(self.weights, self.choice).astype(np.float32)


def miou_of(pred: np.ndarray, truth: np.ndarray) -> float:
    """Official mIoU of 0..12 predictions against 0..12 truth (flat arrays)."""
    idx = truth.astype(np.int64) * NUM_CLASSES + pred
    conf = np.bincount(idx, minlength=NUM_CLASSES * NUM_CLASSES).reshape(NUM_CLASSES, NUM_CLASSES)
    return miou_from_confusion(conf)


def column(probs: Sequence[np.ndarray], w: np.ndarray, c: int, b: float) -> np.ndarray:
    """Score of class c for every pixel: sum_m w[m] * p_m[c] * exp(b) (probabilities stored as uint8)."""
    acc = np.zeros(probs[0].shape[1], dtype=np.float32)
    for p, wm in zip(probs, w):
        if wm:
            acc += p[c] * np.float32(wm * np.exp(b) / 255.0)
    return acc


def scores(probs: Sequence[np.ndarray], matrix: np.ndarray, biases: np.ndarray) -> np.ndarray:
    """(N, 13) float32 scores of a recipe."""
    return np.stack([column(probs, matrix[:, c], c, biases[c]) for c in range(NUM_CLASSES)], axis=1)


def mix_predict(probs: Sequence[np.ndarray], matrix: np.ndarray, biases: np.ndarray) -> np.ndarray:
    """Argmax of the scores of a recipe ((M, 13) class weights, (13,) biases), class by class (no N x 13
    array: the weight search calls it often). The one numpy definition: the search and the full-pixel
    scoring (src.ensembling.search.stream_confusions) both call it; src.prediction.ensemble.Mix is its torch
    twin."""
    best = column(probs, matrix[:, 0], 0, biases[0])
    pred = np.zeros(len(best), dtype=np.uint8)
    for c in range(1, NUM_CLASSES):
        v = column(probs, matrix[:, c], c, biases[c])
        better = v > best
        np.copyto(pred, np.uint8(c), where=better)
        np.copyto(best, v, where=better)
    return pred


def predict(probs: Sequence[np.ndarray], fit: Fit) -> np.ndarray:
    """Argmax of a fitted recipe's scores."""
    return mix_predict(probs, fit.matrix(), fit.biases)


class _Columns:
    """The current N x 13 scores with the best and second-best class of every pixel, so that replacing
    one class column is scored in O(N)."""

    def __init__(self, s: np.ndarray):
        self.s = s
        self.refresh()

    def refresh(self) -> None:
        rows = np.arange(len(self.s))
        self.i1 = self.s.argmax(1)
        self.v1 = self.s[rows, self.i1]
        masked = self.s.copy()
        masked[rows, self.i1] = -np.inf
        self.i2 = masked.argmax(1)
        self.v2 = masked[rows, self.i2]

    def pred_with(self, c: int, v: np.ndarray) -> np.ndarray:
        own = self.i1 == c
        other_v = np.where(own, self.v2, self.v1)
        other_i = np.where(own, self.i2, self.i1)
        return np.where(v > other_v, c, other_i)

    def set(self, c: int, v: np.ndarray) -> None:
        self.s[:, c] = v
        self.refresh()


def _fit_weights(probs: Sequence[np.ndarray], truth: np.ndarray, log: Callable[[str], None]
                 ) -> tuple[np.ndarray, float]:
    """Coordinate search of the run weights (equal to start), a few rounds of multiplicative moves."""
    m = len(probs)
    w = np.full(m, 1.0 / m)
    zero_b = np.zeros(NUM_CLASSES)
    best = miou_of(predict(probs, Fit(w, [None] * NUM_CLASSES, zero_b, 0.0)), truth)
    if m == 1:
        return w, best
    for _ in range(3):
        moved = False
        for k in range(m):
            for f in WEIGHT_FACTORS:
                cand = w.copy()
                cand[k] = cand[k] * f if cand[k] > 0 else 0.25 * cand.max() * f
                if cand.sum() <= 0 or np.allclose(cand / cand.sum(), w):
                    continue
                cand /= cand.sum()
                score = miou_of(predict(probs, Fit(cand, [None] * NUM_CLASSES, zero_b, 0.0)), truth)
                if score > best + TOL:
                    w, best, moved = cand, score, True
        if not moved:
            break
    log(f"blend: weights {np.round(w, 3).tolist()} -> mIoU {best:.4f}")
    return w, best


def _fit_choice(probs: Sequence[np.ndarray], truth: np.ndarray, fit: Fit, cols: _Columns,
                log: Callable[[str], None]) -> None:
    """Per class, the mix or one run alone, whichever scores best (two rounds)."""
    for _ in range(2):
        moved = False
        for c in range(NUM_CLASSES):
            for cand in [None, *range(len(probs))]:
                if cand == fit.choice[c]:
                    continue
                w = fit.weights if cand is None else np.eye(len(probs))[cand]
                v = column(probs, w, c, fit.biases[c])
                score = miou_of(cols.pred_with(c, v), truth)
                if score > fit.miou + TOL:
                    fit.choice[c], fit.miou, moved = cand, score, True
                    cols.set(c, v)
                    src = "the mix" if cand is None else f"run {cand}"
                    fit.steps.append(f"class {c} from {src}: {score:.4f}")
        if not moved:
            break
    if any(m is not None for m in fit.choice):
        log(f"blend: class choice {fit.choice} -> mIoU {fit.miou:.4f}")


def _fit_biases(truth: np.ndarray, fit: Fit, cols: _Columns, log: Callable[[str], None]) -> None:
    """Per class, +- moves of its bias from coarse to fine steps."""
    for step in BIAS_STEPS:
        for c in range(NUM_CLASSES):
            for d in (step, -step):
                v = cols.s[:, c] * np.float32(np.exp(d))
                score = miou_of(cols.pred_with(c, v), truth)
                if score > fit.miou + TOL:
                    fit.biases[c] += d
                    fit.miou = score
                    cols.set(c, v)
    log(f"blend: biases {np.round(fit.biases, 2).tolist()} -> mIoU {fit.miou:.4f}")


def search(probs: Sequence[np.ndarray], truth: np.ndarray, *, choice: bool = True, biases: bool = True,
           log: Callable[[str], None] = print) -> Fit:
    """Fit a recipe on sampled pixels: `probs` one uint8 (13, N) array per run, `truth` (N,) 0..12."""
    w, best = _fit_weights(probs, truth, log)
    fit = Fit(w, [None] * NUM_CLASSES, np.zeros(NUM_CLASSES), best, [f"weights {np.round(w, 3).tolist()}"])
    if not (choice or biases):
        return fit
    cols = _Columns(scores(probs, fit.matrix(), fit.biases))
    if choice and len(probs) > 1:
        _fit_choice(probs, truth, fit, cols, log)
    if biases:
        _fit_biases(truth, fit, cols, log)
    return fit


def mean_fit(n_runs: int) -> Fit:
    """The plain equal-weight average of the runs."""
    return Fit(np.full(n_runs, 1.0 / n_runs), [None] * NUM_CLASSES, np.zeros(NUM_CLASSES), float("nan"))
