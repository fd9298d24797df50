"""Checkpoints: atomic replacement (even under SIGKILL), clear errors, discovery.
(Rebuilding a model from one: tests/test_models.py::test_load_for_inference_rebuilds_the_model.)"""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from src.core.checkpoint import find_checkpoints, load_checkpoint, save_checkpoint
from src.core.errors import CheckpointError, DataError

REPO = Path(__file__).resolve().parents[1]


def _state(value: float, n: int = 10) -> dict:
    return {"model": {"w": torch.full((n,), value)}, "config": {"name": "t"}, "epoch": int(value)}


def test_roundtrip_leaves_no_temporary(tmp_path):
    path = save_checkpoint(tmp_path / "sub" / "last.pt", _state(3.0))
    state = load_checkpoint(path)
    assert state["epoch"] == 3 and torch.equal(state["model"]["w"], torch.full((10,), 3.0))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]


def test_failed_write_keeps_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, _state(1.0))
    bad = {**_state(2.0), "oops": lambda: None}  # cannot be pickled: torch.save fails mid-way
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        save_checkpoint(path, bad)
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_missing_corrupt_and_foreign_files_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pt: checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")
    path = save_checkpoint(tmp_path / "best.pt", _state(1.0, n=1000))
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pt: unreadable checkpoint"):
        load_checkpoint(tmp_path / "cut.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="other.pt: not a flair2-kit checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    assert issubclass(CheckpointError, DataError)


def test_sigkill_during_writes_never_breaks_the_checkpoint(tmp_path):
    """A writer killed at an arbitrary moment (often mid-write) leaves a loadable previous file."""
    path = tmp_path / "last.pt"
    script = textwrap.dedent(f"""
        import torch
        from src.core.checkpoint import save_checkpoint
        i = 0
        while True:
            i += 1
            save_checkpoint({str(path)!r}, {{"model": {{"w": torch.full((3_000_000,), float(i))}},
                                             "config": {{}}, "epoch": i}})
    """)
    for delay in (0.05, 0.3, 0.7):
        proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
        try:
            while not path.exists():
                assert proc.poll() is None, "writer exited early"
                time.sleep(0.02)
            time.sleep(delay)
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        state = load_checkpoint(path)
        assert state["epoch"] >= 1
        assert torch.equal(state["model"]["w"][:5], torch.full((5,), float(state["epoch"])))
    # the next save sweeps temporaries left by killed writers
    save_checkpoint(path, _state(1.0))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_find_checkpoints(tmp_path):
    run = tmp_path / "runs" / "demo"
    for fold in (1, 0):
        save_checkpoint(run / f"fold{fold}" / "best.pt", _state(fold))
        save_checkpoint(run / f"fold{fold}" / "last.pt", _state(fold))
    save_checkpoint(run / "fold0" / "previous" / "best.pt", _state(7))  # an older run set aside
    extra = save_checkpoint(tmp_path / "elsewhere" / "model.pt", _state(9))
    found = find_checkpoints(run)
    assert found == [run / "fold0" / "best.pt", run / "fold1" / "best.pt"]
    assert find_checkpoints([str(run), extra, run / "fold0" / "best.pt"], which="best") == [*found, extra]
    assert find_checkpoints(run, which="last") == [run / "fold0" / "last.pt", run / "fold1" / "last.pt"]
    with pytest.raises(CheckpointError, match="no best.pt found"):
        find_checkpoints(tmp_path / "elsewhere")
    with pytest.raises(CheckpointError, match="missing: no such checkpoint"):
        find_checkpoints(tmp_path / "missing")
