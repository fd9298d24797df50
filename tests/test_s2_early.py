"""Early S2 fusion (src/models/s2_features.py, `s2_early`): the monthly features of a real synthetic sample
equal a hand computation, turn with the D4 augmentation, and the model builds, trains, keeps pretrained
kernels
and survives a checkpoint round trip."""
from __future__ import annotations

import datetime as dt

import numpy as np
import pytest
import torch

from src.core.checkpoint import save_checkpoint
from src.core.config import load_settings
from src.core.errors import ConfigError
from src.core.settings import Settings, check_job
from src.core.tables import load_index
from src.data.augment import AUG_LEN, Slot
from src.data.dataset import FlairDataset
from src.data.device_augment import d4_batch, device_batch
from src.data.loader import collate
from src.models.flair_model import build_model, load_for_inference
from src.models.s2_features import (
    add_input_channels,
    calendar_month,
    early_channels,
    early_features,
    first_conv_with,
)

TINY = {"encoder": "tu-test_resnet", "encoder_weights": "none", "utae_widths": [16, 16, 32, 32],
        "utae_decoder_widths": [16, 16, 32, 32], "ltae_heads": 4, "ltae_d_model": 32, "ltae_d_k": 4}


@pytest.fixture(scope="module")
def sample(synth_data_dir) -> dict:
    """One real synthetic training patch with its S2 series (monthly composites, no augmentation)."""
    cfg = load_settings(None, {"use_s2": True, "data_dir": str(synth_data_dir), "workers": 0})
    return FlairDataset(load_index(synth_data_dir / "index_train.csv"), cfg, train=False)[0]


def hand_ndvi(sample: dict) -> np.ndarray:
    """(12, S, S) by hand: each date's calendar month from its date, NDVI = (B8-B4)/(B8+B4), months without
    a date take the nearest month with one (the earlier on a tie)."""
    s2 = sample["s2"].double().numpy()
    by_month: dict[int, list[np.ndarray]] = {}
    for t, days in enumerate(sample["s2_days"].tolist()):
        month = (dt.date(2021, 5, 15) - dt.timedelta(days=days)).month - 1
        red, nir = s2[t, 2], s2[t, 6]
        by_month.setdefault(month, []).append((nir - red) / np.maximum(nir + red, 1e-6))
    present = sorted(by_month)
    out = []
    for m in range(12):
        near = min(present, key=lambda p: (min(abs(p - m), 12 - abs(p - m)), p))
        out.append(np.mean(by_month[near], axis=0))
    return np.stack(out)


def test_calendar_month_is_the_date_month():
    days = torch.arange(-400, 401)
    want = [(dt.date(2021, 5, 15) - dt.timedelta(days=int(d))).month - 1 for d in days]
    assert calendar_month(days).tolist() == want


def test_early_ndvi_of_a_real_sample_equals_a_hand_computation(sample):
    s2, days = sample["s2"][None].float(), sample["s2_days"][None]
    size = sample["s2"].shape[-1]
    h, w = sample["image"].shape[-2:]
    pad = torch.zeros(days.shape, dtype=torch.bool)
    months = hand_ndvi(sample)
    # nearest: the S2 pixel each aerial pixel lies in (centred window, 50 aerial pixels per S2 pixel)
    rows = np.floor(size / 2 + (np.arange(h) + 0.5 - h / 2) / 50).astype(int)
    cols = np.floor(size / 2 + (np.arange(w) + 0.5 - w / 2) / 50).astype(int)
    got = early_features(s2, days, pad, "ndvi", (h, w), "nearest")[0].numpy()
    np.testing.assert_allclose(got, months[:, rows[:, None], cols[None, :]], atol=1e-5)
    # bilinear (the default): between the centres of the S2 pixels around each aerial pixel
    y = size / 2 + (np.arange(h) + 0.5 - h / 2) / 50 - 0.5
    x = size / 2 + (np.arange(w) + 0.5 - w / 2) / 50 - 0.5
    y0, x0 = np.floor(y).astype(int), np.floor(x).astype(int)
    wy, wx = (y - y0)[:, None], (x - x0)[None, :]
    r, c = y0[:, None], x0[None, :]
    want = ((1 - wy) * (1 - wx) * months[:, r, c] + (1 - wy) * wx * months[:, r, c + 1]
            + wy * (1 - wx) * months[:, r + 1, c] + wy * wx * months[:, r + 1, c + 1])
    got = early_features(s2, days, pad, "ndvi", (h, w))[0].numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_padded_dates_are_ignored_and_no_date_gives_zeros(sample):
    s2, days = sample["s2"][None].float(), sample["s2_days"][None]
    t = s2.shape[1]
    longer = torch.cat([s2, torch.rand(1, 3, *s2.shape[2:])], 1)  # junk on padded dates
    longer_days = torch.cat([days, torch.tensor([[0, 100, -100]])], 1)
    pad = torch.arange(t + 3)[None] >= t
    ref = early_features(s2, days, torch.zeros(1, t, dtype=torch.bool), "bands", (64, 64))
    torch.testing.assert_close(early_features(longer, longer_days, pad, "bands", (64, 64)), ref)
    assert ref.shape == (1, early_channels("bands"), 64, 64)
    none = early_features(s2, days, torch.ones(1, t, dtype=torch.bool), "ndvi", (64, 64))
    assert not none.any()


