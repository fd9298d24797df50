"""Fetching files: resumable verified HTTP, what happened to each zip, and free-space checks.

Resumable, verified HTTP download of one large file (the FLAIR #2 zips are up to 50 GB).

- HTTP with `Range` resume into `NAME.part`; the file is renamed to `NAME` only after its size
  (Content-Length) and md5 (where known) match, so a present final file is always a verified one.
- The md5 is computed while streaming; on resume the bytes already on disk are hashed once first, so
  a 50 GB file is never read a second time.
- Connection errors, HTTP 5xx, 408 and 429 are retried with bounded exponential backoff; a `.part` is
  kept on network failure so the next run continues where this one stopped.

What happened to each zip of a download run (one `Result` per zip, filled by fetch and extract) and
the summary table printed at the end, so a user sees at a glance what was resumed, verified or failed.

Free-space checks before a large download or extraction: refuse early, saying how much is missing,
rather than fill the disk 40 GB into a run."""
from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from src.core.errors import ChecksumError, DiskSpaceError, DownloadError
from src.core.progress import progress as progress_bar

CHUNK = 1 << 20
_RETRYABLE = (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException, ssl.SSLError)


class _Truncated(ConnectionError):
    """The server closed the stream before Content-Length bytes arrived."""


@dataclass
class _Stream:
    """Where one download stands: bytes in the `.part` file, their running md5, the expected total."""

    part: Path
    offset: int = 0
    total: int | None = None
    got: int = 0  # bytes received by the current attempt (a productive attempt resets the retry count)
    md5: Any = field(default_factory=hashlib.md5)

    def restart(self) -> None:
        self.offset, self.md5 = 0, hashlib.md5()


def _hash_file(path: Path, h: Any) -> int:
    """Feed an existing partial file to the hash once (resume), return its size."""
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            n += len(chunk)
    return n


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """'bytes 100-199/1000' -> (100, 1000); 'bytes */1000' -> (None, 1000)."""
    if not value or not value.startswith("bytes "):
        return None, None
    span, _, total = value[6:].partition("/")
    start = None if span.strip() == "*" else int(span.split("-")[0])
    return start, (int(total) if total.strip().isdigit() else None)


@dataclass(frozen=True)
class Transfer:
    """How files are fetched: retries after a network failure, the first retry delay in seconds (doubled
    each time, at most 60 s), the socket timeout, and whether a progress bar is drawn."""

    retries: int = 5
    backoff: float = 2.0
    timeout: float = 60.0
    progress: bool = True


