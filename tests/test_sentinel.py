"""s2_series against a slow reimplementation written straight from the spec's baseline procedure."""
from __future__ import annotations

import datetime as dt
from dataclasses import replace

import numpy as np
import pytest

from src.core.errors import DataError
from src.data import sentinel
from src.data.sentinel import (
    BASELINE,
    FALLBACK_TOL,
    cloud_cover,
    encode_days,
    product_date,
    read_products,
    s2_series,
    select_dates,
)


def product_name(day: dt.date, sat: str = "S2A") -> str:
    return f"{sat}_MSIL2A_{day:%Y%m%d}T105021_N0300_R051_T31UDP_{day:%Y%m%d}T135921"


def random_dates(rng: np.random.Generator, n: int, start: dt.date, span_days: int = 364) -> list[dt.date]:
    """n distinct sorted dates; never 29 February (the baseline cannot force it into 2021)."""
    days = [start + dt.timedelta(days=o) for o in range(span_days + 1)]
    days = [d for d in days if (d.month, d.day) != (2, 29)]
    return [days[i] for i in np.sort(rng.choice(len(days), size=n, replace=False))]


def super_area(rng: np.random.Generator, n_dates: int, height: int = 97, width: int = 83,
               dtype=np.uint16) -> tuple[np.ndarray, np.ndarray]:
    """Random reflectances and partial cloud/snow blobs whose coverage straddles the 0.5 threshold."""
    data = rng.integers(0, 10001, size=(n_dates, 10, height, width)).astype(dtype)
    masks = np.zeros((n_dates, 2, height, width), dtype=np.uint8)
    yy, xx = np.mgrid[:height, :width]
    for t in range(n_dates):
        for ch in (0, 1):
            for _ in range(rng.integers(0, 4)):
                cy, cx = rng.integers(0, height), rng.integers(0, width)
                radius = rng.uniform(3, 35)
                blob = (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
                masks[t, ch][blob] = rng.integers(40, 101, size=int(blob.sum()))
        masks[t] = np.maximum(masks[t], rng.integers(0, 70, size=(2, height, width)).astype(np.uint8))
    return data, masks


def baseline_series(data, masks, products, centroid, size=40, cover_max=0.5, prob_min=60, monthly=True):
    """The spec's baseline, literally: loops, datetime with the year forced to 2021, float64 means."""
    r, c = centroid
    half = size // 2
    sub = data[:, :, r - half:r + half, c - half:c + half]
    msk = masks[:, :, r - half:r + half, c - half:c + half]
    keep = []
    for t in range(msk.shape[0]):
        cover = np.count_nonzero(msk[t, 0] >= prob_min) + np.count_nonzero(msk[t, 1] >= prob_min)
        cover /= size * size
        if cover < cover_max:
            keep.append(t)
    ref = dt.datetime(2021, 5, 15)
    dates = [dt.datetime(2021, int(p[15:17]), int(p[17:19])) for p in products]
    if not monthly:
        return keep, sub[keep].astype(np.float32), np.array([(ref - dates[t]).days for t in keep])
    values, days = [], []
    for month in range(1, 13):
        idx = [t for t in keep if dates[t].month == month]
        if idx:
            values.append(np.mean(sub[idx], axis=0).astype(np.float32))
            days.append((ref - dt.datetime(2021, month, 15)).days)
    return keep, np.array(values), np.array(days)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("monthly", [True, False])
def test_matches_baseline_inside_one_year(seed, monthly):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(8, 45))
    year = 2020 if seed % 2 else 2021  # 2020 is a leap year: the encoding must still match
    dates = random_dates(rng, n, dt.date(year, 1, 1), span_days=364)
    products = [product_name(d) for d in dates]
    data, masks = super_area(rng, n, dtype=np.uint16 if seed % 3 else np.int16)
    centroid = (int(rng.integers(20, 97 - 20)), int(rng.integers(20, 83 - 20)))
    keep, ref_x, ref_days = baseline_series(data, masks, products, centroid, monthly=monthly)
    assert 0 < len(keep) < n  # the random clouds exercise both outcomes of the filter

    win = masks[:, :, centroid[0] - 20:centroid[0] + 20, centroid[1] - 20:centroid[1] + 20]
    got_keep = select_dates(dates, cloud_cover(win, 60), 0.5)
    assert got_keep.tolist() == keep

    x, days = s2_series(data, masks, products, centroid, replace(BASELINE, monthly=monthly))
    assert x.dtype == np.float32 and days.dtype == np.int64
    assert x.shape == ref_x.shape == (len(ref_days), 10, 40, 40)
    np.testing.assert_array_equal(days, ref_days)
    np.testing.assert_array_equal(x, ref_x)  # bit-identical, float32 mean included


