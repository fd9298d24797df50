"""Out-of-fold stores: a fold run saves its held-out fold's probabilities with its final weights (exactly
its held-out ids, predict's numbers), a resumed run and the post-hoc job keep valid files, the post-hoc
job writes other TTA levels, stale stores are replaced, and errors are one line naming the folder."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from src import oof as O
from src import train as T
from src.core.runtime import Placement
from src.core.settings import Settings
from src.core.tables import fold_rows, write_folds
from src.data.device_augment import device_batch
from src.ensembling.oof import STORE_MANIFEST, parse_store_name, store_ids, store_name, write_fold_oof
from src.models.flair_model import load_for_inference
from src.prediction.ensemble import predict_batch, quantise
from src.prediction.stores import load_prob, prob_path

TINY = ["arch=FPN", "encoder=tu-test_resnet", "encoder_weights=none", "crop_size=64", "batch_size=4",
        "workers=0", "lr=0.001", "warmup_epochs=0.5", "ema=0.9", "channels_last=false", "precision=fp32",
        "epochs=1", "max_train_batches=1", "max_val_batches=1", "tensorboard=false"]


@pytest.fixture(scope="module")
def two_folds(tmp_path_factory, synth_data_dir) -> tuple[Path, Path]:
    """(data dir with 2 folds, runs/t): both folds trained for one tiny step, so fold<k>/oof/ exists."""
    from src.prep.folds import make_folds

    data = tmp_path_factory.mktemp("oof_data")
    for name in ("index_train.csv", "index_test.csv"):
        shutil.copy(synth_data_dir / name, data / name)
    folds = make_folds(data, k=2, seed=0, plot=False)
    # two patches per fold: every held-out patch is predicted in full (512 x 512), keep the test fast
    write_folds(folds.groupby("fold").head(2), data / "folds.csv")
    runs = tmp_path_factory.mktemp("oof_runs")
    for k in ("0", "1"):
        T.main(["--fold", k, *TINY, f"data_dir={data}", f"runs_dir={runs}", "name=t"])
    return data, runs / "t"


def held_out(data: Path, k: int) -> set[str]:
    return set(fold_rows(data, str(k))[1]["id"].astype(str))


def mtimes(store: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in store.glob("PROB_*.npz")}


def test_store_names_round_trip():
    for tta in ("none", "flip", "d4"):
        for ck in ("last", "best"):
            assert parse_store_name(store_name(tta, ck)) == (tta, ck)
    assert store_name() == "oof" and store_name("d4", "best") == "oof_d4_best"
    assert parse_store_name("oofx") is None and parse_store_name("previous") is None


def test_fold_runs_write_exactly_their_held_out_ids_with_the_final_weights(two_folds):
    data, run = two_folds
    everything = set()
    for k in (0, 1):
        store = run / f"fold{k}" / "oof"
        assert store_ids(store) == held_out(data, k)
        everything |= store_ids(store)
        manifest = json.loads((store / STORE_MANIFEST).read_text())
        assert manifest["run"] == "t" and manifest["fold"] == str(k) and manifest["tta"] == "none"
        assert manifest["checkpoint"] == "last" and manifest["complete"] and manifest["missing"] == []
        assert manifest["weights_path"] == str((run / f"fold{k}" / "last.pt").resolve())
    assert held_out(data, 0).isdisjoint(held_out(data, 1))
    assert everything == held_out(data, 0) | held_out(data, 1)  # the training set, once
    # the stored numbers are predict's: last.pt's "model" (EMA) weights through predict_batch
    from src.data.dataset import FlairDataset
    from src.data.loader import collate

    model, cfg = load_for_inference(run / "fold1" / "last.pt")
    _, val_df = fold_rows(data, "1")
    raw = collate([FlairDataset(val_df, cfg, train=False, labels=False)[i] for i in (0, 1)])
    probs = predict_batch([model], None, device_batch(raw, cfg, torch.device("cpu")), tta="none",
                          precision="fp32")
    want = quantise(probs).numpy()
    for j, pid in enumerate(raw["id"]):
        got = load_prob(prob_path(run / "fold1" / "oof", pid))
        assert np.abs(got.astype(int) - want[j]).max() <= 1  # uint8 rounding of a float sum


def test_resume_and_post_hoc_job_keep_valid_files_and_write_other_levels(two_folds, tmp_path):
    data, src_run = two_folds
    run = tmp_path / "t"
    shutil.copytree(src_run, run)
    store = run / "fold0" / "oof"
    gone = sorted(store.glob("PROB_*.npz"))[0]
    gone.unlink()
    before = mtimes(store)
    # a resumed, finished run: no epoch left, the OOF pass writes only the missing file
    T.main(["--fold", "0", "--resume", "1", f"runs_dir={tmp_path}", "name=t"])
    assert store_ids(store) == held_out(data, 0)
    after = mtimes(store)
    assert {n: after[n] for n in before} == before and gone.name in after
    # the post-hoc job at the same level keeps everything; at another level it writes the same ids
    O.main(["--runs", str(run), "--tta", "none", "workers=0"])
    assert mtimes(store) == after
    O.main(["--runs", str(run), "--tta", "flip", "workers=0"])
    for k in (0, 1):
        flip = run / f"fold{k}" / "oof_flip"
        assert store_ids(flip) == held_out(data, k)
        assert json.loads((flip / STORE_MANIFEST).read_text())["tta"] == "flip"
    # other weights in the folder (a fresh run rewrote last.pt): the stale store is emptied and rewritten
    ck = run / "fold0" / "last.pt"
    os.utime(ck, ns=(ck.stat().st_atime_ns, ck.stat().st_mtime_ns + 10**9))
    O.main(["--runs", str(run), "--tta", "none", "workers=0"])
    assert all(mtimes(store)[n] > after[n] for n in after)


def test_fold_all_and_oof_off_write_nothing(two_folds, tmp_path):
    def never(*a, **k):
        raise AssertionError("no store for fold all")

    place = Placement(0, 1, torch.device("cpu"))
    assert write_fold_oof(Settings(oof=True), "all", None, never, tmp_path, place, never) is None
    data, _ = two_folds
    _, val_df = fold_rows(data, "0")
    assert write_fold_oof(Settings(oof=False), "0", val_df, never, tmp_path, place, never) is None
    assert not any(tmp_path.iterdir())


def test_post_hoc_errors_are_one_line_naming_the_folder(two_folds, tmp_path, capsys):
    _, src_run = two_folds
    run = tmp_path / "t"
    shutil.copytree(src_run, run)
    (run / "fold1" / "last.pt").unlink()
    with pytest.raises(SystemExit) as info:
        O.main(["--runs", str(run)])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 1 and f"{run / 'fold1'}: no last.pt" in err and "\n" not in err
    with pytest.raises(SystemExit):
        O.main(["--runs", str(tmp_path / "nothing")])
    err = capsys.readouterr().err.strip()
    assert "nothing: no fold<k> folders" in err and "\n" not in err
