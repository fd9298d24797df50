"""src.training.records: TensorBoard events written into a real run folder and read back with TensorBoard's
own reader; a resumed run replaces the interrupted epoch's events; validation pictures in the official
colours;
extra loggers only on request (never contacted here)."""
from __future__ import annotations

import importlib.util
import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from src.core.errors import ConfigError
from src.core.flair import PALETTE
from src.core.settings import Settings, check_job
from src.data.normalize import normalize
from src.scoring.metrics import miou_from_confusion
from src.training.records import (
    IOU_COLS,
    Tracker,
    display_rgb,
    epoch_scalars,
    sample_grid,
    set_aside_previous_run,
)

EventAccumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator").EventAccumulator
CFG = Settings(name="t", norm="mean_std")


def read_events(run_dir) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def history_row(epoch: int, step: int, validated: bool) -> dict:
    rng = np.random.default_rng(epoch)
    ious = rng.random(len(IOU_COLS)) if validated else np.full(len(IOU_COLS), math.nan)
    return {"epoch": epoch, "step": step, "lr": 1e-3 / epoch, "train_loss": 2.0 / epoch,
            "train_s2_loss": math.nan,
            "val_loss": 1.5 / epoch if validated else math.nan, "miou": float(ious[:12].mean()),
            **dict(zip(IOU_COLS, ious.tolist())), "img_s": 10.0, "epoch_s": 3.0, "nan_steps": 0,
            "val_skipped": 0 if validated else math.nan, "confusion": [[0]]}


def samples(n: int = 3, size: int = 64) -> tuple[dict, np.ndarray]:
    """Validation samples as the loader hands them over (normalised float images) + the raw bands."""
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (n, 5, size, size), generator=g, dtype=torch.uint8)
    mask = torch.randint(0, 13, (n, size, size), generator=g)
    return {"image": normalize(raw, CFG), "mask": mask, "pred": (mask + 1) % 13}, raw.numpy()


def test_events_written_and_read_back(tmp_path):
    run_dir = tmp_path / "runs" / "t" / "fold0"
    run_dir.mkdir(parents=True)
    per_domain = np.random.default_rng(0).integers(0, 50, (2, 13, 13))
    batch, _ = samples()
    tracker = Tracker.open(run_dir, CFG, enabled=True)
    for step in range(1, 9):
        tracker.step(step, loss=1.0 / step, lr=1e-3)
    tracker.epoch(history_row(1, 4, validated=False))
    tracker.epoch(history_row(2, 8, validated=True), domains=["D001_2020", "D002_2021"],
                  per_domain=per_domain, samples=batch)
    tracker.close()
    tracker.close()  # closing twice is harmless (a finally after an early close)

    acc = read_events(run_dir)
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "loss/train", "loss/val", "val/miou", "speed/img_s", "speed/epoch_s",
            "memory/max_rss_gb", "iou/00_building", "iou/10_agricultural_land",
            "domain_miou/D001_2020"} <= tags
    assert "loss/train_s2" not in tags  # NaN values (no S2 head) are left out, not drawn as gaps
    assert [(e.step, round(e.value, 6)) for e in acc.Scalars("train/loss")] == \
        [(s, round(1.0 / s, 6)) for s in range(1, 9)]
    assert [e.step for e in acc.Scalars("loss/train")] == [4, 8]
    assert [e.step for e in acc.Scalars("val/miou")] == [8]  # only the validated epoch
    row = history_row(2, 8, validated=True)
    assert acc.Scalars("iou/10_agricultural_land")[0].value == pytest.approx(row[IOU_COLS[10]])
    assert acc.Scalars("domain_miou/D002_2021")[0].value == pytest.approx(miou_from_confusion(per_domain[1]))
    image = acc.Images("val/rgb_truth_prediction")
    assert len(image) == 1 and image[0].step == 8
    picture = np.asarray(Image.open(io.BytesIO(image[0].encoded_image_string)))
    assert picture.shape == (3 * 64 + 2 * 4, 3 * 64 + 2 * 4, 3)  # 3 patches x (RGB | truth | prediction)
    assert "config" in "".join(acc.Tags()["tensors"])  # the resolved settings, as text


