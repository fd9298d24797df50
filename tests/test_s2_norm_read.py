"""norm=s2_stats with use_s2: the statistics and the series come from one read of the S2 window
(src.data.normalize.series_and_stats), bit-identical to the two separate computations and to the formula
written
out on the whole .npy arrays, windows and boxes leaving the super-area included."""
from __future__ import annotations

import datetime as dt
from dataclasses import replace

import numpy as np
import pytest
import torch

from src.core.config import load_settings
from src.core.flair import BAND_NAMES
from src.data.dataset import S2_SCALE, FlairDataset
from src.data.normalize import s2_box_stats, s2_patch_stats, series_and_stats
from src.data.sentinel import BASELINE, read_products, s2_series

S2_OF = (0, 1, 2, 6)  # B2, B3, B4, B8: the counterparts of B, G, R, NIR


def reference_stats(data, masks, centroid, size=40):
    """The module docstring's formula on whole arrays: the window and the centre 10x10 box clipped to the
    super-area, clear dates at (snow/cloud >= 20) on < 20 % of the window's in-bounds pixels."""
    height, width = data.shape[-2:]
    r0, c0 = int(centroid[0]) - size // 2, int(centroid[1]) - size // 2
    win = masks[:, :, max(r0, 0):max(min(r0 + size, height), 0), max(c0, 0):max(min(c0 + size, width), 0)]
    if win.shape[2] == 0 or win.shape[3] == 0:
        return None
    cover = ((win[:, 0] >= 20).sum(axis=(1, 2)) + (win[:, 1] >= 20).sum(axis=(1, 2))) / (win.shape[2]
                                                                                         * win.shape[3])
    keep = np.flatnonzero(cover < 0.2)
    top = (size - 10) // 2
    box = data[:, :, max(r0 + top, 0):max(min(r0 + top + 10, height), 0),
               max(c0 + top, 0):max(min(c0 + top + 10, width), 0)]
    if keep.size == 0 or box.shape[2] == 0 or box.shape[3] == 0:
        return None
    composite = box[keep][:, S2_OF].astype(np.float64).mean(axis=0)
    mean, std = np.full(data.shape[1], np.nan), np.full(data.shape[1], np.nan)
    mean[list(S2_OF)] = composite.mean(axis=(1, 2))
    std[list(S2_OF)] = composite.std(axis=(1, 2))
    return mean, std


def zone(rng, n_dates=16, height=60, width=70):
    """Random reflectances; cloud/snow blobs so that some dates pass the 20/0.2 filter and some do not."""
    data = rng.integers(0, 10001, size=(n_dates, 10, height, width)).astype(np.uint16)
    masks = np.zeros((n_dates, 2, height, width), np.uint8)
    yy, xx = np.mgrid[:height, :width]
    for t, ch in np.ndindex(n_dates, 2):
        for _ in range(rng.integers(0, 3)):
            blob = (yy - rng.integers(0, height)) ** 2 + (xx - rng.integers(0, width)) ** 2 \
                < rng.uniform(2, 25) ** 2
            masks[t, ch][blob] = rng.integers(15, 101, size=int(blob.sum()))
    start = dt.date(2021, 1, 1)
    products = [f"S2A_MSIL2A_{start + dt.timedelta(days=int(d)):%Y%m%d}T105021_N0300_R051_T31UDP_x"
                for d in np.sort(rng.choice(360, n_dates, replace=False))]
    return data, masks, products


@pytest.mark.parametrize("kw", [{}, {"filter_clouds": False}, {"prob_min": 10, "cover_max": 0.1},
                                {"monthly": False}, {"size": 24}])
def test_one_read_equals_the_two_computations_and_the_formula(tmp_path, kw):
    data, masks, products = zone(np.random.default_rng(3))
    np.save(tmp_path / "d.npy", data)
    np.save(tmp_path / "m.npy", masks)
    mdata, mmasks = np.load(tmp_path / "d.npy", mmap_mode="r"), np.load(tmp_path / "m.npy", mmap_mode="r")
    size = kw.get("size", 40)
    found_some = 0
    # inside; window leaving each side; box partly outside; box outside, window partly inside
    for centroid in [(30, 35), (5, 35), (58, 35), (30, 2), (30, 69), (0, 0), (-3, 10), (-12, 30), (71, 80),
                     (-40, 10)]:
        ref = reference_stats(data, masks, centroid, size)
        alone = s2_box_stats(mdata, mmasks, centroid, size)  # norm=s2_stats without use_s2
        assert (alone is None) == (ref is None)
        found_some += ref is not None
        for got, want in zip(alone or (), ref or ()):
            np.testing.assert_array_equal(got, want)
        try:
            want_x, want_days = s2_series(mdata, mmasks, products, centroid, replace(BASELINE, **kw))
        except ValueError:  # the window lies outside the super-area: the same error
            with pytest.raises(ValueError, match="lies outside the super-area"):
                series_and_stats(mdata, mmasks, products, centroid, replace(BASELINE, **kw))
            continue
        x, days, found = series_and_stats(mdata, mmasks, products, centroid, replace(BASELINE, **kw))
        np.testing.assert_array_equal(x, want_x)
        np.testing.assert_array_equal(days, want_days)
        assert (found is None) == (ref is None)
        for got, want in zip(found or (), ref or ()):
            np.testing.assert_array_equal(got, want)
    assert found_some >= 3


class Counted:
    """An array that counts how often it is indexed (each index of a memmap is a read)."""

    def __init__(self, array: np.ndarray):
        self.array, self.reads = array, 0
        self.shape, self.ndim = array.shape, array.ndim

    def __getitem__(self, key):
        self.reads += 1
        return self.array[key]


def test_sample_reads_its_window_once_and_matches_the_npy_files(synth_index):
    df = synth_index["train"]
    cfg = load_settings(None, {"norm": "s2_stats", "use_s2": True, "bands": ["NIR", "R", "G", "E"],
                             "workers": 0})
    ds = FlairDataset(df, cfg, train=False)
    alone = FlairDataset(df, cfg.with_values(use_s2=False), train=False)
    bands = [BAND_NAMES[j] for j in ds.band_idx]
    ds[0]  # opens the zone's memmaps
    for i in range(len(df)):
        row = df.iloc[i]
        data, masks = np.load(row["s2_data"]), np.load(row["s2_masks"])
        centroid = (int(row["s2_row"]), int(row["s2_col"]))
        key = int(ds.zone_code[i])
        d, m, products = ds._zone(i)
        counted = Counted(getattr(d, "array", d)), Counted(getattr(m, "array", m))
        ds._zones._open[key] = (*counted, products)  # the cached zone, its arrays counted
        s = ds[i]
        assert [c.reads for c in counted] == [1, 1]  # the masks of the window, then the data of its dates
        ref = reference_stats(data, masks, centroid)
        want = s2_patch_stats(bands, *(ref or (None, None)))
        np.testing.assert_array_equal(s["norm_stats"].numpy(), want)
        assert torch.equal(s["norm_stats"], alone[i]["norm_stats"])
        x, _ = s2_series(data, masks, read_products(row["s2_products"]), centroid)
        want_s2 = (np.nan_to_num(x, nan=0.0) / S2_SCALE).astype(np.float16)
        np.testing.assert_array_equal(s["s2"].numpy(), want_s2)
    assert ds.s2_fallbacks == alone.s2_fallbacks