def test_early_features_turn_with_the_d4_augmentation(sample, synth_data_dir):
    """The augmented batch (device D4 on image and S2 crop) gives the features of the raw sample turned
    the same way as its image: computed in the model after augmentation, they stay aligned."""
    cfg = load_settings(None, {"use_s2": True, "data_dir": str(synth_data_dir), "augment": "light"})
    samples = []
    for k in range(8):
        aug = torch.zeros(AUG_LEN)
        aug[Slot.K] = k
        samples.append({**sample, "aug": aug})
    batch = device_batch(collate(samples), cfg, torch.device("cpu"), augment=True)
    raw = device_batch(collate([sample] * 8), cfg, torch.device("cpu"))
    k = torch.arange(8)
    torch.testing.assert_close(batch["image"], d4_batch(raw["image"], k))  # the image did turn
    hw = tuple(raw["image"].shape[-2:])
    turned = early_features(batch["s2"], batch["s2_days"], batch["s2_pad"], "ndvi", hw)
    want = d4_batch(early_features(raw["s2"], raw["s2_days"], raw["s2_pad"], "ndvi", hw), k)
    torch.testing.assert_close(turned, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fusion", ["none", "utt"])
def test_model_with_early_channels_trains(fusion):
    torch.manual_seed(0)
    cfg = load_settings(None, {**TINY, "use_s2": True, "fusion": fusion, "s2_early": "ndvi"})
    model = build_model(cfg).train()
    s2 = torch.rand(2, 3, 10, 16, 16)
    days = torch.tensor([[100, 30, -60], [90, 0, 0]])
    pad = torch.tensor([[False, False, False], [False, True, True]])
    out = model(torch.randn(2, 5, 64, 64), s2, days, pad)
    assert out["logits"].shape == (2, 13, 64, 64)
    assert ("s2_logits" in out) == (fusion == "utt")
    out["logits"].logsumexp(1).mean().backward()
    stem = first_conv_with(model.net.encoder, 5 + 12)
    assert stem.weight.grad[:, 5:].abs().sum() > 0
    model.eval()
    with torch.no_grad():  # without S2 the early channels are zeros (as for a sample with no date)
        assert model(torch.randn(1, 5, 64, 64))["logits"].shape == (1, 13, 64, 64)


def test_pretrained_kernels_are_kept_and_new_ones_start_at_zero(tmp_path):
    rgb = build_model(load_settings(None, {**TINY, "bands": ["R", "G", "B"]}))
    conv = next(m for m in rgb.net.encoder.modules() if isinstance(m, torch.nn.Conv2d))
    path = tmp_path / "encoder.pt"
    torch.save(rgb.net.encoder.state_dict(), path)
    model = build_model(load_settings(None, {**TINY, "encoder_weights": str(path), "use_s2": True,
                                           "s2_early": "ndvi", "bands": ["NIR", "R", "G", "B", "E"]}))
    stem = next(m for m in model.net.encoder.modules() if isinstance(m, torch.nn.Conv2d))
    assert stem.weight.shape[1] == 5 + 12
    assert torch.equal(stem.weight[:, 1:4], conv.weight)  # R, G, B where they sit in `bands`
    assert not stem.weight[:, 5:].any()
    # the same, directly on an encoder: the band kernels bit for bit, the new ones zero
    enc = build_model(load_settings(None, TINY)).net.encoder
    before = next(m for m in enc.modules() if isinstance(m, torch.nn.Conv2d)).weight.detach().clone()
    add_input_channels(enc, 5, 12, pretrained=True)
    after = next(m for m in enc.modules() if isinstance(m, torch.nn.Conv2d)).weight
    assert torch.equal(after[:, :5], before) and not after[:, 5:].any()


def test_checkpoint_round_trip(tmp_path):
    cfg = load_settings(None, {**TINY, "use_s2": True, "fusion": "utt", "s2_early": "ndvi"})
    model = build_model(cfg).eval()
    path = save_checkpoint(tmp_path / "best.pt", {"model": model.state_dict(), "config": cfg.to_dict()})
    loaded, saved = load_for_inference(path)
    assert saved.s2_early == "ndvi"
    args = (torch.randn(1, 5, 64, 64), torch.rand(1, 2, 10, 16, 16), torch.tensor([[50, -50]]))
    with torch.no_grad():
        torch.testing.assert_close(loaded(*args)["logits"], model(*args)["logits"])


def test_settings_need_s2_for_early_fusion_and_allow_it_alone():
    assert load_settings(None, {"use_s2": True, "fusion": "none", "s2_early": "ndvi"}).reads_s2
    # use_s2=false is the one switch for S2 inputs: any preset's aerial-only model (fusion=none use_s2=false)
    aerial = load_settings(None, {**TINY, "use_s2": False, "fusion": "none", "s2_early": "ndvi"})
    assert first_conv_with(build_model(aerial).net.encoder, 5) is not None and not aerial.reads_s2
    assert aerial.early_s2 == "none" and early_channels(aerial.early_s2) == 0
    with pytest.raises(ConfigError, match="does nothing"):
        check_job(load_settings(None, {"use_s2": True, "fusion": "none"}), "train")
    with pytest.raises(ConfigError, match="s2_early: expected one of none, ndvi, bands"):
        load_settings(None, {"s2_early": "rgb"})
    assert not Settings(use_s2=False, fusion="none", s2_early="none").reads_s2
