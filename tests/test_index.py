"""The index on synthetic trees: complete and correct for every layout, and each problem named clearly."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from src import index
from src.core.errors import DataError
from src.core.tables import COLUMNS, load_index
from src.prep.index_checks import Problem
from src.prep.index_scan import IndexReport, build_index, format_problems, scan
from src.prep.synth_write import SynthSpec, make_dataset

CENTROIDS = "flair-2_centroids_sp_to_patch.json"


@pytest.fixture(scope="module")
def small_tree(tmp_path_factory) -> Path:
    """1 train + 1 test domain, 2 zones, 2 patches each; tests corrupt copies of it, never the original."""
    return make_dataset(tmp_path_factory.mktemp("small"), SynthSpec(1, 1, 2, 2, seed=7, edge_rate=0.0))


@pytest.fixture
def tree(small_tree, tmp_path) -> Path:
    dst = tmp_path / "root"
    shutil.copytree(small_tree, dst)
    return dst


def _kinds(report: IndexReport) -> dict[str, list[Problem]]:
    out: dict[str, list[Problem]] = {}
    for p in report.problems:
        out.setdefault(p.kind, []).append(p)
    return out


def test_index_complete_and_correct(synth_root, synth_index):
    centroids = json.loads((synth_root / CENTROIDS).read_text())
    meta = json.loads((synth_root / "flair-2_aerial_metadata.json").read_text())
    train, test = synth_index["train"], synth_index["test"]
    assert len(train) == 3 * 2 * 3 and len(test) == 2 * 2 * 3
    for split, df in synth_index.items():
        assert list(df.columns) == COLUMNS
        assert df["id"].is_monotonic_increasing and df["id"].is_unique
        assert df["id"].str.fullmatch(r"\d{6}").all() and (df["split"] == split).all()
        assert df.groupby("domain")["zone"].nunique().eq(2).all()
        for row in df.itertuples():
            for col in ("img_path", "msk_path", "s2_data", "s2_masks", "s2_products"):
                path = Path(getattr(row, col))
                assert path.is_absolute() and path.is_file(), (col, path)
            assert Path(row.img_path).name == f"IMG_{row.id}.tif"
            assert Path(row.msk_path).name == f"MSK_{row.id}.tif"
            assert Path(row.img_path).parts[-4:-2] == (row.domain, row.zone)
            assert Path(row.s2_data).name == f"SEN2_sp_{row.domain}-{row.zone}_data.npy"
            assert Path(row.s2_data).parts[-4:-2] == (row.domain, row.zone)
            assert [row.s2_row, row.s2_col] == centroids[f"IMG_{row.id}.tif"]
            m = meta[f"IMG_{row.id}"]
            assert (row.camera, row.date, row.time) == (m["camera"], m["date"], m["time"])
            assert row.patch_centroid_z == pytest.approx(m["patch_centroid_z"])
    assert train["img_path"].str.contains("/flair_aerial_train/").all()
    assert test["img_path"].str.contains("/flair_2_aerial_test/").all()
    assert not set(train["domain"]) & set(test["domain"])


def test_csv_round_trip(synth_data_dir, synth_index):
    for split in ("train", "test"):
        df = load_index(synth_data_dir / f"index_{split}.csv")
        pd.testing.assert_frame_equal(df, synth_index[split], check_dtype=False)
        assert df["id"].map(type).eq(str).all() and df["s2_row"].dtype == np.int64


def test_cli_writes_csvs_and_counts(synth_root, tmp_path, capsys):
    assert index.main(["--root", str(synth_root), "--out", str(tmp_path), "--check"]) == 0
    out = capsys.readouterr().out
    assert "train: 3 domains, 6 zones, 18 patches" in out and "test: 2 domains, 4 zones, 12 patches" in out
    assert "D004_2021" in out and "D015_2020" in out
    df = load_index(tmp_path / "index_train.csv")
    assert len(df) == 18 and not list(tmp_path.glob(".*.tmp"))


def test_toy_layout_under_a_test_named_path(tmp_path):
    # tmp_path contains this test's name ("test_..."): only folders below the root may decide the split.
    root = make_dataset(tmp_path / "toy", SynthSpec(2, 1, 1, 2, seed=2, layout="toy", test_labels=False))
    frames = build_index(root)
    assert len(frames["train"]) == 4 and len(frames["test"]) == 2
    assert (frames["test"]["msk_path"] == "").all() and (frames["train"]["msk_path"] != "").all()
    assert frames["train"]["img_path"].str.contains("flair_2_toy_aerial_train").all()
    # the root may also be the dataset folder itself
    assert len(build_index(root / "flair_2_toy_dataset")["train"]) == 4


def test_hugging_face_like_deeper_layout(tree, tmp_path):
    """Per-domain folders at other depths (data/train-val/..., data/flair#2-test/..., aux-data/*.json)."""
    hf = tmp_path / "hf"
    for top, dest in (("flair_aerial_train", "data/train-val"), ("flair_labels_train", "data/train-val"),
                      ("flair_sen_train", "data/train-val"), ("flair_2_aerial_test", "data/flair#2-test"),
                      ("flair_2_sen_test", "data/flair#2-test")):
        for domain in (tree / top).iterdir():
            shutil.copytree(domain, hf / dest / domain.name / "extra" / domain.name, dirs_exist_ok=True)
    (hf / "aux-data").mkdir()
    for js in tree.glob("*.json"):
        shutil.copy(js, hf / "aux-data" / ("renamed_" + js.name if "metadata" in js.name else js.name))
    report = scan(hf)
    assert not report.fatal, format_problems(report.problems)
    assert len(report.frames["train"]) == 4 and len(report.frames["test"]) == 4
    assert (report.frames["test"]["msk_path"] == "").all()
    assert (report.frames["train"]["camera"] != "").all()


def test_missing_train_label_is_fatal_and_named(tree, tmp_path, capsys):
    victim = sorted((tree / "flair_labels_train").rglob("MSK_*.tif"))[0]
    pid = victim.stem[4:]
    victim.unlink()
    problems = _kinds(scan(tree))["missing-label"]
    assert len(problems) == 1 and problems[0].fatal and f"IMG_{pid}.tif" in problems[0].path
    assert f"MSK_{pid}.tif" in problems[0].message
    out_dir = tmp_path / "out"
    assert index.main(["--root", str(tree), "--out", str(out_dir)]) == 1
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "missing-label" in captured.err
    assert f"IMG_{pid}.tif" in captured.out
    assert not (out_dir / "index_train.csv").exists()
    assert f"IMG_{pid}.tif" in (out_dir / "index_problems.txt").read_text()
    with pytest.raises(DataError, match="missing-label"):
        build_index(tree)
    # --lenient writes the CSVs anyway, with an empty msk_path for that patch
    assert index.main(["--root", str(tree), "--out", str(out_dir), "--lenient"]) == 0
    df = load_index(out_dir / "index_train.csv")
    assert df.loc[df["id"] == pid, "msk_path"].item() == ""


def test_missing_test_label_is_a_warning_only(tree):
    victim = sorted((tree / "flair_2_labels_test").rglob("MSK_*.tif"))[0]
    victim.unlink()
    report = scan(tree)
    assert not report.fatal
    assert [p.fatal for p in _kinds(report)["missing-label"]] == [False]
    shutil.rmtree(tree / "flair_2_labels_test")  # no test labels at all: silent, msk_path ""
    report = scan(tree)
    assert not report.problems and (report.frames["test"]["msk_path"] == "").all()


def test_zone_without_s2(tree):
    sen = sorted((tree / "flair_sen_train").glob("*/*"))[0]
    shutil.rmtree(sen)
    problems = _kinds(scan(tree))["zone-without-s2"]
    assert len(problems) == 1 and problems[0].fatal
    assert problems[0].path == f"{sen.parent.name}/{sen.name}" and "2 patch(es)" in problems[0].message


def test_incomplete_s2_triple(tree):
    masks = sorted((tree / "flair_sen_train").rglob("*_masks.npy"))[0]
    masks.unlink()
    kinds = _kinds(scan(tree))
    assert "_masks" in kinds["incomplete-s2"][0].message and kinds["incomplete-s2"][0].fatal
    assert "zone-without-s2" in kinds


def test_patch_without_centroid(tree):
    centroids = json.loads((tree / CENTROIDS).read_text())
    key = sorted(centroids)[1]
    del centroids[key]
    (tree / CENTROIDS).write_text(json.dumps(centroids))
    problems = _kinds(scan(tree))["missing-centroid"]
    assert len(problems) == 1 and problems[0].fatal and problems[0].path.endswith(key)
    (tree / CENTROIDS).unlink()
    assert _kinds(scan(tree))["no-centroids"][0].fatal


def test_duplicate_id(tree):
    imgs = sorted((tree / "flair_aerial_train").rglob("IMG_*.tif"))
    other_zone = next(p for p in imgs if p.parent != imgs[0].parent).parent
    copy = other_zone / imgs[0].name
    shutil.copy(imgs[0], copy)
    problems = _kinds(scan(tree))["duplicate-id"]
    assert len(problems) == 1 and problems[0].fatal
    assert str(imgs[0]) in problems[0].message and str(copy) in problems[0].message


def test_centroid_window_outside_super_area(tree):
    centroids = json.loads((tree / CENTROIDS).read_text())
    keys = sorted(centroids)
    centroids[keys[0]] = [3, 25]  # near the border: the 40x40 window gets padded, not fatal
    centroids[keys[1]] = [-4, 5000]  # not in the super-area at all
    (tree / CENTROIDS).write_text(json.dumps(centroids))
    kinds = _kinds(scan(tree))
    edge, out = kinds["window-outside"], kinds["centroid-outside"]
    assert len(edge) == 1 and not edge[0].fatal and edge[0].path.endswith(keys[0])
    assert re.search(r"leaves the \d+x\d+ super-area", edge[0].message)
    assert len(out) == 1 and out[0].fatal and out[0].path.endswith(keys[1]) and "[-4, 5000]" in out[0].message


def test_unreadable_files_only_with_check(tree, monkeypatch):
    from src.prep import index_checks

    monkeypatch.setattr(index_checks, "CHUNK", 3)  # several chunks: the headers are read in 2 processes
    img = sorted(tree.rglob("IMG_*.tif"))[0]
    img.write_bytes(b"not a tiff at all")
    msk = sorted(tree.rglob("MSK_*.tif"))[0]
    msk.write_bytes(msk.read_bytes()[:300])  # truncated
    assert not scan(tree).fatal  # the default index opens no image
    report = scan(tree, check=True, workers=2)
    bad = {Path(p.path).name for p in _kinds(report)["unreadable"]}
    assert {img.name, msk.name} <= bad and all(p.fatal for p in report.problems if p.kind == "unreadable")


def test_check_finds_bad_shapes_and_s2_mismatch(tree):
    from src.core.files import write_tif

    img = sorted(tree.rglob("IMG_*.tif"))[0]
    write_tif(img, np.zeros((4, 512, 512), np.uint8))  # a band missing
    products = sorted(tree.rglob("*_products.txt"))[0]
    products.write_text("\n".join(products.read_text().split()[:-1]) + "\n")
    data = sorted(tree.rglob("*_data.npy"))[1]
    np.save(data, np.zeros((3, 10, 5), np.uint16))
    report = scan(tree, check=True, workers=2)
    bad = {Path(p.path).name: p.message for p in report.problems if p.kind in ("bad-file", "bad-s2")}
    assert "expected 5 bands" in bad[img.name]
    assert "products but data has T=" in bad[products.name]
    assert "expected (T, 10, H, W)" in bad[data.name]


def test_load_index_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_index(tmp_path / "nope.csv")
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="missing columns"):
        load_index(tmp_path / "x.csv")


