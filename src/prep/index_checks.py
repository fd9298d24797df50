"""What can be wrong in a FLAIR #2 tree (`Problem`) and the file checks of `python -m src.index --check`:
every aerial/label TIFF header and every S2 triple is opened, so a truncated or damaged download is named
file by file before any training starts (docs/data-format.md, "The index")."""
from __future__ import annotations

import datetime as dt
import multiprocessing as mp
import os
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from src.core.errors import raise_machine_limit
from src.core.flair import PATCH_SIZE
from src.core.progress import progress


@dataclass
class Problem:
    """One thing wrong with the tree; `fatal` ones stop the index (the CSVs would be wrong or unusable)."""

    kind: str
    path: str
    message: str
    fatal: bool

    def __str__(self) -> str:
        return f"{'ERROR' if self.fatal else 'warning'} [{self.kind}] {self.path}: {self.message}"


def check_tif(path: Path, kind: str) -> str | None:
    """Header check of an image (5 bands, 512x512, uint8; planar or interleaved) or label; None when fine."""
    try:
        size = path.stat().st_size
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            shape, dtype = tuple(series.shape), np.dtype(series.dtype)
            # Truncated downloads keep a valid header: the strips must also end inside the file.
            end = max((o + n for page in tif.pages for o, n in zip(page.dataoffsets, page.databytecounts)),
                      default=0)
    except Exception as err:  # tifffile raises many types for corrupt files
        raise_machine_limit(err, path)
        return f"unreadable TIFF ({type(err).__name__}: {err})"
    if end > size:
        return f"unreadable TIFF (truncated: image data ends at byte {end}, file has {size})"
    if dtype != np.uint8:
        return f"dtype {dtype}, expected uint8"
    if kind == "img":
        ok = shape in ((5, PATCH_SIZE, PATCH_SIZE), (PATCH_SIZE, PATCH_SIZE, 5))
        return None if ok else f"shape {shape}, expected 5 bands of {PATCH_SIZE}x{PATCH_SIZE}"
    ok = shape in ((PATCH_SIZE, PATCH_SIZE), (1, PATCH_SIZE, PATCH_SIZE), (PATCH_SIZE, PATCH_SIZE, 1))
    return None if ok else f"shape {shape}, expected one band of {PATCH_SIZE}x{PATCH_SIZE}"


def check_s2(triple: dict) -> list[tuple[str, str]]:
    """(path, message) for every inconsistency of one S2 triple: shapes, dtypes, dates vs products.txt."""
    out: list[tuple[str, str]] = []
    try:
        data = np.load(triple["data"], mmap_mode="r")
    except Exception as err:
        raise_machine_limit(err, triple["data"])
        return [(str(triple["data"]), f"unreadable .npy ({type(err).__name__}: {err})")]
    try:
        masks = np.load(triple["masks"], mmap_mode="r")
    except Exception as err:
        raise_machine_limit(err, triple["masks"])
        return [(str(triple["masks"]), f"unreadable .npy ({type(err).__name__}: {err})")]
    if data.ndim != 4 or data.shape[1] != 10:
        out.append((str(triple["data"]), f"shape {data.shape}, expected (T, 10, H, W)"))
    elif data.dtype.kind not in "iu":
        out.append((str(triple["data"]), f"dtype {data.dtype}, expected integer reflectance"))
    if masks.ndim != 4 or masks.shape[1] != 2:
        out.append((str(triple["masks"]), f"shape {masks.shape}, expected (T, 2, H, W)"))
    elif data.ndim == 4 and (masks.shape[0] != data.shape[0] or masks.shape[2:] != data.shape[2:]):
        out.append((str(triple["masks"]), f"shape {masks.shape} does not match data {data.shape}"))
    try:
        lines = [ln.strip() for ln in Path(triple["products"]).read_text().splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise_machine_limit(err, triple["products"])
        return [*out, (str(triple["products"]), f"unreadable ({err})")]
    if data.ndim == 4 and len(lines) != data.shape[0]:
        out.append((str(triple["products"]), f"{len(lines)} products but data has T={data.shape[0]} dates"))
    for line in lines:
        try:
            dt.datetime.strptime(line[11:19], "%Y%m%d")
        except ValueError:
            out.append((str(triple["products"]), f"no date at chars 11..18 of {line!r}"))
            break
    return out


CHUNK = 64  # header checks per task: one future per 64 files, not per file (139k at full size)


def _check_chunk(jobs: list[tuple[Path, str]]) -> list[str | None]:
    return [check_tif(path, kind) for path, kind in jobs]


@contextmanager
def _ctrl_c_held() -> Iterator[None]:
    """Hold Ctrl-C back while worker processes start: forked with it blocked, they never see it (a terminal
    sends it to the whole process group) and print no traceback; the job gets it as soon as this block ends:
    one line, nothing lost. Signal masks are per thread: main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _map(fn: Callable, items: list, workers: int) -> Iterator:
    """fn over items in order, in `workers` processes when there is work for more than one. Forked: no
    re-import per worker, and the job is single-threaded when it forks (the pool starts its threads after)."""
    if workers <= 1 or len(items) < 2:
        yield from map(fn, items)
        return
    with _ctrl_c_held():  # the pool forks its workers when the first item is submitted
        pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"))
        try:
            results = pool.map(fn, items)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    try:
        yield from results
    finally:  # also on Ctrl-C or an error: queued chunks are dropped, not waited for
        pool.shutdown(wait=True, cancel_futures=True)


def check_files(rows: list[dict], triples: list[dict], workers: int | None = None) -> list[Problem]:
    """Every image/label TIFF header of the index rows and every S2 triple, read in `workers` processes
    (default: one per core, up to 16).

    Processes, not threads: parsing a header holds the GIL (~0.3 ms a file), so threads only queue behind
    each other (2 cores, full-size tree in the page cache: 1 thread 48 s, 2 threads 82 s, 2 processes
    ~30 s; BENCHMARKS.md, "Real scale"). Files go out in chunks, so the futures stay few at any size."""
    jobs = [(Path(r["img_path"]), "img") for r in rows]
    jobs += [(Path(r["msk_path"]), "msk") for r in rows if r["msk_path"]]
    chunks = [jobs[i:i + CHUNK] for i in range(0, len(jobs), CHUNK)]
    workers = workers or min(16, os.cpu_count() or 1)
    problems: list[Problem] = []
    with progress(total=len(jobs) + len(triples), desc="checking files", unit="file") as bar:
        for chunk, msgs in zip(chunks, _map(_check_chunk, chunks, workers)):
            bar.update(len(chunk))
            for (path, _kind), msg in zip(chunk, msgs):
                if msg:
                    kind = "unreadable" if msg.startswith("unreadable") else "bad-file"
                    problems.append(Problem(kind, str(path), msg, True))
        for found in _map(check_s2, triples, workers):
            bar.update()
            for path, msg in found:
                kind = "unreadable" if msg.startswith("unreadable") else "bad-s2"
                problems.append(Problem(kind, path, msg, True))
    return problems
