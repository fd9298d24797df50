"""Prediction: TTA views and their inverses, joint aerial/S2 transforms, ensemble weights, complete and
resumable PRED folders, saved probabilities and their later combination, disk-full behaviour."""
from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from torch import nn

from src import predict as P
from src import tta as T
from src.config import DEFAULTS
from src.rasters import DataError, read_label

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------- toy models
class Pointwise(nn.Module):
    """1x1 convs and a pointwise nonlinearity: commutes with every flip/rotation, so TTA is a no-op."""

    def __init__(self, c_in: int = 5, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.a = nn.Conv2d(c_in, 16, 1)
        self.b = nn.Conv2d(16, 13, 1)

    def forward(self, image, s2=None, s2_days=None, s2_pad=None, meta=None):
        return {"logits": self.b(torch.tanh(self.a(image)))}


class Spatial(nn.Module):
    """A 3x3 conv: not equivariant, so TTA must change its output (guards against a no-op TTA)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.c = nn.Conv2d(5, 13, 3, padding=1)

    def forward(self, image, **kw):
        return {"logits": self.c(image)}


class S2Recorder(nn.Module):
    """Output = pointwise(image) + nearest-upsampled per-pixel S2 mean: equivariant only when the S2 crop
    is flipped/rotated with the image. Records every input it receives."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.img = nn.Conv2d(5, 13, 1)
        self.w = nn.Parameter(torch.randn(13, 1, 1))
        self.seen: list[dict[str, torch.Tensor]] = []

    def forward(self, image, s2=None, s2_days=None, s2_pad=None, meta=None):
        self.seen.append({"image": image.clone(), "s2": s2.clone(), "s2_days": s2_days.clone(),
                          "s2_pad": s2_pad.clone()})
        s2_map = s2.mean(dim=(1, 2))[:, None]  # (N, 1, S, S): mean over dates and bands
        up = nn.functional.interpolate(s2_map, size=image.shape[-2:], mode="nearest")
        return {"logits": self.img(image) + self.w * up}


class Constant(nn.Module):
    """Same logits at every pixel of every patch."""

    def __init__(self, logits: list[float]):
        super().__init__()
        self.register_buffer("v", torch.tensor(logits, dtype=torch.float32))

    def forward(self, image, **kw):
        b, _, h, w = image.shape
        return {"logits": self.v[None, :, None, None].expand(b, -1, h, w)}


def _batch(b: int = 3, h: int = 32, w: int = 32, s2: bool = False, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {"image": torch.randn(b, 5, h, w, generator=g), "id": [f"{i:06d}" for i in range(b)]}
    if s2:
        out["s2"] = torch.randn(b, 4, 10, 8, 8, generator=g)
        out["s2_days"] = torch.arange(4).repeat(b, 1)
        out["s2_pad"] = torch.zeros(b, 4, dtype=torch.bool)
    return out


# ------------------------------------------------------------------------------------- TTA level
@pytest.mark.parametrize("level,n", [("none", 1), ("flip", 3), ("d4", 8)])
def test_views_are_distinct_and_invert(level, n):
    x = torch.randn(2, 3, 6, 6)
    vs = T.views(level)
    assert len(vs) == n
    seen = set()
    for v in vs:
        assert torch.equal(v.invert(v.apply(x)), x), v
        seen.add(v.apply(x).numpy().tobytes())
    assert len(seen) == n  # every view is a different picture
    assert vs[0] == T.View()


def test_flip_level_is_identity_hflip_vflip():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    got = [v.apply(x) for v in T.views("flip")]
    assert torch.equal(got[1], x.flip(-1)) and torch.equal(got[2], x.flip(-2))


def test_unknown_level_rejected():
    with pytest.raises(ValueError, match="unknown TTA level"):
        T.views("d8")


@pytest.mark.parametrize("ensemble", ["probs", "logits"])
def test_tta_of_equivariant_model_equals_no_tta(ensemble):
    model = Pointwise().eval()
    batch = _batch()
    ref = P.predict_batch([model], None, batch, "none", ensemble)
    for level in ("flip", "d4"):
        got = P.predict_batch([model], None, batch, level, ensemble)
        assert got.shape == (3, 13, 32, 32)
        assert torch.allclose(got, ref, atol=1e-5), level
    assert torch.allclose(ref.sum(1), torch.ones(3, 32, 32), atol=1e-5)


def test_tta_changes_a_non_equivariant_model_and_averages_the_views():
    model = Spatial().eval()
    batch = _batch()
    ref = P.predict_batch([model], None, batch, "none")
    got = P.predict_batch([model], None, batch, "d4")
    assert not torch.allclose(got, ref, atol=1e-3)
    # by hand: every view through the model on its own, mapped back, probabilities averaged
    with torch.no_grad():
        manual = torch.stack([v.invert(model(v.apply(batch["image"]))["logits"]).softmax(1)
                              for v in T.views("d4")]).mean(0)
    assert torch.allclose(got, manual, atol=1e-5)


def test_views_go_through_the_network_together_and_s2_turns_with_the_image():
    model = S2Recorder().eval()
    batch = _batch(b=2, h=32, w=32, s2=True)
    ref = P.predict_batch([model], None, batch, "none")
    model.seen.clear()
    got = P.predict_batch([model], None, batch, "d4")
    assert len(model.seen) == 1  # one forward pass for all 8 views (V*B rows)
    seen = model.seen[0]
    assert seen["image"].shape[0] == 16 and seen["s2"].shape == (16, 4, 10, 8, 8)
    for k, v in enumerate(T.views("d4")):
        rows = slice(2 * k, 2 * k + 2)
        assert torch.equal(seen["image"][rows], v.apply(batch["image"])), v
        assert torch.equal(seen["s2"][rows], v.apply(batch["s2"])), v
        assert torch.equal(seen["s2_days"][rows], batch["s2_days"])
        assert torch.equal(seen["s2_pad"][rows], batch["s2_pad"])
    # and the model (equivariant only if S2 turns with the image) gives the no-TTA answer
    assert torch.allclose(got, ref, atol=1e-5)


def test_non_square_image_d4_uses_two_stacks():
    model = Pointwise().eval()
    batch = _batch(h=16, w=24)
    ref = P.predict_batch([model], None, batch, "none")
    got = P.predict_batch([model], None, batch, "d4")
    assert got.shape == (3, 13, 16, 24)
    assert torch.allclose(got, ref, atol=1e-5)


# ---------------------------------------------------------------------------------- ensemble level
def test_ensemble_weights_are_applied():
    la = [4.0] + [0.0] * 12
    lb = [0.0, 3.0] + [0.0] * 11
    a, b = Constant(la), Constant(lb)
    pa, pb = torch.tensor(la).softmax(0), torch.tensor(lb).softmax(0)
    batch = _batch(b=2, h=8, w=8)
    got = P.predict_batch([a, b], [3, 1], batch, "d4", "probs")
    want = 0.75 * pa + 0.25 * pb
    assert torch.allclose(got[1, :, 5, 2], want, atol=1e-6)
    got = P.predict_batch([a, b], [1, 3], batch, "none", "logits")
    want = (0.25 * torch.tensor(la) + 0.75 * torch.tensor(lb)).softmax(0)
    assert torch.allclose(got[0, :, 0, 7], want, atol=1e-6)
    # equal weights by default; a zero weight removes a model
    assert torch.allclose(P.predict_batch([a, b], None, batch)[0, :, 0, 0], (pa + pb) / 2, atol=1e-6)
    assert torch.allclose(P.predict_batch([a, b], [0, 2], batch)[0, :, 0, 0], pb, atol=1e-6)
    with pytest.raises(ValueError, match="weights"):
        P.predict_batch([a, b], [1], batch)


def test_models_can_get_their_own_inputs():
    three = Pointwise(c_in=3, seed=3).eval()
    five = Pointwise(c_in=5, seed=4).eval()
    b5 = _batch()
    b3 = {**b5, "image": b5["image"][:, :3]}
    got = P.predict_batch([three, five], None, [b3, b5], "flip")
    want = (P.predict_batch([three], None, b3) + P.predict_batch([five], None, b5)) / 2
    assert torch.allclose(got, want, atol=1e-5)


def test_weights_per_run_item_are_split_between_its_checkpoints(tmp_path):
    for f in ("a/fold0", "a/fold1", "b/fold0"):
        (tmp_path / f).mkdir(parents=True)
        (tmp_path / f / "best.pt").write_bytes(b"x")
    paths, w = P.resolve_checkpoints([tmp_path / "a", tmp_path / "b"], [1, 1])
    assert [p.parent.parent.name for p in paths] == ["a", "a", "b"]
    assert w == [0.5, 0.5, 1.0]
    _, w = P.resolve_checkpoints([tmp_path / "a", tmp_path / "b"], [1, 2, 3])
    assert w == [1, 2, 3]
    with pytest.raises(P.PredictError, match="weights"):
        P.resolve_checkpoints([tmp_path / "a", tmp_path / "b"], [1, 2, 3, 4])


# ------------------------------------------------------------------------------------- file level
class Conv1x1(nn.Module):
    """The cheapest real model on full 512x512 patches: one 1x1 conv over the 5 normalised bands."""

    def __init__(self, seed: int = 0, c_in: int = 5):
        super().__init__()
        torch.manual_seed(seed)
        self.c = nn.Conv2d(c_in, 13, 1)

    def forward(self, image, **kw):
        return {"logits": self.c(image)}


def _cfg(**kw) -> dict:
    return {**DEFAULTS, "bands": ["R", "G", "B", "NIR", "E"], "use_s2": False, "workers": 0,
            "batch_size": 5, "tta": "none", "precision": "fp32", "channels_last": False, **kw}


def _run(index_df, out, models=None, cfg=None, **kw):
    models = models or [Conv1x1().eval()]
    cfg = cfg or _cfg()
    logs: list[str] = []
    report = P.run_prediction(models, [cfg] * len(models), kw.pop("weights", None), index_df, out, cfg,
                              log=logs.append, **kw)
    report["logs"] = logs
    return report


def _preds(folder) -> dict[str, np.ndarray]:
    return {p.name[5:11]: read_label(p) for p in sorted(folder.glob("PRED_*.tif"))}


def test_every_patch_gets_a_prediction_when_batches_do_not_divide(synth_index, tmp_path):
    from src.dataset import FlairDataset
    from src.submit import validate

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
        want = model(sample["image"][None])["logits"][0].argmax(0).numpy()
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
    # the manifest keeps the time measured over both runs
    assert again["n_timed"] == len(test) + 4 and again["infer_s"] > 0  # 16 files written in all


def test_another_setup_is_refused_unless_overwrite(synth_index, tmp_path):
    test = synth_index["test"]
    out = tmp_path / "pred"
    _run(test, out, [Conv1x1(0).eval(), Conv1x1(1).eval()], weights=[1, 1])
    first = _preds(out)
    (out / f"PRED_{test['id'].iloc[0]}.tif").unlink()
    with pytest.raises(P.PredictError, match="weights differs"):
        _run(test, out, [Conv1x1(0).eval(), Conv1x1(1).eval()], weights=[1, 0])
    with pytest.raises(P.PredictError, match="tta differs"):
        _run(test, out, [Conv1x1(0).eval(), Conv1x1(1).eval()], weights=[1, 1], tta="flip")
    report = _run(test, out, [Conv1x1(0).eval(), Conv1x1(1).eval()], weights=[1, 0], overwrite=True)
    assert report["n_written"] == len(test)
    solo = _run(test, tmp_path / "solo", [Conv1x1(0).eval()])
    assert solo["n_written"] == len(test)
    assert all(np.array_equal(a, b) for a, b in zip(_preds(out).values(), _preds(tmp_path / "solo").values()))
    assert any(not np.array_equal(a, _preds(out)[k]) for k, a in first.items() if k in _preds(out))
    # a folder of PRED files that this tool did not write is not silently mixed either
    (out / P.MANIFEST).unlink()
    with pytest.raises(P.PredictError, match="no predict.json"):
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
    left = sorted(p.name for p in out.iterdir() if p.name != P.MANIFEST)
    assert left and all(n.startswith("PRED_") for n in left)  # no temp files left behind
    assert all(P.pred_ok(out / n) for n in left) and len(left) < len(test)
    monkeypatch.setattr(tifffile, "imwrite", real)
    report = _run(test, out)
    assert report["n_written"] == len(test) - len(left) and len(_preds(out)) == len(test)


def test_saved_probabilities_combine_later(synth_index, tmp_path):
    from src.dataset import FlairDataset

    test = synth_index["test"].iloc[:4]
    a, b = Conv1x1(0).eval(), Conv1x1(5).eval()
    _run(test, tmp_path / "pa", [a], probs_dir=tmp_path / "qa")
    _run(test, tmp_path / "pb", [b], probs_dir=tmp_path / "qb")
    pid = test["id"].iloc[1]
    q = P.load_prob(P.prob_path(tmp_path / "qa", pid))
    assert q.dtype == np.uint8 and q.shape == (13, 512, 512)
    assert abs(q.astype(int).sum(0) - 255).max() <= 7  # rounding of 13 classes
    sample = FlairDataset(test, _cfg(), train=False, labels=False)[1]
    probs = P.predict_batch([a], None, {"image": sample["image"][None]})[0].numpy()
    assert np.abs(q / 255.0 - probs).max() <= 0.5 / 255 + 1e-6  # round(p * 255)
    logs: list[str] = []
    P.combine([tmp_path / "qa", tmp_path / "qb"], tmp_path / "only_a", test["id"], [1, 0], log=logs.append)
    assert all(np.array_equal(x, P.load_prob(P.prob_path(tmp_path / "qa", k)).argmax(0))
               for k, x in _preds(tmp_path / "only_a").items())
    P.combine([tmp_path / "qa", tmp_path / "qb"], tmp_path / "ab", test["id"], [1, 3], log=logs.append)
    qa = P.load_prob(P.prob_path(tmp_path / "qa", pid)).astype(np.float32)
    qb = P.load_prob(P.prob_path(tmp_path / "qb", pid)).astype(np.float32)
    assert np.array_equal(read_label(tmp_path / "ab" / f"PRED_{pid}.tif"), (0.25 * qa + 0.75 * qb).argmax(0))
    # a folder that lacks an id is named
    P.prob_path(tmp_path / "qb", pid).unlink()
    with pytest.raises(P.PredictError, match="qb: 1 of 4 PROB files missing"):
        P.combine([tmp_path / "qa", tmp_path / "qb"], tmp_path / "ab2", test["id"], log=logs.append)


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
    s2_cfg = _cfg(use_s2=True, s2_size=8)
    rec = S2Recorder().eval()
    models = [Conv1x1(0, c_in=3).eval(), rec]
    report = P.run_prediction(models, [rgb_cfg, s2_cfg], None, test, tmp_path / "pred", _cfg(tta="flip"),
                              log=lambda s: None)
    assert report["n_written"] == 3
    assert rec.seen and rec.seen[0]["image"].shape[1] == 5 and rec.seen[0]["s2"].shape[-2:] == (8, 8)


# ------------------------------------------------------------------------------------- command line
def _fake_run(runs, seeds=(0, 1)) -> None:
    """Two fold checkpoints of an untrained small model, saved the way training saves them."""
    from src.checkpoint import save_checkpoint
    from src.models import build_model

    cfg = {**DEFAULTS, "encoder": "resnet18", "encoder_weights": "none", "use_s2": False, "fusion": "none",
           "workers": 0, "batch_size": 2, "channels_last": False}
    for fold, seed in enumerate(seeds):
        torch.manual_seed(seed)
        model = build_model(cfg)
        save_checkpoint(runs / f"fold{fold}" / "best.pt", {"model": model.state_dict(), "config": cfg,
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
    assert "2 model(s)" in out and "projected for the 16050 test patches" in out and "mIoU" in out
    zips = list(subs.glob("r18_15-00_*.zip"))  # baseline 15 min, then our measured time
    assert len(zips) == 1
    from src.submit import validate

    assert validate(zips[0], test["id"])["files"] == 3
    assert (tmp_path / "pred_scores.json").is_file() and (tmp_path / "pred_confusion.png").is_file()
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
        assert np.array_equal(x, P.load_prob(P.prob_path(tmp_path / "probs", k)).argmax(0))
        assert (x == pred[k]).mean() > 0.9


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
