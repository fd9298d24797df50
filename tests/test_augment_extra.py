"""augment_extra: the user's albumentations pixel transforms run on each training sample (real synthetic
files), re-seeded per sample, and geometric or band-incompatible transforms are refused in one line."""
from __future__ import annotations

import numpy as np
import pytest

from src.core.config import load_settings
from src.core.errors import ConfigError
from src.data.augment import build_augment
from src.data.dataset import FlairDataset

EXTRA = '''
import albumentations as A

def invert():
    return A.InvertImg(p=1.0)

def noisy():
    return A.Compose([A.OneOf([A.GaussNoise(std_range=(0.1, 0.2), p=1.0)], p=1.0)])

def flip():
    return A.Compose([A.InvertImg(p=0.5), A.HorizontalFlip(p=1.0)])

def gray():
    return A.ToGray(p=1.0)

def not_a_transform():
    return 3
'''


@pytest.fixture()
def extra_file(tmp_path):
    path = tmp_path / "my_aug.py"
    path.write_text(EXTRA)
    return path


def test_pixel_transform_runs_on_the_training_sample_only(synth_index, extra_file):
    df = synth_index["train"].iloc[:1]
    base = {"augment": "none", "crop_size": 128, "use_s2": True}
    plain = FlairDataset(df, load_settings(None, base), train=True)
    with_extra = load_settings(None, {**base, "augment_extra": f"{extra_file}:invert"})
    inverted = FlairDataset(df, with_extra, train=True)
    a, b = plain.load(0, np.random.default_rng(5)), inverted.load(0, np.random.default_rng(5))
    assert b["image"].dtype == a["image"].dtype and b["image"].shape == (5, 128, 128)
    assert np.array_equal(b["image"].numpy(), 255 - a["image"].numpy())   # same crop, inverted
    assert np.array_equal(b["mask"].numpy(), a["mask"].numpy()) and np.array_equal(b["s2"], a["s2"])
    evaluation = FlairDataset(df, with_extra, train=False)
    plain_eval = FlairDataset(df, load_settings(None, base), train=False)
    assert np.array_equal(evaluation.load(0)["image"].numpy(), plain_eval.load(0)["image"].numpy())  # train


def test_draws_are_a_function_of_the_sample_generator(extra_file):
    aug = build_augment(load_settings(None, {"augment": "none", "augment_extra": f"{extra_file}:noisy"}),
                        True)
    image = np.random.default_rng(0).integers(0, 256, (5, 64, 64), dtype=np.uint8)
    one = aug(np.random.default_rng(7), image.copy())["image"]
    again = aug(np.random.default_rng(7), image.copy())["image"]
    other = aug(np.random.default_rng(8), image.copy())["image"]
    assert np.array_equal(one, again) and not np.array_equal(one, other) and not np.array_equal(one, image)


@pytest.mark.parametrize(("name", "message"), [
    ("flip", "HorizontalFlip is not a pixel-level transform"),
    ("gray", "fails on a 5-band uint8 image"),
    ("not_a_transform", "returned int, not an albumentations transform"),
    ("missing", "has no function 'missing'"),
])
def test_bad_transforms_are_one_line_errors(extra_file, name, message):
    with pytest.raises(ConfigError, match=message):
        build_augment(load_settings(None, {"augment_extra": f"{extra_file}:{name}"}), True)


def test_bad_specs_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="expected path/to/file.py:function"):
        build_augment(load_settings(None, {"augment_extra": "nocolon"}), True)
    with pytest.raises(ConfigError, match="file not found"):
        build_augment(load_settings(None, {"augment_extra": f"{tmp_path}/none.py:build"}), True)
    with pytest.raises(ConfigError, match="cannot import no_such_module_xyz"):
        build_augment(load_settings(None, {"augment_extra": "no_such_module_xyz:build"}), True)
