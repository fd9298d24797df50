"""`make evaluate`: id matching, folders and zips, index or labels folder, outputs, bad files named."""
from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile

from src.core.errors import DataError
from src.core.files import read_label, write_tif
from src.core.flair import remap
from src.evaluate import main
from src.scoring.metrics import ConfusionMatrix
from src.scoring.score import evaluate, find_labels
from src.scoring.submission import make_zip, validate, write_pred
from src.submit import main as submit_main
from tests.test_metrics import official_from_files


def _test_rows(synth_index):
    df = synth_index["test"]
    assert len(df) >= 6 and (df["msk_path"] != "").all()
    return df


def _predict(df, folder: Path, seed: int = 0) -> ConfusionMatrix:
    """Write noisy predictions for every labelled row; return the expected matrix."""
    rng = np.random.default_rng(seed)
    cm = ConfusionMatrix()
    for pid, msk in zip(df["id"], df["msk_path"]):
        truth = remap(read_label(msk))
        pred = truth.copy()
        noise = rng.random(pred.shape) < 0.3
        pred[noise] = rng.integers(0, 13, int(noise.sum()))
        write_pred(folder, pid, pred)
        cm.update(pred, truth)
    return cm


@pytest.fixture(scope="module")
def scored(synth_index, tmp_path_factory):
    df = _test_rows(synth_index)
    folder = tmp_path_factory.mktemp("pred") / "pred"
    return df, folder, _predict(df, folder)


def test_folder_zip_index_and_labels_agree(scored, synth_root, synth_data_dir, tmp_path):
    df, folder, expected = scored
    z = make_zip(folder, "synth", tmp_path)
    labels = synth_root / "flair_2_labels_test"
    results = [
        evaluate(folder, labels, workers=2),
        evaluate(z, labels, workers=2),
        evaluate(z, synth_data_dir / "index_test.csv", workers=1),
        evaluate(folder, df, workers=3, backend="process"),
        evaluate(folder, dict(zip(df["id"], df["msk_path"]))),
    ]
    official, _, official_miou = official_from_files(
        [(folder / f"PRED_{i}.tif", m) for i, m in zip(df["id"], df["msk_path"])])
    np.testing.assert_array_equal(expected.matrix, official)
    for r in results:
        np.testing.assert_array_equal(np.array(r["confusion"]), official)
        assert abs(r["miou"] - official_miou) < 1e-9
        assert r["n_patches"] == len(df) and len(r["ious"]) == 12


def test_submit_against_the_test_index(scored, synth_data_dir, tmp_path, capsys):
    df, folder, _ = scored
    index = synth_data_dir / "index_test.csv"
    assert validate(folder, index)["files"] == len(df)
    submit_main(["--pred", str(folder), "--index", str(index), "--name", "synth", "--out", str(tmp_path)])
    assert (tmp_path / "synth.zip").is_file() and "validated" in capsys.readouterr().out
    partial = tmp_path / "partial"
    shutil.copytree(folder, partial)
    (partial / f"PRED_{df['id'].iloc[0]}.tif").unlink()
    with pytest.raises(SystemExit):
        submit_main(["--pred", str(partial), "--index", str(index), "--validate-only"])
    assert f"missing: 1 of {len(df)} expected predictions absent: PRED_{df['id'].iloc[0]}.tif" \
        in capsys.readouterr().err


def test_index_without_labels_needs_labels_dir(scored, synth_root, tmp_path):
    df, folder, expected = scored
    no_labels = df.assign(msk_path="")
    with pytest.raises(DataError, match="pass --labels"):
        evaluate(folder, no_labels)
    r = evaluate(folder, no_labels, labels=synth_root / "flair_2_labels_test")
    np.testing.assert_array_equal(np.array(r["confusion"]), expected.matrix)
    with pytest.raises(DataError, match=r"no MSK_<id>\.tif for 1 of"):
        evaluate(folder, df.assign(id=[*df["id"][:-1], "999999"]), labels=synth_root / "flair_2_labels_test")


def test_missing_and_extra_ids_are_listed(scored, tmp_path):
    df, folder, _ = scored
    ids = sorted(df["id"])
    truth = {f"{900000 + i:06d}": "unused" for i in range(25)} | {i: "unused" for i in ids[1:]}
    with pytest.raises(DataError) as err:
        evaluate(folder, truth)
    text = str(err.value)
    assert "missing 25 predictions for ids: 900000, 900001" in text and "... and 5 more" in text
    assert f"1 predictions with no label, ids: {ids[0]}" in text