def test_empty_root(tmp_path):
    report = scan(tmp_path)
    assert [p.kind for p in report.fatal] == ["no-images"]
    assert list(report.frames["train"].columns) == COLUMNS


def test_a_failed_index_marks_the_old_csvs_unusable_until_one_succeeds(tree, tmp_path, capsys):
    """A `make index --check` that fails must not leave the previous CSVs looking valid: every reader refuses
    them with the index's own message, training included, until an index succeeds again."""
    from src import train as T
    from src.core.tables import INDEX_FAILED
    from src.prep.index_scan import make_index

    data = tmp_path / "data"
    assert make_index(tree, data) == 0 and (data / "index_train.csv").is_file()
    img = sorted(tree.rglob("IMG_*.tif"))[0]
    good = img.read_bytes()
    img.write_bytes(b"not a tiff at all")
    assert make_index(tree, data, check=True, workers=2) == 1
    assert (data / INDEX_FAILED).is_file() and "unusable until an index succeeds" in capsys.readouterr().err
    with pytest.raises(DataError, match="the last `make index` of this folder failed"):
        load_index(data / "index_train.csv")
    with pytest.raises(SystemExit) as stop:  # the trainer stops at once, with that message
        T.main(["--fold", "all", "encoder_weights=none", f"data_dir={data}", f"runs_dir={tmp_path / 'runs'}"])
    assert stop.value.code == 2 and "make index` of this folder failed" in capsys.readouterr().err
    img.write_bytes(good)
    assert make_index(tree, data, check=True, workers=2) == 0
    assert not (data / INDEX_FAILED).exists() and len(load_index(data / "index_train.csv"))


