"""Prediction of a split: complete and resumable PRED folders, saved probabilities and their later
combination, unreadable patches, the time budget, disk-full behaviour, the command line."""
from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from torch import nn

from src import predict as P
from src.core.errors import DataError, PredictError
from src.core.files import read_label
from src.core.settings import Settings
from src.data.normalize import normalize
from src.prediction import ensemble as E
from src.prediction import stores as predstore
from src.prediction import stores as probstore
from src.prediction.ensemble import Ensemble
from src.prediction.passes import Target, combine, run_prediction
from src.scoring.submission import validate, zip_name
from tests.test_ensemble import S2Recorder

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------- file level
class Conv1x1(nn.Module):
    """The cheapest real model on full 512x512 patches: one 1x1 conv over the 5 normalised bands."""

    def __init__(self, seed: int = 0, c_in: int = 5):
        super().__init__()
        torch.manual_seed(seed)
        self.c = nn.Conv2d(c_in, 13, 1)

    def forward(self, image, **kw):
        return {"logits": self.c(image)}


def _cfg(**kw) -> Settings:
    return Settings(**{"use_s2": False, "workers": 0, "batch_size": 5, "tta": "none", "precision": "fp32",
                       "channels_last": False, **kw})


def _run(index_df, out, models=None, cfg=None, weights=None, probs_dir=None, overwrite=False, **kw):
    """run_prediction of `models` (one tiny conv by default), all with settings `cfg`."""
    models = models or [Conv1x1().eval()]
    cfg = cfg or _cfg()
    logs: list[str] = []
    ens = Ensemble(models, [cfg] * len(models), E.normalise_weights(weights, len(models)))
    report = run_prediction(ens, index_df, Target(Path(out), probs_dir and Path(probs_dir), overwrite),
                            log=logs.append, **kw)
    report["logs"] = logs
    return report


def _preds(folder) -> dict[str, np.ndarray]:
    return {p.name[5:11]: read_label(p) for p in sorted(folder.glob("PRED_*.tif"))}


def test_every_patch_gets_a_prediction_when_batches_do_not_divide(synth_index, tmp_path):
    from src.data.dataset import FlairDataset
    test = synth_index["test"]
    assert len(test) % 5 != 0
    model = Conv1x1().eval()
    report = _run(test, tmp_path / "pred", [model])
    assert report["n_written"] == len(test)
    assert validate(tmp_path / "pred", test["id"].tolist())["files"] == len(test)
    assert any("projected for the 16050 test patches" in line for line in report["logs"])
    # the file holds the argmax of the model on that very patch (ids and pixels not shuffled)
    row = 7
    sample = FlairDataset(test, _cfg(), train=False, labels=False)[row]
    with torch.no_grad():
        want = model(normalize(sample["image"][None], _cfg()))["logits"][0].argmax(0).numpy()
    got = read_label(tmp_path / "pred" / f"PRED_{sample['id']}.tif")
    assert np.array_equal(got, want)


def test_resume_writes_only_the_missing_files(synth_index, tmp_path):
    test = synth_index["test"]
    out = tmp_path / "pred"
    _run(test, out)
    files = sorted(out.glob("PRED_*.tif"))
    for p in files[:3]:
        p.unlink()  # an interrupted run
    files[3].write_bytes(files[3].read_bytes()[:100])  # a damaged file (not something we write, but)
    before = {p.name: p.stat().st_mtime_ns for p in files[4:]}
    report = _run(test, out)
    assert report["n_skipped_existing"] == len(test) - 4 and report["n_written"] == 4
    assert {p.name: p.stat().st_mtime_ns for p in files[4:]} == before  # untouched
    assert len(_preds(out)) == len(test)
    again = _run(test, out)
    assert again["n_written"] == 0
    assert not any("writing only the missing ones" in line for line in again["logs"])  # none is missing
    assert any(f"all {len(test)} predictions already present" in line for line in again["logs"])
    # the manifest keeps the time measured over both runs
    assert again["n_timed"] == len(test) + 4 and again["infer_s"] > 0  # 16 files written in all


