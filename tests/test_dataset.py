"""FlairDataset (+ src.data.loader's collate/build_loader/EpochSampler, src.data.dataset) on the synthetic
tree (real TIFF / .npy files): raw samples, their batches, and augmentation that depends on (seed, epoch,
index) only."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from src.core.config import load_settings
from src.core.errors import DataError
from src.core.files import read_image, read_label, write_tif
from src.core.flair import remap
from src.data.augment import AUG_LEN
from src.data.dataset import META_DIM, FlairDataset, encode_metadata
from src.data.device_augment import device_batch
from src.data.loader import EpochSampler, build_loader, collate
from src.data.sentinel import read_products, s2_series

# docs/data-format.md, "Aerial images", literally: R, G, B, NIR, nDSM
SPEC_MEAN = [113.78, 118.08, 109.27, 102.36, 16.70]
SPEC_STD = [35.41, 32.06, 30.71, 27.09, 15.85]


def cfg_of(**kw):
    return load_settings(None, kw)


def test_sample_keys_types_and_s2(synth_index):
    df = synth_index["train"]
    ds = FlairDataset(df, cfg_of(use_s2=True, use_metadata=True, augment="heavy"), train=False)
    assert len(ds) == len(df)
    for i in (0, len(df) - 1):
        s = ds[i]
        row = df.iloc[i]
        assert s["id"] == row["id"]
        assert s["image"].dtype == torch.uint8 and s["image"].shape == (5, 512, 512)
        np.testing.assert_array_equal(s["image"].numpy(), read_image(row["img_path"]))
        assert s["mask"].dtype == torch.uint8 and s["mask"].shape == (512, 512)
        np.testing.assert_array_equal(s["mask"].numpy(), remap(read_label(row["msk_path"])))
        assert "aug" not in s
        data = np.load(row["s2_data"], mmap_mode="r")
        masks = np.load(row["s2_masks"], mmap_mode="r")
        x, days = s2_series(data, masks, read_products(row["s2_products"]), (row["s2_row"], row["s2_col"]))
        valid = ~np.isnan(x).any(axis=(0, 1))
        np.testing.assert_array_equal(s["s2_valid"].numpy(), valid)
        expect = (np.where(np.isnan(x), 0, x) / np.float32(10000)).astype(np.float16)
        np.testing.assert_array_equal(s["s2"].numpy(), expect)
        np.testing.assert_array_equal(s["s2_days"].numpy(), days)
        assert s["s2"].dtype == torch.float16 and s["s2_days"].dtype == torch.int64
        assert s["s2_pad"].dtype == torch.bool and not s["s2_pad"].any()
        assert 0 <= s["s2"].min() and s["s2"].max() <= 1.5
        assert s["meta"].shape == (META_DIM,) and s["meta"].dtype == torch.float32
    assert len(ds._zones) <= df["s2_data"].nunique()  # one memmap triple per zone, not per sample


def test_normalisation_uses_the_five_band_statistics(synth_index):
    """The bands a model is fed: the dataset's raw bands, normalised on the device
    (src.data.device_augment)."""
    one = synth_index["train"].iloc[:1]
    raw = read_image(one["img_path"].iloc[0]).astype(np.float32)

    def fed(**kw):
        cfg = cfg_of(**kw)
        return device_batch(collate([FlairDataset(one, cfg, train=False)[0]]), cfg, torch.device("cpu"))
    s = fed()["image"][0].numpy()
    for b in range(5):
        expect = (raw[b] - np.float32(SPEC_MEAN[b])) / np.float32(SPEC_STD[b])
        np.testing.assert_allclose(s[b], expect, rtol=1e-6, atol=1e-6)
    sub = fed(bands=["NIR", "R", "E"])["image"][0]
    for out_b, b in enumerate((3, 0, 4)):
        expect = (raw[b] - np.float32(SPEC_MEAN[b])) / np.float32(SPEC_STD[b])
        np.testing.assert_allclose(sub[out_b].numpy(), expect, rtol=1e-6, atol=1e-6)
    scaled = fed(norm="scale")["image"][0]
    np.testing.assert_allclose(scaled.numpy(), raw / np.float32(255), rtol=1e-6)
    with pytest.raises(ValueError, match="X"):
        FlairDataset(synth_index["train"], cfg_of(bands=["R", "X"]), train=False)


def test_collate_pads_mixed_lengths(synth_index):
    df = synth_index["train"]
    ds = FlairDataset(df, cfg_of(use_s2=True, s2_monthly=False), train=False)
    lengths = {}
    for i in range(len(df)):
        lengths.setdefault(ds[i]["s2"].shape[0], i)
    assert len(lengths) >= 2  # zones have different numbers of dates
    picks = [ds[i] for i in lengths.values()]
    batch = collate(picks)
    t_max = max(lengths)
    assert batch["s2"].shape == (len(picks), t_max, 10, 40, 40)
    assert batch["s2_days"].shape == batch["s2_pad"].shape == (len(picks), t_max)
    for b, s in enumerate(picks):
        n = s["s2"].shape[0]
        torch.testing.assert_close(batch["s2"][b, :n], s["s2"])
        torch.testing.assert_close(batch["s2_days"][b, :n], s["s2_days"])
        assert not batch["s2_pad"][b, :n].any() and batch["s2_pad"][b, n:].all()
        assert (batch["s2"][b, n:] == 0).all() and (batch["s2_days"][b, n:] == 0).all()
    assert batch["image"].shape == (len(picks), 5, 512, 512) and batch["id"] == [s["id"] for s in picks]
    unlabeled = FlairDataset(df, cfg_of(), train=False, labels=False)[0]
    assert "mask" not in unlabeled
    with pytest.raises(ValueError, match="mask"):
        collate([unlabeled, FlairDataset(df, cfg_of(), train=False)[1]])


def test_training_crop_and_date_dropout(synth_index):
    df = synth_index["train"]
    cfg = cfg_of(use_s2=True, augment="heavy", crop_size=128, s2_date_dropout=0.5)
    ds = FlairDataset(df, cfg, train=True)
    ref = FlairDataset(df, cfg_of(use_s2=True), train=False)
    window = ds.augment.window_shape(512, 512)  # heavy ships its source window; the device crops
    samples = [ds[i] for i in range(3)]
    for i, s in enumerate(samples):
        assert s["image"].shape == (5, *window) and s["mask"].shape == window
        assert s["aug"].shape == (AUG_LEN,) and s["aug"].dtype == torch.float32
        assert 1 <= s["s2"].shape[0] <= ref[i]["s2"].shape[0] == len(ref[i]["s2_days"])
        assert set(s["s2_days"].tolist()) <= set(ref[i]["s2_days"].tolist())
    out = device_batch(collate(samples), cfg, torch.device("cpu"), augment=True)
    assert out["image"].shape == (3, 5, 128, 128) and out["mask"].shape == (3, 128, 128)
    assert out["mask"].min() >= 0 and out["mask"].max() <= 12


def test_window_leaving_the_super_area_is_masked(synth_index):
    df = synth_index["train"].iloc[:1].copy()
    df["s2_row"], df["s2_col"] = 3, 5
    s = FlairDataset(df, cfg_of(use_s2=True), train=False)[0]
    valid = s["s2_valid"].numpy()
    assert not valid[:17].any() and not valid[:, :15].any() and valid[17:, 15:].all()
    assert (s["s2"][:, :, :17] == 0).all() and torch.isfinite(s["s2"]).all()


def test_workers_and_pickling(synth_index):
    df = synth_index["train"]
    cfg = cfg_of(use_s2=True, use_metadata=True, augment="light", crop_size=64, workers=2, batch_size=4)
    ds = FlairDataset(df, cfg, train=True)
    _ = ds[0]  # opens memmaps in this process: they must not travel to the workers
    assert len(pickle.dumps(ds)) < 200_000 and pickle.loads(pickle.dumps(ds))._zones is None
    loader = build_loader(ds, cfg, train=True)
    ids = []
    for batch in loader:
        assert batch["image"].shape == (4, 5, 64, 64) and batch["s2_pad"].shape[0] == 4
        ids += batch["id"]
    assert len(ids) == len(df) // 4 * 4 and len(set(ids)) == len(ids)
    ev = build_loader(FlairDataset(df, cfg, train=False), cfg, train=False)
    assert sum(len(b["id"]) for b in ev) == len(df)


def epoch_batches(ds: FlairDataset, cfg: dict, epochs: list[int], persistent: bool = False) -> list[list]:
    """Every batch of each epoch in `epochs`, through one loader whose sampler is moved on (as training)."""
    sampler = EpochSampler(torch.utils.data.DistributedSampler(ds, num_replicas=1, rank=0, seed=0))
    loader = build_loader(ds, cfg, train=True, sampler=sampler, persistent=persistent)
    out = []
    for epoch in epochs:
        sampler.set_epoch(epoch)
        out.append([(b["id"], b["image"].clone(), b["mask"].clone(), b["s2"].clone(), b["aug"].clone())
                    for b in loader])
    return out


def same(a: list, b: list) -> bool:
    return all(x[0] == y[0] and all(torch.equal(u, v) for u, v in zip(x[1:], y[1:])) for x, y in zip(a, b))


def test_augmentation_is_a_function_of_seed_epoch_and_index(synth_index):
    """Persistent workers and exact resume rest on this: an epoch's batches are the same with 0 or 2
    workers, again when replayed, and differ in another epoch; the same row at two indices is augmented
    independently."""
    df = synth_index["train"].iloc[:8]
    cfg = cfg_of(use_s2=True, augment="heavy", crop_size=64, batch_size=4, s2_date_dropout=0.3)
    ds = FlairDataset(df, cfg, train=True)
    main = epoch_batches(ds, cfg.with_values(workers=0), [0, 1])
    workers = epoch_batches(ds, cfg.with_values(workers=2), [1, 0, 1], persistent=True)
    assert same(main[0], workers[1]) and same(main[1], workers[0]) and same(main[1], workers[2])
    assert not same(main[0], main[1])
    twice = FlairDataset(df.iloc[[0, 0]], cfg, train=True)
    assert not torch.equal(twice[(0, 0)]["image"], twice[(1, 0)]["image"])
    assert torch.equal(twice[(0, 3)]["image"], twice[(0, 3)]["image"])


def corrupt_copy(synth_index, tmp_path, value: int):
    """One-row index whose label is a copy of a real one with `value` written in a corner."""
    df = synth_index["train"].iloc[:2].copy().reset_index(drop=True)
    raw = read_label(df.loc[0, "msk_path"]).copy()
    raw[:4, :4] = value
    path = tmp_path / f"MSK_{df.loc[0, 'id']}.tif"
    write_tif(path, raw)
    df.loc[0, "msk_path"] = str(path)
    return df, path


@pytest.mark.parametrize("value", [0, 20, 255])
def test_labels_outside_1_19_raise_naming_the_file(synth_index, tmp_path, value):
    df, path = corrupt_copy(synth_index, tmp_path, value)
    ds = FlairDataset(df, cfg_of(), train=False)
    with pytest.raises(DataError, match=rf"{path.name}.*\[{value}\]"):
        ds[0]
    assert "mask" not in FlairDataset(df, cfg_of(), train=False, labels=False)[0]


def test_skip_bad_in_training_logs_and_replaces(synth_index, tmp_path):
    df, path = corrupt_copy(synth_index, tmp_path, 25)
    log = tmp_path / "bad.log"
    ds = FlairDataset(df, cfg_of(skip_bad=True), train=True, bad_log=log)
    s = ds[0]
    assert s["id"] == df.loc[1, "id"] and ds.bad_count == 1
    text = log.read_text()
    assert df.loc[0, "id"] in text and path.name in text
    ds[0]
    assert ds.bad_count == 1  # known bad rows are skipped without re-reading
    df.loc[1, "img_path"] = str(tmp_path / "missing.tif")
    with pytest.raises(DataError, match="every one"):
        FlairDataset(df, cfg_of(skip_bad=True), train=True, bad_log=log)[1]


def test_skip_bad_outside_training_marks_the_sample(synth_index, tmp_path):
    """A corrupt image in validation/inference is reported as {"id", "bad"}, never replaced by its
    neighbour (which would be scored twice); collate lists it apart from the tensors."""
    df = synth_index["train"].iloc[:3].copy().reset_index(drop=True)
    src = Path(df.loc[1, "img_path"])
    bad_img = tmp_path / src.name
    data = src.read_bytes()
    bad_img.write_bytes(data[: len(data) // 3])  # a truncated download
    df.loc[1, "img_path"] = str(bad_img)
    bad_id = df.loc[1, "id"]
    log = tmp_path / "bad.log"
    ds = FlairDataset(df, cfg_of(skip_bad=True, use_s2=True), train=False, bad_log=log)
    marker = ds[1]
    assert set(marker) == {"id", "bad"} and marker["id"] == bad_id
    assert bad_img.name in marker["bad"] and "\n" not in marker["bad"]
    assert ds.bad_count == 1 and log.read_text() == f"{bad_id}\t{marker['bad']}\n"
    assert ds[1] == marker and ds.bad_count == 1  # known bad: not re-read, not logged twice
    batch = collate([ds[i] for i in range(3)])
    assert batch["id"] == [df.loc[0, "id"], df.loc[2, "id"]] and batch["bad"] == [(bad_id, marker["bad"])]
    assert batch["image"].shape[0] == batch["s2"].shape[0] == 2
    # training keeps replacing it, so an epoch keeps its size
    assert FlairDataset(df, cfg_of(skip_bad=True), train=True)[1]["id"] == df.loc[2, "id"]
    # without skip_bad the error names the file
    with pytest.raises(DataError, match=bad_img.name):
        FlairDataset(df, cfg_of(), train=False)[1]


def test_encode_metadata():
    m = encode_metadata("UCE-M3-f120-s06", "2021-06-21", "10h30", 675_000.0, 6_580_000.0, 500.0)
    assert m.dtype == np.float32 and m.shape == (META_DIM,)
    assert m[0] == 0 and m[1] == 0 and m[2] == pytest.approx(0.5)
    assert m[3] == pytest.approx(np.sin(2 * np.pi * 171 / 365.25), abs=1e-6)
    assert m[5] == pytest.approx(-0.25)
    assert m[6:].sum() == 1
    missing = encode_metadata("", "", "", float("nan"), float("nan"), float("nan"))
    assert not missing.any()


@pytest.fixture(scope="module")
def mixed_index(tmp_path_factory):
    """Training index of a small tree whose tiles alternate planar and pixel-interleaved storage (only
    planar ones can be decoded straight into a batch row), some S2 windows leaving their super-area."""
    from src.prep.index_scan import build_index
    from src.prep.synth_write import SynthSpec, make_dataset

    root = make_dataset(tmp_path_factory.mktemp("mixed"), SynthSpec(
        train_domains=1, test_domains=0, zones=2, patches=4, seed=5, interleave="mixed", edge_rate=0.3))
    return build_index(root)["train"].reset_index(drop=True)


def assert_same_batch(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        if torch.is_tensor(value):
            assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
        else:
            assert got[key] == value, key


@pytest.mark.parametrize("kw", [dict(augment="none"), dict(augment="light"),
                                dict(augment="light", crop_size=96),
                                dict(augment="heavy", crop_size=128, s2_date_dropout=0.3),
                                dict(augment="light", bands=["NIR", "R", "G"], use_s2=False)])
def test_batched_fetch_gives_the_batch_of_single_fetches(mixed_index, kw):
    """What torch's fetcher hands to collate (__getitems__) batches to exactly collate([ds[i], ...]), samples
    included, in training and in evaluation; the image and mask rows are written in place (collate does
    not copy them again)."""
    cfg = cfg_of(**{"use_s2": True, "use_metadata": True, **kw})
    for train in (True, False):
        ds = FlairDataset(mixed_index, cfg, train=train)
        items = [(i, 4) for i in (5, 0, 3, 3, 6, 1, 2)]
        singles = [ds[item] for item in items]
        batched = ds.__getitems__(items)
        for one, other in zip(batched, singles):
            assert_same_batch(one, other)
        batch = collate(batched)
        assert_same_batch(batch, collate(singles))
        for key in ("image", "mask"):
            assert batch[key].data_ptr() == batched[0][key].data_ptr()  # the rows themselves


def test_batched_fetch_with_bad_samples(synth_index, tmp_path):
    """skip_bad: in evaluation the marker of an unreadable patch takes its place in the batch (collate lists
    it apart), in training the next readable patch does, as with single fetches."""
    df = synth_index["train"].iloc[:4].copy().reset_index(drop=True)
    bad_img = tmp_path / Path(df.loc[2, "img_path"]).name
    bad_img.write_bytes(Path(df.loc[2, "img_path"]).read_bytes()[:5000])
    df.loc[2, "img_path"] = str(bad_img)
    for train in (False, True):
        cfg = cfg_of(skip_bad=True, use_s2=True, augment="light")
        batched = collate(FlairDataset(df, cfg, train=train).__getitems__([0, 1, 2, 3]))
        assert_same_batch(batched, collate([FlairDataset(df, cfg, train=train)[i] for i in range(4)]))
        assert ("bad" in batched) != train and len(batched["id"]) == 4 - ("bad" in batched)
