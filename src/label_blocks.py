"""Class counts and majority class of square blocks of a label map (numpy): which class covers a coarse
pixel, e.g. the 50 x 50 aerial pixels under one Sentinel-2 pixel (docs/data-format.md, "Geometry").

Torch-free on purpose: the EDA reads it without importing torch. The training loss pools its S2 target
on the device with torch (src.losses.downsample_mask: adaptive bins of any size ratio, no purity), a
different operation on a different array type.
"""
from __future__ import annotations

import numpy as np

from src.classes import NUM_CLASSES


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
