"""Joint augmentation: aerial image, mask and S2 crop stay aligned under every preset, through both
halves (src.data.augment in the worker, src.data.device_augment on the batch)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from src.core.config import load_settings
from src.data.augment import AUG_LEN, MASK_FILL, Augment, Slot, build_augment, d4, s2_matrix, warp_s2
from src.data.device_augment import augment_batch

L_CLASS = 3
S2 = 40


def ground_l(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """An asymmetric L (no D4 symmetry, off-centre) in aerial input pixel coordinates (pixel centres)."""
    vertical = (x >= 100) & (x < 250) & (y >= 60) & (y < 460)
    horizontal = (x >= 100) & (x < 430) & (y >= 310) & (y < 460)
    return vertical | horizontal


def planted(t: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Image, mask and S2 crop rendered from the same L (S2 pixel centre -> aerial 255.5 + 50 (j - 19.5))."""
    yy, xx = np.mgrid[0:512, 0:512].astype(np.float64)
    inside = ground_l(xx, yy)
    image = np.where(inside[..., None], np.array([200, 190, 180, 210, 90]), np.array([30, 40, 35, 20, 10]))
    mask = np.where(inside, L_CLASS, 0).astype(np.uint8)
    sy, sx = np.mgrid[0:S2, 0:S2].astype(np.float64)
    s2_l = ground_l(255.5 + 50 * (sx - 19.5), 255.5 + 50 * (sy - 19.5)).astype(np.float32)
    s2 = np.repeat(np.repeat(s2_l[None, None], 10, axis=1), t, axis=0)
    s2 *= np.arange(1, t + 1, dtype=np.float32)[:, None, None, None]  # dates distinguishable
    return np.moveaxis(image.astype(np.uint8), -1, 0).copy(), mask, s2, np.arange(t, dtype=np.int64) * 30


def full(aug: Augment, cfg: dict, seed: int, image, mask=None, s2=None, days=None) -> dict:
    """Both halves on one sample: the worker's (crop or heavy's source window, draws), then the device's
    (heavy's warp, photometric, D4)."""
    out = aug(np.random.default_rng(seed), image, mask, s2, None, days)
    if out["aug"] is None:
        return out
    batch = {"image": torch.from_numpy(np.ascontiguousarray(out["image"]))[None]}
    if mask is not None:
        batch["mask"] = torch.from_numpy(np.ascontiguousarray(out["mask"]))[None]
    if s2 is not None:
        batch["s2"] = torch.from_numpy(out["s2"])[None]
        batch["s2_valid"] = torch.from_numpy(out["s2_valid"])[None]
    res = augment_batch(batch, torch.from_numpy(out["aug"])[None], cfg)
    done = {k: v[0].numpy() for k, v in res.items()}
    done["image"] = done["image"].astype(np.uint8)
    return {**out, **done}


def check_alignment(out: dict) -> tuple[int, int]:
    """Assert image, mask and S2 agree; returns (#S2 pixels compared inside the L, outside the L)."""
    image, mask, s2, valid = out["image"], out["mask"], out["s2"], out["s2_valid"]
    assert image.shape[1:] == mask.shape
    scored = mask != MASK_FILL
    in_l = mask == L_CLASS
    band = image[0].astype(np.float32)
    if in_l[scored].any() and (~in_l)[scored].any():
        threshold = (band[in_l & scored].mean() + band[~in_l & scored].mean()) / 2
        mismatch = np.mean((band > threshold)[scored] != in_l[scored])
        assert mismatch < 0.05, f"image and mask disagree on {mismatch:.1%} of the pixels"
    # S2 pixel q <-> aerial output b = c_out + 50 (q - c_s2); compare where both are unambiguous
    h = image.shape[1]
    c_out = (h - 1) / 2
    hits = [0, 0]
    s2_l = s2[0, 0] / s2[0, 0].max() if s2[0, 0].max() > 0 else s2[0, 0]
    for i in range(S2):
        for j in range(S2):
            by, bx = c_out + 50 * (i - 19.5), c_out + 50 * (j - 19.5)
            r, c = int(round(by)), int(round(bx))
            if not valid[i, j] or min(r, c) < 40 or max(r, c) >= h - 40:
                continue
            window = mask[r - 40:r + 41, c - 40:c + 41]
            if (window == MASK_FILL).any() or window.min() != window.max():
                continue
            v = s2_l[i, j]
            if 0.25 < v < 0.75:
                continue
            assert (v > 0.5) == (window[0, 0] == L_CLASS), f"S2 pixel {(i, j)} disagrees with the aerial mask"
            hits[int(v <= 0.5)] += 1
    # each date carries the same L, scaled by its date number
    for t in range(1, s2.shape[0]):
        ratio = s2[t, 0][s2_l > 0.5] / s2[0, 0][s2_l > 0.5]
        np.testing.assert_allclose(ratio, ratio[0], rtol=1e-5)
    return hits[0], hits[1]


