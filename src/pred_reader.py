"""Reading PRED files from a prediction folder or a submission zip, for the validator and the scorer.

Both list a folder or a zip once and read its members from many threads (libtiff, through imagecodecs,
decodes LZW with the GIL released), so the listing and the thread-safe reads live here, below both.
"""
from __future__ import annotations

import io
import os
import re
import threading
import zipfile
from pathlib import Path

import imagecodecs
import numpy as np
import tifffile

from src.errors import DataError, SubmissionError

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
