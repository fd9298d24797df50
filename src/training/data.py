"""What the training loop reads: the training set, its sampler and its loader (built once: persistent
workers keep their open S2 zones across epochs), and the validation loader. Each epoch's order and
augmentation are a function of (seed, epoch), so a resumed run replays an epoch bit for bit
(docs/data-format.md, "Samples and batches"). What is read is settled before torch loads:
src.training.prepare."""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import DataLoader, DistributedSampler

from src.core.errors import ConfigError, DataError
from src.core.runtime import Placement, derive_seed, seed_everything
from src.core.settings import Settings
from src.data.dataset import FlairDataset
from src.data.loader import EpochSampler, WeightedDraw, build_loader
from src.training.validation import Domains


@contextlib.contextmanager
def as_setting_error() -> Iterator[None]:
    """ValueErrors raised while building the dataset or model are bad settings (DataErrors stay data)."""
    try:
        yield
    except DataError:
        raise
    except ValueError as err:
        raise ConfigError(str(err).strip().splitlines()[0]) from None


@dataclass
class Data:
    """The training set with its sampler and loader, and the validation loader (None for fold "all")."""

    train_ds: FlairDataset
    sampler: EpochSampler             # (index, epoch) pairs in DistributedSampler's order
    train_loader: DataLoader
    n_batches: int                    # training batches per epoch and process
    val_loader: DataLoader | None
    domains: Domains                  # of the validation patches (none for fold "all")


def build_data(cfg: Settings, train_df: pd.DataFrame, val_df: pd.DataFrame | None, place: Placement,
               bad_log: Path | None) -> Data:
    """Datasets and loaders (this rank's shard). The training order is a function of (seed, epoch) through
    the sampler, the augmentation of (seed, epoch, index) through the dataset: the training loader keeps
    its workers across epochs (`epoch_loader` only moves the sampler on)."""
    rank, world = place.rank, place.world
    with as_setting_error():
        train_ds = FlairDataset(train_df, cfg, train=True, bad_log=bad_log)
    if "draw_weight" in train_df:  # sample_rare (src.training.prepare.rare_patch_weights)
        draw = WeightedDraw(train_df["draw_weight"].to_numpy(), world, rank, cfg.seed)
    else:
        draw = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    sampler = EpochSampler(draw)
    gen = torch.Generator()
    gen.manual_seed(derive_seed(cfg.seed, rank, 1))  # worker seeds (nothing in a sample depends on them)
    train_loader = build_loader(train_ds, cfg, train=True, sampler=sampler, generator=gen, persistent=True)
    bs = cfg.batch_size
    drop_last = len(sampler) > bs  # build_loader's rule: never drop the only batch of a tiny set
    n_batches = len(sampler) // bs if drop_last else math.ceil(len(sampler) / bs)
    if cfg.max_train_batches:
        n_batches = min(n_batches, cfg.max_train_batches)
    val_loader, domains = None, Domains()
    if val_df is not None:
        val_ds = FlairDataset(val_df, cfg, train=False, bad_log=bad_log)
        shard = list(range(rank, len(val_ds), world))  # no padding: every patch counted once
        val_loader = build_loader(val_ds, cfg, train=False, sampler=shard)
        domains = Domains.of_rows(val_df)
    return Data(train_ds, sampler, train_loader, n_batches, val_loader, domains)


def epoch_loader(cfg: Settings, data: Data, epoch: int, rank: int) -> DataLoader:
    """Everything random in an epoch is a function of (seed, epoch, rank): exact replay after resume."""
    seed_everything(cfg.seed, epoch, rank)  # dropout, modality dropout
    data.sampler.set_epoch(epoch)  # data order, and the epoch of every sample's augmentation draws
    return data.train_loader
