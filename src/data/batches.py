"""Where a batch's tensors live, and samples written straight into their rows.

Why: a batch of 16 light samples is ~20 MB written once more by collate after the samples were made; writing
each sample into its row of the batch tensor while it is still in cache (`BatchRows`, used by
src.data.dataset.FlairDataset.__getitems__) and letting collate keep that tensor (`rows_of`) saves that pass
(collate went from ~0.5 to ~0.1 ms per light sample, BENCHMARKS.md "Data path"). In a DataLoader worker the
tensors are in shared memory, so sending the batch to the main process copies nothing (`batch_tensor`).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import get_worker_info


def batch_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor for a batch; in a DataLoader worker, in shared memory, so that sending the
    batch to the main process copies nothing (what torch's default_collate does). In the main process,
    numpy's memory, which asks the kernel for huge pages from 4 MB on: a fresh batch written into 4 KB pages
    cost up to 3x more (page faults; 0.57 against 0.19 ms per light sample, depending on the allocator's
    state)."""
    if get_worker_info() is None:
        try:
            return torch.from_numpy(np.empty(shape, dtype=torch.empty(0, dtype=dtype).numpy().dtype))
        except TypeError:  # no numpy twin (bfloat16)
            return torch.empty(shape, dtype=dtype)
    template = torch.empty(0, dtype=dtype)
    storage = template._typed_storage()._new_shared(math.prod(shape), device=template.device)
    return template.new(storage).view(shape)


def rows_of(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The batch tensor whose rows 0, 1, ... are exactly `tensors` (views written in place by
    src.data.dataset.FlairDataset.__getitems__), else None: such a batch is already stacked, and copying it
    again would cost a pass over the whole batch. Equal to torch.stack(tensors), sharing their memory."""
    first = tensors[0]
    root, n = first._base, first.numel()
    if root is None or not root.is_contiguous() or root.storage_offset() != 0 \
            or root.numel() != n * len(tensors):
        return None
    for k, t in enumerate(tensors):
        if t._base is not root or t.shape != first.shape or t.storage_offset() != k * n \
                or not t.is_contiguous():
            return None
    return root.view(len(tensors), *first.shape)


class BatchRows:
    """One batch tensor per key (image, mask), made at the shape and dtype of the first array put there, by
    `batch_tensor` (in shared memory in a DataLoader worker): `FlairDataset.__getitems__`
    writes sample k's arrays into row k. Where the augmentation keeps the shape read (no crop), sample k is
    decoded straight into its row (`target`), and nothing is copied at all."""

    def __init__(self, n: int):
        self.n = n
        self.tensors: dict[str, torch.Tensor] = {}
        self.arrays: dict[str, np.ndarray] = {}  # the same memory (numpy indexing is ~10x cheaper)
        self.in_place: dict[str, bool] = {}  # key -> samples are read straight into their rows

    def target(self, key: str, k: int) -> np.ndarray | None:
        """Row k of `key`'s batch as an array to read sample k into, or None (see `put`)."""
        return self.arrays[key][k] if self.in_place.get(key) else None

    def put(self, key: str, k: int, array: np.ndarray, read_shape: tuple[int, ...]) -> torch.Tensor:
        """Row k of `key`'s batch tensor, now holding `array` (read at `read_shape`, then augmented); a
        tensor of its own when the array's shape or dtype differs from the batch's (collate then stacks that
        key as usual). Samples are read in place from the second on when the first kept the shape read (no
        crop), until one is not (a pixel-interleaved tile, a warp): the rest of the batch is copied."""
        batch = self.tensors.get(key)
        if batch is None:
            dtype = torch.from_numpy(np.empty(0, array.dtype)).dtype
            batch = self.tensors[key] = batch_tensor((self.n, *array.shape), dtype)
            self.arrays[key] = batch.numpy()
            self.arrays[key][k] = array
            self.in_place[key] = tuple(read_shape) == array.shape
            return batch[k]
        dst = self.arrays[key][k]
        if dst.shape != array.shape or dst.dtype != array.dtype:
            return torch.from_numpy(np.ascontiguousarray(array))
        if not (_address(dst) == _address(array) and dst.strides == array.strides):  # else read in place
            dst[...] = array
            self.in_place[key] = False
        return batch[k]


def _address(array: np.ndarray) -> int:
    return array.__array_interface__["data"][0]
