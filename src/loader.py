"""Samples -> batches: `collate` and the one DataLoader builder that training, validation, prediction and
the benchmarks all use (so worker settings, OpenCV threads and pinning are decided once)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from src.seeding import seed_worker
from src.workers import loader_workers, single_thread_opencv


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples into a batch; S2 series are zero-padded to the longest T, `s2_pad` marks padding.

    A sample {"id": ..., "bad": message} (an unreadable patch that must not be replaced by another one,
    e.g. in validation with skip_bad) is left out of the tensors and listed in batch["bad"] as
    (id, message); a batch of only such samples is {"id": [], "bad": [...]}.
    """
    if not samples:
        raise ValueError("collate: empty batch")
    bad = [(s["id"], s["bad"]) for s in samples if "bad" in s]
    if bad:
        samples = [s for s in samples if "bad" not in s]
        if not samples:
            return {"id": [], "bad": bad}
    batch: dict[str, Any] = {"id": [s["id"] for s in samples]}
    if bad:
        batch["bad"] = bad
    keys = set().union(*samples) - {"id", "s2", "s2_days", "s2_pad"}
    for key in sorted(keys):
        if not all(key in s for s in samples):
            raise ValueError(f"collate: key {key!r} present in some samples only "
                             "(mixed labelled and unlabelled rows?)")
        batch[key] = torch.stack([s[key] for s in samples])
    if any("s2" in s for s in samples):
        if not all("s2" in s for s in samples):
            raise ValueError("collate: key 's2' present in some samples only")
        lengths = [s["s2"].shape[0] for s in samples]
        t_max = max(lengths)
        first = samples[0]["s2"]
        s2 = first.new_zeros((len(samples), t_max, *first.shape[1:]))
        days = torch.zeros((len(samples), t_max), dtype=torch.int64)
        pad = torch.ones((len(samples), t_max), dtype=torch.bool)
        for b, (s, n) in enumerate(zip(samples, lengths)):
            s2[b, :n] = s["s2"]
            days[b, :n] = s["s2_days"]
            pad[b, :n] = False
        batch["s2"], batch["s2_days"], batch["s2_pad"] = s2, days, pad
    return batch


def build_loader(ds: Dataset, cfg: dict, *, train: bool, sampler: Any = None,
                 generator: torch.Generator | None = None, collate_fn: Callable = collate,
                 batch_size: int | None = None, persistent: bool = False) -> DataLoader:
    """The kit's DataLoader: cfg `workers` (a number or auto), OpenCV single-threaded before the workers
    fork, pinned memory on CUDA, seeded workers.

    Training shuffles (unless a sampler is given) and drops the last incomplete batch, except when there
    is no more than one batch (tiny demos would otherwise get empty epochs). `generator` seeds the worker
    seeds and the shuffle (exact resume); `persistent` keeps the workers across epochs.
    """
    workers = loader_workers(cfg.get("workers", 0))
    if workers > 0:
        single_thread_opencv()
    bs = int(batch_size or cfg.get("batch_size", 8))
    n = len(sampler) if sampler is not None else len(ds)  # type: ignore[arg-type]
    return DataLoader(ds, batch_size=bs, shuffle=train and sampler is None, sampler=sampler,
                      num_workers=workers, collate_fn=collate_fn, pin_memory=torch.cuda.is_available(),
                      drop_last=train and n > bs, worker_init_fn=seed_worker, generator=generator,
                      persistent_workers=persistent and workers > 0,
                      prefetch_factor=4 if workers > 0 else None)
