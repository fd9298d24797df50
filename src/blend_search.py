"""The ensemble search of `python -m src.blend`, on a pixel subsample held in memory: per-model weights,
then a per-class model choice, then per-class biases, each step kept only when it raises the official
mIoU (one dataset-level confusion matrix, classes 0..11; docs/data-format.md, "Metric") of the pixels
it is fitted on.

The combined score of class c is sum_m W[m, c] * p_m[c] * exp(b[c]) (b: a bias on the log-probabilities,
applied as a factor, exactly as src.ensemble.Mix does at test time), with W[:, c] the run weights, or the
one-hot of one run when the search chose that run alone for class c (2nd place's recipe); the prediction
is the argmax. Only one class column changes in a choice or bias step, so a candidate is scored from the
best and second-best of the other columns (two passes over N pixels, not a new N x 13 argmax), which keeps
hundreds of candidates cheap. Greedy coordinate moves with a small tolerance: a move that does not beat
the current mIoU by `TOL` is not taken, so noise alone does not move the recipe.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from src.classes import NUM_CLASSES
from src.metrics import miou_from_confusion
from src.recipe import class_weight_matrix

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
        own definition, src.recipe)."""
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
    scoring (src.blend_data.stream_confusions) both call it; src.ensemble.Mix is its torch twin."""
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
