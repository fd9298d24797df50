"""The submission: the one writer of PRED files, the validator, the zip, and the reader of PRED files from
a folder or a zip.

The submission format (docs/data-format.md, "Submission"): the one writer of `PRED_<id>.tif`, the
validator and the Codalab zip.

A submission is one `PRED_<id>.tif` per test patch: single band, uint8, 512x512, values 0..12, LZW,
zipped flat (no folder inside) as `<approach>_<baseline-time>_<your-time>.zip` (times `M-S`) or
`<approach>.zip`. The official scorer silently drops out-of-range values and cannot say which file is
wrong, so `validate` checks everything itself and names each file and problem; `make_zip` only
publishes a zip that passed `validate`, so the kit cannot hand out an invalid one.

Reading PRED files from a prediction folder or a submission zip, for the validator and the scorer.

Both list a folder or a zip once and read its members from many threads (libtiff, through imagecodecs,
decodes LZW with the GIL released), so the listing and the thread-safe reads live here, below both."""
from __future__ import annotations

import io
import os
import re
import shutil
import threading
import zipfile
from collections import Counter, defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import imagecodecs
import numpy as np
import tifffile

from src.core.errors import DataError, DiskFullError, SubmissionError, is_disk_full
from src.core.files import atomic_path, write_tif
from src.core.flair import N_TEST_PATCHES, NUM_CLASSES, PATCH_SHAPE
from src.core.workers import default_workers

ID_RE = re.compile(r"^\d{6}$")
TIME_RE = re.compile(r"^\d+-\d{1,2}$")
APPROACH_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+-]*(_[A-Za-z0-9.+-]+)*$")
MAX_FILE_BYTES = PATCH_SHAPE[0] * PATCH_SHAPE[1] + 8192  # generous: LZW of 13-value maps stays under raw size
LISTED = 20  # ids shown before "and N more"
MESSAGE_LINES = 30  # problems listed one per line before they are grouped by kind


def pred_name(pid: str | int) -> str:
    """Id ("012345" or 12345) -> "PRED_012345.tif"."""
    pid = f"{pid:06d}" if isinstance(pid, (int, np.integer)) else str(pid)
    if not ID_RE.match(pid):
        raise ValueError(f"patch id must be 6 digits, got {pid!r}")
    return f"PRED_{pid}.tif"


def short_list(items: Iterable[str], n: int = LISTED) -> str:
    """Sorted ids or names, the first `n` shown and the rest counted (error messages stay readable)."""
    items = sorted(items)
    shown = ", ".join(items[:n])
    return shown + (f" ... and {len(items) - n} more" if len(items) > n else "")


def _free_bytes(folder: Path) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return -1


def fmt_mb(n: int) -> str:
    """Bytes as decimal megabytes, for messages."""
    return f"{n / 1e6:,.1f} MB"


# ---------------------------------------------------------------- writing one prediction

def write_pred(folder: str | os.PathLike, pid: str | int, array: np.ndarray) -> Path:
    """Write `folder/PRED_<id>.tif` (LZW, atomic) after checking it is a valid prediction.

    Any integer array of shape 512x512 with values 0..12 is accepted and stored as uint8; anything
    else raises ValueError before a byte is written. An interrupted write leaves no PRED_*.tif,
    and a full disk raises DiskFullError saying how much space is needed.
    """
    folder = Path(folder)
    path = folder / pred_name(pid)
    array = np.asarray(array)
    if array.ndim != 2 or array.shape != PATCH_SHAPE:
        raise ValueError(f"{path.name}: prediction must be a 2-D {PATCH_SHAPE[0]}x{PATCH_SHAPE[1]} array, "
                         f"got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{path.name}: prediction must hold integer class ids, got dtype {array.dtype}")
    lo, hi = int(array.min()), int(array.max())
    if lo < 0 or hi >= NUM_CLASSES:
        bad = np.unique(array[(array < 0) | (array >= NUM_CLASSES)])[:10].tolist()
        raise ValueError(f"{path.name}: values outside 0..{NUM_CLASSES - 1}: {bad}")
    folder.mkdir(parents=True, exist_ok=True)
    try:
        write_tif(path, array.astype(np.uint8, copy=False), compression="lzw")
    except OSError as err:
        if not is_disk_full(err):
            raise
        free = _free_bytes(folder)
        raise DiskFullError(
            f"disk full while writing {path}: one prediction needs up to {fmt_mb(MAX_FILE_BYTES)} "
            f"({N_TEST_PATCHES:,} test patches up to {fmt_mb(N_TEST_PATCHES * MAX_FILE_BYTES)}, typically "
            f"a tenth of that); {fmt_mb(free)} free in {folder}; free space there or predict into another "
            "folder", path) from None
    return path


