"""Worker counts and OpenCV threads: how many processes/threads read data. Torch-free, so the notebook
and the data-preparation CLIs import it without loading torch."""
from __future__ import annotations

import os

from src.core.errors import ConfigError


def cpu_count() -> int:
    """Cores this process may use (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_workers(limit: int = 16) -> int:
    """Threads or processes for reading and decoding files (TIFF decoding releases the GIL): one per core,
    at most `limit` (beyond that a disk rarely keeps up)."""
    return max(1, min(limit, cpu_count()))


def loader_workers(setting: int | str) -> int:
    """DataLoader workers for the `workers` setting: a number as given, `auto` = the cores this process
    may use, shared between the local DDP processes, minus one for the main process."""
    if isinstance(setting, str):
        if setting != "auto":
            raise ConfigError(f"workers: expected a number or auto, got {setting!r}")
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        return max(0, cpu_count() // max(1, local) - 1)
    if setting < 0:
        raise ConfigError(f"workers: expected >= 0 or auto, got {setting}")
    return int(setting)


def single_thread_opencv() -> None:
    """One OpenCV thread in this process. Called before DataLoader workers fork: a worker is one core, and
    inheriting OpenCV's pool would run workers x cores threads (cv2.setNumThreads inside a forked worker
    deadlocks on the parent's pool, so it must happen here, before the fork)."""
    import cv2

    cv2.setNumThreads(1)
