"""The synthetic generator writes the real FLAIR #2 formats (docs/data-format.md, "Layout on disk",
"Aerial images", "Labels and classes", "Sentinel-2 super-areas", "Metadata"), and its data keeps its
promises."""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from src import index, synth
from src.core.config import load_settings
from src.core.files import read_image, read_label
from src.data.dataset import FlairDataset
from src.data.sentinel import BASELINE, encode_days, product_date, s2_series
from src.prep.synth_scene import (
    AGRI,
    BARE,
    EVENT_PAIRS,
    PLOWED,
    TEST_DOMAINS,
    ZoneTruth,
    event_windows,
    hidden_dates,
    plan_dataset,
)
from src.prep.synth_write import AERIAL_LOOK, SynthSpec, make_dataset

# The session fixture synth_root is make_dataset(tmp, SynthSpec(3, 2, 2, 3, seed=0)): the same arguments give
# the truth.
FIXTURE_ARGS = dict(train_domains=3, test_domains=2, zones=2, patches=3, seed=0)
META_KEYS = {"domain", "zone", "camera", "date", "time", "patch_centroid_x", "patch_centroid_y",
             "patch_centroid_z"}
TOP = {"train": ("flair_aerial_train", "flair_labels_train", "flair_sen_train"),
       "test": ("flair_2_aerial_test", "flair_2_labels_test", "flair_2_sen_test")}


@pytest.fixture(scope="module")
def truth() -> list[ZoneTruth]:
    return plan_dataset(**FIXTURE_ARGS)


def _paths(root: Path, zt: ZoneTruth, pid: str) -> tuple[Path, Path, Path]:
    aerial, labels, sen = (root / top / zt.domain / zt.zone for top in TOP[zt.split])
    return aerial / "img" / f"IMG_{pid}.tif", labels / "msk" / f"MSK_{pid}.tif", sen / "sen"


def _s2(root: Path, zt: ZoneTruth) -> tuple[np.ndarray, np.ndarray, list[str]]:
    sen = root / TOP[zt.split][2] / zt.domain / zt.zone / "sen"
    stem = f"SEN2_sp_{zt.domain}-{zt.zone}"
    products = (sen / f"{stem}_products.txt").read_text().split()
    return np.load(sen / f"{stem}_data.npy"), np.load(sen / f"{stem}_masks.npy"), products


def test_tree_names_and_ids(synth_root, truth):
    imgs = sorted(synth_root.rglob("IMG_*.tif"))
    msks = sorted(synth_root.rglob("MSK_*.tif"))
    assert len(imgs) == len(msks) == 5 * 2 * 3
    ids = [p.stem[4:] for p in imgs]
    assert all(re.fullmatch(r"\d{6}", i) for i in ids) and len(set(ids)) == len(ids)
    assert {p.stem[4:] for p in msks} == set(ids)
    domains = {zt.domain for zt in truth}
    assert {zt.domain for zt in truth if zt.split == "test"} <= set(TEST_DOMAINS)
    assert all(re.fullmatch(r"D\d{3}_\d{4}", d) for d in domains) and len(domains) == 5
    for zt in truth:
        assert re.fullmatch(r"Z\d+_[A-Z]{2}", zt.zone)
        for pid, _, _ in zt.patches:
            img, msk, sen = _paths(synth_root, zt, pid)
            assert img.is_file() and msk.is_file()
        stems = sorted(p.name for p in sen.iterdir())
        base = f"SEN2_sp_{zt.domain}-{zt.zone}"
        assert stems == [f"{base}_data.npy", f"{base}_masks.npy", f"{base}_products.txt"]
    assert not list(synth_root.rglob(".*.tmp")), "temp files left behind"


