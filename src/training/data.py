"""What the training loop reads: the training set, its sampler and its loader (built once: persistent
workers keep their open S2 zones across epochs), and the validation loader. Each epoch's order and
augmentation are a function of (seed, epoch), so a resumed run replays an epoch bit for bit
(docs/data-format.md, "Samples and batches").

Training settings that need data or a check before the run starts (train.prepare calls `resolve_knobs`).

`class_weights=inverse | inverse_sqrt` is turned into 13 numbers from the training split's pixel counts,
which come from DATA/class_hist.csv (src.prep.class_hist's cache, filled by `make folds` and the EDA, keyed by
mask id, path, size and mtime), so the usual cost is reading one CSV. The numbers replace the word in the
resolved config: config.yaml, every checkpoint, prediction and a resumed run all see the same weights,
even if the masks or folds change later."""
from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import torch
from torch.utils.data import DataLoader, DistributedSampler

from src.core.errors import ConfigError, DataError
from src.core.runtime import derive_seed, seed_everything
from src.data.loader import EpochSampler, build_loader
from src.training.validation import domain_codes

if TYPE_CHECKING:
    from src.data.dataset import FlairDataset
import numpy as np

from src.core.flair import NUM_CLASSES, OTHER
from src.core.tables import train_index
from src.models.losses import FREQ_WEIGHTS, class_weights, from_data
from src.prep.class_hist import HIST_COLS, class_histograms


@contextlib.contextmanager
def as_setting_error() -> Iterator[None]:
    """ValueErrors raised while building the dataset or model are bad settings (DataErrors stay data)."""
    try:
        yield
    except DataError:
        raise
    except ValueError as err:
        raise ConfigError(str(err).strip().splitlines()[0]) from None


def missing_files(df: pd.DataFrame, use_s2: bool) -> list[str]:
    """Files listed in the index that are not on disk (labels and S2 included)."""
    cols = ["img_path", "msk_path"] + (["s2_data", "s2_masks", "s2_products"] if use_s2 else [])
    paths = pd.unique(pd.concat([df[c].astype(str) for c in cols if c in df.columns]))
    return [p for p in paths if not p or not os.path.exists(p)]


@dataclass
class Data:
    """The training set with its sampler and loader, and the validation loader (None for fold "all")."""

    train_ds: FlairDataset
    sampler: EpochSampler             # (index, epoch) pairs in DistributedSampler's order
    train_loader: DataLoader
    n_batches: int                    # training batches per epoch and process
    val_loader: DataLoader | None
    domains: list[str]
    domain_of: dict[str, int]         # validation id -> index into domains


def build_data(cfg: dict, train_df: pd.DataFrame, val_df: pd.DataFrame | None, rank: int, world: int,
               bad_log: Path | None) -> Data:
    """Datasets and loaders (this rank's shard). The training order is a function of (seed, epoch) through
    the sampler, the augmentation of (seed, epoch, index) through the dataset: the training loader keeps
    its workers across epochs (`epoch_loader` only moves the sampler on)."""
    from src.data.dataset import FlairDataset  # (imported here: the settings checks stay fast)

    with as_setting_error():
        train_ds = FlairDataset(train_df, cfg, train=True, bad_log=bad_log)
    sampler = EpochSampler(DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True,
                                              seed=cfg["seed"]))
    gen = torch.Generator()
    gen.manual_seed(derive_seed(cfg["seed"], rank, 1))  # worker seeds (nothing in a sample depends on them)
    train_loader = build_loader(train_ds, cfg, train=True, sampler=sampler, generator=gen, persistent=True)
    bs = cfg["batch_size"]
    drop_last = len(sampler) > bs  # build_loader's rule: never drop the only batch of a tiny set
    n_batches = len(sampler) // bs if drop_last else math.ceil(len(sampler) / bs)
    if cfg["max_train_batches"]:
        n_batches = min(n_batches, cfg["max_train_batches"])
    val_loader, domains, domain_of = None, [], {}
    if val_df is not None:
        val_ds = FlairDataset(val_df, cfg, train=False, bad_log=bad_log)
        shard = list(range(rank, len(val_ds), world))  # no padding: every patch counted once
        val_loader = build_loader(val_ds, cfg, train=False, sampler=shard)
        domains, domain_of = domain_codes(val_df)
    return Data(train_ds, sampler, train_loader, n_batches, val_loader, domains, domain_of)


