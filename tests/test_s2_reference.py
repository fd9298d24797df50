"""bench/s2_reference.py's S2 feature sets (issue 28) on hand-made NDVI series: the clear dates put on a fixed
day-of-year grid, and the NDVI statistics (max, its day, min after it, largest drop and its day)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("s2_reference", REPO / "bench" / "s2_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ref = _module()


def _series(values: list[float]) -> np.ndarray:
    """(T, 1, 2) NDVI: pixel 0 follows `values`, pixel 1 stays at 0.3."""
    v = np.asarray(values, np.float32)
    return np.stack([v, np.full_like(v, 0.3)], axis=1)[:, None, :]


def test_stats_of_a_peak_then_a_harvest():
    doy = np.array([20, 100, 150, 170, 200, 300])
    ndvi = _series([0.2, 0.4, 0.9, 0.1, 0.3, 0.5])  # peak on day 150, harvest drop of 0.8 by day 170
    top, top_day, after, drop, drop_day = ref.ndvi_stats(ndvi, doy)[:, 0]
    assert np.isclose(top[0], 0.9) and top_day[0] == 150
    assert np.isclose(after[0], 0.1)   # the lowest value from the peak on
    assert np.isclose(drop[0], 0.8) and drop_day[0] == 170
    flat = ref.ndvi_stats(ndvi, doy)[:, 0, 1]  # never falls: no drop, dated the first date
    assert np.allclose(flat, [0.3, 20, 0.3, 0.0, 20])


def test_stats_min_after_the_max_ignores_earlier_lows():
    doy = np.array([10, 60, 120, 240])
    stats = ref.ndvi_stats(_series([0.0, 0.8, 0.5, 0.6]), doy)[:, 0, 0]
    assert np.allclose(stats, [0.8, 60, 0.5, 0.3, 120])


def test_dates_grid_keeps_a_short_event_at_its_day():
    doy = np.array([0, 140, 160, 180, 360])
    ndvi = _series([0.3, 0.3, 0.9, 0.3, 0.3])  # a green peak on day 160 only
    grid = ref.interp_dates(ndvi, doy, step=10)
    assert grid.shape == (37, 1, 2)
    days = np.arange(0, 365, 10)
    assert np.isclose(grid[days == 160, 0, 0], 0.9)
    assert np.isclose(grid[days == 150, 0, 0], 0.6)  # halfway between day 140 and the peak
    assert np.allclose(grid[(days <= 140) | (days >= 180), 0, 0], 0.3)
    assert np.allclose(grid[:, 0, 1], 0.3)


def test_dates_grid_edges_single_date_and_equal_days():
    grid = ref.interp_dates(_series([0.5, 0.7]), np.array([100, 200]), step=100)
    assert np.allclose(grid[:, 0, 0], [0.5, 0.5, 0.7, 0.7])  # days 0, 100, 200, 300: held flat at the ends
    assert np.allclose(ref.interp_dates(_series([0.4]), np.array([50]), step=100)[:, 0, 0], 0.4)
    same_day = ref.interp_dates(_series([0.2, 0.6]), np.array([30, 30]), step=100)  # averaged
    assert np.allclose(same_day[:, 0, 0], 0.4)


def test_ndvi_dates_reads_the_sample_and_orders_by_day_of_year():
    s2 = torch.zeros(2, 10, 1, 1, dtype=torch.float16)
    s2[:, 2], s2[:, 6] = 0.1, torch.tensor([0.3, 0.9])[:, None, None]  # red, NIR: NDVI 0.5 then 0.8
    days = torch.tensor([-10, 30])  # days before 15 May: 25 May (doy 144), then 15 April (doy 104)
    ndvi, doy = ref.ndvi_dates({"s2": s2, "s2_days": days})
    assert doy.tolist() == [104, 144]
    assert np.allclose(ndvi[:, 0, 0], [0.8, 0.5], atol=2e-3)


def test_pixel_features_put_each_set_under_the_aerial_pixels():
    s2 = torch.zeros(3, 10, 4, 4, dtype=torch.float16)
    s2[:, 2], s2[:, 6] = 0.1, 0.3
    sample = {"image": torch.zeros(5, 8, 8, dtype=torch.uint8), "s2": s2,
              "s2_days": torch.tensor([100, 0, -100])}
    assert ref.pixel_features(sample, None).shape == (64, 5)
    assert ref.pixel_features(sample, "monthly").shape == (64, 5 + 12)
    assert ref.pixel_features(sample, "dates").shape == (64, 5 + 37)
    stats = ref.pixel_features(sample, "stats")
    assert stats.shape == (64, 5 + 5) and np.allclose(stats[:, 5], 0.5, atol=2e-3)


def test_settings_given_to_the_reader_change_the_series_it_reads(synth_data_dir):
    """`--set s2_cover_max=...` reaches the kit's cloud filter: a stricter filter keeps no more dates (and
    fewer somewhere), on the real files of the synthetic tree."""
    _, default = ref.load_samples(synth_data_dir, "all", False)
    _, strict = ref.load_samples(synth_data_dir, "all", False, {"s2_cover_max": 0.0})
    kept = [(len(a["s2_days"]), len(b["s2_days"])) for a, b in zip(default, strict)]
    assert all(b <= a for a, b in kept) and any(b < a for a, b in kept), kept