def test_aerial_and_label_formats(synth_root, truth):
    zt = truth[0]
    for pid, _, _ in zt.patches:
        img_path, msk_path, _ = _paths(synth_root, zt, pid)
        with tifffile.TiffFile(img_path) as tif:
            page = tif.pages[0]
            assert tif.series[0].shape == (5, 512, 512) and tif.series[0].dtype == np.uint8
            assert page.compression == tifffile.COMPRESSION.LZW
            assert page.planarconfig == tifffile.PLANARCONFIG.SEPARATE
            geo = page.geotiff_tags
            assert geo["ModelPixelScale"][:2] == [0.2, 0.2]
            assert geo["ProjectedCSTypeGeoKey"] == 2154
            x, y = geo["ModelTiepoint"][3:5]
            assert 0 < x < 1.3e6 and 6.0e6 < y < 7.2e6  # Lambert-93 over France
        img = read_image(img_path)
        assert img.std(axis=(1, 2)).min() > 1  # every band carries signal
        msk = read_label(msk_path)
        assert msk.shape == (512, 512) and msk.dtype == np.uint8
        assert msk.min() >= 1 and msk.max() <= 19


def test_s2_formats_dates_and_clouds(synth_root, truth):
    shapes, lengths, full_cover, bright, dark = set(), set(), 0, [], []
    for zt in truth:
        data, masks, products = _s2(synth_root, zt)
        t, h, w = len(zt.days), *zt.shape
        assert data.shape == (t, 10, h, w) and data.dtype == np.uint16
        assert masks.shape == (t, 2, h, w) and masks.dtype == np.uint8 and masks.max() <= 100
        assert 8 <= t <= 50 and h != w and min(h, w) >= 60
        assert len(products) == t
        dates = [dt.datetime.strptime(p[11:19], "%Y%m%d").date() for p in products]
        assert all(d.year == zt.year for d in dates) and dates == sorted(dates) and len(set(dates)) == t
        assert all(re.fullmatch(r"S2[AB]_MSIL2A_\d{8}T\d{6}_N\d{4}_R\d{3}_T\d{2}[A-Z]{3}_\d{8}T\d{6}", p)
                   for p in products)
        cover = (masks >= 60).any(1).mean(axis=(1, 2))
        full_cover += int((cover == 1).sum())
        assert (cover < 0.05).any(), "every zone keeps some clear dates"
        cloud = masks[:, 1] >= 90
        bright.append(data[:, 0][cloud])
        dark.append(data[:, 0][masks.max(1) < 15])
        shapes.add((h, w))
        lengths.add(t)
    assert len(shapes) > 3 and len(lengths) > 3, "sizes and date counts vary per zone"
    assert full_cover >= len(truth), "some dates are fully covered"
    assert np.median(np.concatenate(bright)) > 5000 > 2000 > np.median(np.concatenate(dark))


def test_json_files(synth_root, truth):
    centroids = json.loads((synth_root / "flair-2_centroids_sp_to_patch.json").read_text())
    meta = json.loads((synth_root / "flair-2_aerial_metadata.json").read_text())
    patches = {pid: (zt, r0, c0) for zt in truth for pid, r0, c0 in zt.patches}
    assert set(centroids) == {f"IMG_{pid}.tif" for pid in patches}
    assert set(meta) == {f"IMG_{pid}" for pid in patches}
    for pid, (zt, r0, c0) in patches.items():
        row, col = centroids[f"IMG_{pid}.tif"]
        assert (row, col) == (r0 + 5, c0 + 5) and 0 <= row < zt.shape[0] and 0 <= col < zt.shape[1]
        m = meta[f"IMG_{pid}"]
        assert set(m) == META_KEYS
        assert (m["domain"], m["zone"]) == (zt.domain, zt.zone)
        assert dt.date.fromisoformat(m["date"]).year == zt.year
        assert re.fullmatch(r"\d{2}h\d{2}", m["time"])
        assert 0 < m["patch_centroid_x"] < 1.3e6 and 6.0e6 < m["patch_centroid_y"] < 7.2e6
        assert -10 < m["patch_centroid_z"] < 2000