def test_an_aerial_only_tree_indexes_with_one_warning_and_refuses_s2_training(tmp_path, capsys):
    """A tree without any Sentinel-2 (FLAIR #1 style, or a subset without the sen folders and centroids) is a
    legitimate aerial-only dataset: indexed with one warning; training with use_s2=true is then a one-line
    error
    before any work."""
    import shutil

    from src import train as T
    from src.prep.folds import make_folds
    from src.prep.index_scan import make_index

    root = make_dataset(tmp_path / "raw", SynthSpec(2, 1, 1, 2, seed=4, edge_rate=0.0))
    for sen in [p for p in root.rglob("*sen*") if p.is_dir() and p.parent == root]:
        shutil.rmtree(sen)
    (root / "flair-2_centroids_sp_to_patch.json").unlink()
    data = tmp_path / "data"
    assert make_index(root, data) == 0
    out = capsys.readouterr().out
    assert "warning aerial-only (1):" in out and "ERROR" not in out
    assert (load_index(data / "index_train.csv")["s2_data"] == "").all()
    make_folds(data, k=2, seed=0, plot=False)
    capsys.readouterr()
    runs = tmp_path / "runs"
    with pytest.raises(SystemExit) as stop:
        T.main(["--fold", "0", "encoder_weights=none", "use_s2=true", "fusion=utt", f"data_dir={data}",
                f"runs_dir={runs}"])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1 and "is an aerial-only index" in err
    assert not runs.exists()  # nothing was started
