"""Progress for everything a person waits on: a tqdm bar on a terminal, a line per phase in a log file.

tqdm redraws its bar every 0.1 s; written into a file (`make demo > log`, a cluster job's stdout) that is
tens of KB of carriage returns per epoch. When the stream is not a terminal, `progress` prints one line
when a phase ends (and one every `interval` seconds for long phases) instead. FLAIR_PROGRESS=bar|lines
forces one behaviour."""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any


def count(n: int, noun: str, plural: str = "") -> str:
    """`1 domain`, `3 domains`: a number with its noun in the right form (`plural` when not noun + "s")."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class LineProgress:
    """The subset of tqdm's interface the kit uses, printing whole lines instead of redrawing a bar."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "",
                 unit: str = "it", file: IO[str] | None = None, interval: float = 60.0,
                 disable: bool = False, **_: Any):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.desc, self.unit = total, desc, unit
        self.file = file or sys.stderr
        self.interval, self.disable = interval, disable
        self.n, self.postfix = 0, ""
        self.t0 = self.last = time.monotonic()
        self.closed = False

    def __iter__(self) -> Iterator:
        for item in self.iterable or ():
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kw: Any) -> None:
        items = {**(ordered_dict or {}), **kw}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval and not self.disable:
            self.last = now
            self._line(now)

    def _line(self, now: float, done: bool = False) -> None:
        el = now - self.t0
        total = f"/{self.total}" if self.total else ""
        rate = ""
        if el > 0 and self.n:  # under one item a second, the seconds an item take say more than "0.0 it/s"
            per_s = self.n / el
            rate = f", {per_s:.1f} {self.unit}/s" if per_s >= 1 else f", {el / self.n:.1f} s/{self.unit}"
        eta = ""
        if not done and self.total and self.n:
            eta = f", ETA {fmt_duration(el / self.n * (self.total - self.n))}"
        post = f" ({self.postfix})" if self.postfix else ""
        line = f"{self.desc}: {self.n}{total} {self.unit} in {fmt_duration(el)}{rate}{eta}{post}"
        print(line, file=self.file, flush=True)

    def close(self) -> None:
        if not self.closed and not self.disable and self.n:
            self._line(time.monotonic(), done=True)
        self.closed = True


def use_bar(file: IO[str] | None = None) -> bool:
    mode = os.environ.get("FLAIR_PROGRESS", "")
    if mode in ("bar", "lines"):
        return mode == "bar"
    stream = file or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


def progress(iterable: Iterable | None = None, total: int | None = None, desc: str = "", unit: str = "it",
             file: IO[str] | None = None, disable: bool = False, **kw: Any) -> Any:
    """tqdm on a terminal, LineProgress otherwise; same arguments as tqdm."""
    if use_bar(file):
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, file=file or sys.stderr, disable=disable,
                    dynamic_ncols=True, **kw)
    kw.pop("leave", None)
    kw.pop("dynamic_ncols", None)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, file=file, disable=disable, **kw)
