"""Reliability (issue 11): bad files, interruptions and bad settings never lose work or give a wrong
submission.

Cases already covered elsewhere are not re-tested here (see the table in docs/commands.md, "Reliability"):
SIGKILL while writing checkpoints (tests/test_checkpoint.py), exact resume after SIGKILL and the NaN
stop (tests/test_train.py), resume of deleted PRED files and disk full (tests/test_predict.py,
tests/test_submit.py), 21 malformed submissions (tests/test_submit.py). This file adds the end-to-end
paths: a 5 %-corrupt synthetic set trained and predicted with skip_bad=1 (exact skip lists, valid
submission), the strict mode naming each kind of bad file, a single non-finite step skipped and
counted, a predict process killed mid-run, and one-line setting errors from the real command lines.
"""
from __future__ import annotations

import csv
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from src import predict as P
from src import train as T
from src.core.checkpoint import load_checkpoint
from src.core.errors import DataError, caused_by_interrupt
from src.core.files import read_label
from src.prediction.stores import FALLBACK_CLASS, pred_ok

REPO = Path(__file__).resolve().parents[1]
TINY = ["encoder=tu-test_resnet", "encoder_weights=none", "crop_size=64", "batch_size=4", "workers=0",
        "lr=0.001", "warmup_epochs=0.5", "ema=0.9", "channels_last=false", "precision=fp32", "log_every=1",
        "oof=false"]  # (out-of-fold stores: tests/test_oof.py)
FUSION = ["use_s2=true", "fusion=utt", "utae_widths=[8,8,16,16]", "utae_decoder_widths=[8,8,8,16]",
          "ltae_heads=2", "ltae_d_model=16", "ltae_d_k=4"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}


def train_args(data: Path, runs: Path, *extra: str, fold: str = "0", resume: int = 0) -> list[str]:
    return ["--fold", fold, "--resume", str(resume), *TINY, *FUSION, f"data_dir={data}", f"runs_dir={runs}",
            "name=r", *extra]


def corrupt(path: Path, how: str) -> None:
    """Damage a file the ways disks and downloads do: cut in half, or overwritten with garbage."""
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(b"\x00garbage" * 64)