def test_s2_under_each_patch_agrees_with_its_labels(synth_root, truth):
    """The promise: labels downsampled to 10 m match the S2 label map at the centroid, and the S2 data
    written there is the rendering of that label map (clear dates)."""
    centroids = json.loads((synth_root / "flair-2_centroids_sp_to_patch.json").read_text())
    agree, errors, n = 0, [], 0
    for zt in truth:
        data, masks, _ = _s2(synth_root, zt)
        expected = np.einsum("ktb,khw->tbhw", zt.profiles, zt.fractions)
        for pid, _, _ in zt.patches:
            row, col = centroids[f"IMG_{pid}.tif"]
            msk = read_label(_paths(synth_root, zt, pid)[1])
            # Aerial pixel 50k+25 sits at the centre of the k-th S2 pixel under the patch.
            down = msk[25::50, 25::50][:10, :10]
            s2_labels = zt.s2_labels[row - 5:row + 5, col - 5:col + 5]
            assert (down == s2_labels).mean() > 0.8
            agree += int((down == s2_labels).sum())
            n += down.size
            win = (slice(None), slice(None), slice(row - 5, row + 5), slice(col - 5, col + 5))
            clear = (masks[win].max(1) < 15)[:, None].repeat(10, 1)
            errors.append(np.abs(data[win] / 10000 - expected[win])[clear])
    assert agree / n > 0.9
    err = np.concatenate(errors)
    assert err.size > 1000 and np.median(err) < 0.02


def test_herbaceous_and_agricultural_differ_only_in_s2(synth_root, truth):
    aerial = {10: [], 11: []}
    for zt in truth[:2]:  # one domain: same radiometric shift for both classes
        for pid, _, _ in zt.patches:
            img_path, msk_path, _ = _paths(synth_root, zt, pid)
            img, msk = read_image(img_path), read_label(msk_path)
            for k in aerial:
                aerial[k].append(img[:, msk == k])
    herb, agri = (np.concatenate(aerial[k], axis=1).astype(np.float32) for k in (10, 11))
    assert herb.shape[1] > 5000 and agri.shape[1] > 5000
    assert np.abs(herb.mean(1) - agri.mean(1)).max() < 3
    assert np.abs(herb.std(1) - agri.std(1)).max() < 3

    gaps = []
    for zt in truth:
        data, masks, _ = _s2(synth_root, zt)
        ndvi = (data[:, 6].astype(np.float32) - data[:, 2]) / (data[:, 6].astype(np.float32) + data[:, 2] + 1)
        clear = masks.max(1) < 15
        pure = {k: zt.fractions[k] == 1 for k in (10, 11)}
        if min(p.sum() for p in pure.values()) < 3:
            continue
        for t in range(len(zt.days)):
            if clear[t][pure[10]].all() and clear[t][pure[11]].all():
                gaps.append(abs(ndvi[t][pure[10]].mean() - ndvi[t][pure[11]].mean()))
    assert len(gaps) > 10 and max(gaps) > 0.4  # a strong phenology difference somewhere in the year


def test_domains_differ_in_frequencies_and_radiometry(truth):
    freq = {}
    for zt in truth:
        freq.setdefault(zt.domain, np.zeros(20))
        freq[zt.domain] += zt.fractions.sum(axis=(1, 2))
    f = np.stack([v / v.sum() for v in freq.values()])
    assert np.abs(f[:, None] - f[None]).sum(-1).max() > 0.3
    gains = np.stack([zt.style["gain"] for zt in truth])
    assert np.ptp(gains, axis=0).min() > 0.02
    assert f[:, 13:].sum() > 0  # rare classes exist (they become "other")


def test_rare_classes_reach_the_labels(synth_root):
    values = set()
    for msk in synth_root.rglob("MSK_*.tif"):
        values |= set(np.unique(read_label(msk)).tolist())
    assert values & set(range(13, 20)), "no rare class 13..19 in any label"
    assert len(values & set(range(1, 13))) >= 10


