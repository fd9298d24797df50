"""Pseudo-labels (docs/recipes.md, "Pseudo-labels"): the PSEUDO_<id>.tif format and its folder manifest
(written by `python -m src.pseudo`), and how training reads them (`pseudo_dir`, `pseudo_threshold`,
`pseudo_weight`).

Why this shape: the 2nd place's biggest single gain (62.4 -> 63.3 mIoU) came from training on the test
patches labelled by an ensemble. A pseudo file keeps the class *and* the confidence of every pixel, so the
threshold is a training setting, not a property of the files: trying another threshold re-reads the same
files. Low-confidence pixels become IGNORE_U8 in the uint8 mask; the loss skips them (src.models.losses), and
the D4 and warp augmentations move them like any label value. Pseudo rows only ever join the training rows:
ids of the training index and domains of the validation fold are refused."""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from src.core.errors import ConfigError, DataError
from src.core.files import read_tif, write_tif
from src.core.flair import NUM_CLASSES, class_argmax
from src.core.settings import Settings
from src.core.tables import load_index, train_index

PSEUDO_MANIFEST = "pseudo.json"
PSEUDO_REPORT = "pseudo_report.csv"
PSEUDO_FORMAT = ("PSEUDO_<id>.tif: uint8 (2,H,W) planar LZW TIFF; band 0 = class 0..12 (argmax of the "
                 "saved probabilities), band 1 = confidence = round(max softmax * 255)")
# uint8 mask value of a pixel no loss sees (src.models.losses maps it to IGNORE)
IGNORE_U8 = 255
THRESHOLDS = (0.5, 0.7, 0.9)      # the report's and the manifest's summary thresholds


def pseudo_path(folder: str | Path, pid: str) -> Path:
    return Path(folder) / f"PSEUDO_{pid}.tif"


# ------------------------------------------------------------------------------------------ one file
def from_probs(q: np.ndarray) -> np.ndarray:
    """uint8 (13,H,W) saved probabilities -> uint8 (2,H,W): class (argmax, ties to the lower class) and
    confidence (the largest saved value: round(max p * 255), since rounding keeps the order)."""
    return np.stack(class_argmax(q))


def write_pseudo(path: Path, pair: np.ndarray) -> None:
    """One pseudo file, atomically (src.core.files.write_tif)."""
    write_tif(path, np.ascontiguousarray(pair, dtype=np.uint8))


def read_pseudo(path: str | Path) -> np.ndarray:
    """PSEUDO_<id>.tif -> uint8 (2,H,W); DataError naming the file for anything else."""
    arr = read_tif(path)
    if arr.ndim == 3 and arr.shape[-1] == 2 and arr.shape[0] != 2:
        arr = np.moveaxis(arr, -1, 0)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[0] != 2:
        raise DataError(f"{path}: expected a uint8 (2,H,W) pseudo-label file (class, confidence), "
                        f"got {arr.dtype} {arr.shape}")
    if int(arr[0].max(initial=0)) >= NUM_CLASSES:
        raise DataError(f"{path}: pseudo-label classes outside 0..{NUM_CLASSES - 1}")
    return arr


def check_threshold(threshold: float) -> float:
    if not 0.0 <= float(threshold) <= 1.0:
        raise ConfigError(f"pseudo_threshold: expected a number in 0..1, got {threshold}")
    return float(threshold)


def min_level(threshold: float) -> int:
    """The smallest confidence level c (0..255) kept by `threshold`: c / 255 >= threshold (256: none)."""
    kept = np.arange(256) / 255.0 >= check_threshold(threshold)
    return int(np.argmax(kept)) if kept.any() else 256


def pseudo_mask(pair: np.ndarray, level: int) -> np.ndarray:
    """(2,H,W) pseudo pair -> uint8 (H,W) training mask: the class, IGNORE_U8 where confidence < level."""
    return np.where(pair[1] >= level, pair[0], np.uint8(IGNORE_U8)).astype(np.uint8)


def level_counts(pair: np.ndarray) -> np.ndarray:
    """int64 (13, 256): pixels per class and confidence level (sums over patches; any threshold's
    class histogram is a suffix sum)."""
    flat = pair[0].astype(np.int64).ravel() * 256 + pair[1].ravel()
    return np.bincount(flat, minlength=NUM_CLASSES * 256)[:NUM_CLASSES * 256].reshape(NUM_CLASSES, 256)


def kept_counts(levels: np.ndarray, threshold: float) -> np.ndarray:
    """(13,) pixels per class at or above `threshold`, from `level_counts` sums."""
    return np.asarray(levels)[:, min_level(threshold):].sum(1)


# ------------------------------------------------------------------------------------------ manifest
def read_manifest(folder: Path) -> dict[str, Any]:
    """pseudo.json of a pseudo-label folder; DataError naming it when missing, unreadable or incomplete."""
    path = folder / PSEUDO_MANIFEST
    if not folder.is_dir():
        raise DataError(f"{folder}: no such pseudo-label folder (make pseudo writes it)")
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: not found: not a pseudo-label folder (make pseudo writes it)") from None
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: unreadable ({type(err).__name__}: {err})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("ids"), list) or "index" not in manifest:
        raise DataError(f"{path}: not a pseudo-label manifest (no ids or index)")
    if not manifest.get("complete"):
        raise DataError(f"{path}: incomplete (the pseudo job was interrupted): re-run make pseudo")
    return manifest