def test_another_setup_is_refused_unless_overwrite(synth_index, tmp_path):
    test = synth_index["test"]
    out = tmp_path / "pred"
    _run(test, out, [Conv1x1(0).eval(), Conv1x1(1).eval()], weights=[1, 1])
    first = _preds(out)
    (out / f"PRED_{test['id'].iloc[0]}.tif").unlink()
    with pytest.raises(PredictError, match="weights differs"):
        _run(test, out, [Conv1x1(0).eval(), Conv1x1(1).eval()], weights=[1, 0])
    with pytest.raises(PredictError, match="tta differs"):
        _run(test, out, [Conv1x1(0).eval(), Conv1x1(1).eval()], weights=[1, 1], tta="flip")
    report = _run(test, out, [Conv1x1(0).eval(), Conv1x1(1).eval()], weights=[1, 0], overwrite=True)
    assert report["n_written"] == len(test)
    solo = _run(test, tmp_path / "solo", [Conv1x1(0).eval()])
    assert solo["n_written"] == len(test)
    assert all(np.array_equal(a, b) for a, b in zip(_preds(out).values(), _preds(tmp_path / "solo").values()))
    assert any(not np.array_equal(a, _preds(out)[k]) for k, a in first.items() if k in _preds(out))
    # a folder of PRED files that this tool did not write is not silently mixed either
    (out / predstore.MANIFEST).unlink()
    with pytest.raises(PredictError, match="no predict.json"):
        _run(test, out, [Conv1x1(0).eval()])


def test_disk_full_leaves_no_partial_file_and_says_what_to_free(synth_index, tmp_path, monkeypatch):
    import threading

    test = synth_index["test"]
    out = tmp_path / "pred"
    real = tifffile.imwrite
    lock, calls = threading.Lock(), [0]

    def full_after_four(path, *a, **kw):
        with lock:
            calls[0] += 1
            n = calls[0]
        if n > 4:
            with open(path, "wb") as f:  # a partly written temp file, as a real full disk leaves
                f.write(b"II*\x00")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(tifffile, "imwrite", full_after_four)
    with pytest.raises(OSError, match="free") as info:
        _run(test, out)
    assert info.value.errno == errno.ENOSPC and "re-run the same command" in str(info.value)
    left = sorted(p.name for p in out.iterdir() if p.name != predstore.MANIFEST)
    assert left and all(n.startswith("PRED_") for n in left)  # no temp files left behind
    assert all(predstore.pred_ok(out / n) for n in left) and len(left) < len(test)
    monkeypatch.setattr(tifffile, "imwrite", real)
    report = _run(test, out)
    assert report["n_written"] == len(test) - len(left) and len(_preds(out)) == len(test)


def test_saved_probabilities_combine_later(synth_index, tmp_path):
    from src.data.dataset import FlairDataset

    test = synth_index["test"].iloc[:4]
    a, b = Conv1x1(0).eval(), Conv1x1(5).eval()
    _run(test, tmp_path / "pa", [a], probs_dir=tmp_path / "qa")
    _run(test, tmp_path / "pb", [b], probs_dir=tmp_path / "qb")
    pid = test["id"].iloc[1]
    q = probstore.load_prob(probstore.prob_path(tmp_path / "qa", pid))
    assert q.dtype == np.uint8 and q.shape == (13, 512, 512)
    assert abs(q.astype(int).sum(0) - 255).max() <= 7  # rounding of 13 classes
    sample = FlairDataset(test, _cfg(), train=False, labels=False)[1]
    probs = E.predict_batch([a], None, {"image": normalize(sample["image"][None], _cfg())})[0].numpy()
    with pytest.raises(PredictError, match="raw uint8"):
        E.predict_batch([a], None, {"image": sample["image"][None]})
    assert np.abs(q / 255.0 - probs).max() <= 0.5 / 255 + 1e-6  # round(p * 255)
    logs: list[str] = []
    combine([tmp_path / "qa", tmp_path / "qb"], tmp_path / "only_a", test["id"], [1, 0], log=logs.append)
    assert all(np.array_equal(x, probstore.load_prob(probstore.prob_path(tmp_path / "qa", k)).argmax(0))
               for k, x in _preds(tmp_path / "only_a").items())
    combine([tmp_path / "qa", tmp_path / "qb"], tmp_path / "ab", test["id"], [1, 3], log=logs.append)
    qa = probstore.load_prob(probstore.prob_path(tmp_path / "qa", pid)).astype(np.float32)
    qb = probstore.load_prob(probstore.prob_path(tmp_path / "qb", pid)).astype(np.float32)
    assert np.array_equal(read_label(tmp_path / "ab" / f"PRED_{pid}.tif"), (0.25 * qa + 0.75 * qb).argmax(0))
    # a folder that lacks an id is named
    probstore.prob_path(tmp_path / "qb", pid).unlink()
    with pytest.raises(PredictError, match="qb: 1 of 4 PROB files missing"):
        combine([tmp_path / "qa", tmp_path / "qb"], tmp_path / "ab2", test["id"], log=logs.append)


