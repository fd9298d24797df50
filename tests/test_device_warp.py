"""`heavy`'s zoom/rotation on the device (src.data.device_augment.warp_batch) from the worker's source
window (src.data.augment): the same geometry as OpenCV warping the whole patch with the drawn forward map,
the S2 crop and its validity moved by the S2 map, 12 outside the patch, plain crops exact; `none`/`light`
untouched."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from src.core.config import load_settings
from src.data.augment import (
    AUG_LEN,
    MASK_FILL,
    Augment,
    ExtraTransform,
    Slot,
    s2_matrix,
    warp_s2,
    window_maps,
    window_start,
)
from src.data.device_augment import augment_batch, warp_batch

PATCH, CROP, S2 = 256, 64, 40
SQUARE = 5      # the class of the labelled square
IGNORE = 255    # pseudo-label pixels below the threshold travel like a label


def checkerboard() -> np.ndarray:
    """(5, PATCH, PATCH) uint8: 8-px squares, each band its own contrast."""
    yy, xx = np.mgrid[0:PATCH, 0:PATCH]
    board = ((yy // 8 + xx // 8) % 2).astype(np.float64)
    return np.stack([(40 + 200 * board * (b + 1) / 5) for b in range(5)]).astype(np.uint8)


def labelled_mask() -> np.ndarray:
    """Class 1 everywhere, a SQUARE block, an IGNORE strip: no 12 anywhere, so 12 means 'outside'."""
    mask = np.ones((PATCH, PATCH), np.uint8)
    mask[110:150, 120:160] = SQUARE
    mask[60:70, :] = IGNORE
    return mask


def opencv(image: np.ndarray, matrix: np.ndarray, nearest: bool, fill: int) -> np.ndarray:
    """The CPU reference: cv2.warpAffine of the whole patch to (CROP, CROP), band by band."""
    kw = dict(flags=cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
              borderValue=fill)
    planes = image[None] if image.ndim == 2 else image
    out = np.stack([cv2.warpAffine(np.ascontiguousarray(p), matrix, (CROP, CROP), **kw) for p in planes])
    return out[0] if image.ndim == 2 else out


def on_device(worker: list[dict]) -> dict[str, np.ndarray]:
    """The worker outputs of one batch through warp_batch, as numpy."""
    batch = {"image": torch.stack([torch.from_numpy(np.ascontiguousarray(w["image"])) for w in worker]),
             "mask": torch.stack([torch.from_numpy(np.ascontiguousarray(w["mask"])) for w in worker])}
    if worker[0].get("s2") is not None:
        batch["s2"] = torch.stack([torch.from_numpy(w["s2"]) for w in worker])
        batch["s2_valid"] = torch.stack([torch.from_numpy(w["s2_valid"]) for w in worker])
    done = warp_batch(batch, torch.stack([torch.from_numpy(w["aug"]) for w in worker]))
    return {k: v.numpy() for k, v in done.items()}


def ship(matrix: np.ndarray, image: np.ndarray, mask: np.ndarray, s2: np.ndarray | None = None,
         valid: np.ndarray | None = None) -> dict:
    """What a worker ships for a given forward map: heavy's window and the maps in `aug`."""
    rows, cols = Augment("heavy", crop_size=CROP).window_shape(PATCH, PATCH)
    top, left = window_start(matrix, CROP, (rows, cols), (PATCH, PATCH))
    aug = np.zeros(AUG_LEN, np.float32)
    window_maps(matrix, top, left, CROP, (PATCH, PATCH), S2 if s2 is not None else None, aug)
    rows, cols = slice(top, top + rows), slice(left, left + cols)
    return {"image": image[:, rows, cols], "mask": mask[rows, cols], "s2": s2, "s2_valid": valid, "aug": aug}


def drawn(seed: int) -> tuple[np.ndarray, tuple[int, int] | None]:
    """The forward map heavy draws for `seed` (replaying the worker's draws: D4 element, then geometry)."""
    rng = np.random.default_rng(seed)
    rng.integers(8)
    matrix, offset, _ = Augment("heavy", crop_size=CROP)._geometry(rng, PATCH, PATCH)
    if matrix is None:
        r, c = offset
        matrix = np.array([[1.0, 0.0, -c], [0.0, 1.0, -r]])
    return matrix, offset