# ------------------------------------------------------------------------------------------ training
def pseudo_folder(cfg: Settings, fold: str) -> Path | None:
    """cfg's `pseudo_dir` with `{fold}` and `{runs_dir}` filled in (a fold-specific teacher), or None."""
    if not cfg.pseudo_dir:
        return None
    return Path(cfg.pseudo_dir.replace("{fold}", str(fold)).replace("{runs_dir}", cfg.runs_dir))


def pseudo_rows(cfg: Settings, fold: str, val_df: pd.DataFrame | None
                ) -> tuple[pd.DataFrame, Path, dict[str, Any]] | None:
    """(the index rows of the pseudo-labelled patches with `msk_path` = their PSEUDO file, the folder, its
    manifest), None without `pseudo_dir`. Refused, naming the file: ids of the training index, domains of
    the validation fold, missing pseudo files, ids the manifest's index lacks."""
    folder = pseudo_folder(cfg, fold)
    if folder is None:
        return None
    manifest = read_manifest(folder)
    where = folder / PSEUDO_MANIFEST
    ids = [str(i) for i in manifest["ids"]]
    wanted = set(ids)
    training = set(train_index(cfg.data_dir)["id"].astype(str))
    clash = [i for i in ids if i in training]
    if clash:
        raise DataError(f"{where}: {len(clash)} pseudo-labelled ids are training patches of "
                        f"{Path(cfg.data_dir) / 'index_train.csv'} (e.g. {clash[0]}); pseudo-labels are "
                        "for unlabelled patches only")
    index = load_index(manifest["index"])
    rows = index[index["id"].astype(str).isin(wanted)].copy()
    if len(rows) != len(wanted):
        lacking = sorted(wanted - set(rows["id"].astype(str)))
        raise DataError(f"{where}: {len(lacking)} ids are not in its index {manifest['index']} "
                        f"(e.g. {lacking[0]})")
    shared = sorted(set(rows["domain"]) & set(val_df["domain"])) if val_df is not None else []
    if shared:
        raise DataError(f"{where}: pseudo-labelled patches of validation domain(s) {', '.join(shared)} "
                        f"(fold {fold}): validation would not be held out")
    rows["msk_path"] = [str(pseudo_path(folder, i)) for i in rows["id"].astype(str)]
    absent = [p for p in rows["msk_path"] if not os.path.isfile(p)]
    if absent:
        raise DataError(f"{absent[0]}: pseudo-label file not found ({len(absent)} of {len(rows)} missing; "
                        "re-run make pseudo)")
    return rows.sort_values("id").reset_index(drop=True), folder, manifest


def add_pseudo_rows(cfg: Settings, fold: str, train_df: pd.DataFrame, val_df: pd.DataFrame | None,
                    log: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Training rows plus the pseudo-labelled ones (column `pseudo` marks them), or those alone with
    `pseudo_only` (the 2nd place fine-tuned on the test set's pseudo-labels only); unchanged without
    `pseudo_dir`. Logs (by default: printed by rank 0 only) how many were added and the share of their
    pixels the threshold keeps."""
    found = pseudo_rows(cfg, fold, val_df)
    if found is None:
        return train_df
    rows, folder, manifest = found
    if log is None:
        log = print if os.environ.get("RANK", "0") == "0" else (lambda _: None)
    kept = ""
    if manifest.get("levels"):
        levels = np.asarray(manifest["levels"], dtype=np.int64)
        share = kept_counts(levels, cfg.pseudo_threshold).sum() / max(int(levels.sum()), 1)
        kept = f", {share:.1%} of their pixels at or above the threshold"
    settings = f"threshold {cfg.pseudo_threshold}{kept}; weight {cfg.pseudo_weight}"
    if cfg.pseudo_only:
        log(f"pseudo: training on the {len(rows)} pseudo-labelled patches of {folder} alone ({settings}; "
            f"pseudo_only=true leaves out the {len(train_df)} labelled training patches)")
        return rows.assign(pseudo=True).reset_index(drop=True)
    log(f"pseudo: added {len(rows)} pseudo-labelled patches from {folder} to the {len(train_df)} training "
        f"patches ({settings})")
    return pd.concat([train_df.assign(pseudo=False), rows.assign(pseudo=True)], ignore_index=True)


@dataclass
class PseudoSource:
    """What FlairDataset needs to read pseudo rows: which rows are pseudo, the kept confidence level and
    their loss weight (small numpy and numbers: pickles cheaply into DataLoader workers)."""

    flags: np.ndarray   # bool per row
    level: int          # min_level(pseudo_threshold)
    weight: float       # pseudo_weight

    @classmethod
    def of(cls, index_df: pd.DataFrame, cfg: Settings) -> PseudoSource | None:
        """None when the rows hold no pseudo-labelled patch (then samples carry no "weight")."""
        if "pseudo" not in index_df.columns or not index_df["pseudo"].astype(bool).any():
            return None
        return cls(index_df["pseudo"].astype(bool).to_numpy(), min_level(cfg.pseudo_threshold),
                   cfg.pseudo_weight)

    def mask(self, path: str, shape: tuple[int, ...], img_path: str) -> np.ndarray:
        """The uint8 training mask of a pseudo row (IGNORE_U8 below the threshold)."""
        pair = read_pseudo(path)
        if pair.shape[1:] != tuple(shape):
            raise DataError(f"{path}: pseudo-label shape {pair.shape[1:]} differs from image {tuple(shape)} "
                            f"of {img_path}")
        return pseudo_mask(pair, self.level)

    def sample_weight(self, i: int) -> float:
        return self.weight if self.flags[i] else 1.0
