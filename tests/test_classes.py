"""The nomenclature and the challenge remap y = min(v, 13) - 1 (docs/data-format.md, "Labels and classes")."""
from __future__ import annotations

import numpy as np
import pytest

from src.core import flair as classes
from src.core.flair import class_argmax


def test_remap_matches_the_official_formula():
    raw = np.arange(1, 20, dtype=np.uint8)
    expected = np.minimum(raw.astype(int), 13) - 1
    out = classes.remap(raw)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)
    assert out[11] == 11 and set(out[12:].tolist()) == {classes.OTHER}  # 12 plowed land -> 11, 13..19 -> 12


def test_remap_keeps_shape_and_accepts_other_int_types():
    rng = np.random.default_rng(0)
    raw = rng.integers(1, 20, (3, 64, 48))
    out = classes.remap(raw.astype(np.int64))
    assert out.shape == raw.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.minimum(raw, 13) - 1)


def test_invalid_values():
    assert classes.remap(np.array([0], np.uint8))[0] == 255  # a stray 0 stays visible, never a class
    assert classes.remap(np.array([20, 255], np.uint8)).tolist() == [12, 12]  # like the official min()
    with pytest.raises(ValueError, match="outside 0..255"):
        classes.remap(np.array([-1, 3]))
    with pytest.raises(ValueError, match="outside 0..255"):
        classes.remap(np.array([256]))
    assert classes.invalid_label_values(np.array([[1, 19], [0, 20]], np.uint8)) == [0, 20]
    assert classes.invalid_label_values(np.arange(1, 20)) == []


def test_palette_and_names():
    assert classes.PALETTE.shape == (13, 3) and classes.PALETTE.dtype == np.uint8
    assert classes.PALETTE_19.shape == (19, 3)
    assert len(classes.NOMENCLATURE_19) == 19
    assert [v for v, _, _ in classes.NOMENCLATURE_19] == list(range(1, 20))
    assert classes.PALETTE[0].tolist() == [0xDB, 0x0E, 0x9A]  # building #db0e9a
    assert classes.PALETTE[10].tolist() == [0xFF, 0xF3, 0x0D]  # agricultural land #fff30d
    assert len(classes.CLASS_NAMES) == 13 and classes.CLASS_NAMES[-1] == "other"
    assert classes.CLASS_NAMES[9:11] == ["herbaceous vegetation", "agricultural land"]
    assert classes.hex_to_rgb("#55ff00") == (0x55, 0xFF, 0x00)


def test_colorize():
    labels = np.array([[0, 12], [9, 99]])
    rgb = classes.colorize(labels)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0].tolist() == classes.PALETTE[0].tolist()
    assert rgb[1, 0].tolist() == classes.PALETTE[9].tolist()
    assert rgb[1, 1].tolist() == classes.PALETTE[12].tolist()  # out of range is clipped, not an error


@pytest.mark.parametrize("dtype, high", [(np.uint8, 4), (np.uint8, 256), (np.uint16, 3), (np.uint16, 511)])
def test_class_argmax_is_argmax_and_max_ties_to_the_lower_class(dtype, high):
    """Few distinct values (high 3-4) make ties on most pixels: the lower class must win, as np.argmax."""
    scores = np.random.default_rng(high).integers(0, high, size=(13, 40, 33)).astype(dtype)
    cls, top = class_argmax(scores)
    assert cls.dtype == np.uint8 and top.dtype == dtype
    np.testing.assert_array_equal(cls, scores.argmax(0))
    np.testing.assert_array_equal(top, scores.max(0))
    flat_cls, _ = class_argmax(scores.reshape(13, -1))
    np.testing.assert_array_equal(flat_cls, cls.ravel())
