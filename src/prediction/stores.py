"""The folders prediction writes: PRED files with their predict.json manifest and background writer, and
saved probabilities (PROB_<id>.npz) with theirs.

The PRED folder of a prediction run (docs/data-format.md, "Predictions and probabilities"): which files
are done, the predict.json manifest that makes a re-run resume instead of mixing two setups, the
background writer, and the fallback file of an unreadable patch.

Files are written only through `src.scoring.submission.write_pred` and `src.prediction.stores.save_prob`
(both atomic), so a killed run never leaves a partial file under a final name, and "done" can be read off the
folder.

Saved ensemble probabilities (docs/data-format.md, "Predictions and probabilities"): the PROB_<id>.npz
format, its folder manifest, and the weighted average of several folders (`predict --combine`).

Separately predicted models are combined later without re-running them, so a PROB file must be cheap to
write in the prediction loop and cheap to read back: uint8 (13, H, W) = round(softmax * 255), deflate
level 1: 1.5-2.0 MB per 512x512 patch from a barely trained model (noisy probabilities, the worst case
measured: bench/scale_bench.py), less from confident models; the raw array is 3.4 MB. Plan ~30 GB for the
test set, ~115 GB for an OOF store of the training set (BENCHMARKS.md, "Real scale")."""
from __future__ import annotations

import io
import json
import zipfile
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tifffile

from src.core.errors import DataError, DiskFullError, PredictError, is_disk_full
from src.core.files import atomic_write, write_json
from src.core.flair import NUM_CLASSES, OTHER, PATCH_SHAPE
from src.scoring.submission import pred_name, write_pred

MANIFEST = "predict.json"
# setup fields newer than some manifests: a manifest without one was made with this value
LEGACY = {"bn_adapt": "none"}
FALLBACK_CLASS = OTHER  # written for unreadable test patches with skip_bad=1: "other" costs no false positive


def pred_path(out_dir: str | Path, pid: str) -> Path:
    return Path(out_dir) / pred_name(pid)


def _image_hw(path: str) -> tuple[int, int] | None:
    try:
        with tifffile.TiffFile(path) as tif:
            shape = tif.series[0].shape
    except Exception:
        return None
    if len(shape) == 3 and shape[-1] <= 16 < shape[0]:  # pixel-interleaved (H, W, C)
        return int(shape[0]), int(shape[1])
    return int(shape[-2]), int(shape[-1])


def pred_ok(path: Path, img_path: str | None = None) -> bool:
    """A PRED file counts as done when its TIFF header reads as a 2-D uint8 image of the image's size.
    (Files are written atomically, so a killed run leaves no partial file under the final name.)"""
    if not path.is_file():
        return False
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            shape, dtype = tuple(page.shape), page.dtype
    except Exception:
        return False
    if len(shape) != 2 or dtype != np.uint8:
        return False
    want = _image_hw(img_path) if img_path else None
    return want is None or shape == want


def scan_done(index_df: pd.DataFrame, out_dir: Path, probs_dir: Path | None = None,
              threads: int = 8) -> set[str]:
    """Ids whose PRED file (and PROB file when probabilities are saved) already exist and are valid."""
    rows = list(zip(index_df["id"].astype(str), index_df.get("img_path", [None] * len(index_df))))

    def ok(row: tuple[str, str | None]) -> bool:
        pid, img = row
        if probs_dir is not None and not prob_ok(prob_path(probs_dir, pid)):
            return False
        return pred_ok(pred_path(out_dir, pid), img)

    with ThreadPoolExecutor(threads) as pool:
        flags = list(pool.map(ok, rows))
    return {pid for (pid, _), f in zip(rows, flags) if f}


# ------------------------------------------------------------------------------------------- manifest
def read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise PredictError(f"{path}: unreadable manifest ({err}); delete it and use --overwrite") from None


