"""Training knobs: encoder_lr_ratio (per-group lr through the schedule and across a resume), class_weights
inverse | inverse_sqrt (from the class histogram cache, checked against the masks counted by hand), avg_last
(avg.pt = the exact mean of the last epochs' weights, the same bits after a resume) and sync_bn on CPU.
One tiny 3-epoch run on every training domain (no validation: it would cost most of the time) and the same
run resumed after epoch 2, on the synthetic tree."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from src import train as T
from src.core.checkpoint import load_checkpoint, save_checkpoint
from src.core.config import load_settings
from src.core.errors import ConfigError
from src.core.files import read_label
from src.core.flair import NUM_CLASSES, NUM_RAW, OTHER, remap
from src.core.settings import Settings
from src.core.tables import fold_rows
from src.data.loader import WeightedDraw
from src.models.flair_model import build_model, load_for_inference
from src.models.losses import Criterion
from src.training import loop as L
from src.training.prepare import fold_inputs, inverse_frequency_weights, rare_patch_weights, resolve_knobs
from src.training.state import (
    RESUME_ONLY,
    Progress,
    Schedule,
    averaged_epochs,
    build_nets,
    checkpoint_state,
    encoder_of,
    param_groups,
    resume,
    set_lr,
    sync_batchnorm,
)

TINY = ["encoder=tu-test_resnet", "encoder_weights=none", "crop_size=64", "batch_size=4", "workers=0",
        "lr=0.001", "warmup_epochs=0.5", "ema=0.9", "channels_last=false", "precision=fp32", "log_every=1",
        "tensorboard=false", "oof=false", "max_train_batches=2", "max_val_batches=1"]
KNOBS = ["epochs=3", "encoder_lr_ratio=0.1", "avg_last=2", "class_weights=inverse_sqrt", "sample_rare=0.5"]
STEPS_PER_EPOCH = 2  # max_train_batches, accum_steps=1


@pytest.fixture(scope="module")
def data_dir(synth_folds_dir, tmp_path_factory) -> Path:
    """A private copy of the folds data dir (the runs here rewrite its class_hist.csv cache)."""
    data = tmp_path_factory.mktemp("knobs_data")
    for name in ("index_train.csv", "index_test.csv", "folds.csv", "class_hist.csv"):
        if (synth_folds_dir / name).exists():
            shutil.copy(synth_folds_dir / name, data / name)
    return data


def run_args(data: Path, runs: Path, resume: int = 0) -> list[str]:
    return ["--fold", "all", "--resume", str(resume), *TINY, *KNOBS, f"data_dir={data}", f"runs_dir={runs}",
            "name=k"]


def _recording(records: list[list[tuple[float, float]]]):
    def set_lr_and_record(optimizer: torch.optim.Optimizer, lr: float) -> None:
        set_lr(optimizer, lr)
        records.append([(g["lr"], g.get("lr_scale", 1.0)) for g in optimizer.param_groups])
    return set_lr_and_record


def _counting(calls: list[int]):
    def checkpoint_state_and_count(*args, **kw):
        calls.append(1)
        return checkpoint_state(*args, **kw)
    return checkpoint_state_and_count


def _keeping_epochs(saved: list[Path]):
    def save_and_keep(path, state):
        out = save_checkpoint(path, state)
        if Path(path).name == "last.pt":  # a copy of every epoch's last.pt
            saved.append(shutil.copy(out, Path(path).with_name(f"last_e{state['epoch']}.pt")))
        return out
    return save_and_keep


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory) -> dict:
    """A 3-epoch run (every optimizer step's group lrs recorded, every epoch's last.pt kept) and the same
    run resumed from its epoch-2 last.pt in another folder."""
    tmp = tmp_path_factory.mktemp("knobs_runs")
    ref_lrs: list = []
    resumed_lrs: list = []
    saved: list[Path] = []
    states: list[int] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(L, "set_lr", _recording(ref_lrs))
        mp.setattr(L, "save_checkpoint", _keeping_epochs(saved))
        mp.setattr(L, "checkpoint_state", _counting(states))
        ref = T.main(run_args(data_dir, tmp / "ref"))
    ref_dir = tmp / "ref" / "k" / "foldall"
    res_dir = tmp / "resumed" / "k" / "foldall"
    res_dir.mkdir(parents=True)
    shutil.copy(ref_dir / "last_e2.pt", res_dir / "last.pt")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(L, "set_lr", _recording(resumed_lrs))
        resumed = T.main(run_args(data_dir, tmp / "resumed", resume=1))
    return {"ref": ref, "resumed": resumed, "ref_dir": ref_dir, "res_dir": res_dir, "ref_lrs": ref_lrs,
            "resumed_lrs": resumed_lrs, "states_built": len(states)}


# ----------------------------------------------------------------------------- encoder_lr_ratio
def test_param_groups_split_the_encoder_and_keep_weight_decay_rules():
    model = build_model(load_settings(None, {"encoder": "tu-test_resnet", "encoder_weights": "none"}))
    groups = param_groups(model, 0.01, encoder_lr_ratio=0.1)
    enc = {id(p) for p in encoder_of(model).parameters()}
    assert enc == {id(p) for n, p in model.named_parameters() if n.startswith("net.encoder.")}
    assert [(g["lr_scale"], g["weight_decay"]) for g in groups] == [(1.0, 0.01), (1.0, 0.0), (0.1, 0.01),
                                                                   (0.1, 0.0)]
    for g in groups:
        assert all((id(p) in enc) == (g["lr_scale"] == 0.1) for p in g["params"])
        assert all((p.ndim > 1) == (g["weight_decay"] > 0) for p in g["params"])
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    # ratio 1: the two groups of earlier versions (their checkpoints still resume), no multiplier
    plain = param_groups(model, 0.01)
    assert len(plain) == 2 and not any("lr_scale" in g for g in plain)
    opt = torch.optim.AdamW(groups, lr=1.0)
    set_lr(opt, 0.5)
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.5, 0.05, 0.05]
    with pytest.raises(ConfigError, match="has no `encoder`"):
        param_groups(torch.nn.Linear(2, 2), 0.01, encoder_lr_ratio=0.1)


def test_encoder_lr_ratio_holds_at_every_step_and_after_resume(runs):
    ref, res = runs["ref_lrs"], runs["resumed_lrs"]
    assert len(ref) == 3 * STEPS_PER_EPOCH and len(res) == STEPS_PER_EPOCH
    cfg = Settings(**load_checkpoint(runs["ref_dir"] / "last.pt")["config"])
    sched = Schedule.of(cfg, STEPS_PER_EPOCH)
    for step, groups in enumerate(ref):
        assert [s for _, s in groups] == [1.0, 1.0, 0.1, 0.1]
        rest, enc = groups[0][0], groups[2][0]
        assert rest == sched.lr(step) and enc == rest * 0.1  # warmup and cosine keep the ratio
    assert res == ref[-STEPS_PER_EPOCH:]  # the resumed epoch steps with the same lrs
    saved = load_checkpoint(runs["res_dir"] / "last.pt")["optimizer"]["param_groups"]
    assert [g["lr_scale"] for g in saved] == [1.0, 1.0, 0.1, 0.1]


def test_resume_takes_this_runs_ratio_and_refuses_another_group_layout():
    def nets_at(ratio: float):
        cfg = load_settings(None, {"encoder": "tu-test_resnet", "encoder_weights": "none", "ema": 0.0,
                                 "encoder_lr_ratio": ratio})
        return cfg, build_nets(cfg, build_model(cfg), torch.device("cpu"))

    cfg, nets = nets_at(0.1)
    state = checkpoint_state(cfg, "0", nets, Progress(), Schedule.of(cfg, 2))
    _, other = nets_at(0.2)
    resume(other, state)  # an encoder_lr_ratio override on resume applies from the next step
    assert [g["lr_scale"] for g in other.optimizer.param_groups] == [1.0, 1.0, 0.2, 0.2]
    with pytest.raises(ConfigError, match="encoder_lr_ratio cannot change between 1 and another value"):
        resume(nets_at(1.0)[1], state)


def test_resume_with_knobs_is_bit_identical(runs):
    a, b = load_checkpoint(runs["ref_dir"] / "last.pt"), load_checkpoint(runs["res_dir"] / "last.pt")
    for part in ("raw_model", "model"):
        assert all(torch.equal(v, b[part][k]) for k, v in a[part].items()), part
    for key in ("step", "lr", "train_loss"):
        assert [r[key] for r in runs["ref"]["history"]] == [r[key] for r in runs["resumed"]["history"]], key


# ----------------------------------------------------------------------------- class_weights=inverse*
def hand_counts(data: Path, fold: str = "0") -> np.ndarray:
    """Pixel counts of classes 0..12 over a fold's training masks, read and remapped here."""
    return hand_counts_of(fold_rows(data, fold)[0]["msk_path"])


