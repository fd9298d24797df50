"""src.show draws truth and prediction beside the aerial RGB for the same patches on every call."""
from __future__ import annotations

import matplotlib.image
import numpy as np
import pytest

from src import show
from src.analysis.common import rgb_of
from src.core.errors import DataError
from src.core.files import read_image, read_label, write_tif
from src.core.flair import remap


def test_rgb_of_takes_the_first_three_bands(synth_index):
    img = read_image(synth_index["train"].iloc[0]["img_path"])
    rgb = rgb_of(img)
    assert rgb.shape == (*img.shape[1:], 3) and rgb.dtype == np.uint8 and rgb.flags.c_contiguous
    assert (rgb[..., 2] == img[2]).all()


def test_prediction_grid_with_and_without_truth(synth_index, tmp_path):
    df = synth_index["train"]
    for _, r in df.iloc[:3].iterrows():
        write_tif(tmp_path / f"PRED_{r['id']}.tif", remap(read_label(r["msk_path"])))
    rows = show.pick_rows(df, tmp_path, 2)
    assert rows["id"].tolist() == sorted(df["id"].iloc[:3])[::2]  # evenly spaced over the sorted ids
    shapes = []
    for name, index in (("truth.png", df), ("no_truth.png", df.assign(msk_path=""))):
        out = show.save_prediction_grid(index, tmp_path, tmp_path / name, n=2)
        shapes.append(matplotlib.image.imread(out).shape)
    assert shapes[0][0] == shapes[1][0] and shapes[0][1] > shapes[1][1]  # one more column with truth
    with pytest.raises(DataError, match="no PRED"):
        show.pick_rows(synth_index["test"], tmp_path, 2)