def test_toy_layout_interleaved_same_content(tmp_path):
    a = make_dataset(tmp_path / "official", SynthSpec(1, 1, 1, 2, seed=3))
    b = make_dataset(tmp_path / "toy", SynthSpec(1, 1, 1, 2, seed=3, layout="toy", interleave="contig",
                                                 test_labels=False))
    toy = b / "flair_2_toy_dataset"
    assert (toy / "flair-2_centroids_sp_to_patch.json").is_file()
    dirs = sorted(p.name for p in toy.iterdir() if p.is_dir())
    assert dirs == ["flair_2_toy_aerial_test", "flair_2_toy_aerial_train", "flair_2_toy_labels_train",
                    "flair_2_toy_sen_test", "flair_2_toy_sen_train"]
    imgs_a = {p.name: p for p in a.rglob("IMG_*.tif")}
    imgs_b = {p.name: p for p in b.rglob("IMG_*.tif")}
    assert set(imgs_a) == set(imgs_b) and len(imgs_a) == 4
    for name, path in imgs_b.items():
        with tifffile.TiffFile(path) as tif:
            assert tif.pages[0].planarconfig == tifffile.PLANARCONFIG.CONTIG
            assert tif.series[0].shape == (512, 512, 5)
        np.testing.assert_array_equal(read_image(path), read_image(imgs_a[name]))


def test_mixed_interleave_and_seeds(tmp_path):
    root = make_dataset(tmp_path / "m", SynthSpec(1, 0, 1, 2, seed=1, interleave="mixed"))
    configs = set()
    for path in root.rglob("IMG_*.tif"):
        with tifffile.TiffFile(path) as tif:
            configs.add(tif.pages[0].planarconfig)
    assert configs == {tifffile.PLANARCONFIG.CONTIG, tifffile.PLANARCONFIG.SEPARATE}
    ids = lambda **kw: [p for zt in plan_dataset(1, 1, 1, 3, **kw) for p in zt.patches]  # noqa: E731
    assert ids(seed=1) == ids(seed=1) and ids(seed=1) != ids(seed=2)


def test_cli_and_bad_arguments(tmp_path, capsys):
    assert synth.main(["--out", str(tmp_path / "cli"), "--train-domains", "1", "--test-domains", "0",
                       "--zones", "1", "--patches", "1", "--seed", "5"]) == 0
    assert "1 patches" in capsys.readouterr().out
    assert len(list((tmp_path / "cli").rglob("IMG_*.tif"))) == 1
    with pytest.raises(ValueError, match="layout"):
        make_dataset(tmp_path / "x", SynthSpec(layout="hf"))
    with pytest.raises(ValueError, match="interleave"):
        make_dataset(tmp_path / "x", SynthSpec(interleave="bsq"))


def test_many_patches_fit_in_grown_super_area():
    zt = plan_dataset(1, 0, 1, 30, seed=4, edge_rate=0.0)[0]
    h, w = zt.shape
    starts = [(r0, c0) for _, r0, c0 in zt.patches]
    assert len(set(starts)) == 30
    for r0, c0 in starts:  # full 40x40 window inside at every centroid, no overlap thanks to the grid
        r, c = ZoneTruth.centroid(r0, c0)
        assert 20 <= r <= h - 20 and 20 <= c <= w - 20


def test_parallel_workers_write_the_same_bytes(tmp_path):
    serial = make_dataset(tmp_path / "s", SynthSpec(1, 0, 2, 1, seed=9))
    parallel = make_dataset(tmp_path / "p", SynthSpec(1, 0, 2, 1, seed=9), workers=2)
    files = sorted(p.relative_to(serial) for p in serial.rglob("*") if p.is_file())
    assert len(files) == 2 * 5 + 2
    assert files == sorted(p.relative_to(parallel) for p in parallel.rglob("*") if p.is_file())
    for rel in files:
        assert (serial / rel).read_bytes() == (parallel / rel).read_bytes(), rel