def test_resume_replaces_the_interrupted_epochs_events(tmp_path):
    first = Tracker.open(tmp_path, CFG)
    for step in range(1, 11):  # epochs end at steps 4 and 8; killed during the third epoch
        first.step(step, loss=1.0)
    first.close()
    resumed = Tracker.open(tmp_path, CFG, resume_step=8)  # last.pt holds step 8 (the second epoch's end)
    for step in range(9, 13):
        resumed.step(step, loss=2.0)
    resumed.close()
    events = [(e.step, e.value) for e in read_events(tmp_path).Scalars("train/loss")]
    assert events == [(s, 1.0) for s in range(1, 9)] + [(s, 2.0) for s in range(9, 13)]
    fresh = Tracker.open(tmp_path, CFG)  # a fresh start (killed in its first epoch, no .pt to set aside)
    fresh.step(1, loss=3.0)
    fresh.close()
    assert [(e.step, e.value) for e in read_events(tmp_path).Scalars("train/loss")] == [(1, 3.0)]


def test_fresh_start_sets_old_events_aside(tmp_path):
    old = Tracker.open(tmp_path, CFG)
    old.step(1, loss=5.0)
    old.close()
    (tmp_path / "best.pt").write_bytes(b"old")  # an earlier run's outputs
    set_aside_previous_run(tmp_path, log=lambda _: None)
    assert not list(tmp_path.glob("events.out.tfevents.*"))
    assert len(list((tmp_path / "previous").glob("events.out.tfevents.*"))) == 1


def test_disabled_tracker_writes_nothing(tmp_path):
    for tracker in (Tracker.open(tmp_path, CFG, enabled=False),  # not rank 0
                    Tracker.open(tmp_path, CFG.with_values(tensorboard=False, loggers=""))):
        tracker.step(1, loss=1.0)
        tracker.epoch(history_row(1, 1, validated=True), samples=samples()[0])
        tracker.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("norm", ["mean_std", "scale"])
def test_pictures_undo_the_normalisation(norm):
    cfg = CFG.with_values(norm=norm)
    batch, raw = samples()
    rgb = display_rgb(normalize(torch.as_tensor(raw), cfg)[0], cfg)
    np.testing.assert_allclose(rgb.astype(int), np.moveaxis(raw[0, :3], 0, -1).astype(int), atol=1)
    np.testing.assert_array_equal(display_rgb(torch.as_tensor(raw[0]), cfg), np.moveaxis(raw[0, :3], 0, -1))
    no_rgb = cfg.with_values(bands=["NIR", "E"])  # no R, G, B: the first band in grey
    grey = display_rgb(torch.as_tensor(raw[0, 3:]), no_rgb)
    assert (grey[..., 0] == raw[0, 3]).all() and (grey[..., 1] == grey[..., 2]).all()


def test_sample_grid_draws_truth_and_prediction_in_the_official_colours():
    batch, raw = samples(n=2, size=600)  # wider than a panel: subsampled to <= 256 px (every 3rd pixel)
    batch["mask"][0, 0, 0] = 255  # an ignored pixel shows like "other"
    grid = sample_grid(batch, CFG, max_n=5)
    assert grid.shape == (2 * 200 + 4, 3 * 200 + 2 * 4, 3) and grid.dtype == np.uint8
    truth = grid[:200, 204:404]
    np.testing.assert_array_equal(truth[1:], PALETTE[batch["mask"][0, 3::3, ::3].numpy()])
    assert tuple(truth[0, 0]) == tuple(PALETTE[12])
    np.testing.assert_array_equal(grid[204:, 408:], PALETTE[batch["pred"][1, ::3, ::3].numpy()])
    assert sample_grid({"image": []}, CFG) is None


def test_epoch_scalars_skip_nan_and_name_domains():
    row = history_row(1, 4, validated=False)
    values = epoch_scalars(row, ["D1"], np.eye(13, dtype=np.int64)[None] * 7)
    assert "val/miou" not in values and "iou/00_building" not in values
    assert values["loss/train"] == 2.0 and values["domain_miou/D1"] == 1.0


def test_extra_loggers_only_on_request():
    assert Settings(loggers="").logger_names == [] and Settings().logger_names == []
    assert Settings(loggers="MLflow, wandb,mlflow").logger_names == ["mlflow", "wandb"]
    with pytest.raises(ConfigError, match="loggers: unknown logger 'comet'"):
        Settings(loggers="wandb,comet")
    check_job(Settings(tensorboard=True, loggers=""), "train")
    with pytest.raises(ConfigError, match="tb_images: expected a value >= 0, got -1"):
        Settings(tb_images=-1)
    for name in ("wandb", "mlflow"):
        if importlib.util.find_spec(name) is None:  # the usual case: not a requirement of the kit
            with pytest.raises(ConfigError, match=f"loggers={name} needs the {name} package: pip install"):
                check_job(Settings(tensorboard=False, loggers=name), "train")