def fetch(url: str, dest: Path, md5: str | None = None, transfer: Transfer = Transfer(),
          result: Result | None = None) -> Result:
    """Download `url` to `dest` through `dest.part`, resuming, retrying and verifying.

    `dest` appears only once size and md5 are right; an md5 mismatch deletes the `.part` and raises
    ChecksumError. A `.part` is kept on network failure (DownloadError says how many bytes it holds).
    """
    res = result or Result(dest.name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    st = _Stream(dest.with_name(dest.name + ".part"))
    if st.part.exists():
        st.offset = _hash_file(st.part, st.md5)
    res.resumed_from = st.offset
    t0 = time.monotonic()
    try:
        _fetch_with_retries(url, dest.name, st, res, transfer)
    finally:
        res.seconds += time.monotonic() - t0
    _verify(dest.name, st, md5, res)
    # Not an atomic_write temporary: a `.part` must outlive a failed run under a known name to be
    # resumed, so it is renamed by hand, and only once verified.
    os.replace(st.part, dest)
    return res


def _fetch_with_retries(url: str, name: str, st: _Stream, res: Result, transfer: Transfer) -> None:
    """Attempts until the server has sent everything, sleeping backoff * 2^(failures-1) (<= 60 s) between."""
    retries, failures = transfer.retries, 0
    while True:
        st.got = 0
        try:
            _attempt(url, name, st, res, transfer.timeout, transfer.progress)
            return
        except urllib.error.HTTPError as err:
            after = _after_http_error(err, url, name, st, failures, retries)
            if after is None:
                return
            failures, last = after, f"HTTP {err.code}"
        except _RETRYABLE as err:
            failures = 1 if st.got else failures + 1
            if failures > retries:
                raise DownloadError(f"{name}: giving up after {retries} retries ({err}); the {st.offset} "
                                    f"bytes in {st.part.name} are kept, re-run to resume") from None
            last = f"{type(err).__name__}: {err}"
        wait = min(transfer.backoff * 2 ** (failures - 1), 60.0)
        print(f"{name}: {last}; retry {failures}/{retries} from byte {st.offset} in {wait:.0f} s")
        time.sleep(wait)


def _after_http_error(err: urllib.error.HTTPError, url: str, name: str, st: _Stream, failures: int,
                      retries: int) -> int | None:
    """The failure count after an HTTP error, None when a 416 says the `.part` is already complete;
    raises DownloadError for a permanent error or when the retries are used up."""
    if err.code == 416:  # nothing left to send: the .part may already be complete
        _, st.total = _content_range(err.headers.get("Content-Range"))
        if st.total is not None and st.total == st.offset:
            return None
        print(f"{name}: partial file ({st.offset} bytes) does not fit the server's "
              f"({st.total}); restarting from 0")
        st.part.unlink(missing_ok=True)
        st.restart()
        failures += 1
    elif err.code >= 500 or err.code in (408, 429):  # server-side or throttling: retry
        failures += 1
    else:
        raise DownloadError(f"{name}: HTTP {err.code} {err.reason} from {url}") from None
    if failures > retries:
        raise DownloadError(f"{name}: giving up after {retries} retries (HTTP {err.code}); "
                            f"re-run to resume from {st.offset} bytes") from None
    return failures


def _attempt(url: str, name: str, st: _Stream, res: Result, timeout: float, progress: bool) -> None:
    """One request from byte `st.offset`, appending to the `.part` and hashing as bytes arrive."""
    headers = {"Range": f"bytes={st.offset}-"} if st.offset else {}
    req = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        if resp.status == 206:
            start, st.total = _content_range(resp.headers.get("Content-Range"))
            if start != st.offset:
                raise DownloadError(f"{name}: asked for bytes from {st.offset}, got {start}")
        else:
            if st.offset:
                print(f"{name}: server ignored the Range request, restarting from 0")
                st.restart()
            length = resp.headers.get("Content-Length")
            st.total = int(length) if length and length.isdigit() else None
        with progress_bar(total=st.total, initial=st.offset, unit="B", unit_scale=True, unit_divisor=1024,
                          desc=name, disable=not progress) as bar, \
                open(st.part, "ab" if st.offset else "wb") as f:
            # read1 returns what has arrived, so a dropped connection loses no received byte
            while chunk := resp.read1(CHUNK):
                f.write(chunk)
                st.md5.update(chunk)
                st.offset += len(chunk)
                st.got += len(chunk)
                res.fetched += len(chunk)
                bar.update(len(chunk))
        if st.total is not None and st.offset < st.total:
            raise _Truncated(f"stream ended at {st.offset} of {st.total} bytes")


def _verify(name: str, st: _Stream, md5: str | None, res: Result) -> None:
    """Size against Content-Length, then md5 when known; a bad `.part` is deleted (ChecksumError)."""
    if st.total is not None and st.offset != st.total:
        st.part.unlink(missing_ok=True)
        raise ChecksumError(f"{name}: got {st.offset} bytes, Content-Length says {st.total}; file deleted")
    res.size = st.offset
    if not md5:
        res.md5 = "unknown"
        return
    digest = st.md5.hexdigest()
    if digest != md5.lower():
        st.part.unlink(missing_ok=True)
        res.md5 = "mismatch"
        raise ChecksumError(f"{name}: md5 mismatch (expected {md5.lower()}, got {digest}); "
                            f"the file was deleted, re-run to download it again")
    res.md5 = "ok"


@dataclass
class Result:
    """What happened to one zip in this run (one row of the summary table)."""

    name: str
    status: str = "pending"    # ok | skipped | failed
    size: int = 0              # bytes of the zip (0 when unknown)
    fetched: int = 0           # bytes received in this run
    resumed_from: int = 0      # bytes already in the .part file when this run started
    seconds: float = 0.0
    md5: str = "-"             # ok | unknown | mismatch | -
    extracted: str = "-"       # yes | already | failed | -
    message: str = ""
    entries: list[str] = field(default_factory=list)


def summary(results: list[Result]) -> str:
    """Plain-text table, one row per zip."""
    head = ("file", "status", "size", "fetched", "resumed", "time", "speed", "md5", "extract")
    rows = [head]
    for r in results:
        speed = human(r.fetched / r.seconds) + "/s" if r.fetched and r.seconds > 0 else "-"
        rows.append((r.name, r.status, human(r.size) if r.size else "-",
                     human(r.fetched) if r.fetched else "-", human(r.resumed_from) if r.resumed_from else "-",
                     f"{r.seconds:.1f} s" if r.seconds else "-", speed, r.md5, r.extracted))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += [r.message if r.message.startswith(r.name) else f"{r.name}: {r.message}"
              for r in results if r.message]
    return "\n".join(lines)


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
