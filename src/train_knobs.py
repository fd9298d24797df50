"""Training settings that need data or a check before the run starts (train.prepare calls `resolve_knobs`).

`class_weights=inverse | inverse_sqrt` is turned into 13 numbers from the training split's pixel counts,
which come from DATA/class_hist.csv (src.class_hist's cache, filled by `make folds` and the EDA, keyed by
mask id, path, size and mtime), so the usual cost is reading one CSV. The numbers replace the word in the
resolved config: config.yaml, every checkpoint, prediction and a resumed run all see the same weights,
even if the masks or folds change later.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from src.class_hist import HIST_COLS, class_histograms
from src.classes import NUM_CLASSES, OTHER
from src.errors import ConfigError
from src.losses import FREQ_WEIGHTS, class_weights, from_data
from src.tables import train_index

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
