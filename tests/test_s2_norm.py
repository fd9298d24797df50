"""norm=s2_stats (the 2nd place's Sentinel-2 normalisation) on the synthetic tree: the per-patch statistics
against a hand computation from the .npy files, the device normalisation, the elevation band and the
fallbacks, S2 read for the statistics only (use_s2=false), and a tiny train -> predict -> infer/export run."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from src.core.config import load_settings
from src.core.errors import ConfigError
from src.core.flair import BAND_MEAN, BAND_STD
from src.data.dataset import FlairDataset
from src.data.device_augment import device_batch
from src.data.loader import collate
from src.data.normalize import norm_stats, normalize, patch_norm_stats, s2_box_stats

CPU = torch.device("cpu")
GAIN = 255 / 2000  # the team's scale: reflectance x 10000 of 2000 -> grey level 255
S2_OF = {"R": 2, "G": 1, "B": 0, "NIR": 6}  # B4, B3, B2, B8 in the band order B2 B3 B4 B5 B6 B7 B8 ...
TRAIN = dict(zip(("R", "G", "B", "NIR", "E"), zip(BAND_MEAN.tolist(), BAND_STD.tolist())))


def cfg_of(**kw) -> dict:
    return load_settings(None, {"norm": "s2_stats", "workers": 0, **kw})


def by_hand(row, bands=("R", "G", "B", "NIR", "E")) -> np.ndarray | None:
    """The documented formula, written out on the whole arrays: clear dates over the 40x40 window
    (snow/cloud >= 20 on < 20 % of it), their mean, then mean/std over the centre 10x10."""
    data, masks = np.load(row["s2_data"]), np.load(row["s2_masks"])
    r, c = int(row["s2_row"]), int(row["s2_col"])
    assert 20 <= r <= data.shape[2] - 20 and 20 <= c <= data.shape[3] - 20  # window inside
    win = masks[:, :, r - 20:r + 20, c - 20:c + 20]
    cover = ((win[:, 0] >= 20).sum(axis=(1, 2)) + (win[:, 1] >= 20).sum(axis=(1, 2))) / 1600
    keep = cover < 0.2
    if not keep.any():
        return None
    composite = data[keep, :, r - 5:r + 5, c - 5:c + 5].astype(np.float64).mean(axis=0)
    out = []
    for b in bands:
        if b == "E":
            out.append(TRAIN["E"])
        else:
            px = composite[S2_OF[b]]
            out.append((GAIN * px.mean(), max(GAIN * px.std(), 1.0)))
    return np.array(out, np.float32)


def inside_rows(df):
    """Rows whose 40x40 window lies inside the super-area and that have a clear date."""
    rows = []
    for i in range(len(df)):
        shape = np.load(df.iloc[i]["s2_data"], mmap_mode="r").shape
        r, c = int(df.iloc[i]["s2_row"]), int(df.iloc[i]["s2_col"])
        if 20 <= r <= shape[2] - 20 and 20 <= c <= shape[3] - 20 and by_hand(df.iloc[i]) is not None:
            rows.append(i)
    return rows


def test_sample_statistics_match_a_hand_computation(synth_index):
    df = synth_index["train"]
    rows = inside_rows(df)
    assert len(rows) >= 3
    ds = FlairDataset(df, cfg_of(use_s2=False), train=False)
    for i in rows:
        s = ds[i]
        assert "s2" not in s and s["norm_stats"].dtype == torch.float32 and s["norm_stats"].shape == (5, 2)
        np.testing.assert_allclose(s["norm_stats"].numpy(), by_hand(df.iloc[i]), rtol=1e-5)
        np.testing.assert_array_equal(s["norm_stats"][4].numpy(), np.float32(TRAIN["E"]))  # E: train
    assert ds.s2_fallbacks == 0
    # the cloud filter matters: some dates of the synthetic zones are dropped at probability 20
    masks = np.load(df.iloc[rows[0]]["s2_masks"])
    assert (masks >= 20).any()
    # bands in another order, a subset: the rows follow cfg's bands
    sub = FlairDataset(df, cfg_of(bands=["NIR", "G", "B"], use_s2=True), train=False)[rows[0]]
    np.testing.assert_allclose(sub["norm_stats"].numpy(), by_hand(df.iloc[rows[0]], ("NIR", "G", "B")),
                               rtol=1e-5)


def test_statistics_do_not_depend_on_use_s2_nor_on_the_training_crop(synth_index):
    df = synth_index["train"]
    a = FlairDataset(df, cfg_of(use_s2=False), train=False)
    b = FlairDataset(df, cfg_of(use_s2=True, fusion="utt", crop_size=64, augment="heavy"), train=True)
    for i in (0, len(df) - 1):
        assert torch.equal(a[i]["norm_stats"], b[i]["norm_stats"])
        assert b[i]["image"].shape[-1] == b.augment.window_shape(512, 512)[1] < 512  # heavy's source window


def test_device_normalisation_is_x_minus_m_over_s(synth_index):
    df = synth_index["train"]
    cfg = cfg_of(bands=["R", "G", "B", "E"])
    ds = FlairDataset(df, cfg, train=False)
    batch = collate([ds[0], ds[1]])
    assert batch["norm_stats"].shape == (2, 4, 2)
    out = device_batch(batch, cfg, CPU)
    assert "norm_stats" not in out  # consumed: never reaches the model or TTA
    raw = batch["image"].numpy().astype(np.float32)
    st = batch["norm_stats"].numpy()
    want = (raw - st[:, :, 0, None, None]) / st[:, :, 1, None, None]
    np.testing.assert_allclose(out["image"].numpy(), want, rtol=1e-6, atol=1e-5)
    half = device_batch(batch, cfg, CPU, dtype=torch.bfloat16)["image"]
    assert half.dtype == torch.bfloat16
    # a batch without the statistics is an error, never a silent fallback
    with pytest.raises(ValueError, match="norm_stats"):
        device_batch({"image": batch["image"]}, cfg, CPU)
    # no S2 at all (an ONNX export): normalize's fallback is exactly norm=mean_std
    plain = normalize(batch["image"], cfg.with_values(norm="mean_std"))
    assert torch.equal(normalize(batch["image"], cfg), plain)
    mean, std = norm_stats(cfg.bands, cfg.norm)
    np.testing.assert_array_equal(mean, BAND_MEAN[[0, 1, 2, 4]])
    np.testing.assert_array_equal(std, BAND_STD[[0, 1, 2, 4]])


def test_patches_without_usable_s2_fall_back_to_the_train_statistics(synth_index, tmp_path):
    df = synth_index["train"].iloc[:3].copy()
    fallback = np.stack([BAND_MEAN, BAND_STD], axis=1)
    # no S2 files in the index row, no centroid: train mean/std, counted
    df.loc[df.index[0], ["s2_data", "s2_masks", "s2_products"]] = ""
    df.loc[df.index[1], "s2_row"] = -1
    ds = FlairDataset(df, cfg_of(), train=False)
    for i in (0, 1):
        np.testing.assert_array_equal(ds[i]["norm_stats"].numpy(), fallback)
    assert ds.s2_fallbacks == 2
    assert not np.array_equal(ds[2]["norm_stats"].numpy(), fallback)
    # every date cloudy, the window outside the super-area: no usable S2
    data = np.full((4, 10, 50, 50), 800, np.uint16)
    cloudy = np.zeros((4, 2, 50, 50), np.uint8)
    cloudy[:, 1] = 30
    assert s2_box_stats(data, cloudy, (25, 25)) is None
    assert s2_box_stats(data, np.zeros_like(cloudy), (200, 200)) is None
    stats, used = patch_norm_stats(["R", "E"], data, cloudy, (25, 25))
    assert not used and np.array_equal(stats, fallback[[0, 4]])
    # a uniform box (std 0) divides by the 1-grey-level floor; a partly cloudy window keeps its clear dates
    clear = cloudy.copy()
    clear[0] = 0
    stats, used = patch_norm_stats(["R", "E"], data, clear, (25, 25))
    assert used and np.allclose(stats[0], (800 * GAIN, 1.0))
    # an index without the S2 columns is refused up front
    with pytest.raises(ConfigError, match="norm=s2_stats"):
        FlairDataset(df.drop(columns=["s2_data"]), cfg_of(), train=False)


def test_statistics_are_cheap_to_read(synth_index):
    df = synth_index["train"]
    ds = FlairDataset(df, cfg_of(), train=False)
    ds.read_norm_stats(0)  # opens the zone's memmaps
    t = time.perf_counter()
    for i in range(len(df)):
        ds.read_norm_stats(i)
    per_patch = (time.perf_counter() - t) / len(df)
    assert per_patch < 0.02  # measured ~0.2 ms; a 512x512 TIFF read costs ~5 ms


def test_tiny_train_predict_and_the_orthophoto_refusal(synth_folds_dir, tmp_path):
    from src import predict as P
    from src import train as T
    from src.deploy.export import export_checkpoint
    from src.prediction.ensemble import load_ensemble

    runs = tmp_path / "runs"
    T.main(["--fold", "0", "--resume", "0", "encoder=tu-test_resnet", "encoder_weights=none", "crop_size=64",
            "batch_size=2", "workers=0", "epochs=1", "max_train_batches=1", "max_val_batches=1",
            "channels_last=false", "precision=fp32", "oof=false", "tensorboard=false", "norm=s2_stats",
            "bands=R,G,B", f"data_dir={synth_folds_dir}", f"runs_dir={runs}", "name=s2n"])
    best = runs / "s2n" / "fold0" / "best.pt"
    assert best.is_file()
    index = tmp_path / "index_test.csv"  # 3 test patches keep the test short
    pd.read_csv(synth_folds_dir / "index_test.csv", dtype={"id": str}).head(3).to_csv(index, index=False)
    P.main(["--runs", str(best), "--split", "test", "--index", str(index), "--out", str(tmp_path / "pred"),
            "--tta", "none", "--device", "cpu", "batch_size=2", "workers=0"])
    assert len(list((tmp_path / "pred").glob("PRED_*.tif"))) == 3
    # whole orthophotos have no S2: refused in one line, unless the train statistics are forced
    with pytest.raises(ConfigError, match="norm=s2_stats"):
        load_ensemble([best], CPU, job="infer", log=lambda s: None)
    ens = load_ensemble([best], CPU, overrides={"norm": "mean_std"}, job="infer", log=lambda s: None)
    assert ens.cfg.norm == "mean_std"
    # the slim export checks its logits with normalize's fallback (no S2 in an exported model)
    rep = export_checkpoint(best, onnx=False, size=64, log=lambda s: None)
    assert Path(rep["slim"]).is_file() and np.isfinite(rep["slim_max_diff"])
    lines: list[str] = []  # and no ONNX: its input cannot carry the per-patch statistics
    rep = export_checkpoint(best, onnx=True, size=64, log=lines.append)
    assert "onnx" not in rep and "no ONNX: norm=s2_stats" in lines[0]