def check_pred(data: bytes) -> tuple[list[str], np.ndarray | None]:
    """Strict check of one PRED file's bytes -> (problems, class histogram or None)."""
    try:
        tif = tifffile.TiffFile(io.BytesIO(data))
    except Exception as err:
        return [f"not a readable TIFF ({type(err).__name__}: {err})"], None
    with tif:
        problems = []
        try:
            if len(tif.pages) != 1:
                problems.append(f"{len(tif.pages)} images (pages) in the file, expected 1 "
                                f"(array shape {tuple(tif.series[0].shape)})")
            page = tif.pages[0]
            shape = tuple(tif.series[0].shape)
        except Exception as err:
            return [f"malformed TIFF ({type(err).__name__}: {err})"], None
        if page.samplesperpixel != 1:
            problems.append(f"{page.samplesperpixel} bands (samples per pixel), expected a single band")
        elif len(shape) != 2 and len(tif.pages) == 1:
            problems.append(f"array shape {shape}, expected a 2-D array")
        if page.dtype != np.uint8:
            problems.append(f"dtype {page.dtype}, expected uint8")
        size = (page.imagelength, page.imagewidth)
        if size != PATCH_SHAPE:
            problems.append(f"shape {size[0]}x{size[1]}, expected {PATCH_SHAPE[0]}x{PATCH_SHAPE[1]}")
        compression = getattr(page.compression, "name", str(page.compression))
        if compression != "LZW":
            problems.append(f"compression {compression}, expected LZW")
        if page.dtype is None or not np.issubdtype(page.dtype, np.integer):
            return problems, None
        try:
            arr = decode_tif(data)
        except Exception as err:
            return problems + [f"pixel data unreadable ({type(err).__name__}: {err})"], None
    bad = (arr < 0) | (arr >= NUM_CLASSES)
    if bad.any():
        problems.append(f"values outside 0..{NUM_CLASSES - 1}: {np.unique(arr[bad])[:10].tolist()}")
        return problems, None
    return problems, np.bincount(arr.ravel().astype(np.intp), minlength=NUM_CLASSES)


def expected_ids(ids) -> set[str] | None:
    """ids as a set: None, an iterable of ids, a DataFrame with an `id` column, or an index CSV path."""
    if ids is None:
        return None
    if isinstance(ids, (str, os.PathLike)):
        from src.core.tables import load_index

        ids = load_index(ids)
    if hasattr(ids, "columns"):
        ids = ids["id"]
    out = {f"{i:06d}" if isinstance(i, (int, np.integer)) else str(i) for i in ids}
    bad = [i for i in out if not ID_RE.match(i)]
    if bad:
        raise ValueError(f"expected ids must be 6 digits, got {short_list(bad)}")
    return out


# ---------------------------------------------------------------- validation

def _group(problems: list[str]) -> str:
    """Every problem when few; grouped by kind ("file: problem" with the same problem) when many."""
    if len(problems) <= MESSAGE_LINES:
        return "\n".join(f"  {p}" for p in problems)
    groups: dict[str, list[str]] = defaultdict(list)
    for p in problems:
        file, _, what = p.partition(": ")
        groups[what].append(file)
    return "\n".join(f"  {what}: {len(files)} files: {short_list(files, 5)}"
                     for what, files in groups.items())


