"""Pseudo-labels: PSEUDO files made from real PROB files round-trip (and resume, and refuse another source);
the threshold ignores exactly the pixels below it, which then add nothing to any loss; pseudo_weight scales
a pseudo sample's loss; augmentation keeps ignored pixels; pseudo rows join training only (never
validation, never training ids); a tiny training run with pseudo_dir works end to end; bad inputs are
one-line errors naming the file."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from src import pseudo as P
from src import train as T
from src.core.config import load_settings
from src.core.errors import ConfigError, DataError
from src.core.settings import Settings
from src.core.tables import fold_rows, load_index, write_folds
from src.data.augment import Augment
from src.data.dataset import FlairDataset
from src.data.device_augment import d4_batch
from src.data.loader import collate
from src.data.pseudo_labels import (
    IGNORE_U8,
    PSEUDO_MANIFEST,
    PSEUDO_REPORT,
    add_pseudo_rows,
    kept_counts,
    min_level,
    pseudo_mask,
    pseudo_path,
    read_pseudo,
    write_pseudo,
)
from src.models.losses import IGNORE, Criterion
from src.prediction.stores import prob_path, save_prob

TINY = ["arch=FPN", "encoder=tu-test_resnet", "encoder_weights=none", "crop_size=64", "batch_size=4",
        "workers=0", "lr=0.001", "warmup_epochs=0.5", "ema=0.9", "channels_last=false", "precision=fp32",
        "epochs=1", "max_train_batches=1", "max_val_batches=1", "tensorboard=false", "oof=false"]
LEVELS = np.array([0, 60, 120, 178, 179, 200, 255], dtype=np.uint8)  # 0.7 keeps 179 (179/255 >= 0.7)


def fake_probs(seed: int, size: int = 512) -> np.ndarray:
    """uint8 (13,H,W) saved probabilities: 32-px blocks of one class and one confidence level (compress
    well); the other classes share the rest, always below the winner."""
    rng = np.random.default_rng(seed)
    n = size // 32
    cls = np.kron(rng.integers(0, 13, (n, n)), np.ones((32, 32), dtype=np.int64))
    top = np.kron(rng.choice(LEVELS[1:], (n, n)), np.ones((32, 32), dtype=np.int64))
    rest = (255 - top) // 13
    q = np.broadcast_to(rest, (13, size, size)).copy()
    np.put_along_axis(q, cls[None], top[None], axis=0)
    return q.astype(np.uint8)


@pytest.fixture(scope="module")
def made(tmp_path_factory, synth_data_dir) -> dict:
    """Data dir (2 folds of 2 patches), 3 test patches with PROB files, and their pseudo-label folder."""
    from src.prep.folds import make_folds

    data = tmp_path_factory.mktemp("pseudo_data")
    for name in ("index_train.csv", "index_test.csv"):
        shutil.copy(synth_data_dir / name, data / name)
    folds = make_folds(data, k=2, seed=0, plot=False)
    write_folds(folds.groupby("fold").head(2), data / "folds.csv")
    test = load_index(data / "index_test.csv").head(3)
    index = data / "index_pseudo.csv"
    test.to_csv(index, index=False)
    probs = tmp_path_factory.mktemp("probs")
    ids = test["id"].astype(str).tolist()
    for k, pid in enumerate(ids):
        save_prob(prob_path(probs, pid), fake_probs(k))
    (probs / "probs.json").write_text(json.dumps({"format": "x", "models": ["m"], "tta": "d4"}))
    out = tmp_path_factory.mktemp("pseudo")
    manifest = P.main(["--probs", str(probs), "--index", str(index), "--out", str(out)])
    return {"data": data, "index": index, "probs": probs, "out": out, "ids": ids, "manifest": manifest}


def cfg_of(made: dict, *extra: str) -> Settings:
    return load_settings(None, [*TINY, f"data_dir={made['data']}", f"pseudo_dir={made['out']}", *extra])


# ------------------------------------------------------------------------------------------ the files
def test_files_round_trip_with_manifest_and_report(made):
    levels = np.zeros((13, 256), dtype=np.int64)
    for k, pid in enumerate(made["ids"]):
        q = fake_probs(k)
        pair = read_pseudo(pseudo_path(made["out"], pid))
        assert pair.dtype == np.uint8 and pair.shape == (2, 512, 512)
        assert np.array_equal(pair[0], q.argmax(0)) and np.array_equal(pair[1], q.max(0))
        np.add.at(levels, (pair[0].ravel(), pair[1].ravel()), 1)
    m = json.loads((made["out"] / PSEUDO_MANIFEST).read_text())
    assert m["complete"] and m["ids"] == made["ids"] and m["skipped"] == []
    assert m["source"] == {"format": "x", "models": ["m"], "tta": "d4"}
    assert np.array_equal(np.array(m["levels"]), levels) and m["pixels"] == 3 * 512 * 512
    kept = (levels[:, 179:]).sum(1)
    assert m["class_pixels_at"]["0.7"] == kept.tolist() == kept_counts(levels, 0.7).tolist()
    assert m["share_at"]["0.7"] == pytest.approx(kept.sum() / levels.sum())
    report = (made["out"] / PSEUDO_REPORT).read_text().splitlines()
    assert report[0].startswith("class,name,pixels,share,kept_0.5") and len(report) == 14


def test_rerun_resumes_and_another_source_is_refused(made, tmp_path, capsys):
    out = tmp_path / "p"
    args = ["--probs", str(made["probs"]), "--index", str(made["index"]), "--out", str(out)]
    P.main(args)
    first = pseudo_path(out, made["ids"][0])
    first.unlink()  # a killed run: one file missing
    stamp = pseudo_path(out, made["ids"][1]).stat().st_mtime_ns
    P.main(args)
    assert first.is_file() and pseudo_path(out, made["ids"][1]).stat().st_mtime_ns == stamp
    probs = tmp_path / "probs2"
    shutil.copytree(made["probs"], probs)
    (probs / "probs.json").write_text(json.dumps({"models": ["other"]}))
    capsys.readouterr()
    with pytest.raises(SystemExit):
        P.main(["--probs", str(probs), *args[2:]])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out) in err and "another source" in err
    P.main(["--probs", str(probs), *args[2:], "--overwrite"])
    assert json.loads((out / PSEUDO_MANIFEST).read_text())["source"] == {"models": ["other"]}


def test_bad_inputs_are_one_line_errors_naming_the_file(made, tmp_path, capsys):
    probs = tmp_path / "probs"
    shutil.copytree(made["probs"], probs)
    lost = prob_path(probs, made["ids"][1])
    lost.unlink()
    base = ["--index", str(made["index"]), "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit):
        P.main(["--probs", str(probs), *base])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{lost}: probability file not found" in err
    skipped = tmp_path / "skipped.txt"  # predict's unreadable patches (fallback PRED, no PROB) are left out
    skipped.write_text(f"{made['ids'][1]}\tunreadable\n")
    m = P.main(["--probs", str(probs), *base, "--skipped", str(skipped)])
    assert m["skipped"] == [made["ids"][1]] and len(m["ids"]) == 2
    save_prob(lost, np.zeros((12, 64, 64), np.uint8))  # wrong shape
    capsys.readouterr()
    with pytest.raises(SystemExit):
        P.main(["--probs", str(probs), "--index", str(made["index"]), "--out", str(tmp_path / "o2")])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(lost) in err and "(13,H,W)" in err
    bad = tmp_path / "PSEUDO_1.tif"
    write_pseudo(bad, np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(DataError, match=f"^{bad}: expected a uint8 \\(2,H,W\\)"):
        read_pseudo(bad)


# ------------------------------------------------------------------------------------------ threshold, loss
def test_threshold_ignores_exactly_the_pixels_below_it():
    rng = np.random.default_rng(0)
    conf = np.arange(64 * 64).reshape(64, 64) % 256  # every level
    pair = np.stack([rng.integers(0, 13, (64, 64)), conf]).astype(np.uint8)
    for t in (0.0, 0.2, 0.5, 0.7, 0.70001, 0.9, 1.0):
        mask = pseudo_mask(pair, min_level(t))
        below = pair[1] / 255.0 < t
        assert np.array_equal(mask == IGNORE_U8, below), t
        assert np.array_equal(mask[~below], pair[0][~below])
    assert min_level(0.7) == 179 and min_level(0.2) == 51
    with pytest.raises(ConfigError, match="pseudo_threshold"):
        min_level(1.5)


@pytest.mark.parametrize("loss", ["ce", "ce_dice", "focal"])
def test_ignored_pixels_add_nothing_and_weight_scales_a_pseudo_sample(loss):
    torch.manual_seed(0)
    crit = Criterion(load_settings(None, [f"loss={loss}"]))
    mask = torch.randint(0, 12, (2, 16, 16))
    low = torch.rand(2, 16, 16) < 0.4
    mask_u8 = mask.masked_fill(low, IGNORE_U8)  # as the dataset ships it (uint8 255, long on the device)
    logits = torch.randn(2, 13, 16, 16, requires_grad=True)
    base, _ = crit({"logits": logits}, mask_u8)
    base.backward()
    assert torch.all(logits.grad.permute(0, 2, 3, 1)[low] == 0)  # no gradient through ignored pixels
    other = logits.detach().clone()
    other.permute(0, 2, 3, 1)[low] = 50 * torch.randn(int(low.sum()), 13)
    assert float(crit({"logits": other}, mask_u8)[0]) == pytest.approx(float(base), rel=1e-6)
    same, _ = crit({"logits": logits}, mask.masked_fill(low, IGNORE))
    assert float(same) == pytest.approx(float(base), rel=1e-6)
    # a batch of pseudo samples only: pseudo_weight scales the loss
    for w in (0.0, 0.5, 2.0):
        scaled, _ = crit({"logits": logits}, mask_u8, weight=torch.full((2,), w))
        assert float(scaled) == pytest.approx(w * float(base), rel=1e-6, abs=1e-7)
    if loss != "ce_dice":  # per pixel losses: sample 1's terms weigh w, sample 0's weigh 1 (Dice is a ratio)
        w = 0.25
        mixed, _ = crit({"logits": logits}, mask_u8, weight=torch.tensor([1.0, w]))
        if loss == "ce":
            cw = crit.w
            m = mask.masked_fill(low, 0)
            px = F.cross_entropy(logits, m, weight=cw, reduction="none") * ~low
            expect = (px[0].sum() + w * px[1].sum()) / (cw[m] * ~low).sum()
        else:
            n = (~low).flatten(1).sum(1).double()
            parts = [float(crit({"logits": logits[b:b + 1]}, mask_u8[b:b + 1])[0]) for b in (0, 1)]
            expect = (parts[0] * n[0] + w * parts[1] * n[1]) / n.sum()
        assert float(mixed) == pytest.approx(float(expect), rel=1e-5)


def test_augmentation_keeps_ignored_pixels():
    rng = np.random.default_rng(1)
    mask = rng.integers(0, 12, (64, 64)).astype(np.uint8)
    mask[rng.random((64, 64)) < 0.3] = IGNORE_U8
    batch = torch.from_numpy(np.stack([mask, mask]))
    turned = d4_batch(batch, torch.tensor([3, 6]))
    for b in range(2):
        assert torch.equal(turned[b].flatten().sort().values, batch[b].flatten().sort().values)
    aug = Augment("heavy", crop_size=48)
    for seed in range(6):  # zoom/rotation warps (nearest): only label values, IGNORE_U8 or the fill 12
        out = aug(np.random.default_rng(seed), np.zeros((5, 64, 64), np.uint8), mask)
        assert set(np.unique(out["mask"])) <= set(np.unique(mask)) | {12}


# ------------------------------------------------------------------------------------------ training
def test_pseudo_rows_join_training_only_and_samples_carry_weights(made):
    cfg = cfg_of(made, "pseudo_weight=0.5", "augment=none", "crop_size=512")
    train_df, val_df = fold_rows(made["data"], "0")
    lines: list[str] = []
    rows = add_pseudo_rows(cfg, "0", train_df, val_df, lines.append)
    assert len(rows) == len(train_df) + 3 and rows["pseudo"].sum() == 3
    assert set(rows.loc[rows["pseudo"], "id"]) == set(made["ids"])
    assert not set(made["ids"]) & set(val_df["id"]) and "added 3 pseudo-labelled patches" in lines[0]
    assert add_pseudo_rows(load_settings(None, TINY), "0", train_df, val_df) is train_df  # no pseudo_dir
    ds = FlairDataset(rows, cfg, train=True)
    k = int(np.flatnonzero(rows["pseudo"].to_numpy())[0])
    sample = ds[k]
    pair = read_pseudo(pseudo_path(made["out"], rows.loc[k, "id"]))
    assert float(sample["weight"]) == 0.5 and ds[0]["weight"] == 1.0
    assert np.array_equal(sample["mask"].numpy(), pseudo_mask(pair, min_level(0.7)))
    batch = collate([ds[0], sample])
    assert batch["weight"].tolist() == [1.0, 0.5] and batch["mask"].dtype == torch.uint8
    assert "weight" not in FlairDataset(val_df, cfg, train=False)[0]
    lines.clear()  # pseudo_only: the pseudo-labelled patches alone (the 2nd place's fine-tune)
    alone = add_pseudo_rows(cfg.with_values(pseudo_only=True), "0", train_df, val_df, lines.append)
    assert len(alone) == 3 and alone["pseudo"].all() and "alone" in lines[0]
    with pytest.raises(ConfigError, match="pseudo_only=true needs pseudo_dir"):
        add_pseudo_rows(load_settings(None, [*TINY, "pseudo_only=true"]), "0", train_df, val_df)


def test_refused_pseudo_folders_name_the_file(made, tmp_path):
    train_df, val_df = fold_rows(made["data"], "0")
    folder = tmp_path / "p"
    shutil.copytree(made["out"], folder)
    cfg = cfg_of(made).with_values(pseudo_dir=str(folder))
    m = json.loads((folder / PSEUDO_MANIFEST).read_text())
    train_ids = load_index(made["data"] / "index_train.csv")
    (folder / PSEUDO_MANIFEST).write_text(json.dumps({**m, "ids": [train_ids["id"].iloc[0]],
                                                     "index": str(made["data"] / "index_train.csv")}))
    with pytest.raises(DataError, match=f"^{folder / PSEUDO_MANIFEST}: 1 pseudo-labelled ids are training"):
        add_pseudo_rows(cfg, "0", train_df, val_df)
    moved = load_index(made["index"]).assign(domain=val_df["domain"].iloc[0])  # a validation domain
    moved.to_csv(tmp_path / "moved.csv", index=False)
    (folder / PSEUDO_MANIFEST).write_text(json.dumps({**m, "index": str(tmp_path / "moved.csv")}))
    with pytest.raises(DataError, match="validation domain"):
        add_pseudo_rows(cfg, "0", train_df, val_df)
    (folder / PSEUDO_MANIFEST).write_text(json.dumps({**m, "complete": False}))
    with pytest.raises(DataError, match="incomplete"):
        add_pseudo_rows(cfg, "0", train_df, val_df)
    (folder / PSEUDO_MANIFEST).write_text(json.dumps(m))
    gone = pseudo_path(folder, made["ids"][2])
    gone.unlink()
    with pytest.raises(DataError, match=f"^{gone}: pseudo-label file not found"):
        add_pseudo_rows(cfg, "0", train_df, val_df)
    write_pseudo(gone, np.zeros((2, 256, 256), np.uint8))  # another shape than its image
    rows = add_pseudo_rows(cfg, "0", train_df, val_df, lambda _: None)
    ds = FlairDataset(rows, cfg, train=True)
    with pytest.raises(DataError, match=f"^{gone}: pseudo-label shape"):
        ds.load(len(rows) - 1)


def test_training_with_pseudo_dir_end_to_end(made, tmp_path, capsys, monkeypatch):
    seen: list[tuple] = []
    forward = Criterion.forward

    def spy(self, out, mask, s2_valid=None, weight=None):  # what the training loop hands the loss
        if weight is not None:
            seen.append((weight.tolist(), int((mask == IGNORE_U8).sum())))
        return forward(self, out, mask, s2_valid=s2_valid, weight=weight)

    monkeypatch.setattr(Criterion, "forward", spy)
    base = ["--fold", "0", *TINY, f"data_dir={made['data']}", f"runs_dir={tmp_path}", "name=t"]
    res = T.main([*base, f"pseudo_dir={made['out']}", "pseudo_weight=0.5", "pseudo_threshold=0.5"])
    assert len(seen) == 1 and 0.5 in seen[0][0] and 1.0 in seen[0][0] and seen[0][1] > 0  # training only
    out = capsys.readouterr().out
    train_df, val_df = fold_rows(made["data"], "0")
    assert f"pseudo: added 3 pseudo-labelled patches from {made['out']}" in out
    assert f"train {len(train_df) + 3} patches" in out and f"validate on fold 0: {len(val_df)} patches" in out
    assert np.isfinite(res["history"][-1]["train_loss"])
    with pytest.raises(SystemExit):
        T.main([*base, f"pseudo_dir={made['out']}", "pseudo_threshold=1.5"])
    assert "pseudo_threshold" in capsys.readouterr().err


def test_finetune_preset_is_a_config():
    cfg = load_settings(Path(__file__).resolve().parents[1] / "configs" / "pseudo_finetune.yaml")
    assert cfg.pseudo_dir == "data/pseudo" and "fold{fold}" in cfg.init_from and cfg.epochs == 2
    from src.data.pseudo_labels import pseudo_folder

    assert pseudo_folder(cfg.with_values(pseudo_dir="data/pseudo_fold{fold}"),
                         "3") == Path("data/pseudo_fold3")
