"""Worker counts, OpenCV threads and open-file limits: how many processes/threads read data, and how many
files each may keep open. Torch-free, so the notebook and the data-preparation CLIs import it without
loading torch."""
from __future__ import annotations

import contextlib
import os


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
    """DataLoader workers for the `workers` setting (checked by src.core.settings): a number as given, `auto`
    = the cores this process may use, shared between the local DDP processes, minus one for the main one."""
    if setting == "auto":
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        return max(0, cpu_count() // max(1, local) - 1)
    return int(setting)


def process_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) of this process under torchrun; (0, 1, 0) otherwise."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def single_thread_opencv() -> None:
    """One OpenCV thread in this process. Called before DataLoader workers fork: a worker is one core, and
    inheriting OpenCV's pool would run workers x cores threads (cv2.setNumThreads inside a forked worker
    deadlocks on the parent's pool, so it must happen here, before the fork)."""
    import cv2

    cv2.setNumThreads(1)


def open_files_limit() -> int:
    """This process's limit of open files, first raised from the soft to the hard limit (no privilege
    needed; many systems default to a soft 1024 under a far higher hard limit). Where there are no such
    limits (not POSIX, or unlimited), a large number."""
    try:
        import resource
    except ImportError:
        return 1 << 20
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return 1 << 20 if soft == resource.RLIM_INFINITY else soft