def validate(path: str | os.PathLike, ids=None, workers: int | None = None,
             label: str | None = None) -> dict:
    """Check a prediction folder or submission zip; raise SubmissionError listing every problem.

    Checks: exactly the expected ids when `ids` is given (missing and extra listed), names
    PRED_<6 digits>.tif, one single-band image per file, uint8, 512x512, values 0..12, LZW; in a zip
    also no folders, no duplicate names and no other files. In a folder only *.tif/*.tiff files are
    looked at (other files are not zipped). Returns a summary: files, bytes, class pixel counts.
    """
    path = Path(path)
    where = label or str(path)
    want = expected_ids(ids)
    problems: list[str] = []
    try:
        src = PredSource(path)
    except SubmissionError as err:
        raise SubmissionError(f"invalid submission {where}:\n  {err}") from None
    to_check: list[str] = []
    if src.is_zip:
        counts = Counter(src.entries)
        for name, n in sorted(counts.items()):
            if n > 1:
                problems.append(f"{name}: appears {n} times in the zip")
        for name in sorted(counts):
            if name.endswith("/"):
                problems.append(f"{name}: folder inside the zip (files must be at the top level)")
            elif "/" in name:
                problems.append(f"{name}: inside a folder (files must be at the top level of the zip)")
            elif not PRED_RE.match(name):
                problems.append(f"{name}: not a prediction file name (expected only PRED_<6 digits>.tif)")
            else:
                to_check.append(name)
    else:
        for name in src.entries:
            if name.startswith("."):
                continue  # temp files of an interrupted atomic write, never zipped
            if PRED_RE.match(name):
                to_check.append(name)
            elif name.lower().endswith((".tif", ".tiff")):
                problems.append(f"{name}: wrong name (expected PRED_<6 digits>.tif)")
    found = {PRED_RE.match(n).group(1) for n in to_check}
    if want is not None:
        missing, extra = want - found, found - want
        if missing:
            problems.append(f"missing: {len(missing)} of {len(want)} expected predictions absent: "
                            + short_list(pred_name(i) for i in missing))
        if extra:
            problems.append(f"extra: {len(extra)} predictions for ids not in the expected set: "
                            + short_list(pred_name(i) for i in extra))
        to_check = [n for n in to_check if PRED_RE.match(n).group(1) in want]
    if not to_check and not problems:
        problems.append(f"{where}: no PRED_<6 digits>.tif files")

    def one(name: str) -> tuple[str, list[str], np.ndarray | None, int]:
        try:
            data = src.read(name)
        except Exception as err:
            return name, [f"unreadable ({type(err).__name__}: {err})"], None, 0
        found_problems, hist = check_pred(data)
        return name, found_problems, hist, len(data)

    hist_total = np.zeros(NUM_CLASSES, dtype=np.int64)
    n_bytes = 0
    with src, ThreadPoolExecutor(workers or default_workers()) as pool:
        for name, file_problems, hist, size in pool.map(one, to_check):
            problems.extend(f"{name}: {p}" for p in file_problems)
            n_bytes += size
            if hist is not None:
                hist_total += hist
    if problems:
        plural = "s" if len(problems) > 1 else ""
        raise SubmissionError(f"invalid submission {where}: {len(problems)} problem{plural}\n"
                              + _group(problems), problems)
    return {"path": str(path), "files": len(to_check), "bytes": n_bytes, "class_pixels": hist_total.tolist()}


# ---------------------------------------------------------------- zipping

def format_time(t: float | int | str) -> str:
    """Seconds -> "M-S" (754 -> "12-34"); a string already in that form passes through."""
    if isinstance(t, str):
        if not TIME_RE.match(t):
            raise ValueError(f"time {t!r}: expected seconds or 'M-S' (e.g. 12-34)")
        return t
    if t < 0:
        raise ValueError(f"time must be >= 0 seconds, got {t}")
    total = int(round(t))
    return f"{total // 60}-{total % 60:02d}"


def zip_name(approach: str, baseline_time=None, your_time=None) -> str:
    """`<approach>_<baseline-time>_<your-time>.zip` when both times are known, else `<approach>.zip`."""
    if not APPROACH_RE.match(approach or ""):
        raise ValueError(f"approach name {approach!r}: use letters, digits, '.', '+', '-', '_' "
                         "(no spaces or slashes, must start with a letter or digit)")
    if (baseline_time is None) != (your_time is None):
        raise ValueError("give both baseline_time and your_time, or neither")
    if baseline_time is None:
        return f"{approach}.zip"
    return f"{approach}_{format_time(baseline_time)}_{format_time(your_time)}.zip"