@pytest.mark.parametrize("preset,crop", [("none", 512), ("none", 256), ("light", 512), ("light", 256),
                                         ("heavy", 512), ("heavy", 256)])
def test_joint_alignment(preset, crop):
    image, mask, s2, days = planted()
    totals = np.zeros(2, int)
    for seed in range(12):
        cfg = load_settings(None, {"augment": preset, "crop_size": crop})
        out = full(build_augment(cfg, train=True), cfg, seed, image, mask, s2.copy(), days)
        assert out["image"].shape == (5, crop, crop) and out["mask"].shape == (crop, crop)
        assert out["s2"].shape == (3, 10, S2, S2) and out["s2_valid"].shape == (S2, S2)
        totals += check_alignment(out)
    assert totals[0] > 0 and totals[1] > 0  # the comparison really happened, on both sides of the L


def test_d4_moves_all_targets_with_the_same_element():
    image, mask, s2, days = planted()
    seen = set()
    cfg = load_settings(None, {"augment": "light"})
    for seed in range(40):
        out = full(Augment("light"), cfg, seed, image, mask, s2, days)
        matches = [k for k in range(8) if np.array_equal(out["image"], d4(image, k, axes=(1, 2)))]
        assert len(matches) == 1  # the L has no symmetry: exactly one element explains the image
        k = matches[0]
        assert k == out["aug"][Slot.K]
        seen.add(k)
        np.testing.assert_array_equal(out["mask"], d4(mask, k))
        np.testing.assert_array_equal(out["s2"], d4(s2, k, axes=(2, 3)))  # exact, no resampling
        assert out["s2_valid"].all()
    assert seen == set(range(8))


def test_d4_group():
    a = np.arange(12).reshape(3, 4)
    results = {d4(a, k).tobytes() + bytes(d4(a, k).shape) for k in range(8)}
    assert len(results) == 8
    np.testing.assert_array_equal(d4(a, 5), np.rot90(np.flip(a, 1), 1))


def test_eval_is_identity_at_full_size():
    image, mask, s2, days = planted()
    cfg = load_settings(None, {"augment": "heavy", "crop_size": 256, "s2_date_dropout": 0.5})
    out = build_augment(cfg, train=False)(None, image, mask, s2, None, days)
    assert out["image"] is image and out["mask"] is mask and out["s2"] is s2
    assert out["s2_valid"].all() and out["aug"] is None


def test_date_dropout_keeps_order_and_at_least_one():
    _, _, s2, days = planted(t=10)
    image = np.zeros((5, 64, 64), np.uint8)
    lengths = set()
    for seed in range(30):
        out = Augment("none", date_dropout=0.5)(np.random.default_rng(seed), image, None, s2, None, days)
        kept = out["s2_days"] // 30
        assert 1 <= len(kept) <= 10 and np.all(np.diff(kept) > 0)
        np.testing.assert_array_equal(out["s2"], s2[kept])
        lengths.add(len(kept))
    assert len(lengths) > 2
    for seed in range(10):
        out = Augment("none", date_dropout=0.999)(np.random.default_rng(seed), image, None, s2, None, days)
        assert len(out["s2_days"]) == 1


