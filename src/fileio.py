"""Atomic file writes: the one write pattern of the kit (temporary name in the same folder, then rename).

A reader never finds a half-written file under a final name: an interrupted write leaves at most a hidden
`.NAME.*.tmp` beside it. Every writer of the kit (TIFFs, checkpoints, CSV, JSON, figures, zips, markers)
goes through `atomic_write`.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


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