def centroid(where: np.ndarray) -> np.ndarray:
    return np.argwhere(where).mean(axis=0)


def test_checkerboard_and_square_land_where_opencv_puts_them():
    image, mask = checkerboard(), labelled_mask()
    heavy = Augment("heavy", crop_size=CROP)
    seeds = range(16)
    worker = [heavy(np.random.default_rng(s), image, mask) for s in seeds]
    assert {w["image"].shape for w in worker} == {(5, *heavy.window_shape(PATCH, PATCH))}
    done = on_device(worker)
    for b, seed in enumerate(seeds):
        matrix, _ = drawn(seed)
        ref, ref_mask = opencv(image, matrix, False, 0), opencv(mask, matrix, True, MASK_FILL)
        diff = np.abs(done["image"][b].astype(int) - ref)
        assert diff.mean() < 1.0 and diff.max() <= 8  # OpenCV rounds its weights to 1/32 px
        assert np.mean(done["mask"][b] != ref_mask) < 0.005
        if (ref_mask == SQUARE).sum() > 20:
            assert np.abs(centroid(done["mask"][b] == SQUARE) - centroid(ref_mask == SQUARE)).max() < 1.0


def test_outside_the_patch_the_mask_is_12_and_the_image_0():
    """Least zoom, largest angle, source square in the patch's corner: its rotated corners leave the patch."""
    angle, zoom = np.deg2rad(15.0), 0.75
    lin = zoom * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    centre = np.full(2, CROP / zoom / 2 - 0.5)
    matrix = np.hstack([lin, (np.full(2, (CROP - 1) / 2) - lin @ centre)[:, None]])
    image, mask = checkerboard(), labelled_mask()
    done = on_device([ship(matrix, image, mask)])
    ref_mask = opencv(mask, matrix, True, MASK_FILL)
    outside = ref_mask == MASK_FILL
    assert outside.sum() > 50
    assert np.mean((done["mask"][0] == MASK_FILL) != outside) < 0.005
    assert set(np.unique(done["mask"][0])) <= {1, SQUARE, IGNORE, MASK_FILL}
    deep = cv2.erode(outside.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)  # no neighbour inside
    assert deep.any() and (done["image"][0][:, deep] == 0).all()
    assert np.abs(done["image"][0].astype(int) - opencv(image, matrix, False, 0)).max() <= 8


def test_a_plain_crop_is_an_exact_slice():
    image, mask = checkerboard(), labelled_mask()
    heavy = Augment("heavy", crop_size=CROP)
    plain = [s for s in range(40) if drawn(s)[1] is not None][:4]
    assert plain  # p = 0.25 per seed
    done = on_device([heavy(np.random.default_rng(s), image, mask) for s in plain])
    for b, seed in enumerate(plain):
        r, c = drawn(seed)[1]
        np.testing.assert_array_equal(done["image"][b], image[:, r:r + CROP, c:c + CROP])
        np.testing.assert_array_equal(done["mask"][b], mask[r:r + CROP, c:c + CROP])


def test_a_marked_s2_pixel_lands_where_the_s2_map_puts_it():
    angle, zoom = np.deg2rad(-11.0), 1.2
    lin = zoom * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    matrix = np.hstack([lin, (np.full(2, (CROP - 1) / 2) - lin @ np.array([140.0, 100.0]))[:, None]])
    s2 = np.zeros((2, 10, S2, S2), np.float32)
    mark = np.array([21.0, 18.0])  # (x, y) of the marked S2 pixel
    s2[:, :, 18, 21] = 1.0
    done = on_device([ship(matrix, checkerboard(), labelled_mask(), s2, np.ones((S2, S2), bool))])
    s2m = s2_matrix(matrix, (PATCH, PATCH), (CROP, CROP), S2)
    expect = s2m[:, :2] @ mark + s2m[:, 2]
    band = done["s2"][0, 1, 3]
    yy, xx = np.mgrid[0:S2, 0:S2]
    got = np.array([(band * xx).sum(), (band * yy).sum()]) / band.sum()
    assert np.abs(got - expect).max() < 0.25
    assert np.abs(np.array(np.unravel_index(band.argmax(), band.shape))[::-1] - expect).max() < 1.0


