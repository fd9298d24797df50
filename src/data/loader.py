"""Samples -> batches: `collate`, the epoch-aware sampler, the one DataLoader builder, and the multi-input
loader that feeds a whole ensemble.

Samples -> batches: `collate`, the epoch-aware sampler and the one DataLoader builder that training,
validation, prediction and the benchmarks all use (so worker settings, OpenCV threads and pinning are
decided once).

One loader for a whole ensemble: each patch is read once per distinct input setting, not per model.

Models whose input settings differ (bands, norm, S2 on/off and S2 options, metadata) each need their own
sample of the same patch; item i of `MultiInput` is the list of those samples, and `collate_multi`
batches each setting separately (docs/data-format.md, "Samples and batches")."""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from src.core.errors import DataError, one_line
from src.core.runtime import init_worker
from src.core.settings import Settings
from src.core.workers import loader_workers, single_thread_opencv
from src.data.batches import batch_tensor, rows_of


class EpochSampler(Sampler):
    """Yields (index, epoch) pairs from a sampler with `set_epoch` (DistributedSampler): the dataset seeds
    a sample's augmentation from them, so persistent workers (which never see the main process's
    attributes again) still know the epoch, and a batch does not depend on the number of workers."""

    def __init__(self, sampler: Any):
        self.sampler, self.epoch = sampler, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((int(i), self.epoch) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class WeightedDraw:
    """A DistributedSampler-like sampler (`set_epoch`, one shard per rank) that draws ceil(N / world) * world
    indices with replacement, index i with probability weights[i] / sum: sample_rare's patch order. The
    draws are a function of (seed, epoch) only, so a resumed run replays an epoch and every rank shares one
    draw (rank r takes draws r, r + world, ...)."""

    def __init__(self, weights: Sequence[float], num_replicas: int, rank: int, seed: int):
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        if self.weights.ndim != 1 or not len(self.weights) or not (self.weights >= 0).all() \
                or not self.weights.sum() > 0:
            raise ValueError("WeightedDraw: weights must be >= 0 with a positive sum")
        self.world, self.rank, self.seed, self.epoch = num_replicas, rank, seed, 0
        self.per_rank = -(-len(self.weights) // num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator()
        gen.manual_seed(self.seed + self.epoch)
        draws = torch.multinomial(self.weights, self.per_rank * self.world, replacement=True, generator=gen)
        return iter(draws[self.rank::self.world].tolist())

    def __len__(self) -> int:
        return self.per_rank


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    first = tensors[0]
    rows = rows_of(tensors)
    if rows is not None:
        return rows
    return torch.stack(tensors, out=batch_tensor((len(tensors), *first.shape), first.dtype))


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples into a batch; S2 series are zero-padded to the longest T, `s2_pad` marks padding.

    A sample {"id": ..., "bad": message} (an unreadable patch that must not be replaced by another one,
    e.g. in validation with skip_bad) is left out of the tensors and listed in batch["bad"] as
    (id, message); a batch of only such samples is {"id": [], "bad": [...]}. Tensors that already are
    the rows of one batch tensor, in order (FlairDataset.__getitems__), are that tensor
    (src.data.batches.rows_of).
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
        batch[key] = _stack([s[key] for s in samples])
    if any("s2" in s for s in samples):
        if not all("s2" in s for s in samples):
            raise ValueError("collate: key 's2' present in some samples only")
        lengths = [s["s2"].shape[0] for s in samples]
        t_max = max(lengths)
        first = samples[0]["s2"]
        s2 = batch_tensor((len(samples), t_max, *first.shape[1:]), first.dtype)
        days = batch_tensor((len(samples), t_max), torch.int64).zero_()
        pad = batch_tensor((len(samples), t_max), torch.bool).fill_(True)
        for b, (s, n) in enumerate(zip(samples, lengths)):
            s2[b, :n] = s["s2"]
            s2[b, n:] = 0  # only the padding: the batch is written once
            days[b, :n] = s["s2_days"]
            pad[b, :n] = False
        batch["s2"], batch["s2_days"], batch["s2_pad"] = s2, days, pad
    return batch


def build_loader(ds: Dataset, cfg: Settings, *, train: bool, sampler: Any = None,
                 generator: torch.Generator | None = None, collate_fn: Callable = collate,
                 batch_size: int | None = None, persistent: bool = False) -> DataLoader:
    """The kit's DataLoader: cfg `workers` (a number or auto), OpenCV single-threaded before the workers
    fork (a worker is one core), pinned memory on CUDA (non-blocking copies), 4 batches prefetched per
    worker, seeded workers.

    Training shuffles (unless a sampler is given) and drops the last incomplete batch, except when there
    is no more than one batch (tiny demos would otherwise get empty epochs). `generator` seeds the worker
    seeds and the shuffle; `persistent` keeps the workers (and their open S2 zones) across epochs.
    """
    workers = loader_workers(cfg.workers)
    if workers > 0:
        single_thread_opencv()
    bs = int(batch_size or cfg.batch_size)
    n = len(sampler) if sampler is not None else len(ds)  # type: ignore[arg-type]
    return DataLoader(ds, batch_size=bs, shuffle=train and sampler is None, sampler=sampler,
                      num_workers=workers, collate_fn=collate_fn, pin_memory=torch.cuda.is_available(),
                      drop_last=train and n > bs, worker_init_fn=init_worker, generator=generator,
                      persistent_workers=persistent and workers > 0,
                      prefetch_factor=4 if workers > 0 else None)


# Settings that change what a model is fed: models differing in any of them get separate inputs.
DATA_KEYS = ("bands", "norm", "use_s2", "s2_size", "s2_filter_clouds", "s2_cover_max", "s2_prob_min",
             "s2_monthly", "s2_cloud_pixels", "use_metadata")


def input_signature(cfg: Settings) -> str:
    return json.dumps({k: getattr(cfg, k) for k in DATA_KEYS}, sort_keys=True, default=str)


class MultiInput(Dataset):
    """The same patch as seen by each distinct input setting: item i -> [sample of dataset g, ...].

    With skip_bad, an unreadable patch becomes the marker {"id": id, "bad": one-line error} instead of
    raising (the datasets themselves never substitute another patch: every id must get its own
    prediction)."""

    def __init__(self, datasets: list[Dataset], ids: Sequence[str], skip_bad: bool = False):
        self.datasets = datasets
        self.ids = np.asarray([str(i) for i in ids], dtype=str)
        self.skip_bad = skip_bad

    def __len__(self) -> int:
        return len(self.datasets[0])

    def __getitem__(self, i: int) -> list[Any] | dict[str, str]:
        try:
            return [ds[i] for ds in self.datasets]
        except DataError as err:
            if not self.skip_bad:
                raise
            return {"id": str(self.ids[i]), "bad": one_line(err).replace("\n", " ")}


def collate_multi(samples: list[Any]) -> dict[str, Any]:
    """{"batches": one collated batch per input setting (None if every sample was bad),
    "bad": [(id, error), ...]}."""
    bad = [(s["id"], s["bad"]) for s in samples if isinstance(s, dict)]
    good = [s for s in samples if not isinstance(s, dict)]
    batches = [collate([s[g] for s in good]) for g in range(len(good[0]))] if good else None
    return {"batches": batches, "bad": bad}


def input_groups(model_cfgs: Sequence[Settings]) -> list[int]:
    """Input index of each model: models with the same input setting share one (in order of first use)."""
    sigs = [input_signature(mcfg) for mcfg in model_cfgs]
    first = list(dict.fromkeys(sigs))
    return [first.index(s) for s in sigs]


def group_configs(model_cfgs: Sequence[Settings], group_of: Sequence[int]) -> list[Settings]:
    """The settings of each input group (its first model's): what that group's samples are read and
    normalised with."""
    return [model_cfgs[group_of.index(g)] for g in range(max(group_of) + 1)]


def prediction_loader(index_df: pd.DataFrame, model_cfgs: Sequence[Settings], cfg: Settings
                      ) -> tuple[DataLoader, list[int]]:
    """(loader of collate_multi dicts, input index of each model). One dataset per distinct input setting;
    the kit's loader settings (workers, single-threaded OpenCV in them, pinning) with cfg's batch size."""
    from src.data.dataset import FlairDataset

    group_of = input_groups(model_cfgs)
    df = index_df.reset_index(drop=True)
    datasets: list[Dataset] = [FlairDataset(df, gcfg.with_values(skip_bad=False), train=False, labels=False)
                               for gcfg in group_configs(model_cfgs, group_of)]
    ds = MultiInput(datasets, df["id"].tolist(), cfg.skip_bad)
    loader = build_loader(ds, cfg, train=False, collate_fn=collate_multi, batch_size=cfg.batch_size)
    return loader, group_of
