"""Saved ensemble probabilities (docs/data-format.md, "Predictions and probabilities"): the PROB_<id>.npz
format, its folder manifest, and the weighted average of several folders (`predict --combine`).

Separately predicted models are combined later without re-running them, so a PROB file must be cheap to
write in the prediction loop and cheap to read back: uint8 (13, H, W) = round(softmax * 255), deflate
level 1 (at most ~1.4 MB per 512x512 patch for a near-uniform untrained model; confident models
compress better; plan up to ~23 GB for the test set).
"""
from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from src.classes import NUM_CLASSES
from src.errors import DataError, PredictError
from src.fileio import atomic_write, write_json

PROBS_MANIFEST = "probs.json"
PROBS_FORMAT = "PROB_<id>.npz, key 'probs', uint8 (13,H,W) = round(softmax*255)"


def prob_path(probs_dir: str | Path, pid: str) -> Path:
    return Path(probs_dir) / f"PROB_{pid}.npz"


def prob_ok(path: Path) -> bool:
    """A PROB file counts as done when it is a non-empty zip (written atomically, so never partial)."""
    return path.is_file() and path.stat().st_size > 0 and zipfile.is_zipfile(path)


def save_prob(path: Path, q: np.ndarray) -> None:
    """uint8 (13,H,W) -> PROB_<id>.npz (np.load-able; deflate level 1: fast, these compress well), atomic."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(q), allow_pickle=False)
    with atomic_write(path) as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
            zf.writestr("probs.npy", buf.getvalue())


def load_prob(path: Path) -> np.ndarray:
    """PROB_<id>.npz -> uint8 (13,H,W), naming the file when it is unreadable."""
    try:
        with np.load(path) as z:
            q = z["probs"]
    except FileNotFoundError:
        raise DataError(f"{path}: probability file not found") from None
    except Exception as err:
        raise DataError(f"{path}: unreadable probability file ({type(err).__name__}: {err})") from None
    if q.dtype != np.uint8 or q.ndim != 3 or q.shape[0] != NUM_CLASSES:
        raise DataError(f"{path}: expected uint8 (13,H,W) probabilities, got {q.dtype} {q.shape}")
    return q


# ------------------------------------------------------------------------------------ folder manifest
def write_manifest(probs_dir: Path, identity: dict[str, Any], s_per_patch: float | None) -> None:
    """probs.json: the format, the setup that made the files, and the seconds per patch it took to make
    them (the whole chain for a combination; None when unknown), which a later --combine adds up."""
    write_json(probs_dir / PROBS_MANIFEST, {"format": PROBS_FORMAT, **identity, "s_per_patch": s_per_patch})


def saved_s_per_patch(probs_dir: Path) -> float | None:
    """Seconds per patch that made a folder's probabilities, from its probs.json; None when not recorded
    (older folders, hand-made ones) or unreadable."""
    try:
        value = json.loads((Path(probs_dir) / PROBS_MANIFEST).read_text()).get("s_per_patch")
    except (OSError, ValueError, AttributeError):
        return None
    return float(value) if isinstance(value, (int, float)) and value >= 0 else None


# ------------------------------------------------------------------------------------------ combining
def folder_ids(dirs: Sequence[Path], ids: Sequence[str] | None = None) -> list[str]:
    """The ids to combine (default: those of the first folder); every folder must hold every one."""
    for d in dirs:
        if not d.is_dir():
            raise PredictError(f"{d}: no such probabilities folder")
    if ids is None:
        ids = sorted(p.name[5:-4] for p in dirs[0].glob("PROB_*.npz"))
        if not ids:
            raise PredictError(f"{dirs[0]}: no PROB_<id>.npz files")
    ids = [str(i) for i in ids]
    for d in dirs:
        lacking = [i for i in ids if not prob_path(d, i).is_file()]
        if lacking:
            raise PredictError(f"{d}: {len(lacking)} of {len(ids)} PROB files missing (first: {lacking[:3]})")
    return ids


def average(dirs: Sequence[Path], weights: Sequence[float], pid: str, keep_probs: bool
            ) -> tuple[np.ndarray, np.ndarray | None]:
    """(argmax uint8 (H,W), re-quantised average or None) of one patch's saved probabilities."""
    acc = None
    for d, wi in zip(dirs, weights):
        q = load_prob(prob_path(d, pid)).astype(np.float32)
        if acc is not None and q.shape != acc.shape:
            raise DataError(f"{prob_path(d, pid)}: shape {q.shape} differs from the other "
                            f"folders' {acc.shape}")
        acc = q * wi if acc is None else acc + q * wi
    pred = acc.argmax(0).astype(np.uint8)
    return pred, (np.rint(acc).astype(np.uint8) if keep_probs else None)