def test_memmap_input_and_other_sizes(tmp_path):
    rng = np.random.default_rng(7)
    dates = random_dates(rng, 20, dt.date(2021, 1, 3))
    products = [product_name(d) for d in dates]
    data, masks = super_area(rng, 20)
    np.save(tmp_path / "d.npy", data)
    np.save(tmp_path / "m.npy", masks)
    mdata, mmasks = np.load(tmp_path / "d.npy", mmap_mode="r"), np.load(tmp_path / "m.npy", mmap_mode="r")
    for size in (16, 24, 48):
        keep, ref_x, ref_days = baseline_series(data, masks, products, (40, 41), size=size)
        x, days = s2_series(mdata, mmasks, products, (40, 41), replace(BASELINE, size=size))
        np.testing.assert_array_equal(x, ref_x)
        np.testing.assert_array_equal(days, ref_days)


def test_no_filter_keeps_everything():
    rng = np.random.default_rng(3)
    dates = random_dates(rng, 12, dt.date(2021, 1, 1))
    data, masks = super_area(rng, 12)
    masks[:] = 100  # fully cloudy: the filter would drop every date
    x, days = s2_series(data, masks, [product_name(d) for d in dates], (48, 41),
                        replace(BASELINE, filter_clouds=False, monthly=False))
    assert x.shape[0] == 12
    np.testing.assert_array_equal(x, data[:, :, 28:68, 21:61].astype(np.float32))
    np.testing.assert_array_equal(days, [(dt.date(2021, 5, 15) - d).days for d in dates])


def test_fallback_when_no_date_survives():
    rng = np.random.default_rng(4)
    n = 10
    dates = random_dates(rng, n, dt.date(2021, 1, 1))
    products = [product_name(d) for d in dates]
    data, masks = super_area(rng, n, height=60, width=60)
    masks[:] = 0
    # nothing below 0.5; the least covered is date 1 (0.65), dates 2 and 8 are within 0.1 of it
    covers = [0.9, 0.65, 0.725, 0.95, 0.8, 0.8, 1.0, 0.9, 0.7, 0.85]
    for t, cov in enumerate(covers):
        rows = int(round(cov * 40))
        masks[t, 1, 10:10 + rows, 10:50] = 100
    x, days = s2_series(data, masks, products, (30, 30), replace(BASELINE, monthly=False))
    expect = [t for t, cov in enumerate(covers) if cov <= 0.65 + FALLBACK_TOL]
    assert expect == [1, 2, 8]
    np.testing.assert_array_equal(x, data[expect, :, 10:50, 10:50].astype(np.float32))
    np.testing.assert_array_equal(days, [(dt.date(2021, 5, 15) - dates[t]).days for t in expect])
    # same through the monthly path: one composite per month of the kept dates
    xm, daysm = s2_series(data, masks, products, (30, 30), replace(BASELINE, monthly=True))
    assert len(daysm) == len({dates[t].month for t in expect}) and xm.shape[0] == len(daysm)


