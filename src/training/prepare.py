"""What a training run settles before torch is imported (`python -m src.train` calls `fold_inputs`): the
fold's rows, the pseudo-labelled ones, the files they name, and the settings that need the data.

`class_weights=inverse | inverse_sqrt` is turned into 13 numbers from the training split's pixel counts,
which come from DATA/class_hist.csv (src.prep.class_hist's cache, filled by `make folds` and the EDA, keyed
by mask id, path, size and mtime), so the usual cost is reading one CSV. The numbers replace the word in the
resolved settings: config.yaml, every checkpoint, prediction and a resumed run all see the same weights,
even if the masks or folds change later.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from src.core.errors import ConfigError, DataError
from src.core.flair import NUM_CLASSES, OTHER
from src.core.settings import FREQUENCY_WEIGHTS, Settings
from src.core.tables import fold_rows, train_index
from src.data.pseudo_labels import add_pseudo_rows
from src.prep.class_hist import HIST_COLS, class_histograms

# class_weights words resolved from the training masks: word -> power p of w_c = 1 / f_c ** p (f_c: class
# c's share of the training pixels)
FREQ_WEIGHTS = dict(zip(FREQUENCY_WEIGHTS, (1.0, 0.5)))


def fold_inputs(cfg: Settings, fold: str) -> tuple[Settings, pd.DataFrame, pd.DataFrame | None]:
    """(settings with class weights resolved, training rows with the pseudo-labelled ones, validation rows
    or None for fold "all"); a one-line error when files the index lists are missing (a warning with
    skip_bad, whose loader then skips them)."""
    train_df, val_df = fold_rows(cfg.data_dir, fold)
    if (cfg.use_s2 or cfg.norm == "s2_stats") and (train_df["s2_data"].astype(str) == "").all():
        what = "use_s2=true" if cfg.use_s2 else "norm=s2_stats"
        raise ConfigError(f"{what}: {Path(cfg.data_dir) / 'index_train.csv'} is an aerial-only index (no "
                          "Sentinel-2 in the tree it was made from): use use_s2=false with norm=mean_std, or "
                          "index a tree with its sen folders")
    # class_weights=inverse|inverse_sqrt -> 13 numbers from the training masks, before config.yaml is written
    cfg = resolve_knobs(cfg, train_df)
    if cfg.sample_rare:  # before the pseudo-labelled rows: their masks are not in the histogram cache
        train_df = train_df.assign(draw_weight=rare_patch_weights(cfg, train_df))
    train_df = add_pseudo_rows(cfg, fold, train_df, val_df)  # pseudo_dir: test patches, training rows only
    if "draw_weight" in train_df:  # pseudo-labelled rows are drawn at the mean weight
        train_df["draw_weight"] = train_df["draw_weight"].fillna(1.0)
    missing = missing_files(pd.concat([train_df, val_df]) if val_df is not None else train_df, cfg.use_s2)
    if missing:
        msg = (f"{len(missing)} files listed in {Path(cfg.data_dir) / 'index_train.csv'} are missing "
               f"(e.g. {missing[0]})")
        if not cfg.skip_bad:
            raise DataError(msg + " (re-run `make index`, or skip_bad=1 to skip those patches)")
        print(f"warning: {msg}; skip_bad=1: those patches will be skipped")
    return cfg, train_df, val_df


def missing_files(df: pd.DataFrame, use_s2: bool) -> list[str]:
    """Files listed in the index that are not on disk (labels and S2 included)."""
    cols = ["img_path", "msk_path"] + (["s2_data", "s2_masks", "s2_products"] if use_s2 else [])
    paths = pd.unique(pd.concat([df[c].astype(str) for c in cols if c in df.columns]))
    return [p for p in paths if not p or not os.path.exists(p)]


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
    return patch_counts(data_dir, train_df, skip_bad).to_numpy(dtype=np.int64).sum(0)


def patch_counts(data_dir: str | os.PathLike, train_df: pd.DataFrame, skip_bad: bool) -> pd.DataFrame:
    """Pixel counts of classes 0..12 (columns HIST_COLS) of each row of `train_df`, in its order, through
    DATA/class_hist.csv (0 for a row it lacks: a mask skip_bad leaves out)."""
    index = train_index(data_dir)
    if skip_bad:
        index = index[[Path(p).is_file() for p in index["msk_path"].astype(str)]]
    hist = class_histograms(index, Path(data_dir) / CACHE_NAME).set_index("id")
    return hist.reindex(train_df["id"].astype(str))[HIST_COLS].fillna(0)


def rare_patch_weights(cfg: Settings, train_df: pd.DataFrame) -> np.ndarray:
    """sample_rare=p: each training patch's draw weight sum_c share_ic * f_c ** -p (share_ic: class c's share
    of patch i's scored pixels, f_c: of the training split's), normalised to mean 1; the patch mostly made of
    a class 10x rarer than another is drawn 10**p times as often. Why: a rare class (plowed land, ~3% of the
    pixels) otherwise appears in a few crops per epoch, whatever its loss weight (BENCHMARKS.md, "Short
    events")."""
    counts = patch_counts(cfg.data_dir, train_df, cfg.skip_bad).to_numpy(dtype=np.float64, copy=True)
    counts[:, OTHER] = 0
    if not counts.any():
        return np.ones(len(counts))
    rarity = np.asarray(inverse_frequency_weights(counts.sum(axis=0), cfg.sample_rare))  # f_c ** -p
    pixels = counts.sum(axis=1)
    weights = np.divide(counts @ rarity, pixels, out=np.zeros(len(counts)), where=pixels > 0)
    weights[~(weights > 0)] = weights[weights > 0].mean()
    return weights / weights.mean()


def resolve_knobs(cfg: Settings, train_df: pd.DataFrame) -> Settings:
    """cfg with class_weights=inverse|inverse_sqrt replaced by its 13 numbers (printed once, by rank 0);
    anything else is returned unchanged."""
    word = cfg.class_weights
    if not cfg.class_weights_from_data:
        return cfg
    counts = training_pixel_counts(cfg.data_dir, train_df, cfg.skip_bad)
    weights = inverse_frequency_weights(counts, FREQ_WEIGHTS[word])
    resolved = cfg.with_values(class_weights=tuple(weights))  # checked as typed numbers would be
    if int(os.environ.get("RANK", "0")) == 0:  # prepare() runs in every torchrun process
        shown = ", ".join(f"{w:.3g}" for w in weights)
        print(f"class_weights={word}: [{shown}] (from {len(train_df)} training masks; saved in config.yaml)")
    return resolved