def make_zip(folder: str | os.PathLike, approach: str, out_dir: str | os.PathLike = "submissions",
             baseline_time=None, your_time=None, ids=None, workers: int | None = None,
             compression: int = zipfile.ZIP_STORED) -> Path:
    """Validate `folder`, zip its PRED_*.tif flat into `out_dir`, validate the zip, publish it.

    Never overwrites: an existing zip of the same name raises FileExistsError (remove it or choose
    another approach name). The zip is written under a hidden temp name and only linked to its final
    name after it passed `validate`, so an interrupted or invalid run leaves no `<name>.zip`.
    LZW TIFFs barely shrink under deflate, so entries are stored by default.
    """
    folder, out_dir = Path(folder), Path(out_dir)
    final = out_dir / zip_name(approach, baseline_time, your_time)
    if final.exists():
        raise FileExistsError(f"{final} already exists: remove it or choose another approach name")
    want = expected_ids(ids)
    summary = validate(folder, want, workers)
    names = sorted(n for n in PredSource(folder).entries if PRED_RE.match(n))
    if want is not None:
        names = [n for n in names if PRED_RE.match(n).group(1) in want]
    out_dir.mkdir(parents=True, exist_ok=True)
    final, tmp = atomic_path(final)
    try:
        try:
            with zipfile.ZipFile(tmp, "w", compression=compression) as zf:
                for name in names:
                    zf.write(folder / name, arcname=name)
        except OSError as err:
            if not is_disk_full(err):
                raise
            tmp.unlink(missing_ok=True)
            need = summary["bytes"] + 200 * len(names)
            free = _free_bytes(out_dir)
            raise DiskFullError(
                f"disk full while writing {final}: the zip needs about {fmt_mb(need)}, {fmt_mb(free)} free "
                f"in {out_dir}; free at least {fmt_mb(max(need - free, 0) + 1_000_000)} there "
                "or pass another out_dir", final) from None
        validate(tmp, {PRED_RE.match(n).group(1) for n in names}, workers, label=str(final))
        exists = f"{final} already exists: remove it or choose another approach name"
        try:
            os.link(tmp, final)  # fails if the name appeared meanwhile: never overwrite
        except FileExistsError:
            raise FileExistsError(exists) from None
        except OSError:  # file systems without hard links
            if final.exists():
                raise FileExistsError(exists) from None
            os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


PRED_RE = re.compile(r"^PRED_(\d{6})\.tif$")


class PredSource:
    """A prediction folder or zip, listed once. `read` is thread-safe (one zip handle per thread);
    use it as a context manager (or call `close`) to close those handles."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: no such folder or zip")
        self.is_zip = self.path.is_file()
        self._init_handles()
        if self.is_zip:
            try:
                with zipfile.ZipFile(self.path) as zf:
                    self.entries = [info.filename for info in zf.infolist()]
            except (zipfile.BadZipFile, OSError) as err:
                raise SubmissionError(f"{self.path}: not a readable zip ({err})") from None
        else:
            self.entries = sorted(p.name for p in self.path.iterdir() if p.is_file())

    def _init_handles(self) -> None:
        self._local = threading.local()
        self._handles: list[zipfile.ZipFile] = []
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:  # picklable for process pools: handles are reopened per process
        return {"path": self.path, "is_zip": self.is_zip, "entries": self.entries}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_handles()

    def __enter__(self) -> PredSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            for zf in self._handles:
                zf.close()
            self._handles.clear()
        self._local = threading.local()

    def label(self, name: str) -> str:
        """How a file is named in messages: the path, or zip:member."""
        return f"{self.path}:{name}" if self.is_zip else str(self.path / name)

    def read(self, name: str) -> bytes:
        if not self.is_zip:
            return (self.path / name).read_bytes()
        zf = getattr(self._local, "zf", None)
        if zf is None:
            zf = self._local.zf = zipfile.ZipFile(self.path)
            with self._lock:
                self._handles.append(zf)
        return zf.read(name)

    def predictions(self) -> dict[str, str]:
        """id -> entry name for every PRED_<6 digits>.tif (basename, so a zip with a folder still scores)."""
        out: dict[str, str] = {}
        for name in self.entries:
            m = PRED_RE.match(name.rsplit("/", 1)[-1])
            if m:
                if m.group(1) in out:
                    raise DataError(f"{self.path}: {name} and {out[m.group(1)]} are the same patch")
                out[m.group(1)] = name
        return out


def decode_tif(data: bytes) -> np.ndarray:
    """Pixels of an in-memory TIFF, every page stacked. libtiff (via imagecodecs) decodes LZW about
    twice as fast as tifffile; anything it refuses goes through tifffile, whose errors are clearer."""
    try:
        return imagecodecs.tiff_decode(data, index=None)
    except Exception:
        return tifffile.imread(io.BytesIO(data))


def decode_2d(data: bytes, label: str) -> np.ndarray:
    """Single-band TIFF bytes -> 2-D array (a singleton band axis is dropped). Lenient: for scoring."""
    try:
        arr = decode_tif(data)
    except Exception as err:  # tifffile raises many types for corrupt files
        raise DataError(f"{label}: unreadable TIFF ({type(err).__name__}: {err})") from None
    if arr.ndim == 3 and 1 in (arr.shape[0], arr.shape[-1]):
        arr = arr.reshape(arr.shape[1:] if arr.shape[0] == 1 else arr.shape[:2])
    if arr.ndim != 2:
        raise DataError(f"{label}: expected a single-band 2-D image, got shape {arr.shape}")
    return arr
