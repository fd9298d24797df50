"""The official FLAIR #2 metric (docs/data-format.md, "Metric"), fast enough for the 16,050 test patches.

IGN's rule: truth `t = MSK - 1; t[t > 12] = 12` (`src.core.flair.remap`), prediction as written; one
13x13 confusion matrix summed over the whole set (dataset level, not a mean of per-image scores);
`IoU_k = C_kk / (row_k + col_k - C_kk)`; mIoU = mean of IoU_0..IoU_11 with NaN classes skipped.
"other" (12) stays in the matrix, so it costs the scored classes it is confused with.

Rows are the truth, columns the prediction. The official code silently drops predictions outside
0..12 (sklearn `labels=`); here they raise, because a submission holding them is broken.
One `np.bincount` of `13 * t + p` replaces sklearn's per-patch `confusion_matrix` (tens of times faster)."""
from __future__ import annotations

import argparse
import sys

import numpy as np

from src.core.flair import CLASS_NAMES, NUM_CLASSES, NUM_SCORED, remap

# the per-class IoU columns of metrics.csv and the per-domain tables
IOU_COLS = [f"iou_{k}_{name.replace(' ', '_')}" for k, name in enumerate(CLASS_NAMES)]


def _is_tensor(x) -> bool:
    """torch.Tensor check without importing torch: scoring (and its worker processes) never needs it."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _bad_values(arr: np.ndarray, num_classes: int) -> list[int]:
    """Distinct values outside 0..num_classes-1 (at most 10, for the error message)."""
    bad = np.unique(arr[(arr < 0) | (arr >= num_classes)])
    return [int(v) for v in bad[:10]]


def _check_integer(arr: np.ndarray, what: str) -> None:
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        raise ValueError(f"{what} must be an integer array of class ids, got dtype {arr.dtype}")


def _out_of_range(arr: np.ndarray, num_classes: int) -> bool:
    # max (and min when signed) of the usually uint8 array cost little next to the bincount: always check.
    if not arr.size:
        return False
    return int(arr.max()) >= num_classes or (arr.dtype.kind == "i" and int(arr.min()) < 0)


def _check_range(arr: np.ndarray, num_classes: int, what: str) -> None:
    if _out_of_range(arr, num_classes):
        raise ValueError(f"{what} values outside 0..{num_classes - 1}: {_bad_values(arr, num_classes)}")


def confusion_matrix(pred: np.ndarray, target: np.ndarray, num_classes: int = NUM_CLASSES,
                     ignore_index: int | None = None) -> np.ndarray:
    """(num_classes, num_classes) int64 counts, rows = truth, cols = prediction.

    `pred` and `target` hold 0-based class ids of the same shape (any number of dims). Pixels whose
    target equals `ignore_index` (e.g. 255 for training masks) are dropped; any other value outside
    0..num_classes-1 raises ValueError, in either array.
    """
    pred = np.asarray(pred)
    target = np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} != target shape {target.shape}")
    _check_integer(pred, "prediction")
    _check_integer(target, "target")
    if ignore_index is not None:
        keep = target != ignore_index
        if not keep.all():
            pred, target = pred[keep], target[keep]
    _check_range(pred, num_classes, "prediction")
    _check_range(target, num_classes, "target")
    n = num_classes
    if n * n <= 256:  # 13 * 12 + 12 = 168 fits a byte: no int64 temporaries
        idx = target.astype(np.uint8, copy=False) * np.uint8(n)
        idx += pred.astype(np.uint8, copy=False)
    else:
        idx = target.astype(np.int64) * n + pred
    return np.bincount(idx.ravel(), minlength=n * n).astype(np.int64, copy=False).reshape(n, n)


# raw MSK value -> 13 * truth row (official t = min(v, 13) - 1, via classes.remap); raw 0 -> spare bins.
_RAW_ZERO = NUM_CLASSES * NUM_CLASSES
_RAW_TO_ROW = np.where(remap(np.arange(256)) == 255, _RAW_ZERO,
                       remap(np.arange(256)).astype(np.int64) * NUM_CLASSES).astype(np.uint8)


def confusion_from_raw(pred: np.ndarray, raw: np.ndarray, pred_name: str = "prediction",
                       label_name: str = "label") -> np.ndarray:
    """13x13 matrix of a prediction against a raw MSK array (values 1..19), the truth rule fused in.

    Same result as `confusion_matrix(pred, remap(raw))` with one table lookup instead of three
    passes (evaluate's hot loop). Raises ValueError naming `pred_name` for values outside 0..12 and
    `label_name` for raw 0 (not a FLAIR value; the official code would silently count it as "other").
    """
    pred, raw = np.asarray(pred), np.asarray(raw)
    if pred.shape != raw.shape:
        raise ValueError(f"{pred_name}: shape {pred.shape} != {label_name} shape {raw.shape}")
    _check_integer(pred, pred_name)
    _check_integer(raw, label_name)
    if raw.dtype != np.uint8:
        if raw.size and (int(raw.min()) < 0 or int(raw.max()) > 255):
            raise ValueError(f"{label_name}: values outside 0..255: min {raw.min()}, max {raw.max()}")
        raw = raw.astype(np.uint8)
    if _out_of_range(pred, NUM_CLASSES):
        bad = _bad_values(pred, NUM_CLASSES)
        raise ValueError(f"{pred_name}: values outside 0..{NUM_CLASSES - 1}: {bad}")
    idx = np.take(_RAW_TO_ROW, raw)  # np.take on a 256-entry table: ~3x faster than fancy indexing
    idx += pred.astype(np.uint8, copy=False)
    counts = np.bincount(idx.ravel(), minlength=_RAW_ZERO + NUM_CLASSES)
    if counts[_RAW_ZERO:].any():
        raise ValueError(f"{label_name}: {int(counts[_RAW_ZERO:].sum())} pixels have value 0 "
                         "(FLAIR labels are 1..19)")
    return counts[:_RAW_ZERO].astype(np.int64).reshape(NUM_CLASSES, NUM_CLASSES)


def ious_from_confusion(matrix: np.ndarray) -> np.ndarray:
    """Per-class IoU (float64, one per row); NaN where the class is absent from truth and prediction."""
    c = np.asarray(matrix, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {c.shape}")
    tp = np.diag(c)
    union = c.sum(axis=1) + c.sum(axis=0) - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, tp / np.where(union > 0, union, 1.0), np.nan)


def miou_from_confusion(matrix: np.ndarray, num_scored: int = NUM_SCORED) -> float:
    """Official mIoU: mean IoU of classes 0..num_scored-1, NaN classes skipped (NaN if all are)."""
    scored = ious_from_confusion(matrix)[:num_scored]
    scored = scored[~np.isnan(scored)]
    return float(scored.mean()) if scored.size else float("nan")


class ConfusionMatrix:
    """Dataset-level accumulator: `update` per patch or batch, `merge` across workers, then `miou`."""

    def __init__(self, num_classes: int = NUM_CLASSES, ignore_index: int | None = None,
                 num_scored: int = NUM_SCORED) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.num_scored = num_scored
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, pred, target) -> ConfusionMatrix:
        """Add (H,W) or (B,H,W) predictions against targets; torch tensors are counted on their device."""
        if _is_tensor(pred):
            import torch

            target = torch.as_tensor(target, device=pred.device)
            self.add(confusion_torch(pred, target, self.num_classes, self.ignore_index).cpu().numpy())
        else:
            self.add(confusion_matrix(pred, target, self.num_classes, self.ignore_index))
        return self

    def add(self, matrix) -> ConfusionMatrix:
        """Add an already computed matrix (e.g. from `confusion_torch` after an all-reduce)."""
        if _is_tensor(matrix):
            matrix = matrix.detach().cpu().numpy()
        matrix = np.asarray(matrix)
        if matrix.shape != self.matrix.shape:
            raise ValueError(f"matrix shape {matrix.shape} != {self.matrix.shape}")
        self.matrix += matrix.astype(np.int64)
        return self

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Sum another accumulator into this one (parallel evaluation, several folds)."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes}-class into {self.num_classes}-class matrix")
        self.matrix += other.matrix
        return self

    def reset(self) -> None:
        self.matrix[:] = 0

    @property
    def total(self) -> int:
        """Pixels counted so far."""
        return int(self.matrix.sum())

    def ious(self) -> np.ndarray:
        return ious_from_confusion(self.matrix)

    def miou(self) -> float:
        return miou_from_confusion(self.matrix, self.num_scored)


def confusion_torch(pred, target, num_classes: int = NUM_CLASSES, ignore_index: int | None = None):
    """`confusion_matrix` on the tensors' device (torch.bincount): int64 (C, C), rows = truth.

    For the trainer's validation loop on GPU; sum the result across DDP ranks with all_reduce.
    Invalid pixels (and ignored ones) go to spare bins instead of being filtered out, so the only
    host sync is the one inside bincount plus one scalar check; invalid values raise ValueError.
    """
    import torch

    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    if pred.is_floating_point() or target.is_floating_point():
        raise ValueError(f"prediction and target must be integer tensors, got {pred.dtype}, {target.dtype}")
    n = num_classes
    p = pred.reshape(-1).long()
    t = target.reshape(-1).long()
    idx = t * n + p
    bad = (p < 0) | (p >= n) | (t < 0) | (t >= n)
    if ignore_index is not None:
        ignored = t == ignore_index
        bad &= ~ignored
        idx = torch.where(ignored, torch.full_like(idx, n * n + 1), idx)
    idx = torch.where(bad, torch.full_like(idx, n * n), idx)
    counts = torch.bincount(idx, minlength=n * n + 2)
    if counts[n * n].item():
        p_bad = torch.unique(p[(p < 0) | (p >= n)])[:10].tolist()
        t_ok = t == ignore_index if ignore_index is not None else torch.zeros_like(t, dtype=torch.bool)
        t_bad = torch.unique(t[((t < 0) | (t >= n)) & ~t_ok])[:10].tolist()
        raise ValueError(f"values outside 0..{n - 1}: prediction {p_bad}, target {t_bad}")
    return counts[: n * n].reshape(n, n)


def format_table(ious, names: list[str] | None = None, miou: float | None = None,
                 support=None, num_scored: int = NUM_SCORED) -> str:
    """Per-class IoU table as text; classes past `num_scored` are marked as left out of the mIoU."""
    names = list(CLASS_NAMES if names is None else names)
    ious = np.asarray(ious, dtype=np.float64)
    width = max(len(n) for n in names[: len(ious)]) if len(ious) else 5
    head = f"{'':>3} {'class':<{width}}  {'IoU':>6}" + ("  truth px" if support is not None else "")
    lines = [head]
    for k, iou in enumerate(ious):
        cell = "   nan" if np.isnan(iou) else f"{iou:6.4f}"
        row = f"{k:>3} {names[k]:<{width}}  {cell}"
        if support is not None:
            row += f"  {int(support[k]):>9d}"
        if k >= num_scored:
            row += "  (not in mIoU)"
        lines.append(row)
    if miou is None:
        scored = ious[:num_scored]
        scored = scored[~np.isnan(scored)]
        miou = float(scored.mean()) if scored.size else float("nan")
    lines.append(f"{'':>3} {'mIoU (0..' + str(num_scored - 1) + ')':<{width}}  {miou:6.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Print the mIoU of a saved confusion matrix (.npy or evaluate's JSON), e.g. from a training run."""
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("matrix", help="13x13 confusion matrix: .npy file or JSON with a 'confusion' key")
    args = parser.parse_args(argv)
    if args.matrix.endswith(".npy"):
        matrix = np.load(args.matrix)
    else:
        with open(args.matrix) as f:
            matrix = np.asarray(json.load(f)["confusion"], dtype=np.int64)
    print(format_table(ious_from_confusion(matrix), support=matrix.sum(axis=1)))


if __name__ == "__main__":
    main()