def ids_in(log: Path) -> list[str]:
    return [line.split("\t", 1)[0] for line in log.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- the 5 % soak
@pytest.fixture(scope="module")
def soak(tmp_path_factory):
    """50 patches (30 train, 20 test): index and folds built on good files, then exactly 5 % of the 100
    image / train-label / S2 .npy files damaged (as if the disk went bad mid-project)."""
    from src.core.tables import write_index
    from src.prep.folds import make_folds
    from src.prep.index_scan import build_index
    from src.prep.synth_write import SynthSpec, make_dataset

    base = tmp_path_factory.mktemp("soak")
    root = make_dataset(base / "raw", SynthSpec(train_domains=3, test_domains=2, zones=2, patches=5, seed=1))
    data = base / "data"
    data.mkdir()
    frames = build_index(root)
    write_index(frames, data)
    make_folds(data, k=3, seed=0, plot=False)
    train, test = frames["train"], frames["test"]
    both = pd.concat([train, test])
    images = sorted(both["img_path"])
    labels = sorted(train["msk_path"])
    s2 = sorted(set(both["s2_data"]) | set(both["s2_masks"]))
    assert len(images) + len(labels) + len(s2) == 100
    rng = np.random.default_rng(11)
    chosen = ([images[k] for k in rng.choice(len(images), 2, replace=False)]
              + [labels[k] for k in rng.choice(len(labels), 2, replace=False)]
              + [s2[k] for k in rng.choice(len(s2), 1, replace=False)])
    for k, p in enumerate(chosen):
        corrupt(Path(p), "truncate" if k % 2 == 0 else "garbage")
    bad = set(chosen)

    def hit(df: pd.DataFrame, cols: tuple[str, ...]) -> set[str]:
        return {r["id"] for _, r in df.iterrows() if any(r[c] in bad for c in cols)}

    return {"root": root, "data": data, "bad": bad, "train": train, "test": test, "base": base,
            "bad_train": hit(train, ("img_path", "msk_path", "s2_data", "s2_masks")),
            "bad_test": hit(test, ("img_path", "s2_data", "s2_masks"))}


def test_index_check_names_exactly_the_damaged_files(soak):
    from src.prep.index_scan import scan

    report = scan(soak["root"], check=True, workers=2)
    named = {p.path for p in report.problems if p.fatal}
    assert named == soak["bad"]
    assert all(p.kind in ("unreadable", "bad-file", "bad-s2") for p in report.problems if p.fatal)


@pytest.fixture(scope="module")
def soak_run(soak):
    """skip_bad=1 training (a full epoch: every patch is read once) on the damaged set."""
    runs = soak["base"] / "runs"
    result = T.main(train_args(soak["data"], runs, "epochs=1", "skip_bad=1"))
    return {"runs": runs, "result": result, "run_dir": runs / "r" / "fold0"}


def test_soak_training_skips_exactly_the_damaged_patches(soak, soak_run):
    log = soak_run["run_dir"] / "skipped.tsv"
    ids = ids_in(log)
    assert len(ids) == len(set(ids))  # each bad patch logged once
    assert set(ids) == soak["bad_train"] and soak["bad_train"]
    for line in log.read_text().splitlines():  # every line names one of the damaged files
        assert any(Path(b).name in line for b in soak["bad"]), line
    ckpt = load_checkpoint(soak_run["run_dir"] / "last.pt")
    assert ckpt["epoch"] == 1 and math.isfinite(soak_run["result"]["best_miou"])


def test_soak_prediction_gives_a_valid_submission_and_an_exact_skip_list(soak, soak_run, tmp_path, capsys):
    from src.scoring.submission import validate

    pred, subs = tmp_path / "pred", tmp_path / "subs"
    P.main(["--runs", str(soak_run["runs"] / "r"), "--out", str(pred), "--tta", "none", "--submit", "soak",
            "--submit-dir", str(subs), f"data_dir={soak['data']}", "skip_bad=1", "batch_size=4"])
    zips = list(subs.glob("*.zip"))
    assert len(zips) == 1
    summary = validate(zips[0], soak["test"]["id"].tolist())
    assert summary  # every test id present, well formed
    skipped = ids_in(pred / "skipped.txt")
    assert set(skipped) == soak["bad_test"] and len(skipped) == len(set(skipped)) and skipped
    for pid in skipped:  # the fallback class: "other" (12), no false positive on a scored class
        assert (read_label(pred / f"PRED_{pid}.tif") == FALLBACK_CLASS).all()
    assert "mIoU" in capsys.readouterr().out


# ----------------------------------------------------------------------------- strict mode names the file
@pytest.fixture(scope="module")
def data_dir(synth_folds_dir) -> Path:
    return synth_folds_dir


def _train_row(data: Path) -> tuple[pd.DataFrame, int]:
    index = pd.read_csv(data / "index_train.csv", dtype=str)
    folds = pd.read_csv(data / "folds.csv", dtype=str)
    train_ids = set(folds.loc[folds["fold"] != "0", "id"])
    return index, int(index.index[index["id"].isin(train_ids)][0])


def _broken_copy(data_dir: Path, tmp_path: Path, kind: str) -> tuple[Path, str, set[str]]:
    """A data dir whose index points one training patch (or its S2 zone) at a damaged copy.
    Returns (data dir, damaged file name, ids that become unreadable)."""
    broken = tmp_path / "data"
    shutil.copytree(data_dir, broken)
    index, row = _train_row(broken)
    if kind in ("label", "image"):
        col = "msk_path" if kind == "label" else "img_path"
        bad = tmp_path / Path(index.loc[row, col]).name
        shutil.copy(index.loc[row, col], bad)
        corrupt(bad, "truncate")
        index.loc[row, col] = str(bad)
        hit = {index.loc[row, "id"]}
    else:  # the zone's S2 data .npy: every patch of the zone is hit
        zone = index["s2_data"] == index.loc[row, "s2_data"]
        bad = tmp_path / Path(index.loc[row, "s2_data"]).name
        shutil.copy(index.loc[row, "s2_data"], bad)
        corrupt(bad, "truncate")
        index.loc[zone, "s2_data"] = str(bad)
        hit = set(index.loc[zone, "id"])
    index.to_csv(broken / "index_train.csv", index=False)
    return broken, bad.name, hit


@pytest.mark.parametrize("kind", ["label", "npy"])
def test_damaged_file_mid_training_stops_with_its_name_or_is_skipped(data_dir, tmp_path, capsys, kind):
    """(The image case is tests/test_train.py::test_corrupt_image_stops_with_its_name_or_is_skipped.)"""
    broken, name, hit = _broken_copy(data_dir, tmp_path, kind)
    with pytest.raises(SystemExit) as info:
        T.main(train_args(broken, tmp_path / "strict", "epochs=1", "max_val_batches=1"))
    # the message is the last line of stderr (the progress is closed before it, even on an error)
    last = capsys.readouterr().err.strip().splitlines()[-1].split("data error: ", 1)
    assert info.value.code == 1 and len(last) == 2 and name in last[1]
    T.main(train_args(broken, tmp_path / "lenient", "epochs=1", "max_val_batches=1", "skip_bad=1"))
    run = tmp_path / "lenient" / "r" / "fold0"
    val_ids = set(pd.read_csv(broken / "folds.csv", dtype=str).query("fold == '0'")["id"])
    assert set(ids_in(run / "skipped.tsv")) == hit - val_ids  # a full epoch: each hit patch once
    assert load_checkpoint(run / "last.pt")["epoch"] == 1
    assert f"skip_bad: {len(hit - val_ids)} unreadable patches skipped" in capsys.readouterr().out


def _dataset_row(synth_index, tmp_path, kind: str):
    """One-row index whose files are valid TIFF / .npy files of the wrong shape."""
    from src.core.files import write_tif

    df = synth_index["train"].iloc[:1].copy().reset_index(drop=True)
    if kind == "bands":
        bad = tmp_path / "IMG_bands.tif"
        write_tif(bad, np.zeros((4, 512, 512), np.uint8))
        df.loc[0, "img_path"] = str(bad)
    elif kind == "size":
        bad = tmp_path / "IMG_size.tif"
        write_tif(bad, np.zeros((5, 256, 256), np.uint8))
        df.loc[0, "img_path"] = str(bad)
    else:
        src_masks, src_prod = Path(df.loc[0, "s2_masks"]), Path(df.loc[0, "s2_products"])
        for c in ("s2_data", "s2_masks", "s2_products"):
            shutil.copy(df.loc[0, c], tmp_path / Path(df.loc[0, c]).name)
            df.loc[0, c] = str(tmp_path / Path(df.loc[0, c]).name)
        if kind == "s2_masks_T":
            masks = np.load(src_masks)
            np.save(df.loc[0, "s2_masks"], masks[:-1])
            bad = Path(df.loc[0, "s2_data"])  # the message names the triple's data file and shapes
        else:
            lines = src_prod.read_text().split()
            Path(df.loc[0, "s2_products"]).write_text("\n".join(lines[:-2]) + "\n")
            bad = Path(df.loc[0, "s2_data"])
    return df, bad


@pytest.mark.parametrize("kind, message", [
    ("bands", "expected 5 bands, got 4"),
    ("size", "label shape (512, 512) differs from image (256, 256)"),
    ("s2_masks_T", "S2 triple does not match"),
    ("s2_products_T", "S2 triple does not match"),
])
def test_wrong_shapes_are_caught_with_the_file_named(synth_index, tmp_path, kind, message):
    """Label values outside 1..19: tests/test_dataset.py::test_labels_outside_1_19_raise_naming_the_file;
    the same shapes before training: tests/test_index.py::test_check_finds_bad_shapes_and_s2_mismatch."""
    from src.core.config import load_settings
    from src.data.dataset import FlairDataset

    df, bad = _dataset_row(synth_index, tmp_path, kind)
    cfg = load_settings(None, {"use_s2": kind.startswith("s2"), "workers": 0})
    with pytest.raises(DataError) as info:
        FlairDataset(df, cfg, train=False)[0]
    assert bad.name in str(info.value) and message in str(info.value)


def test_wrong_size_or_bands_caught_by_index_check(tmp_path):
    """An unlabelled test image has no label to compare with: `python -m src.index --check` names it
    (the dataset checks the band count; the submission validator rejects a non-512x512 PRED file)."""
    from src.core.files import write_tif
    from src.prep.index_scan import scan
    from src.prep.synth_write import SynthSpec, make_dataset

    root = make_dataset(tmp_path / "raw", SynthSpec(train_domains=1, test_domains=1, zones=1, patches=2,
                                                    seed=3))
    small, bands = sorted(root.glob("flair_2_aerial_test/**/IMG_*.tif"))
    write_tif(small, np.zeros((5, 256, 256), np.uint8))
    write_tif(bands, np.zeros((3, 512, 512), np.uint8))
    report = scan(root, check=True, workers=2)
    found = {Path(p.path).name: p.message for p in report.problems if p.fatal}
    assert set(found) == {small.name, bands.name}
    assert "shape (5, 256, 256)" in found[small.name] and "expected 5 bands of 512x512" in found[small.name]
    assert "shape (3, 512, 512)" in found[bands.name]


# ----------------------------------------------------------------------------- one non-finite step
def _inf_zone_run(data_dir: Path, tmp_path: Path) -> tuple[Path, int]:
    """Train one epoch (batch 1) where one training zone's S2 data file holds inf (a float .npy, which
    `index --check` flags as "expected integer reflectance"): the loss of each of its patches is
    non-finite. Returns (run dir, number of such training patches)."""
    broken = tmp_path / "data"
    shutil.copytree(data_dir, broken)
    index, row = _train_row(broken)
    zone = index["s2_data"] == index.loc[row, "s2_data"]
    arr = np.load(index.loc[row, "s2_data"]).astype(np.float32)
    arr[:] = np.inf
    bad = tmp_path / "inf_data.npy"
    np.save(bad, arr)
    index.loc[zone, "s2_data"] = str(bad)
    index.to_csv(broken / "index_train.csv", index=False)
    val_ids = set(pd.read_csv(broken / "folds.csv", dtype=str).query("fold == '0'")["id"])
    n_hit = len(set(index.loc[zone, "id"]) - val_ids)
    T.main(train_args(broken, tmp_path / "runs", "epochs=1", "batch_size=1", "max_val_batches=1",
                      f"max_nan_steps={n_hit}"))
    return tmp_path / "runs" / "r" / "fold0", n_hit


def test_a_non_finite_batch_is_skipped_counted_and_training_goes_on(data_dir, tmp_path, capsys):
    """(Repeated NaNs stopping the run with the checkpoint intact:
    tests/test_train.py::test_non_finite_losses_stop_the_run_and_keep_the_checkpoint.)"""
    run, n_hit = _inf_zone_run(data_dir, tmp_path)
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and int(rows[0]["nan_steps"]) == n_hit > 0
    out = capsys.readouterr().out
    assert out.count("step skipped") == n_hit
    assert f"BatchNorm re-estimation: {n_hit} batch" in out and "left out (non-finite statistics)" in out
    assert load_checkpoint(run / "last.pt")["nan_steps"] == n_hit


def test_a_skipped_non_finite_step_leaves_the_weights_finite(data_dir, tmp_path):
    run, _ = _inf_zone_run(data_dir, tmp_path)
    ckpt = load_checkpoint(run / "last.pt")
    for part in ("raw_model", "model"):
        bad = [k for k, v in ckpt[part].items() if v.is_floating_point() and not bool(v.isfinite().all())]
        assert not bad, f"{part}: non-finite {bad[:4]}"
    assert math.isfinite(ckpt["history"][0]["val_loss"])


# ----------------------------------------------------------------------------- predict killed mid-run
def test_predict_killed_then_rerun_completes_writing_only_the_missing(soak, soak_run, tmp_path):
    from src.scoring.submission import validate

    out = tmp_path / "pred"
    cmd = [sys.executable, "-m", "src.predict", "--runs", str(soak_run["runs"] / "r"), "--out", str(out),
           "--tta", "none", f"data_dir={soak['data']}", "skip_bad=1", "batch_size=1"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while len(list(out.glob("PRED_*.tif"))) < 2:
            assert proc.poll() is None, "predict ended before it could be killed"
            time.sleep(0.02)
        assert proc.poll() is None, "predict finished before it could be killed"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("PRED_*.tif")}
    n_ids = len(soak["test"])
    assert 2 <= len(first) < n_ids
    assert all(pred_ok(out / name) for name in first)  # atomic writes: no partial file under a final name
    done = subprocess.run(cmd[:-1] + ["batch_size=4"], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert {n: (out / n).stat().st_mtime_ns for n in first} == first  # kept, not rewritten
    assert len(list(out.glob("PRED_*.tif"))) == n_ids
    validate(out, soak["test"]["id"].tolist())
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]  # killed writers' temps swept


# ----------------------------------------------------------------------------- settings: one line, exit != 0
@pytest.fixture(scope="module")
def fake_ckpt(tmp_path_factory) -> Path:
    """An untrained tiny checkpoint saved the way training saves it (for predict's setting errors)."""
    import torch

    from src.core.checkpoint import save_checkpoint
    from src.core.config import load_settings
    from src.models.flair_model import build_model

    cfg = load_settings(None, {"encoder": "tu-test_resnet", "encoder_weights": "none", "workers": 0})
    torch.manual_seed(0)
    runs = tmp_path_factory.mktemp("fake_runs")
    return save_checkpoint(runs / "fold0" / "best.pt", {"model": build_model(cfg).state_dict(),
                                                        "config": cfg.to_dict(),
                                                        "epoch": 1, "step": 1, "best_miou": 0.0})


@pytest.mark.parametrize("tool, extra, code, message", [
    ("train", ["lr_typo=1"], 2, "unknown setting 'lr_typo'"),
    ("train", ["epochs=abc"], 2, "epochs: expected an integer"),
    ("train", ["--fold", "7"], 2, "fold 7 not in"),
    ("train", ["--resume", "1"], 2, "nothing to resume"),
    ("predict", ["batch_sise=2"], 2, "unknown setting 'batch_sise'"),
    ("predict", ["batch_size=two"], 2, "batch_size: expected an integer"),
    ("predict", ["MISSING"], 1, "missing.pt"),
])
def test_setting_errors_are_one_line_from_the_command_line(data_dir, fake_ckpt, tmp_path, tool, extra, code,
                                                           message):
    runs = tmp_path / "runs"
    if tool == "train":
        cmd = ["-m", "src.train", "--config", str(REPO / "configs" / "demo.yaml"), *extra,
               f"data_dir={data_dir}", f"runs_dir={runs}", "encoder=tu-test_resnet"]
    else:
        ckpt = str(tmp_path / "missing.pt") if extra == ["MISSING"] else str(fake_ckpt)
        cmd = ["-m", "src.predict", "--runs", ckpt, "--out", str(tmp_path / "pred"), f"data_dir={data_dir}",
               *[e for e in extra if e != "MISSING"]]
    done = subprocess.run([sys.executable, *cmd], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=120)
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert done.returncode == code, done.stderr[-2000:]
    assert len(lines) == 1 and message in lines[0], done.stderr[-2000:]
    assert not runs.exists() and not (tmp_path / "pred").exists()  # nothing started


# ------------------------------------------------------------------------------------------ Ctrl-C
def _interrupt_when(proc: subprocess.Popen, ready, timeout: float = 240.0) -> tuple[int, str, str]:
    """SIGINT (Ctrl-C) to `proc` once `ready()` holds; (exit code, stdout, stderr)."""
    end = time.monotonic() + timeout
    while not ready() and proc.poll() is None and time.monotonic() < end:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def test_ctrl_c_in_training_is_one_line_with_the_resume_command(data_dir, tmp_path):
    """With DataLoader workers too: no traceback from the main process or the workers, exit 130, and the
    line names what is kept and the exact command that resumes."""
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "src.train", "--config", "configs/demo.yaml",
           *train_args(data_dir, runs, "epochs=50", "workers=2")]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    code, out, err = _interrupt_when(proc, lambda: (runs / "r" / "fold0" / "last.pt").is_file())
    assert code == 130, err[-2000:]
    assert "Traceback" not in out + err and "KeyboardInterrupt" not in out + err
    line = err.strip().splitlines()[-1]
    assert line.startswith("train: interrupted: ") and "last.pt (the last finished epoch) is kept" in line
    assert "resume with: make train CONFIG=configs/demo.yaml FOLD=0 RESUME=1" in line


