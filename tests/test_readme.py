"""The README's walk on synthetic data, as written: its commands are parsed from README.md, so the walk cannot
drift from what the kit does. Fast: each line through `make -n` in a copy of the Makefile, the run that `make
train` leaves carried to the later steps. Slow (`make test-all`): the whole walk for real in a copy of the
repository, with no other variable."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.test_makefile import dry, tree  # noqa: F401 (the fixture)

REPO = Path(__file__).resolve().parents[1]


def walk() -> list[list[str]]:
    """The commands between the README's walk markers, comments dropped: [["make", "synth"], ...]."""
    text = (REPO / "README.md").read_text()
    block = text.split("<!-- walk:begin -->", 1)[1].split("<!-- walk:end -->", 1)[0]
    lines = [ln.split("#", 1)[0].strip() for ln in block.splitlines()]
    return [ln.split() for ln in lines if ln and not ln.startswith("```")]


def test_the_walk_is_the_competitor_path_with_no_other_variable():
    assert [c[:2] for c in walk()] == [["make", t] for t in ("synth", "index", "folds", "train", "predict",
                                                              "submit", "evaluate")]
    assert [c for c in walk() if len(c) > 2] == [["make", "train", "CONFIG=configs/demo.yaml"]]


def test_each_line_of_the_walk_does_what_its_comment_says(tree):  # noqa: F811
    out = {}
    for cmd in walk():
        target = cmd[1]
        out[target] = "\n".join(dry(tree, *cmd[1:]))
        if target == "train":  # what the training job leaves for the steps after it
            (tree / "runs").mkdir(exist_ok=True)
            (tree / "runs" / "latest").write_text("demo\n")
    assert "src.synth --out data/synth" in out["synth"] and "--root data/synth --out data" in out["index"]
    assert "src.folds --data data --k 5" in out["folds"]
    assert "src.train --config configs/demo.yaml --fold 0" in out["train"]
    assert "--runs runs/demo --split test --out predictions/demo" in out["predict"]
    assert "--out predictions/demo" in out["submit"] and "--submit demo" in out["submit"]
    assert "--pred predictions/demo --index data/index_test.csv" in out["evaluate"]


@pytest.mark.slow
def test_the_walk_runs_as_written_in_a_fresh_copy(tmp_path):
    """Every line of the walk in a copy of the repository (its tracked files and the venv), nothing else."""
    copy = tmp_path / "kit"
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    for name in files:
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, copy / name)
    (copy / ".venv").symlink_to(REPO / ".venv")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    started = time.monotonic()
    for cmd in walk():
        run = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=1800)
        assert run.returncode == 0, f"{' '.join(cmd)}:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}"
    minutes = (time.monotonic() - started) / 60
    assert len(list((copy / "predictions" / "demo").glob("PRED_*.tif"))) == 16
    assert list((copy / "submissions").glob("demo*.zip"))
    assert (copy / "predictions" / "demo_scores.json").is_file()
    print(f"the README walk took {minutes:.1f} min")