def hand_counts_of(mask_paths) -> np.ndarray:
    counts = np.zeros(NUM_CLASSES, dtype=np.int64)
    for path in mask_paths:
        raw = read_label(path).ravel()
        raw = raw[(raw >= 1) & (raw <= NUM_RAW)]
        counts += np.bincount(remap(raw).astype(np.int64), minlength=NUM_CLASSES)
    return counts


@pytest.mark.parametrize("word, power", [("inverse", 1.0), ("inverse_sqrt", 0.5)])
def test_inverse_weights_match_the_masks_counted_by_hand(data_dir, word, power, capsys):
    counts = hand_counts(data_dir)
    present = [c for c in range(NUM_CLASSES) if c != OTHER and counts[c] > 0]
    freq = counts / counts[:OTHER].sum()
    raw = {c: 1.0 / freq[c] ** power for c in present}
    mean = sum(raw.values()) / len(raw)
    expected = [raw[c] / mean if c in raw else 0.0 for c in range(NUM_CLASSES)]
    train_df, _ = fold_rows(data_dir, "0")
    cfg = resolve_knobs(load_settings(None, {"class_weights": word, "data_dir": str(data_dir)}), train_df)
    assert cfg.class_weights == pytest.approx(expected, rel=1e-12)
    assert cfg.class_weights[OTHER] == 0.0
    assert f"class_weights={word}: [" in capsys.readouterr().out
    w = Criterion(cfg).w  # the loss takes the resolved list; the S2 head the same list
    assert torch.equal(w, Criterion(cfg).w_s2) and w.tolist() == pytest.approx(expected, rel=1e-6)


