"""src.train on the synthetic tree: outputs, the validation metric, exact resume after SIGKILL, NaN stop,
bad files, one-line setting errors, and 2-process DDP (gloo on CPU). Tiny models and crops throughout."""
from __future__ import annotations

import csv
import hashlib
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
import torch

from src import train as T
from src.core.checkpoint import load_checkpoint
from src.core.config import load_settings
from src.core.settings import Settings
from src.core.tables import fold_rows
from src.data.device_augment import device_batch
from src.models.flair_model import load_for_inference
from src.models.losses import Criterion
from src.scoring.metrics import IOU_COLS, confusion_torch, miou_from_confusion
from src.training.records import CSV_COLS
from src.training.state import lr_at
from src.training.validation import Domains, validate

REPO = Path(__file__).resolve().parents[1]
TINY = ["encoder=tu-test_resnet", "encoder_weights=none", "crop_size=64", "batch_size=4", "workers=0",
        "lr=0.001", "warmup_epochs=0.5", "ema=0.9", "channels_last=false", "precision=fp32", "log_every=1",
        "oof=false"]  # (out-of-fold stores: tests/test_oof.py)
FUSION = ["use_s2=true", "fusion=utt", "utae_widths=[8,8,16,16]", "utae_decoder_widths=[8,8,8,16]",
          "ltae_heads=2", "ltae_d_model=16", "ltae_d_k=4"]
CONTRACT_KEYS = {"model", "config", "epoch", "step", "best_miou", "optimizer", "scaler", "ema", "raw_model",
                 "rng", "fold", "scheduler", "history"}


@pytest.fixture(scope="module")
def data_dir(synth_folds_dir) -> Path:
    """The session data dir with folds.csv (3 folds = the 3 synthetic training domains)."""
    return synth_folds_dir


def args(data_dir: Path, runs: Path, *extra: str, fold: str = "0", resume: int = 0) -> list[str]:
    return ["--fold", fold, "--resume", str(resume), *TINY, f"data_dir={data_dir}", f"runs_dir={runs}",
            "name=t", *extra]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- pure pieces
# (the loss: tests/test_losses.py)
def test_lr_schedule_warmup_then_cosine():
    lrs = [lr_at(s, 100, 10, 1e-3, 0.01) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))          # warmup rises
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))         # cosine falls
    assert lr_at(100, 100, 10, 1e-3, 0.01) == pytest.approx(1e-5)  # ends at base * min_lr_ratio


# ----------------------------------------------------------------------------- one-line setting errors
@pytest.mark.parametrize("extra, fold, resume, message", [
    (["lr_typo=1"], "0", 0, "unknown setting 'lr_typo'"),
    (["loss=dice"], "0", 0, "loss: expected one of"),
    (["precision=fp8"], "0", 0, "precision: expected one of"),
    (["class_weights=[1,2]"], "0", 0, "class_weights: expected 13 numbers"),
    ([], "7", 0, "fold 7 not in"),
    ([], "x", 0, "--fold: expected a fold number"),
    ([], "0", 1, "nothing to resume"),
    (["fusion=utt", "epochs=1", "max_train_batches=1", "max_val_batches=1"], "0", 0,
     "fusion=utt needs use_s2=true"),
    (["use_s2=true", "epochs=1", "max_train_batches=1", "max_val_batches=1"], "0", 0,
     "use_s2=true does nothing with fusion=none: set fusion=utt or use_s2=false"),
])
def test_setting_errors_are_one_line_before_any_work(data_dir, tmp_path, capsys, extra, fold, resume,
                                                     message):
    with pytest.raises(SystemExit) as exit_info:
        T.main(args(data_dir, tmp_path / "runs", *extra, fold=fold, resume=resume))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "runs").exists()  # nothing was started