def test_bad_files_are_named(scored, tmp_path):
    df, folder, _ = scored
    msks = dict(zip(df["id"], df["msk_path"]))
    pid = sorted(msks)[0]
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    tifffile.imwrite(bad / f"PRED_{pid}.tif", np.full((512, 512), 13, np.uint8), compression="lzw")
    with pytest.raises(DataError, match=rf"PRED_{pid}\.tif: values outside 0..12: \[13\]"):
        evaluate(bad, msks, workers=2)
    tifffile.imwrite(bad / f"PRED_{pid}.tif", np.zeros((256, 256), np.uint8))
    with pytest.raises(DataError, match=rf"PRED_{pid}\.tif: shape \(256, 256\) != .*MSK_{pid}\.tif shape"):
        evaluate(bad, msks)
    (bad / f"PRED_{pid}.tif").write_bytes(b"not a tiff")
    with pytest.raises(DataError, match=rf"PRED_{pid}\.tif: unreadable TIFF"):
        evaluate(bad, msks)
    shutil.copy(folder / f"PRED_{pid}.tif", bad / f"PRED_{pid}.tif")
    zero = tmp_path / f"MSK_{pid}.tif"
    write_tif(zero, np.zeros((512, 512), np.uint8))
    with pytest.raises(DataError, match=rf"MSK_{pid}\.tif: 262144 pixels have value 0"):
        evaluate(bad, msks | {pid: zero})


def test_zip_with_folder_still_scores(scored, tmp_path):
    """The validator rejects such a zip, but scoring it is still useful (e.g. someone else's zip)."""
    df, folder, expected = scored
    z = tmp_path / "nested.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for p in sorted(folder.glob("PRED_*.tif")):
            zf.write(p, f"preds/{p.name}")
    r = evaluate(z, dict(zip(df["id"], df["msk_path"])))
    np.testing.assert_array_equal(np.array(r["confusion"]), expected.matrix)


def test_find_labels(synth_root, tmp_path):
    found = find_labels(synth_root / "flair_2_labels_test")
    assert all(p.name == f"MSK_{i}.tif" for i, p in found.items())
    with pytest.raises(DataError, match="no MSK_"):
        find_labels(tmp_path)
    with pytest.raises(DataError, match="not found"):
        find_labels(tmp_path / "nowhere")


def test_cli_writes_json_and_png(scored, synth_data_dir, tmp_path, capsys):
    df, folder, expected = scored
    out_json, out_png = tmp_path / "s.json", tmp_path / "c.png"
    main(["--pred", str(folder), "--index", str(synth_data_dir / "index_test.csv"),
          "--json", str(out_json), "--png", str(out_png), "--workers", "2"])
    text = capsys.readouterr().out
    assert "building" in text and f"{expected.miou():.4f}" in text and "(not in mIoU)" in text
    result = json.loads(out_json.read_text())
    assert abs(result["miou"] - expected.miou()) < 1e-12
    assert len(result["ious"]) == 12 and np.array(result["confusion"]).shape == (13, 13)
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit) as code:
        main(["--pred", str(tmp_path / "nowhere"), "--labels", str(tmp_path)])
    assert code.value.code == 1 and "error:" in capsys.readouterr().err


def test_scores_per_domain_from_the_index_or_the_label_folders(scored, synth_root, synth_data_dir, tmp_path):
    """Each test domain's matrix is its own patches' sum (the per-domain report of make evaluate)."""
    df, folder, expected = scored
    per = {}
    for pid, msk, dom in zip(df["id"], df["msk_path"], df["domain"]):
        per.setdefault(dom, ConfusionMatrix()).update(tifffile.imread(folder / f"PRED_{pid}.tif"),
                                                      remap(read_label(msk)))
    names = sorted(per)
    assert len(names) >= 2
    for truth in (synth_data_dir / "index_test.csv", synth_root / "flair_2_labels_test", df):
        r = evaluate(folder, truth, workers=2)["per_domain"]
        assert r["domains"] == names
        assert r["n_patches"] == [int((df["domain"] == d).sum()) for d in names]
        np.testing.assert_array_equal(np.array(r["confusion"]), [per[d].matrix for d in names])
        assert r["miou"] == pytest.approx([per[d].miou() for d in names])
    flat = tmp_path / "flat"  # labels outside any D<nnn>_<year> folder and no index: domains unknown
    flat.mkdir()
    for msk in df["msk_path"]:
        shutil.copy(msk, flat)
    r = evaluate(folder, flat)
    assert r["per_domain"] is None
    np.testing.assert_array_equal(np.array(r["confusion"]), expected.matrix)


def test_cli_writes_the_domain_report_beside_the_json(scored, synth_data_dir, tmp_path, capsys):
    df, folder, _ = scored
    main(["--pred", str(folder), "--index", str(synth_data_dir / "index_test.csv"),
          "--json", str(tmp_path / "p_scores.json")])
    out = capsys.readouterr().out
    assert f"per-domain mIoU ({df['domain'].nunique()} domains):" in out
    table = (tmp_path / "p_domains.csv").read_text().splitlines()
    assert table[0].startswith("domain,patches,pixels,miou,iou_0_building")
    assert [line.split(",")[0] for line in table[1:]] == [*sorted(df["domain"].unique()), "all"]
    assert (tmp_path / "p_domains.png").read_bytes()[:4] == b"\x89PNG"
    main(["--pred", str(folder), "--index", str(synth_data_dir / "index_test.csv"),
          "--domains", str(tmp_path / "elsewhere")])
    assert (tmp_path / "elsewhere.csv").is_file() and (tmp_path / "elsewhere.png").is_file()