def test_snow_and_cloud_are_summed():
    dates = [dt.date(2021, 3, 1), dt.date(2021, 4, 1)]
    data = np.ones((2, 10, 40, 40), np.uint16)
    masks = np.zeros((2, 2, 40, 40), np.uint8)
    masks[0, 0, :15] = 60   # snow 37.5 %
    masks[0, 1, 25:] = 61   # cloud 37.5 % -> 75 %: dropped
    masks[1, 0, :15] = 59   # below prob_min: clear
    masks[1, 1, :19] = 100  # 47.5 %: kept
    x, days = s2_series(data, masks, [product_name(d) for d in dates], (20, 20), replace(BASELINE,
                                                                                         monthly=False))
    np.testing.assert_array_equal(days, [(dt.date(2021, 5, 15) - dates[1]).days])


def test_window_outside_is_nan_padded():
    rng = np.random.default_rng(5)
    n = 14
    dates = random_dates(rng, n, dt.date(2021, 1, 1))
    products = [product_name(d) for d in dates]
    data, masks = super_area(rng, n, height=50, width=70)
    for centroid in [(5, 60), (45, 3), (0, 0), (49, 69), (25, 35)]:
        r, c = centroid
        # reference: pad with NaN, cover over the in-bounds pixels only, baseline keep rule
        pad = np.full((n, 10, 50 + 80, 70 + 80), np.nan, np.float32)
        pad[:, :, 40:90, 40:110] = data
        sub = pad[:, :, r + 40 - 20:r + 40 + 20, c + 40 - 20:c + 40 + 20]
        win = masks[:, :, max(r - 20, 0):r + 20, max(c - 20, 0):c + 20]
        valid = win.shape[2] * win.shape[3]
        cover = [(np.count_nonzero(win[t, 0] >= 60) + np.count_nonzero(win[t, 1] >= 60)) / valid
                 for t in range(n)]
        keep = [t for t in range(n) if cover[t] < 0.5] or [
            t for t in range(n) if cover[t] <= min(cover) + FALLBACK_TOL]
        x, days = s2_series(data, masks, products, centroid, replace(BASELINE, monthly=False))
        assert x.shape == (len(keep), 10, 40, 40)
        np.testing.assert_array_equal(x, sub[keep])  # NaN where the window leaves the super-area
        nan_rows = np.isnan(x[0, 0]).all(axis=1)
        assert nan_rows.sum() == max(0, 20 - r) + max(0, r + 20 - 50)
        np.testing.assert_array_equal(days, [(dt.date(2021, 5, 15) - dates[t]).days for t in keep])
        xm, _ = s2_series(data, masks, products, centroid, replace(BASELINE, monthly=True))
        np.testing.assert_array_equal(np.isnan(xm[0]), np.isnan(x[0]))  # pads stay NaN in composites


def test_window_fully_outside_raises():
    data = np.zeros((2, 10, 30, 30), np.uint16)
    masks = np.zeros((2, 2, 30, 30), np.uint8)
    products = [product_name(dt.date(2021, 3, 1)), product_name(dt.date(2021, 4, 1))]
    with pytest.raises(ValueError, match="outside"):
        s2_series(data, masks, products, (100, 10))


def test_series_across_new_year_is_ordered_by_true_date():
    rng = np.random.default_rng(6)
    dates = random_dates(rng, 24, dt.date(2020, 9, 1), span_days=330)  # Sep 2020 .. Jul 2021
    assert {d.year for d in dates} == {2020, 2021}
    perm = rng.permutation(len(dates))  # products listed out of order
    shuffled = [dates[i] for i in perm]
    data, masks = super_area(rng, len(dates))
    masks[:] = 0
    x, days = s2_series(data[perm], masks[perm], [product_name(d) for d in shuffled], (48, 41),
                        replace(BASELINE, monthly=False))
    ref_year = sentinel.reference_year(dates)
    true_days = [(dt.date(ref_year, 5, 15) - d).days for d in dates]  # no leap day in this span
    np.testing.assert_array_equal(days, true_days)
    assert np.all(np.diff(days) < 0)
    np.testing.assert_array_equal(x, data[:, :, 28:68, 21:61].astype(np.float32))
    xm, dm = s2_series(data[perm], masks[perm], [product_name(d) for d in shuffled], (48, 41))
    months = sorted({(d.year, d.month) for d in dates})
    ref = dt.date(ref_year, 5, 15)
    np.testing.assert_array_equal(dm, [(ref - dt.date(y, m, 15)).days for y, m in months])
    first = [t for t, d in enumerate(dates) if (d.year, d.month) == months[0]]
    np.testing.assert_array_equal(xm[0], np.mean(data[first][:, :, 28:68, 21:61], axis=0).astype(np.float32))