def epoch_loader(cfg: dict, data: Data, epoch: int, rank: int) -> DataLoader:
    """Everything random in an epoch is a function of (seed, epoch, rank): exact replay after resume."""
    seed_everything(cfg["seed"], epoch, rank)  # dropout, modality dropout
    data.sampler.set_epoch(epoch)  # data order, and the epoch of every sample's augmentation draws
    return data.train_loader


CACHE_NAME = "class_hist.csv"  # under data_dir: the cache `make folds` and the EDA use


def inverse_frequency_weights(counts: np.ndarray, power: float) -> list[float]:
    """Pixel counts (13,) -> weights w_c = 1 / f_c ** power, normalised to mean 1 over the scored classes
    present; 0 for "other" (not scored) and for every class with no pixel.

    A class absent from the training split has no finite inverse frequency; its weight never multiplies a
    training pixel anyway (cross-entropy weighs each pixel by its target class), and 0 keeps it out of
    the Dice term and out of the validation loss, which it could not have been trained for.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.shape != (NUM_CLASSES,) or (counts < 0).any():
        raise ValueError(f"expected {NUM_CLASSES} non-negative pixel counts, got {counts!r}")
    scored = np.arange(NUM_CLASSES) != OTHER
    present = scored & (counts > 0)
    if not present.any():
        raise ConfigError("class_weights: the training split has no pixel of any scored class")
    freq = counts / counts[scored].sum()
    weights = np.zeros(NUM_CLASSES)
    weights[present] = freq[present] ** -power
    weights[present] /= weights[present].mean()
    return [float(w) for w in weights]


def training_pixel_counts(data_dir: str | os.PathLike, train_df: pd.DataFrame, skip_bad: bool = False
                          ) -> np.ndarray:
    """Pixel counts of classes 0..12 over the masks of `train_df`, through DATA/class_hist.csv.

    The whole index_train.csv is passed to the cache (it is rewritten to hold exactly the rows it is given,
    so asking for one fold would throw away the others'); the training rows are then summed. With skip_bad,
    rows whose mask file is missing are left out, as training skips them.
    """
    index = train_index(data_dir)
    if skip_bad:
        index = index[[Path(p).is_file() for p in index["msk_path"].astype(str)]]
    hist = class_histograms(index, Path(data_dir) / CACHE_NAME)
    rows = hist[hist["id"].isin(set(train_df["id"].astype(str)))]
    return rows[HIST_COLS].to_numpy(dtype=np.int64).sum(0)


def check_knobs(cfg: dict) -> None:
    """Values of encoder_lr_ratio and avg_last that their types cannot catch (train.check_settings: before
    any data is read)."""
    if cfg["encoder_lr_ratio"] < 0:
        raise ConfigError(f"encoder_lr_ratio: expected >= 0 (0 leaves the encoder's weights as they are), "
                          f"got {cfg['encoder_lr_ratio']}")
    if cfg["avg_last"] < 0:
        raise ConfigError(f"avg_last: expected a number of epochs >= 0, got {cfg['avg_last']}")


def resolve_knobs(cfg: dict, train_df: pd.DataFrame) -> dict:
    """cfg with class_weights=inverse|inverse_sqrt replaced by its 13 numbers (printed once, by rank 0);
    anything else is returned unchanged. The settings were checked before (train.check_settings)."""
    word = cfg["class_weights"]
    if not from_data(word):
        return cfg
    counts = training_pixel_counts(cfg["data_dir"], train_df, bool(cfg["skip_bad"]))
    weights = inverse_frequency_weights(counts, FREQ_WEIGHTS[word])
    resolved = {**cfg, "class_weights": weights}
    class_weights(resolved)  # the numbers pass the loss's own check, as typed ones would
    if int(os.environ.get("RANK", "0")) == 0:  # prepare() runs in every torchrun process
        shown = ", ".join(f"{w:.3g}" for w in weights)
        print(f"class_weights={word}: [{shown}] (from {len(train_df)} training masks; saved in config.yaml)")
    return resolved
