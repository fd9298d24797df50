"""Free-space checks before a large download or extraction: refuse early, saying how much is missing,
rather than fill the disk 40 GB into a run."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from src.errors import DiskSpaceError


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the filesystem that holds `path` (tests replace this to simulate a full disk)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def human(n: float) -> str:
    """Bytes in decimal units, as the challenge page states sizes (50.7 GB)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def require_space(folder: Path, need: int, what: str) -> None:
    """Raise DiskSpaceError naming the missing amount when `need` bytes do not fit in `folder`."""
    free = free_bytes(folder)
    if need > free:
        raise DiskSpaceError(
            f"not enough free disk space in {folder} for {what}: need about {human(need)}, "
            f"{human(free)} free, {human(need - free)} missing (free some space or choose another --out)")