def test_a_ctrl_c_landing_in_an_extension_import_is_still_a_ctrl_c():
    """Seen in CI: Ctrl-C while matplotlib's C extension initialised (the first curves.png of a run) came
    back as ImportError('initialization failed') and the job printed a traceback."""
    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as stop:
            raise ImportError("initialization failed") from stop
    except ImportError as err:
        assert caused_by_interrupt(err)
    loop = ImportError("a cycle")
    loop.__context__ = ValueError("inner")
    loop.__context__.__context__ = loop
    assert not caused_by_interrupt(loop) and not caused_by_interrupt(OSError("disk"))


def test_ctrl_c_in_prediction_keeps_the_files_and_says_how_to_go_on(soak, soak_run, tmp_path):
    out_dir = tmp_path / "pred"
    cmd = [sys.executable, "-m", "src.predict", "--runs", str(soak_run["runs"] / "r"), "--out", str(out_dir),
           "--tta", "d4", f"data_dir={soak['data']}", "batch_size=1", "workers=0", "skip_bad=1"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    code, out, err = _interrupt_when(proc, lambda: any(out_dir.glob("PRED_*.tif")))
    assert code == 130 and "Traceback" not in out + err, err[-2000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("predict: interrupted: ") and "new PRED files in" in line
    assert line.endswith("re-run the same command to write the missing ones")
