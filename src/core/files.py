"""Files on disk: the one atomic write pattern of the kit, and the one TIFF reader and writer.

Atomic file writes: the one write pattern of the kit (temporary name in the same folder, then rename).

A reader never finds a half-written file under a final name: an interrupted write leaves at most a hidden
`.NAME.*.tmp` beside it. Every writer of the kit (TIFFs, checkpoints, CSV, JSON, figures, zips, markers)
goes through `atomic_write`.

Reading and writing the kit's TIFFs: one reader for every caller, and atomic writes.

FLAIR images may be stored pixel-interleaved (H, W, C) or planar (C, H, W) [spec: ?]; `read_image`
always returns (C, H, W) so callers never guess."""
from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np
import tifffile

from src.core.errors import DataError, machine_limit


def atomic_path(path: str | os.PathLike) -> tuple[Path, Path]:
    """(final, temporary) pair in the same folder, so that os.replace is atomic."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; outputs are meant to be shared like any other file
    return path, Path(tmp)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` atomically, on any error it
    is removed, so a reader never finds a half-written file under the final name."""
    final, tmp = atomic_path(path)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temps(path: str | os.PathLike) -> None:
    """Delete the hidden temporaries an earlier, killed write of `path` left beside it."""
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically (CSV, reports, markers)."""
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> Path:
    """Write JSON atomically (manifests, scores, recipes); non-JSON values are written as strings."""
    return write_text(path, json.dumps(obj, indent=indent, default=str))


def save_figure(fig, path: str | os.PathLike, dpi: int = 100, **savefig_kwargs) -> Path:
    """Save a matplotlib figure as PNG atomically, then close it (every picture of the kit goes here)."""
    import matplotlib.pyplot as plt

    try:
        with atomic_write(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi, **savefig_kwargs)
    finally:
        plt.close(fig)
    return Path(path)


def read_tif(path: str | os.PathLike, out: np.ndarray | None = None) -> np.ndarray:
    """Raw array of the first page series, with a clear error naming the file.

    libtiff (imagecodecs.tiff_decode) decodes FLAIR's LZW files about 3x faster than tifffile's
    reader (bench/metric_bench.py); tifffile is the fallback and the source of error messages. `out`: an
    array of the image's exact shape and dtype to decode into (a batch row, src.data.dataset.BatchRows: no
    copy); when it does not fit (e.g. a pixel-interleaved file), a new array is returned as without it.
    """
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, MemoryError) as err:
        raise machine_limit(err, path) or DataError(f"{path}: unreadable ({err})") from None
    if out is not None:
        try:
            return imagecodecs.tiff_decode(raw, out=out)
        except Exception:
            pass
    try:
        return imagecodecs.tiff_decode(raw)
    except Exception:
        pass
    try:
        return tifffile.imread(io.BytesIO(raw))
    except Exception as err:  # tifffile raises many types for corrupt files
        raise machine_limit(err, path) or DataError(f"{path}: unreadable TIFF ({type(err).__name__}: "
                                                    f"{err})") from None


def to_chw(arr: np.ndarray, path: str | os.PathLike = "", bands: int | None = None) -> np.ndarray:
    """(H,W,C) or (C,H,W) or (H,W) -> (C,H,W). The band axis is the small one (<= 16)."""
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim == 3:
        if arr.shape[-1] <= 16 and arr.shape[0] > 16:
            arr = np.moveaxis(arr, -1, 0)
    else:
        raise DataError(f"{path}: expected a 2-D or 3-D image, got shape {arr.shape}")
    if bands is not None and arr.shape[0] != bands:
        raise DataError(f"{path}: expected {bands} bands, got {arr.shape[0]} (shape {arr.shape})")
    return arr


def read_image(path: str | os.PathLike, bands: int | None = 5, out: np.ndarray | None = None) -> np.ndarray:
    """Aerial image as (C, H, W), checking the band count when given; decoded into `out` where it fits
    (`read_tif`)."""
    return to_chw(read_tif(path, out), path, bands)


def read_label(path: str | os.PathLike) -> np.ndarray:
    """Single-band label or prediction as (H, W)."""
    arr = read_tif(path)
    if arr.ndim == 3 and 1 in (arr.shape[0], arr.shape[-1]):
        arr = arr.reshape(arr.shape[1:] if arr.shape[0] == 1 else arr.shape[:2])
    if arr.ndim != 2:
        raise DataError(f"{path}: expected a single-band 2-D label, got shape {arr.shape}")
    return arr


def write_tif(path: str | os.PathLike, arr: np.ndarray, compression: str | None = "lzw",
              planar: bool = True, **kwargs) -> None:
    """Write a TIFF atomically (temp name in the same folder, then rename).

    Multi-band arrays are given as (C, H, W) and written planar (or interleaved with planar=False).
    An interrupted write leaves only a hidden `.NAME.*.tmp` file, never a file under the final name.
    """
    final, tmp = atomic_path(path)
    try:
        if arr.ndim == 3 and not planar:
            tifffile.imwrite(tmp, np.moveaxis(arr, 0, -1), photometric="minisblack",
                             planarconfig="contig", compression=compression, **kwargs)
        elif arr.ndim == 3:
            tifffile.imwrite(tmp, arr, photometric="minisblack", planarconfig="separate",
                             compression=compression, **kwargs)
        else:
            tifffile.imwrite(tmp, arr, photometric="minisblack", compression=compression, **kwargs)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