def test_unreadable_patch_fallback_with_skip_bad(synth_index, tmp_path):
    test = synth_index["test"].iloc[:6].copy()
    bad = tmp_path / "IMG_broken.tif"
    bad.write_bytes(Path(test["img_path"].iloc[2]).read_bytes()[:500])
    test.loc[test.index[2], "img_path"] = str(bad)
    with pytest.raises(DataError, match="IMG_broken.tif"):
        _run(test, tmp_path / "strict")
    report = _run(test, tmp_path / "lenient", cfg=_cfg(skip_bad=True))
    pid = test["id"].iloc[2]
    assert report["fallback"] == [pid]
    assert (read_label(tmp_path / "lenient" / f"PRED_{pid}.tif") == 12).all()
    assert len(_preds(tmp_path / "lenient")) == 6
    assert pid in (tmp_path / "lenient" / "skipped.txt").read_text()


def test_time_budget_picks_the_largest_level_that_fits(synth_index, tmp_path):
    test = synth_index["test"].iloc[:2]
    big = _run(test, tmp_path / "big", cfg=_cfg(tta="none", time_budget_s=1e9, batch_size=1))
    assert big["tta"] == "d4"
    small = _run(test, tmp_path / "small", cfg=_cfg(tta="d4", time_budget_s=1e-9, batch_size=1))
    assert small["tta"] == "none"
    assert any("does NOT fit" in line for line in small["logs"])


def test_models_with_different_inputs_share_one_loader(synth_index, tmp_path):
    test = synth_index["test"].iloc[:3]
    rgb_cfg = _cfg(bands=["R", "G", "B"])
    s2_cfg = _cfg(use_s2=True, fusion="utt", s2_size=8)
    rec = S2Recorder().eval()
    models = [Conv1x1(0, c_in=3).eval(), rec]
    # (the prediction settings are the first model's: tta=flip)
    ens = Ensemble(models, [rgb_cfg.with_values(tta="flip"), s2_cfg], [0.5, 0.5])
    report = run_prediction(ens, test, Target(tmp_path / "pred"), log=lambda s: None)
    assert report["n_written"] == 3
    assert rec.seen and rec.seen[0]["image"].shape[1] == 5 and rec.seen[0]["s2"].shape[-2:] == (8, 8)


# ------------------------------------------------------------------------------------- command line
def _fake_run(runs, seeds=(0, 1)) -> None:
    """Two fold checkpoints of an untrained small model, saved the way training saves them."""
    from src.core.checkpoint import save_checkpoint
    from src.models.flair_model import build_model

    cfg = Settings(encoder="resnet18", encoder_weights="none", use_s2=False, fusion="none", workers=0,
                   batch_size=2, channels_last=False)
    for fold, seed in enumerate(seeds):
        torch.manual_seed(seed)
        model = build_model(cfg)
        save_checkpoint(runs / f"fold{fold}" / "best.pt", {"model": model.state_dict(),
                                                           "config": cfg.to_dict(),
                                                           "epoch": 1, "step": 1, "best_miou": 0.0})


def test_cli_predict_submit_and_combine(synth_index, tmp_path, capsys):
    test = synth_index["test"].iloc[:3]
    index_csv = tmp_path / "index_test.csv"
    test.to_csv(index_csv, index=False)
    runs = tmp_path / "runs" / "r18"
    _fake_run(runs)
    subs = tmp_path / "subs"
    args = ["--runs", str(runs), "--index", str(index_csv), "--out", str(tmp_path / "pred"), "--tta", "none",
            "--save-probs", str(tmp_path / "probs"), "--submit", "r18", "--baseline-time", "900",
            "--submit-dir", str(subs), "workers=0"]
    P.main(args)
    out = capsys.readouterr().out
    assert "2 models" in out and "projected for the 16050 test patches" in out and "mIoU" in out
    zips = list(subs.glob("r18_15-00_*.zip"))  # baseline 15 min, then our measured time
    assert len(zips) == 1
    assert validate(zips[0], test["id"])["files"] == 3
    assert (tmp_path / "pred_scores.json").is_file() and (tmp_path / "pred_confusion.png").is_file()
    # the same files as make evaluate (src.scoring.score.score_and_write): the per-domain report included
    assert json.loads((tmp_path / "pred_scores.json").read_text())["per_domain"]["domains"]
    assert (tmp_path / "pred_domains.csv").read_text().startswith("domain,patches,pixels,miou,")
    assert (tmp_path / "pred_domains.png").is_file() and "per-domain mIoU" in out
    # the same command again: nothing re-predicted (same measured time, so the same zip name), and the
    # existing zip is never overwritten: a one-line error
    with pytest.raises(SystemExit) as info:
        P.main(args)
    assert info.value.code == 1
    captured = capsys.readouterr()
    assert "all 3 predictions already present" in captured.out
    assert "already exists" in captured.err and len(captured.err.strip().splitlines()) == 1
    # combining the saved probabilities with themselves gives their argmax (the predictions up to
    # near-ties that uint8 rounding merges: this untrained model is close to uniform)
    P.main(["--combine", str(tmp_path / "probs"), str(tmp_path / "probs"), "--weights", "1,2",
            "--index", str(index_csv), "--out", str(tmp_path / "comb")])
    comb, pred = _preds(tmp_path / "comb"), _preds(tmp_path / "pred")
    assert comb.keys() == pred.keys() == set(test["id"])
    for k, x in comb.items():
        assert np.array_equal(x, probstore.load_prob(probstore.prob_path(tmp_path / "probs", k)).argmax(0))
        assert (x == pred[k]).mean() > 0.9