def test_s2_and_its_validity_follow_the_cpu_rule():
    """Against src.data.augment.warp_s2 (the numpy reference), with a NaN-pad strip and pixels from
    outside."""
    rng = np.random.default_rng(4)
    s2 = rng.random((3, 10, S2, S2)).astype(np.float32)
    valid = np.ones((S2, S2), bool)
    valid[:, :4] = False
    s2[..., ~valid] = 0.0
    image, mask = checkerboard(), labelled_mask()
    seeds = range(12)
    worker = [ship(drawn(s)[0], image, mask, s2, valid) for s in seeds]
    done = on_device(worker)
    for b, seed in enumerate(seeds):
        ref, ref_ok = warp_s2(s2, valid, s2_matrix(drawn(seed)[0], (PATCH, PATCH), (CROP, CROP), S2))
        np.testing.assert_array_equal(done["s2_valid"][b], ref_ok)
        np.testing.assert_allclose(done["s2"][b], ref, atol=1e-4)
        assert not ref_ok.all()


def test_a_batch_through_the_whole_device_half():
    """Shapes after augment_batch; a batch mixing heavy and light samples is refused in one line."""
    image, mask = checkerboard(), labelled_mask()
    cfg = load_settings(None, {"augment": "heavy", "crop_size": CROP})
    heavy, light = Augment("heavy", crop_size=CROP), Augment("light", crop_size=CROP)
    worker = [heavy(np.random.default_rng(s), image, mask) for s in range(4)]
    batch = {k: torch.stack([torch.from_numpy(np.ascontiguousarray(w[k])) for w in worker])
             for k in ("image", "mask", "aug")}
    out = augment_batch({k: batch[k] for k in ("image", "mask")}, batch["aug"], cfg)
    assert out["image"].shape == (4, 5, CROP, CROP) and out["mask"].shape == (4, CROP, CROP)
    mixed = batch["aug"].clone()
    mixed[0] = torch.from_numpy(light(np.random.default_rng(0), image, mask)["aug"])
    with pytest.raises(ValueError, match="mixes"):
        augment_batch({k: batch[k] for k in ("image", "mask")}, mixed, cfg)


def test_none_and_light_still_crop_in_the_worker():
    image, mask = checkerboard(), labelled_mask()
    s2 = np.random.default_rng(1).random((2, 10, S2, S2)).astype(np.float32)
    for preset in ("none", "light"):
        out = Augment(preset, crop_size=CROP)(np.random.default_rng(3), image, mask, s2, None, np.arange(2))
        assert out["image"].shape == (5, CROP, CROP) and out["mask"].shape == (CROP, CROP)
        assert out["s2"].shape == s2.shape and out["s2_valid"].shape == (S2, S2)
        assert out["aug"] is None if preset == "none" else not out["aug"][Slot.WARP:].any()


def test_heavy_runs_the_users_pixel_transforms_on_the_source_window(tmp_path):
    path = tmp_path / "my_aug.py"
    path.write_text("import albumentations as A\n\n\ndef invert():\n    return A.InvertImg(p=1.0)\n")
    image, mask = checkerboard(), labelled_mask()
    plain = Augment("heavy", crop_size=CROP)(np.random.default_rng(2), image, mask)
    extra = Augment("heavy", crop_size=CROP, extra=ExtraTransform(f"{path}:invert", 5))
    inverted = extra(np.random.default_rng(2), image, mask)
    np.testing.assert_array_equal(inverted["image"], 255 - plain["image"])  # the window, before the warp
    np.testing.assert_array_equal(inverted["aug"][Slot.WARP:], plain["aug"][Slot.WARP:])  # the same map


def test_a_window_too_small_for_the_map_is_refused():
    matrix = np.array([[0.5, 0.0, 0.0], [0.0, 0.5, 0.0]])  # zoom out 2x: a 128 px source for a 64 crop
    with pytest.raises(ValueError, match="too small"):
        window_start(matrix, CROP, (100, 100), (PATCH, PATCH))