def prepare_out(out_dir: Path, identity: dict[str, Any], index_df: pd.DataFrame, overwrite: bool,
                probs_dir: Path | None) -> dict[str, Any] | None:
    """Create the folder and check that what is already there was made by the same setup.

    Returns the previous manifest (None when starting fresh). With --overwrite the split's PRED (and
    PROB) files are deleted first, so an interrupted overwrite can never mix two setups.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    if probs_dir is not None:
        probs_dir.mkdir(parents=True, exist_ok=True)
    prev = read_manifest(out_dir / MANIFEST)
    existing = any(out_dir.glob("PRED_*.tif"))
    if overwrite:
        for pid in index_df["id"].astype(str):
            pred_path(out_dir, pid).unlink(missing_ok=True)
            if probs_dir is not None:
                prob_path(probs_dir, pid).unlink(missing_ok=True)
        (out_dir / MANIFEST).unlink(missing_ok=True)
        return None
    if prev is None:
        if existing:
            raise PredictError(f"{out_dir} already holds PRED files but no {MANIFEST}: use another --out, "
                               "or --overwrite to replace them")
        return None
    for key, value in identity.items():
        before = prev.get(key, LEGACY.get(key))
        if json.dumps(before, sort_keys=True, default=str) != json.dumps(value, sort_keys=True, default=str):
            raise PredictError(f"{out_dir} holds predictions from another setup ({key} differs: "
                               f"{before} vs {value}); use another --out, or --overwrite")
    return prev


class RunRecord:
    """predict.json of a PRED folder, kept in step with probs.json of its probabilities folder.

    Fields: the setup (`identity`), then split_ids, infer_s and n_timed (measured seconds and the files
    they produced, summed over resumed runs), complete, and for a combination `sources_s_per_patch`
    (seconds per patch of the combined folders' own runs, None when one did not record it)."""

    def __init__(self, out_dir: Path, probs_dir: Path | None, identity: dict[str, Any],
                 fields: dict[str, Any]):
        self.out_dir, self.probs_dir = out_dir, probs_dir
        self.identity = dict(identity)
        self.fields = {**identity, **fields}

    def write(self, **updates: Any) -> None:
        self.fields.update(updates)
        write_json(self.out_dir / MANIFEST, self.fields)
        if self.probs_dir is not None:
            write_manifest(self.probs_dir, self.identity, self.s_per_patch())

    def split_seconds(self) -> float | None:
        return split_seconds(self.fields)

    def s_per_patch(self) -> float | None:
        return chain_s_per_patch(self.fields)


def _own_s_per_patch(fields: dict[str, Any]) -> float | None:
    n = fields.get("n_timed") or 0
    return float(fields.get("infer_s") or 0.0) / n if n else None


def chain_s_per_patch(fields: dict[str, Any]) -> float | None:
    """Seconds per patch of the whole chain that made a folder's files (a combination adds the time of
    the runs that made its sources); None when a part is unknown."""
    own = _own_s_per_patch(fields)
    if "sources_s_per_patch" not in fields:
        return own
    sources = fields["sources_s_per_patch"]
    return None if sources is None else sources + (own or 0.0)


def split_seconds(fields: dict[str, Any]) -> float | None:
    """Inference seconds for the whole split (the time in the zip name) from a manifest's fields: the
    chain's time when known; for a combination of folders that recorded none, the combination's own."""
    per = chain_s_per_patch(fields)
    if per is None and "sources_s_per_patch" in fields:
        per = _own_s_per_patch(fields)
    return None if per is None else per * int(fields["split_ids"])


# --------------------------------------------------------------------------------------------- writing
class Writer:
    """Background writing of PRED (+PROB) files so encoding overlaps the next batch's compute.

    At most `max_pending` writes are in flight; the first failure is re-raised in the caller's thread
    (disk full as DiskFullError with what to free)."""

    def __init__(self, out_dir: Path, probs_dir: Path | None, threads: int = 4, max_pending: int = 64):
        self.out_dir, self.probs_dir = Path(out_dir), probs_dir
        self.pool = ThreadPoolExecutor(threads)
        self.pending: deque[Future] = deque()
        self.max_pending = max_pending
        self.written: list[str] = []
        self.n_left = 0
        self.bytes_per_file = 64e3

    def _write(self, pid: str, pred: np.ndarray, q: np.ndarray | None) -> str:
        if q is not None:  # probabilities first: a PRED file then implies its PROB file exists
            save_prob(prob_path(self.probs_dir, pid), q)
        write_pred(self.out_dir, pid, pred)
        return pid

    def submit(self, pid: str, pred: np.ndarray, q: np.ndarray | None = None) -> None:
        self.pending.append(self.pool.submit(self._write, pid, pred, q))
        while len(self.pending) > self.max_pending:
            self._collect(self.pending.popleft())

    def _collect(self, fut: Future) -> None:
        try:
            self.written.append(fut.result())
        except OSError as err:
            if not is_disk_full(err):
                raise
            self.abort()
            left = self.n_left - len(self.written)
            raise DiskFullError(f"{err} -- {left} files still to write, about "
                                f"{left * self._file_bytes() / 1e6:.0f} MB more; free that much, then re-run "
                                "the same command: it writes only the missing files") from None

    def _file_bytes(self) -> float:
        """Size of one written patch (PRED + PROB), from the last file written, else a guess."""
        if not self.written:
            return self.bytes_per_file
        p = pred_path(self.out_dir, self.written[-1])
        est = p.stat().st_size if p.exists() else self.bytes_per_file
        if self.probs_dir is not None:
            pp = prob_path(self.probs_dir, self.written[-1])
            est += pp.stat().st_size if pp.exists() else 0
        return est

    def close(self) -> list[str]:
        while self.pending:
            self._collect(self.pending.popleft())
        self.pool.shutdown(wait=True)
        return self.written

    def abort(self) -> None:
        """Drop queued writes, wait for the running ones (each is atomic anyway)."""
        for fut in self.pending:
            fut.cancel()
        self.pool.shutdown(wait=True, cancel_futures=True)
        for fut in self.pending:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.written.append(fut.result())
        self.pending.clear()


def write_fallback(out_dir: Path, bad: list[tuple[str, str]], log: Callable[[str], None]) -> list[str]:
    """skip_bad=1: an unreadable test patch still needs a file: constant "other" (it adds no false
    positive to any scored class), and the id and error are appended to OUT/skipped.txt."""
    for pid, _ in bad:
        write_pred(out_dir, pid, np.full(PATCH_SHAPE, FALLBACK_CLASS, dtype=np.uint8))
    with open(out_dir / "skipped.txt", "a") as f:
        f.writelines(f"{pid}\t{err}\n" for pid, err in bad)
    log(f"predict: warning: {len(bad)} unreadable patches got the fallback class {FALLBACK_CLASS} "
        f"(listed with their errors in {out_dir / 'skipped.txt'})")
    return [pid for pid, _ in bad]


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