def test_cli_combine_submit_names_the_zip_with_the_saved_runs_time(synth_index, tmp_path, capsys):
    """Bug 5: `--combine ... --submit NAME --baseline-time S` ended in a traceback (the combination
    reported no measured time). Its time is now the saved runs' (their probs.json) plus its own."""
    test = synth_index["test"].iloc[:3]
    index_csv = tmp_path / "index_test.csv"
    test.to_csv(index_csv, index=False)
    a = _run(test, tmp_path / "pa", [Conv1x1(0).eval()], probs_dir=tmp_path / "qa")
    b = _run(test, tmp_path / "pb", [Conv1x1(5).eval()], probs_dir=tmp_path / "qb")
    subs = tmp_path / "subs"
    P.main(["--combine", str(tmp_path / "qa"), str(tmp_path / "qb"), "--index", str(index_csv),
            "--out", str(tmp_path / "comb"), "--submit", "ens", "--baseline-time", "900",
            "--submit-dir", str(subs)])
    manifest = json.loads((tmp_path / "comb" / predstore.MANIFEST).read_text())
    runs_per_patch = a["infer_s"] / a["n_timed"] + b["infer_s"] / b["n_timed"]
    assert manifest["sources_s_per_patch"] == pytest.approx(runs_per_patch)
    assert manifest["n_timed"] == 3 and manifest["infer_s"] > 0 and manifest["complete"]
    total = 3 * (runs_per_patch + manifest["infer_s"] / manifest["n_timed"])
    assert [p.name for p in subs.iterdir()] == [zip_name("ens", 900, total)]
    # probability folders that record no time (saved by hand, or by an older kit): the combination's own
    # time names the zip, with a warning
    rng = np.random.default_rng(0)
    for d in ("qc", "qd"):
        (tmp_path / d).mkdir()
        for pid in test["id"]:
            probstore.save_prob(probstore.prob_path(tmp_path / d, pid),
                                rng.integers(0, 256, (13, 512, 512), dtype=np.uint8))
    capsys.readouterr()
    P.main(["--combine", str(tmp_path / "qc"), str(tmp_path / "qd"), "--index", str(index_csv),
            "--out", str(tmp_path / "old"), "--submit", "old", "--baseline-time", "900",
            "--submit-dir", str(subs)])
    assert "no inference time" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "old" / predstore.MANIFEST).read_text())
    assert manifest["sources_s_per_patch"] is None
    assert (subs / zip_name("old", 900, manifest["infer_s"])).is_file()


def test_cli_errors_are_one_line(tmp_path, capsys, synth_index):
    with pytest.raises(SystemExit) as info:
        P.main(["--runs", str(tmp_path / "nowhere"), "--out", str(tmp_path / "p")])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "nowhere" in err and len(err.strip().splitlines()) == 1
    runs = tmp_path / "runs"
    _fake_run(runs, seeds=(0,))
    with pytest.raises(SystemExit) as info:
        P.main(["--runs", str(runs), "--out", str(tmp_path / "p"), "ensembel=logits"])
    assert info.value.code == 2 and "ensembel" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        P.main(["--runs", str(runs), "--out", str(tmp_path / "p"), "ensemble=mean"])
    assert info.value.code == 2 and "ensemble" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        P.main(["--runs", str(runs), "--out", str(tmp_path / "p"), f"data_dir={tmp_path / 'nodata'}"])
    assert info.value.code == 1 and "index_test.csv: index not found" in capsys.readouterr().err


def test_default_tta_fits_the_device_and_is_said_with_a_projection(synth_index, tmp_path):
    """tta=auto (the default) is none on a CPU and d4 on a GPU; the log says which, and after the first batch
    how long the split and the whole test set would take."""
    assert Settings().tta == "auto"
    assert E.device_tta("auto", torch.device("cpu")) == "none"
    assert E.device_tta("auto", torch.device("cuda", 0)) == "d4"
    assert E.device_tta("flip", torch.device("cpu")) == "flip"
    report = _run(synth_index["test"].iloc[:2], tmp_path / "pred", cfg=_cfg(tta="auto"))
    assert report["tta"] == "none"
    assert any("tta=auto: none on cpu" in line for line in report["logs"])
    assert any(line.startswith("predict: first batch") and "for the 16050 test patches" in line
               for line in report["logs"])