def test_encode_days_matches_forced_2021():
    for day in [dt.date(2020, 1, 1), dt.date(2020, 2, 10), dt.date(2020, 12, 31), dt.date(2019, 7, 4)]:
        base = (dt.date(2021, 5, 15) - day.replace(year=2021)).days
        assert encode_days([day], day.year)[0] == base
    assert encode_days([dt.date(2020, 2, 29)], 2020)[0] == encode_days([dt.date(2020, 2, 28)], 2020)[0]
    assert encode_days([dt.date(2022, 1, 1)], 2021)[0] == (dt.date(2021, 5, 15) - dt.date(2022, 1, 1)).days


def test_product_date_and_read_products(tmp_path):
    assert product_date("S2B_MSIL2A_20200302T105021_N0300_R051_T31UDP_20200302T135921") == dt.date(2020, 3, 2)
    assert product_date("/x/S2B_MSIL2A_20200302T105021_N0300") == dt.date(2020, 3, 2)
    with pytest.raises(ValueError, match="S2A_junk"):
        product_date("S2A_junk")
    path = tmp_path / "p_products.txt"
    names = [product_name(dt.date(2021, 1, 5)), product_name(dt.date(2021, 2, 5))]
    path.write_text(names[0] + "\n\n" + names[1] + "\n")
    assert read_products(path) == names
    with pytest.raises(DataError, match="missing_products.txt"):
        read_products(tmp_path / "missing_products.txt")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(DataError, match="empty.txt"):
        read_products(tmp_path / "empty.txt")


def test_shape_mismatches_raise():
    data = np.zeros((3, 10, 30, 30), np.uint16)
    masks = np.zeros((3, 2, 30, 30), np.uint8)
    products = [product_name(dt.date(2021, m, 1)) for m in (1, 2, 3)]
    with pytest.raises(ValueError, match="product names"):
        s2_series(data, masks, products[:2], (15, 15))
    with pytest.raises(ValueError, match="masks shape"):
        s2_series(data, masks[:2], products, (15, 15))


@pytest.fixture(scope="module")
def edge_tree(tmp_path_factory):
    """A synthetic tree (real .npy super-areas, ~1-5 dates a month) with half of its patches against the
    super-area border, and its training index."""
    from src.prep.index_scan import build_index
    from src.prep.synth_write import SynthSpec, make_dataset

    root = make_dataset(tmp_path_factory.mktemp("edge"), SynthSpec(train_domains=1, test_domains=0, zones=2,
                                                                   patches=4, seed=3, edge_rate=0.5))
    return build_index(root)["train"].reset_index(drop=True)