# ------------------------------------------------------------------------------- phenology (issue 28)
# `_tree_digest` of trees written by the code before issue 28 (commit ec2d5f9; TIFFs hashed by their pixels,
# so a codec library's other compressed bytes do not count). If numpy's random streams ever change, recompute
# them with that commit's code from a git worktree, never from the current code.
SMOOTH_DIGESTS = [
    (SynthSpec(1, 1, 1, 2, seed=3), "a23bacd7a42826eaf8415dc58fc7fd5371b78984799a646aefc635325ca91ea1"),
    (SynthSpec(1, 0, 2, 1, seed=9, layout="toy", interleave="mixed", test_labels=False),
     "7f67edc6caabf708751b99e9f0a58cf5ce41ae423b6515dbb4056c0442ee83b2"),
]
EVENTS_ARGS = dict(train_domains=3, test_domains=1, zones=2, patches=2, seed=0, phenology="events")


def _tree_digest(root: Path) -> str:
    """sha256 over every file, sorted: its relative path, then its pixels for a TIFF (decoded, with dtype and
    shape: the compressed bytes may change with the codec library, the content must not), else its bytes."""
    h = hashlib.sha256()
    for path in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(str(path.relative_to(root)).encode())
        if path.suffix == ".tif":
            arr = tifffile.imread(path)
            h.update(f"{arr.dtype}{arr.shape}".encode())
            h.update(np.ascontiguousarray(arr).tobytes())
        else:
            h.update(path.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("case", range(len(SMOOTH_DIGESTS)))
def test_smooth_phenology_writes_the_same_bytes_as_before(tmp_path, case):
    """The default phenology keeps the old figures reproducible: every byte as before issue 28."""
    spec, digest = SMOOTH_DIGESTS[case]
    assert spec.phenology == "smooth"
    assert _tree_digest(make_dataset(tmp_path / "s", spec)) == digest


@pytest.fixture(scope="module")
def events_root(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("events"), SynthSpec(**EVENTS_ARGS))


@pytest.fixture(scope="module")
def events_truth() -> list[ZoneTruth]:
    return plan_dataset(**EVENTS_ARGS)


def _ndvi(data: np.ndarray) -> np.ndarray:
    nir, red = data[:, 6].astype(np.float32), data[:, 2].astype(np.float32)
    return (nir - red) / (nir + red + 1)


def test_events_tree_is_indexed_and_read(events_root, tmp_path):
    assert index.main(["--root", str(events_root), "--out", str(tmp_path), "--check"]) == 0
    df = pd.read_csv(tmp_path / "index_train.csv")
    ds = FlairDataset(df, load_settings(None, {"use_s2": True}), train=False)
    sample = ds[0]
    assert sample["image"].shape[-2:] == (512, 512) and sample["s2"].shape[0] >= 1


def test_events_pairs_look_the_same_from_the_air(events_root, events_truth):
    """Each S2-only pair is drawn with one aerial look, and its pixels agree in mean and spread in every
    band within a domain (the pair cannot be told apart from the aerial image alone)."""
    assert AERIAL_LOOK["events"][PLOWED] == BARE and AERIAL_LOOK["smooth"][PLOWED] == PLOWED
    checked = 0
    for domain in sorted({zt.domain for zt in events_truth}):
        pix = {k: [] for pair in EVENT_PAIRS for k in pair}
        for zt in (z for z in events_truth if z.domain == domain):
            for pid, _, _ in zt.patches:
                img_path, msk_path, _ = _paths(events_root, zt, pid)
                img, msk = read_image(img_path), read_label(msk_path)
                for k in pix:
                    pix[k].append(img[:, msk == k])
        for pair in EVENT_PAIRS:
            a, b = (np.concatenate(pix[k], axis=1).astype(np.float32) for k in pair)
            if min(a.shape[1], b.shape[1]) < 3000:
                continue
            checked += 1
            assert np.abs(a.mean(1) - b.mean(1)).max() < 3, (domain, pair)
            assert np.abs(a.std(1) - b.std(1)).max() < 3, (domain, pair)
    assert checked >= 3


def _gaps(root: Path, zt: ZoneTruth, pair: tuple[int, int]):
    """(days, |NDVI gap|) of a pair's pure pixels on the clear dates of a zone's written S2 (None if too
    few pure pixels)."""
    data, masks, _ = _s2(root, zt)
    pure = [zt.fractions[k] > 0.99 for k in pair]
    if min(p.sum() for p in pure) < 3:
        return None
    ndvi = _ndvi(data)
    clear = [t for t in range(len(zt.days)) if all((masks[t].max(0)[p] < 15).all() for p in pure)]
    gaps = np.array([abs(ndvi[t][pure[0]].mean() - ndvi[t][pure[1]].mean()) for t in clear])
    return zt.days[clear], gaps


def test_events_pairs_differ_in_s2_only_in_short_windows(events_root, events_truth):
    """On the written S2 and the zones' labels, each pair's NDVI agrees outside its event windows (which
    cover a few weeks of the year) and differs strongly inside them somewhere in the tree."""
    inside_max = {pair[1]: 0.0 for pair in EVENT_PAIRS}
    outside = 0
    for zt in events_truth:
        windows = event_windows(zt.style["events"])
        for pair in EVENT_PAIRS:
            assert sum(b - a for a, b in windows[pair[1]]) <= 80  # a short share of the year
            measured = _gaps(events_root, zt, pair)
            if measured is None:
                continue
            days, gaps = measured
            inside = np.array([any(a <= d <= b for a, b in windows[pair[1]]) for d in days], bool)
            assert (gaps[~inside] < 0.05).all(), (zt.zone, pair)
            outside += int((~inside).sum())
            if inside.any():
                inside_max[pair[1]] = max(inside_max[pair[1]], float(gaps[inside].max()))
    assert outside > 30
    assert inside_max[AGRI] > 0.3 and inside_max[PLOWED] > 0.2, inside_max


def test_events_calendar_shifts_per_domain(events_truth):
    shifts = {zt.domain: zt.style["calendar_shift"] for zt in events_truth}
    assert all(abs(s) <= 21 for s in shifts.values()) and np.ptp(list(shifts.values())) > 7
    assert all(zt.style["events"]["mowing"] for zt in events_truth)  # herbaceous vegetation is mown


def test_events_plowed_land_is_rare(events_root, events_truth):
    counts = np.zeros(20)
    for msk in events_root.rglob("MSK_*.tif"):
        counts += np.bincount(read_label(msk).ravel(), minlength=20)
    share = counts[PLOWED] / counts.sum()
    assert 0 < share < 0.05
    smooth = plan_dataset(**{**EVENTS_ARGS, "phenology": "smooth"})
    assert sum(zt.fractions[PLOWED].sum() for zt in smooth) > 2 * sum(
        zt.fractions[PLOWED].sum() for zt in events_truth)


def test_events_cloudy_months_hide_events_on_some_zones(events_root, events_truth):
    """On zones with a cloudy month, every date in it is fully cloudy in the masks, so the official
    filter drops it from every patch's series; other zones keep their event dates."""
    hidden = [zt for zt in events_truth if hidden_dates(zt)]
    assert 0 < len(hidden) < len(events_truth)
    opts = type(BASELINE)(BASELINE.size, True, BASELINE.cover_max, BASELINE.prob_min, False)
    for zt in hidden:
        data, masks, products = _s2(events_root, zt)
        dates = sorted(hidden_dates(zt))
        assert (masks[dates, 1] >= 60).all()
        start, end = zt.style["events"]["hidden"]
        assert end - start >= 28
        _, r0, c0 = zt.patches[0]
        _, days = s2_series(data, masks, products, ZoneTruth.centroid(r0, c0), opts)
        encoded = encode_days([product_date(p) for p in products], zt.year)
        assert len(days) > 0 and not set(days.tolist()) & {encoded[i] for i in dates}


def test_phenology_setting_on_the_command_line(tmp_path, capsys):
    assert synth.main(["--out", str(tmp_path / "cli"), "--train-domains", "1", "--test-domains", "0",
                       "--zones", "1", "--patches", "1", "--phenology", "events"]) == 0
    assert "events phenology" in capsys.readouterr().out
    with pytest.raises(ValueError, match="phenology"):
        make_dataset(tmp_path / "x", SynthSpec(phenology="wavy"))
    assert not (tmp_path / "x").exists()
