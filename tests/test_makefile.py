"""The Makefile's defaults, read with `make -n` (what each target would run) in a copy of the repository's
Makefile: one name carries a run from `make train` to its predictions, submission, scores and export."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    """The Makefile, its configs and an up-to-date (empty) .venv stamp, so `make -n` only prints commands."""
    for name in ("Makefile", "requirements.txt"):
        shutil.copy(REPO / name, tmp_path / name)
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    stamp = tmp_path / ".venv" / ".installed"
    stamp.parent.mkdir()
    stamp.touch()
    later = (tmp_path / "requirements.txt").stat().st_mtime + 10
    os.utime(stamp, (later, later))
    return tmp_path


def dry(tree: Path, *args: str) -> list[str]:
    run = subprocess.run(["make", "-n", "--no-print-directory", *args], cwd=tree, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr
    return run.stdout.splitlines()


def test_later_steps_default_to_the_run_train_started_last(tree: Path):
    (tree / "runs").mkdir()
    (tree / "runs" / "latest").write_text("demo\n")  # what `make train CONFIG=configs/demo.yaml` leaves
    out = "\n".join(dry(tree, "predict", "submit", "evaluate", "export"))
    assert "--runs runs/demo " in out and "--out predictions/demo " in out and "--submit demo" in out
    assert "--pred predictions/demo " in out and "src.export --runs runs/demo" in out
    assert "unet_r34" not in out
    assert "make: NAME=demo (from the run make train started last: runs/latest)" in out


def test_config_and_name_choose_the_run(tree: Path):
    (tree / "runs").mkdir()
    (tree / "runs" / "latest").write_text("demo\n")
    # CONFIG names the run by its `name` (the first place's stage 2 writes runs/first_place_s2_mitb2)
    out = "\n".join(dry(tree, "predict", "CONFIG=configs/first_place_stage2.yaml"))
    assert "--runs runs/first_place_s2_mitb2 " in out and "--out predictions/first_place_s2_mitb2" in out
    # NAME names everything, the training run included
    out = "\n".join(dry(tree, "train", "predict", "submit", "NAME=mine"))
    assert "src.train --config configs/unet_r34.yaml --fold 0 --resume 0 name=mine" in out
    assert "--runs runs/mine " in out and "--submit mine" in out
    # RUNS / PRED typed: no guessing, no line about it
    out = dry(tree, "predict", "RUNS=runs/x", "PRED=predictions/y")
    assert not any(line.startswith("echo") for line in out) and "--runs runs/x" in out[-1]


def test_without_any_run_the_default_config_names_it(tree: Path):
    out = "\n".join(dry(tree, "predict"))
    assert "--runs runs/unet_r34 " in out and "(from the default CONFIG=configs/unet_r34.yaml)" in out


def test_nothing_lands_at_the_repository_root(tree: Path):
    """make ensemble writes its recipe (and tables) under recipes/, which git ignores; so is a .venv that is
    a symlink (`.venv/` in .gitignore would only cover a folder)."""
    from src import blend

    out = "\n".join(dry(tree, "ensemble", "ENSEMBLE_RUNS=runs/a runs/b"))
    assert "--out recipes/recipe.json" in out and blend._parser().get_default("out") == "recipes/recipe.json"
    if not (REPO / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "check-ignore", "--no-index", ".venv", "recipes/recipe.json",
                              "recipes/recipe_domains.csv"], cwd=REPO, capture_output=True, text=True)
    assert ignored.stdout.split() == [".venv", "recipes/recipe.json", "recipes/recipe_domains.csv"]
