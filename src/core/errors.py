"""Every exception type of the kit, in one place (the bottom of the import graph: imports nothing of ours).

Each one carries a one-line message meant for the user that names the file or the setting at fault;
the command-line entry points turn them into that line and an exit code instead of a traceback."""
from __future__ import annotations

import errno
import os
import sys


class DataError(ValueError):
    """A data file is missing, unreadable or malformed; the message names the file."""


class ConfigError(ValueError):
    """A bad setting; the message is one line meant for the user."""


class CheckpointError(DataError):
    """A checkpoint is missing, unreadable or lacks a key; the message names the file."""


class PredictError(ValueError):
    """A user-facing problem while predicting (bad arguments, missing files, mismatching folders)."""


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite losses; the last checkpoint on disk is the last good one."""


class SubmissionError(ValueError):
    """A submission (folder or zip) is invalid. `problems` holds every "file: problem" line."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or [message]


class DiskFullError(OSError):
    """No space left while writing; the message says what was being written and how much to free."""

    def __init__(self, message: str, filename: str | os.PathLike | None = None) -> None:
        super().__init__(errno.ENOSPC, message, None if filename is None else str(filename))

    def __str__(self) -> str:
        return str(self.strerror)


def is_disk_full(err: BaseException) -> bool:
    """True for the OSErrors that mean "no space left" (ENOSPC, or the quota's EDQUOT)."""
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)


class MachineLimitError(RuntimeError):
    """A limit of this machine or process was hit (open files, memory) while reading a file: not a fault of
    the file, so never counted as a bad sample (skip_bad) nor reported as damaged. The message names the
    limit and what raises it."""


def machine_limit(err: BaseException, path: str | os.PathLike | None = None) -> MachineLimitError | None:
    """The MachineLimitError for an error that is a limit of the machine (too many open files in the process
    or the system, out of memory) met while reading `path`, None for any other error."""
    if isinstance(err, MachineLimitError):
        return err
    at = f"{path}: " if path is not None else ""
    code = getattr(err, "errno", None)
    if isinstance(err, MemoryError) or code == errno.ENOMEM:
        return MachineLimitError(f"{at}out of memory (a limit of this machine, not a damaged file): lower "
                                 "batch_size or workers, or free memory")
    if code == errno.ENFILE:
        return MachineLimitError(f"{at}the system's table of open files is full (a limit of this machine, "
                                 "not a damaged file): close other programs or raise fs.file-max")
    if code == errno.EMFILE:
        return MachineLimitError(f"{at}too many open files in this process (limit {_open_files_limit()}, a "
                                 "limit of this machine, not a damaged file): raise it (`ulimit -n 4096`) or "
                                 "use fewer workers")
    return None



def raise_machine_limit(err: BaseException, path: str | os.PathLike) -> None:
    """Raise the MachineLimitError of `err` when it is a limit of the machine met reading `path` (a scan
    then stops: the error says nothing about the file); return for any other error."""
    limit = machine_limit(err, path)
    if limit is not None:
        raise limit from None


def exit_on_machine_limit(job: str, err: BaseException) -> None:
    """A job's handler of MachineLimitError, OSError and MemoryError: a machine limit is one line and exit
    1; any other error goes on up as it was."""
    limit = machine_limit(err)
    if limit is None:
        raise err
    print(f"{job}: error: {one_line(limit)}", file=sys.stderr)
    raise SystemExit(1) from None


def _open_files_limit() -> str:
    """The soft limit of open files of this process (`ulimit -n`), as text."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return "unknown"
    return str(resource.getrlimit(resource.RLIMIT_NOFILE)[0])


def one_line(err: BaseException) -> str:
    """The user-facing line of an error; a DataError re-raised by a DataLoader worker carries the worker's
    whole traceback, of which only the last line is the message."""
    msg = str(err)
    if "Original Traceback" in msg:
        last = [ln for ln in msg.strip().splitlines() if ln.strip()][-1]
        msg = last.split(": ", 1)[1] if last.split(": ", 1)[0].endswith("Error") else last
    return msg


class DownloadError(RuntimeError):
    """A file could not be fetched or verified; the message names it and says what was done."""


class ChecksumError(DownloadError):
    """Size or md5 mismatch; the bad file has been deleted."""


class DiskSpaceError(DownloadError):
    """Not enough free disk space (checked before a download or an extraction starts); the message says
    how much is missing. Unlike DiskFullError, nothing has been written yet."""


class CorruptZipError(DownloadError):
    """A zip that cannot be read or fails its CRC check."""


def exit_interrupted(job: str, kept: str, resume: str) -> None:
    """Ctrl-C in a job: one line saying what was kept and how to go on (no traceback), exit 130 like a
    shell."""
    print(f"\n{job}: interrupted: {kept}; {resume}", file=sys.stderr)
    raise SystemExit(130)


def caused_by_interrupt(err: BaseException) -> bool:
    """Whether a Ctrl-C is behind `err`: one that lands while a C extension initialises (matplotlib's on
    the first plot of a run) comes back as ImportError("initialization failed") caused by the Ctrl-C."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, KeyboardInterrupt):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False