def test_absent_classes_weigh_zero_and_words_need_resolving():
    counts = np.array([100, 0, 25, 400, 0, 0, 0, 0, 0, 0, 0, 0, 999])
    w = inverse_frequency_weights(counts, 1.0)
    assert w[1] == w[4] == w[OTHER] == 0.0
    assert np.mean([w[0], w[2], w[3]]) == pytest.approx(1.0) and w[2] == pytest.approx(4 * w[0])
    with pytest.raises(ConfigError, match="class_weights=inverse is computed from the training split"):
        Criterion(load_settings(None, {"class_weights": "inverse"}))
    with pytest.raises(ConfigError, match="encoder_lr_ratio"):
        load_settings(None, {"encoder_lr_ratio": -1.0})
    for word in ("inverse", "inverse_sqrt"):  # valid settings: their numbers are checked once resolved
        assert load_settings(None, {"class_weights": word}).class_weights_from_data


@pytest.mark.parametrize("bad, message", [(["loss=dice"], "loss: expected one of"),
                                          (["avg_last=-1"], "avg_last: expected a value >= 0"),
                                          (["encoder_lr_ratio=-1"],
                                           "encoder_lr_ratio: expected a value >= 0")])
def test_setting_errors_come_before_the_data_is_read(tmp_path, capsys, bad, message):
    """With class_weights=inverse too (which reads the training masks), a bad setting is reported first:
    here there is no data at all, and the error is still the setting's."""
    with pytest.raises(SystemExit) as exit_info:
        T.main(["--fold", "0", *TINY, "class_weights=inverse", *bad, f"data_dir={tmp_path / 'nodata'}",
                f"runs_dir={tmp_path / 'runs'}"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and message in err and "index_train.csv" not in err


# ----------------------------------------------------------------------------- sample_rare
def test_rare_patch_weights_match_the_masks_counted_by_hand(data_dir):
    """sample_rare=p: patch i weighs sum_c share_ic * f_c ** -p over the scored classes (masks read here),
    mean 1; the patches richest in the rarest class weigh most; fold_inputs adds them, p=0 adds nothing."""
    train_df, _ = fold_rows(data_dir, "0")
    per_patch = np.stack([hand_counts_of([p]) for p in train_df["msk_path"]]).astype(np.float64)
    per_patch[:, OTHER] = 0
    freq = per_patch.sum(0) / per_patch.sum()
    rarity = np.where(freq > 0, freq, 1.0) ** -0.5
    want = (per_patch @ rarity) / per_patch.sum(1)
    cfg = load_settings(None, {"sample_rare": 0.5, "data_dir": str(data_dir)})
    got = rare_patch_weights(cfg, train_df)
    np.testing.assert_allclose(got, want / want.mean(), rtol=1e-9)
    rarest = int(np.argmin(np.where(freq > 0, freq, np.inf)))
    assert got[np.argmax(per_patch[:, rarest] / per_patch.sum(1))] > 1.0
    assert fold_inputs(cfg, "0")[1]["draw_weight"].tolist() == pytest.approx(got.tolist())
    assert "draw_weight" not in fold_inputs(cfg.with_values(sample_rare=0.0), "0")[1]


def test_weighted_draw_is_a_function_of_seed_and_epoch_shared_by_ranks():
    weights = [1.0, 0.0, 3.0, 6.0]
    ranks = [WeightedDraw(weights, 2, r, seed=7) for r in (0, 1)]
    first = [list(d) for d in ranks]
    assert all(len(f) == len(d) == 2 for f, d in zip(first, ranks))
    assert first == [list(d) for d in ranks]  # the same epoch: the same draws
    for d in ranks:
        d.set_epoch(1)
    assert [list(d) for d in ranks] != first
    counts = np.zeros(4)
    for epoch in range(2000):  # the shares follow the weights; index 1 (weight 0) never drawn
        for d in ranks:
            d.set_epoch(epoch)
            np.add.at(counts, list(d), 1)
    assert counts[1] == 0
    np.testing.assert_allclose(counts / counts.sum(), [0.1, 0.0, 0.3, 0.6], atol=0.02)
    with pytest.raises(ValueError, match="weights must be >= 0"):
        WeightedDraw([0.0, 0.0], 1, 0, seed=0)


def test_run_saves_the_resolved_weights(runs, data_dir):
    expected = inverse_frequency_weights(hand_counts(data_dir, "all"), 0.5)
    for name in ("last.pt", "best.pt", "avg.pt"):
        assert load_checkpoint(runs["ref_dir"] / name)["config"]["class_weights"] == pytest.approx(expected)
    assert load_settings(runs["ref_dir"] / "config.yaml").class_weights == pytest.approx(expected)


# ----------------------------------------------------------------------------- avg_last
def test_avg_pt_is_the_mean_of_the_last_epochs_and_resume_gives_the_same_bits(runs):
    assert list(averaged_epochs(3, 2)) == [2, 3] and list(averaged_epochs(2, 5)) == [1, 2]
    e2 = load_checkpoint(runs["ref_dir"] / "last_e2.pt")["raw_model"]
    e3 = load_checkpoint(runs["ref_dir"] / "last_e3.pt")["raw_model"]
    avg = load_checkpoint(runs["ref_dir"] / "avg.pt")
    assert avg["averaged_epochs"] == [2, 3] and avg["epoch"] == 3
    assert not set(RESUME_ONLY) & set(avg)  # weights to predict with: no optimizer state, sums, ...
    assert runs["states_built"] == 3  # one checkpoint state per epoch, avg.pt's included
    for k, v in avg["model"].items():
        if v.dtype.is_floating_point:  # BatchNorm running statistics included
            assert torch.equal(v, ((e2[k].double() + e3[k].double()) / 2).to(v.dtype)), k
        else:
            assert torch.equal(v, e3[k]), k
    assert any(not torch.equal(e2[k], e3[k]) for k in e2)  # the two epochs differ: a real average
    resumed = load_checkpoint(runs["res_dir"] / "avg.pt")
    assert all(torch.equal(v, resumed["model"][k]) for k, v in avg["model"].items())
    model, cfg = load_for_inference(runs["ref_dir"] / "avg.pt")  # prediction reads it like best.pt
    assert all(torch.equal(v, avg["model"][k]) for k, v in model.state_dict().items())
    assert not (load_checkpoint(runs["ref_dir"] / "last_e1.pt")["avg"] or {}).get("count")  # epoch 1: none


# ----------------------------------------------------------------------------- sync_bn
def test_sync_bn_is_a_note_on_cpu_and_converts_in_place_elsewhere(capsys):
    cfg = load_settings(None, {"encoder": "tu-test_resnet", "encoder_weights": "none", "sync_bn": True,
                             "channels_last": False})
    nets = build_nets(cfg, build_model(cfg), torch.device("cpu"))
    model = nets.model
    assert not sync_batchnorm(nets, cfg, 2, torch.device("cpu"))
    assert "note: sync_bn=true ignored: SyncBatchNorm needs CUDA" in capsys.readouterr().out
    assert nets.model is model and not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    # the conversion itself (what a CUDA DDP run does): same tensors, so optimizer and checkpoints still fit
    params, keys = [id(p) for p in model.parameters()], list(model.state_dict())
    assert sync_batchnorm(nets, cfg, 2, torch.device("cuda", 0))
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in nets.model.modules())
    assert [id(p) for p in nets.model.parameters()] == params and list(nets.model.state_dict()) == keys
    assert nets.train_model is nets.model
    assert not sync_batchnorm(nets, cfg.with_values(sync_bn=False), 2, torch.device("cuda", 0))