def test_missing_data_is_named(data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        T.main(args(tmp_path / "nodata", tmp_path / "runs"))
    assert "index_train.csv: not found" in capsys.readouterr().err
    broken = tmp_path / "data"
    shutil.copytree(data_dir, broken)
    index = pd.read_csv(broken / "index_train.csv", dtype=str)
    index.loc[3, "img_path"] = str(tmp_path / "IMG_gone.tif")
    index.to_csv(broken / "index_train.csv", index=False)
    with pytest.raises(SystemExit) as exit_info:
        T.main(args(broken, tmp_path / "runs"))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "IMG_gone.tif" in err and "1 files" in err and "\n" not in err


# ----------------------------------------------------------------------------- a real (tiny) run
def test_fold_run_outputs_checkpoints_and_metric(data_dir, tmp_path):
    runs = tmp_path / "runs"
    result = T.main(args(data_dir, runs, *FUSION, "epochs=2", "val_every=1"))
    run = runs / "t" / "fold0"
    assert {p.name for p in run.iterdir()} >= {"config.yaml", "metrics.csv", "curves.png", "best.pt",
                                               "last.pt"}
    assert (runs / "latest").read_text() == "t\n"  # the run later make steps default to
    rows = read_csv(run / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert set(CSV_COLS) == set(rows[0]) and all(float(r["miou"]) >= 0 for r in rows)
    assert all(float(r["train_s2_loss"]) > 0 for r in rows)  # the auxiliary S2 head is trained
    last = load_checkpoint(run / "last.pt")
    assert CONTRACT_KEYS <= set(last) and last["epoch"] == 2 and last["fold"] == "0"
    assert set(last["rng"]) >= {"python", "numpy", "torch"}
    assert load_settings(run / "config.yaml").to_dict() == last["config"]
    # best.pt holds the EMA weights of the best epoch; re-scoring them on the whole fold reproduces it
    best = load_checkpoint(run / "best.pt")
    assert best["best_miou"] == pytest.approx(max(float(r["miou"]) for r in rows))
    model, cfg = load_for_inference(run / "best.pt")
    assert cfg.to_dict() == best["config"]
    assert all(torch.equal(v, best["ema"]["module"][k]) for k, v in best["model"].items())
    train_df, val_df = fold_rows(cfg.data_dir, "0")
    assert set(val_df["domain"]) == {val_df["domain"].iloc[0]} and not set(val_df["id"]) & set(train_df["id"])
    from src.data.dataset import FlairDataset
    from src.data.loader import collate

    # same batches as the trainer's validation, so multi-threaded conv kernels sum in the same order
    loader = torch.utils.data.DataLoader(FlairDataset(val_df, cfg, train=False),
                                         batch_size=cfg.batch_size, collate_fn=collate)
    domains = Domains(["all"], {str(i): 0 for i in val_df["id"]})
    res = validate(model, loader, Criterion(cfg), cfg.with_values(precision="fp32", channels_last=False),
                   torch.device("cpu"), domains)
    assert res["confusion"].sum() == len(val_df) * 512 * 512 and res["skipped"] == 0  # every pixel, once
    assert res["miou"] == pytest.approx(best["best_miou"], abs=1e-9)
    assert result["best_miou"] == best["best_miou"]


def test_fold_all_trains_on_everything_and_saves_best(data_dir, tmp_path, capsys):
    runs = tmp_path / "runs"
    T.main(args(data_dir, runs, "epochs=1", "max_train_batches=2", fold="all"))
    run = runs / "t" / "foldall"
    done = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("done:")]
    assert done == [f"done: trained on all folds (no validation); weights in {run}"]  # not "best mIoU -inf"
    rows = read_csv(run / "metrics.csv")
    assert len(rows) == 1 and rows[0]["miou"] == "" and rows[0]["val_loss"] == ""
    best, last = load_checkpoint(run / "best.pt"), load_checkpoint(run / "last.pt")
    assert all(torch.equal(v, last["model"][k]) for k, v in best["model"].items())
    index = pd.read_csv(data_dir / "index_train.csv", dtype=str)
    assert len(fold_rows(best["config"]["data_dir"], "all")[0]) == len(index)
    # a fresh start in the same folder sets the earlier run aside instead of mixing the two
    first = digest(run / "last.pt")
    T.main(args(data_dir, runs, "epochs=1", "max_train_batches=1", fold="all"))
    assert digest(run / "previous" / "last.pt") == first and (run / "previous" / "best.pt").exists()
    assert load_checkpoint(run / "last.pt")["step"] == 1


def test_sigkill_mid_run_then_resume_matches_uninterrupted(data_dir, tmp_path):
    """The acceptance test: a run killed mid-epoch and resumed ends bit-identical to an uninterrupted one."""
    common = [*FUSION, "epochs=3", "batch_size=2", "max_val_batches=1", "augment=heavy",
              "modality_dropout=0.3"]
    ref = T.main(args(data_dir, tmp_path / "ref", *common))

    runs = tmp_path / "killed"
    metrics = runs / "t" / "fold0" / "metrics.csv"
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # same float reductions
    proc = subprocess.Popen([sys.executable, "-m", "src.train", *args(data_dir, runs, *common)], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not (metrics.exists() and len(read_csv(metrics)) >= 1):
            assert proc.poll() is None, "training subprocess ended before its first epoch was written"
            time.sleep(0.02)
        assert proc.poll() is None, "training finished before it could be killed"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = load_checkpoint(runs / "t" / "fold0" / "last.pt")["epoch"]
    assert 1 <= killed_at < 3

    resumed = T.main(args(data_dir, runs, *common, resume=1))
    assert resumed["best_miou"] == ref["best_miou"]
    for a, b in zip(ref["history"], resumed["history"], strict=True):
        for key in ("epoch", "step", "lr", "train_loss", "train_s2_loss", "val_loss", "miou", "confusion"):
            assert a[key] == b[key], key
    a = load_checkpoint(tmp_path / "ref" / "t" / "fold0" / "last.pt")
    b = load_checkpoint(runs / "t" / "fold0" / "last.pt")
    for part in ("raw_model", "model"):
        assert all(torch.equal(v, b[part][k]) for k, v in a[part].items()), part


def test_non_finite_losses_stop_the_run_and_keep_the_checkpoint(data_dir, tmp_path, capsys):
    runs = tmp_path / "runs"
    T.main(args(data_dir, runs, "epochs=1", "batch_size=2"))
    run = runs / "t" / "fold0"
    before = {name: digest(run / name) for name in ("last.pt", "best.pt", "metrics.csv")}
    # resume into a second epoch with an absurd learning rate: weights blow up, losses turn NaN
    with pytest.raises(SystemExit) as exit_info:
        T.main(args(data_dir, runs, "epochs=2", "batch_size=2", "lr=1.0e+30", "grad_clip=0",
                    "max_nan_steps=2", resume=1))
    assert exit_info.value.code == 3
    out = capsys.readouterr()
    assert "non-finite loss" in out.out and "step skipped" in out.out
    assert "3 consecutive non-finite" in out.err and "last good checkpoint" in out.err
    assert {name: digest(run / name) for name in before} == before  # untouched, still loads
    assert load_checkpoint(run / "last.pt")["epoch"] == 1


def test_corrupt_image_stops_with_its_name_or_is_skipped(data_dir, tmp_path, capsys):
    broken = tmp_path / "data"
    shutil.copytree(data_dir, broken)
    index = pd.read_csv(broken / "index_train.csv", dtype=str)
    folds = pd.read_csv(broken / "folds.csv", dtype=str)
    train_ids = set(folds.loc[folds["fold"] != "0", "id"])
    row = index.index[index["id"].isin(train_ids)][0]
    bad = tmp_path / "IMG_corrupt.tif"
    bad.write_bytes(Path(index.loc[row, "img_path"]).read_bytes()[:500])  # truncated TIFF
    index.loc[row, "img_path"] = str(bad)
    index.to_csv(broken / "index_train.csv", index=False)
    with pytest.raises(SystemExit) as exit_info:
        T.main(args(broken, tmp_path / "runs", "epochs=1"))
    assert exit_info.value.code == 1 and "IMG_corrupt.tif" in capsys.readouterr().err
    T.main(args(broken, tmp_path / "runs2", "epochs=1", "skip_bad=1"))
    log = (tmp_path / "runs2" / "t" / "fold0" / "skipped.tsv").read_text().splitlines()
    assert log and all(line.startswith(index.loc[row, "id"] + "\t") for line in log)


def test_unreadable_validation_patch_is_skipped_not_scored_twice(data_dir, tmp_path, capsys):
    """skip_bad=1 on a damaged validation patch: left out of the fold mIoU (not replaced by a neighbour
    scored twice), counted, named in skipped.tsv and in the log."""
    broken = tmp_path / "data"
    shutil.copytree(data_dir, broken)
    _, val_df = fold_rows(broken, "0")
    bad_id = val_df["id"].iloc[-1]  # the last: the other validation batches stay exactly the trainer's
    index = pd.read_csv(broken / "index_train.csv", dtype=str)
    row = index.index[index["id"] == bad_id][0]
    bad = tmp_path / "IMG_val_corrupt.tif"
    bad.write_bytes(Path(index.loc[row, "img_path"]).read_bytes()[:500])  # truncated TIFF
    index.loc[row, "img_path"] = str(bad)
    index.to_csv(broken / "index_train.csv", index=False)
    runs = tmp_path / "runs"
    result = T.main(args(broken, runs, "epochs=1", "max_train_batches=1", "skip_bad=1"))
    run = runs / "t" / "fold0"
    out = capsys.readouterr().out
    assert f"validation: 1 unreadable patches skipped (listed in {run / 'skipped.tsv'})" in out
    assert result["history"][-1]["val_skipped"] == 1
    assert read_csv(run / "metrics.csv")[0]["val_skipped"] == "1"
    assert [ln.split("\t")[0] for ln in (run / "skipped.tsv").read_text().splitlines()] == [bad_id]
    # the reference: the same checkpoint scored on the readable validation patches only
    from src.data.dataset import FlairDataset
    from src.data.loader import collate

    model, cfg = load_for_inference(run / "best.pt")
    good = val_df[val_df["id"] != bad_id]
    loader = torch.utils.data.DataLoader(FlairDataset(good, cfg, train=False), batch_size=cfg.batch_size,
                                         collate_fn=collate)
    conf = torch.zeros(13, 13, dtype=torch.int64)
    with torch.no_grad():
        for batch in loader:
            fed = device_batch(batch, cfg, torch.device("cpu"))
            conf += confusion_torch(model(fed["image"])["logits"].argmax(1), fed["mask"])
    assert int(conf.sum()) == len(good) * 512 * 512
    assert result["best_miou"] == pytest.approx(miou_from_confusion(conf.numpy()), abs=1e-9)


def test_progress_in_a_log_is_one_line_per_epoch(data_dir, tmp_path, capsys, monkeypatch):
    """stderr redirected to a file (not a terminal): no tqdm redraws ('\\r'), one progress line per epoch."""
    monkeypatch.delenv("FLAIR_PROGRESS", raising=False)
    T.main(args(data_dir, tmp_path / "runs", "epochs=2", "max_train_batches=2", "max_val_batches=1"))
    err = capsys.readouterr().err
    assert "\r" not in err
    progress_lines = [ln.split(":")[0] for ln in err.splitlines() if ln.startswith("epoch")]
    assert progress_lines == ["epoch 1/2", "epoch 2/2"]


class _OpenCVThreads(torch.utils.data.Dataset):
    """Each sample is the number of OpenCV threads of the process that loads it."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> int:
        import cv2

        return cv2.getNumThreads()


def test_loader_workers_run_opencv_single_threaded():
    """The training and validation loaders come from build_loader: one OpenCV thread per worker."""
    from src.data.loader import build_loader

    loader = build_loader(_OpenCVThreads(), Settings(workers=2, batch_size=1), train=False, collate_fn=list)
    assert [n for batch in loader for n in batch] == [1, 1, 1, 1]


def test_ddp_two_cpu_processes_gloo(data_dir, tmp_path):
    """torchrun with 2 processes: one set of outputs, the validation matrix summed over both shards."""
    runs = tmp_path / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "src.train", *args(data_dir, runs, *FUSION, "epochs=1", "batch_size=2")]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("epoch 1/1:") == 1  # rank 0 logs alone
    run = runs / "t" / "fold0"
    assert len(read_csv(run / "metrics.csv")) == 1
    ckpt = load_checkpoint(run / "best.pt")
    conf = np.array(ckpt["history"][0]["confusion"])
    _, val_df = fold_rows(ckpt["config"]["data_dir"], "0")
    assert conf.sum() == len(val_df) * 512 * 512  # both ranks' shards, no patch twice
    assert miou_from_confusion(conf) == ckpt["best_miou"]
    assert not math.isnan(ckpt["best_miou"])


@pytest.mark.slow
def test_demo_fusion_beats_aerial_only_on_s2_only_classes(tmp_path):
    """Acceptance (slow: two demo trainings, ~3 min on 2 cores): on scripts/demo.sh's synthetic set (8 train
    domains, 4 folds, one torch thread per training as the demo runs them), the demo's U-T&T model clearly
    beats the same U-Net without S2 on herbaceous vegetation (9) and agricultural land (10), which look the
    same from the air and differ only in their S2 phenology."""
    from src.core.tables import write_index
    from src.prep.folds import make_folds
    from src.prep.index_scan import build_index
    from src.prep.synth_write import SynthSpec, make_dataset

    root = make_dataset(tmp_path / "raw", SynthSpec(train_domains=8, test_domains=2, zones=2, patches=2,
                                                    seed=0))
    data = tmp_path / "data"
    data.mkdir()
    write_index(build_index(root), data)
    make_folds(data, k=4, seed=0, plot=False)
    results = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the demo's setting: reductions (and so the figures) depend on the threads
    try:
        for name, extra in (("fusion", []), ("aerial", ["fusion=none", "use_s2=false"])):
            results[name] = T.main(["--config", str(REPO / "configs" / "demo.yaml"), "--fold", "0",
                                    f"data_dir={data}", f"runs_dir={tmp_path / 'runs'}", f"name={name}",
                                    *extra])
    finally:
        torch.set_num_threads(threads)

    def s2_only(result: dict) -> float:
        last = result["history"][-1]
        return (last[IOU_COLS[9]] + last[IOU_COLS[10]]) / 2

    assert results["fusion"]["best_miou"] > 0.33  # clearly non-trivial on two held-out domains
    assert s2_only(results["fusion"]) > s2_only(results["aerial"]) + 0.10  # measured: 0.57 vs 0.24


def test_validated_and_saved_weights_get_their_own_batchnorm_statistics(data_dir, tmp_path):
    """From scratch at a high learning rate, the running BatchNorm statistics lag the weights: eval-mode
    outputs were far off (validation loss ~100x the training loss: 188 vs 2.6 here without
    bn_recalibrate, 3,906 vs 7.3 in a demo-config run). The weights that are validated and saved now carry
    statistics re-estimated on training batches: the validation loss is of the training loss's order."""
    runs = tmp_path / "runs"
    T.main(args(data_dir, runs, "lr=0.01", "warmup_epochs=0", "epochs=2", "val_every=1"))
    rows = read_csv(runs / "t" / "fold0" / "metrics.csv")
    assert all(float(r["val_loss"]) < 3 * float(r["train_loss"]) for r in rows), rows