def reference_composites(data, masks, dates, centroid, size=40, cover_max=0.5, prob_min=60):
    """The monthly composites, written plainly on arrays read whole: NaN-padded window, cover over its
    valid pixels, dates kept (or the fallback) in date order, float64 mean of each (year, month) cast to
    float32, days before 15 May of the reference year in a 365-day calendar."""
    t_all, n_bands, height, width = data.shape
    padded = np.full((t_all, n_bands, height + 2 * size, width + 2 * size), np.nan)
    padded[:, :, size:size + height, size:size + width] = data
    top, left = centroid[0] - size // 2, centroid[1] - size // 2
    window = padded[:, :, size + top:size + top + size, size + left:size + left + size]
    clipped = masks[:, :, max(top, 0):top + size, max(left, 0):left + size]
    cover = [(np.sum(clipped[t, 0] >= prob_min) + np.sum(clipped[t, 1] >= prob_min)) / clipped[t, 0].size
             for t in range(t_all)]
    order = sorted(range(t_all), key=lambda t: dates[t])
    keep = [t for t in order if cover[t] < cover_max] or [t for t in order if cover[t] <= min(cover) + 0.1]
    months = list(dict.fromkeys((dates[t].year, dates[t].month) for t in keep))
    values = [np.mean(window[[t for t in keep if (dates[t].year, dates[t].month) == ym]], axis=0)
              for ym in months]
    ref_year = max(sorted({d.year for d in dates}), key=lambda y: sum(d.year == y for d in dates))
    days = [(dt.date(2021, 5, 15) - dt.date(2021, m, 15)).days + 365 * (ref_year - y) for y, m in months]
    return np.array(values).astype(np.float32), np.array(days)


