"""src.core.progress: a tqdm bar on a terminal, whole lines (no carriage returns) in a log file;
FLAIR_PROGRESS=bar|lines forces one."""
from __future__ import annotations

import io

import pytest

from src.core.progress import LineProgress, progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _no_override(monkeypatch):
    monkeypatch.delenv("FLAIR_PROGRESS", raising=False)


def test_line_progress_prints_one_line_when_the_phase_ends():
    out = io.StringIO()
    assert list(LineProgress(range(5), desc="read", unit="file", file=out)) == list(range(5))
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("read: 5/5 file in 0m0") and "\r" not in out.getvalue()
    assert "ETA" not in lines[0]  # finished


def test_line_progress_interval_postfix_disable_and_empty():
    out = io.StringIO()
    with LineProgress(total=3, desc="epoch 1/2", file=out, interval=0.0) as bar:
        for _ in range(3):
            bar.update(1)
            bar.set_postfix(loss="0.5000", lr="1.00e-03")
    lines = out.getvalue().splitlines()
    assert len(lines) == 4  # one per update (interval 0) + the closing one
    assert lines[0].startswith("epoch 1/2: 1/3 it") and "ETA" in lines[1]
    assert lines[-1].endswith("(loss=0.5000, lr=1.00e-03)")
    quiet = io.StringIO()
    with LineProgress(total=3, file=quiet, disable=True) as bar:
        bar.update(3)
    with LineProgress(total=3, file=quiet):
        pass  # nothing done: nothing to say
    assert quiet.getvalue() == ""


def test_progress_picks_lines_for_a_file_and_a_bar_for_a_terminal(monkeypatch):
    from tqdm import tqdm

    log = io.StringIO()
    bar = progress(total=2, desc="x", file=log, leave=False, dynamic_ncols=True)  # tqdm-only kwargs accepted
    assert isinstance(bar, LineProgress)
    bar.close()
    term = _Terminal()
    bar = progress(total=2, desc="x", file=term)
    assert isinstance(bar, tqdm)
    bar.close()
    monkeypatch.setenv("FLAIR_PROGRESS", "lines")
    assert isinstance(progress(total=2, file=_Terminal()), LineProgress)
    monkeypatch.setenv("FLAIR_PROGRESS", "bar")
    forced = progress(total=2, file=io.StringIO())
    assert isinstance(forced, tqdm)
    forced.close()


def test_slow_phases_say_seconds_per_item_and_counts_agree_with_their_nouns():
    from src.core.progress import count

    out = io.StringIO()
    bar = LineProgress(total=2, desc="epoch 1/1", unit="batch", file=out)
    bar.t0 -= 30.0  # 30 s for 1 batch: "0.0 batch/s" said nothing
    bar.update(1)
    bar.close()
    assert ", 30.0 s/batch" in out.getvalue() and "batch/s" not in out.getvalue()
    assert count(1, "domain") == "1 domain" and count(3, "domain") == "3 domains"
    assert count(1, "patch", "patches") == "1 patch" and count(2, "patch", "patches") == "2 patches"