def test_centre_crop_leaves_s2_in_place():
    centre_crop = np.array([[1.0, 0.0, -128.0], [0.0, 1.0, -128.0]])
    np.testing.assert_allclose(s2_matrix(centre_crop, (512, 512), (256, 256), 40),
                               [[1, 0, 0], [0, 1, 0]], atol=1e-12)
    # a crop 100 aerial px to the right moves the S2 crop 2 S2 px to the left
    right = np.array([[1.0, 0.0, -228.0], [0.0, 1.0, -128.0]])
    np.testing.assert_allclose(s2_matrix(right, (512, 512), (256, 256), 40)[:, 2], [-2.0, 0.0], atol=1e-12)


def test_warp_s2_marks_pixels_from_outside_invalid():
    rng = np.random.default_rng(0)
    s2 = rng.random((2, 10, S2, S2)).astype(np.float32)
    valid = np.ones((S2, S2), bool)
    valid[:, :3] = False  # a NaN pad on the left
    shift = np.array([[1.0, 0.0, 5.0], [0.0, 1.0, 0.0]])  # content moves 5 px right
    out, ok = warp_s2(s2, valid, shift)
    assert not ok[:, :8].any() and ok[:, 8:].all()
    np.testing.assert_array_equal(out[..., 8:], s2[..., 3:-5])
    assert (out[..., :8] == 0).all()
    half = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.0]])
    out, ok = warp_s2(s2, np.ones((S2, S2), bool), half)
    np.testing.assert_allclose(out[..., 1:], (s2[..., 1:] + s2[..., :-1]) / 2, rtol=1e-5)
    assert not ok[:, 0].any() and ok[:, 1:].all()


def test_heavy_draws_its_photometric_parameters_and_works_on_band_subsets():
    image, mask, s2, days = planted()
    drawn = np.zeros(AUG_LEN)
    for bands in (["R", "G", "B"], ["NIR", "E"], ["E"]):
        cfg = load_settings(None, {"augment": "heavy", "crop_size": 128, "bands": bands})
        aug = build_augment(cfg, train=True)
        for seed in range(8):
            sub = np.ascontiguousarray(image[:len(bands)])
            out = full(aug, cfg, seed, sub, mask, s2, days)
            assert out["image"].shape == (len(bands), 128, 128) and out["aug"].shape == (AUG_LEN,)
            assert not out["aug"][Slot.BRIGHT + len(bands):Slot.CONTRAST].any()  # no band beyond cfg's
            drawn += out["aug"] != 0
    for slot in (Slot.JITTER, Slot.NOISE_STD, Slot.BLUR, Slot.HOLES):
        assert 0 < drawn[slot] < 24, slot  # each transform drawn sometimes, never always


def test_unknown_preset():
    with pytest.raises(ValueError, match="medium"):
        Augment("medium")


def test_s2_matrix_keeps_the_correspondence_under_rotation_and_zoom():
    rng = np.random.default_rng(2)
    for _ in range(20):
        angle, zoom = np.deg2rad(rng.uniform(-40, 40)), rng.uniform(0.7, 1.5)
        lin = zoom * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        matrix = np.hstack([lin, rng.uniform(-100, 100, (2, 1))])
        out = int(rng.choice([128, 256, 512]))
        s2m = s2_matrix(matrix, (512, 512), (out, out), S2)
        for a in rng.uniform(0, 512, (5, 2)):
            p = 19.5 + (a - 255.5) / 50            # the S2 point over aerial input point a
            q = 19.5 + (matrix[:, :2] @ a + matrix[:, 2] - (out - 1) / 2) / 50  # over its image
            np.testing.assert_allclose(s2m[:, :2] @ p + s2m[:, 2], q, atol=1e-9)


def test_warp_s2_follows_the_opencv_convention():
    import cv2

    rng = np.random.default_rng(3)
    band = rng.random((S2, S2)).astype(np.float32)
    matrix = cv2.getRotationMatrix2D((19.5, 19.5), 20.0, 1.1)
    ref = cv2.warpAffine(band, matrix, (S2, S2), flags=cv2.INTER_LINEAR)
    out, ok = warp_s2(band[None, None], np.ones((S2, S2), bool), matrix)
    np.testing.assert_allclose(out[0, 0][ok], ref[ok], atol=0.02)  # OpenCV rounds weights to 1/32 px
    assert ok[10:30, 10:30].all() and not ok[0, 0]