def test_monthly_composites_of_synthetic_files_match_a_plain_reference(edge_tree):
    """s2_series through memory-mapped .npy files written by the synthetic generator: the composites
    (NaN pads included) bit-identical to `reference_composites`, for the index's centroids, patches
    moved to the super-area's corners, and without the cloud filter."""
    from src.data.sentinel import open_zone

    checked = months_of_several_dates = 0
    for zone in edge_tree.groupby("s2_data"):
        row = zone[1].iloc[0]
        data, masks, products = open_zone(row["s2_data"], row["s2_masks"], row["s2_products"])
        whole_data, whole_masks = np.load(row["s2_data"]), np.load(row["s2_masks"])
        dates = [product_date(p) for p in products]
        height, width = data.shape[-2:]
        centroids = [(int(r), int(c)) for r, c in zip(zone[1]["s2_row"], zone[1]["s2_col"])]
        for centroid in centroids + [(0, 0), (height - 1, width - 1), (3, width // 2)]:
            want_x, want_days = reference_composites(whole_data, whole_masks, dates, centroid)
            x, days = s2_series(data, masks, products, centroid)
            np.testing.assert_array_equal(x, want_x)
            np.testing.assert_array_equal(days, want_days)
            checked += 1
        everything, _ = reference_composites(whole_data, whole_masks, dates, centroids[0], cover_max=2.0)
        x, _ = s2_series(data, masks, products, centroids[0], replace(BASELINE, filter_clouds=False))
        np.testing.assert_array_equal(x, everything)
        months_of_several_dates += len(dates) - x.shape[0]
    assert checked >= 10 and months_of_several_dates > 0  # composites of one date and of several
    assert (edge_tree["s2_row"] < 20).any()  # the index itself has windows leaving the super-area


def test_cloud_cover_counts_like_count_nonzero():
    rng = np.random.default_rng(11)
    _, masks = super_area(rng, 9, height=37, width=41)
    for window in (masks, masks[:, :1], masks[:, :, 3:30, 0:17]):
        want = np.count_nonzero(window[:, :2] >= 60, axis=(1, 2, 3)) / float(np.prod(window.shape[2:]))
        got = cloud_cover(window, 60)
        assert got.dtype == np.float64
        np.testing.assert_array_equal(got, want)


def reference_filled(data, masks, dates, centroid, size, monthly, prob_min=60, cover_max=0.5):
    """s2_cloud_pixels=fill written plainly, pixel by pixel: the kept dates (as the official filter keeps
    them), each pixel's mean over its clear kept dates of each month (or its clear dates), the steps where it
    has none interpolated in time between its clear ones (np.interp: nearest at the ends), a pixel never
    clear left as the plain series."""
    plain, days = s2_series(data, masks, [product_name(d) for d in dates], centroid,
                            replace(BASELINE, size=size, cover_max=cover_max, monthly=monthly))
    half = size // 2
    r, c = centroid
    sub = data[:, :, r - half:r + half, c - half:c + half].astype(np.float64)
    msk = masks[:, :, r - half:r + half, c - half:c + half]
    cover = [((msk[t, 0] >= prob_min).sum() + (msk[t, 1] >= prob_min).sum()) / size**2
             for t in range(len(dates))]
    keep = [t for t in np.argsort([d.toordinal() for d in dates], kind="stable") if cover[t] < cover_max]
    step = (lambda t: (dates[t].year, dates[t].month)) if monthly else (lambda t: t)
    steps = list(dict.fromkeys(step(t) for t in keep))
    out = plain.astype(np.float64)
    for i in range(size):
        for j in range(size):
            values, when = [], []
            for k, s in enumerate(steps):
                clear = [t for t in keep
                         if step(t) == s and msk[t, 0, i, j] < prob_min and msk[t, 1, i, j] < prob_min]
                if clear:
                    values.append(sub[clear, :, i, j].mean(axis=0))
                    when.append(k)
            if not values:
                continue
            ordinal = [dt.date(*s, 15).toordinal() if monthly else dates[s].toordinal() for s in steps]
            for b in range(sub.shape[1]):
                out[:, b, i, j] = np.interp(ordinal, [ordinal[k] for k in when], [v[b] for v in values])
    return out, days


@pytest.mark.parametrize("monthly", [True, False])
def test_cloud_pixels_fill_matches_a_per_pixel_reference(monthly):
    """s2_cloud_pixels=fill: each cloudy or snowy pixel of a kept date replaced from the same pixel's clear
    dates (monthly means of clear dates, linear in time between them), against a loop over pixels; the dates
    kept and their encoding unchanged."""
    rng = np.random.default_rng(5)
    dates = random_dates(rng, 30, dt.date(2021, 1, 3))
    data, masks = super_area(rng, len(dates), height=30, width=30)
    masks[4, 1, :, :] = 0  # one date clear everywhere, one never clear at one pixel below
    masks[:, 1, 12, 13] = 100
    opts = replace(BASELINE, size=12, monthly=monthly, cover_max=0.9, fill_clouds=True)
    x, days = s2_series(data, masks, [product_name(d) for d in dates], (15, 15), opts)
    want, want_days = reference_filled(data, masks, dates, (15, 15), 12, monthly, cover_max=0.9)
    np.testing.assert_array_equal(days, want_days)
    np.testing.assert_allclose(x, want, rtol=1e-5, atol=0.05)
    products = [product_name(d) for d in dates]
    plain, _ = s2_series(data, masks, products, (15, 15), replace(opts, fill_clouds=False))
    assert (x != plain).mean() > 0.1  # something was filled
    np.testing.assert_array_equal(x[:, :, 3, 4], plain[:, :, 3, 4])  # (12, 13) is never clear: plain


def test_cloud_pixels_fill_reads_real_files_with_pads(edge_tree):
    """fill on memory-mapped synthetic super-areas, windows leaving the super-area included: the same NaN
    pads as the plain series and the same months."""
    from src.data.sentinel import open_zone

    for _, zone in edge_tree.groupby("s2_data"):
        row = zone.iloc[0]
        data, masks, products = open_zone(row["s2_data"], row["s2_masks"], row["s2_products"])
        for centroid in [(int(r), int(c)) for r, c in zip(zone["s2_row"], zone["s2_col"])] + [(0, 0)]:
            plain, days = s2_series(data, masks, products, centroid)
            x, fill_days = s2_series(data, masks, products, centroid, replace(BASELINE, fill_clouds=True))
            np.testing.assert_array_equal(days, fill_days)
            np.testing.assert_array_equal(np.isnan(x), np.isnan(plain))


def test_series_options_follow_the_settings():
    from src.core.settings import Settings
    from src.data.sentinel import SeriesOptions

    assert not BASELINE.fill_clouds and SeriesOptions.of(Settings(s2_cloud_pixels="fill")).fill_clouds
