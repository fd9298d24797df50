"""Submission writer, validator and zipper: every malformed submission is rejected by name and reason."""
from __future__ import annotations

import errno
import io
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from src.core.errors import DiskFullError, SubmissionError
from src.scoring.submission import format_time, make_zip, validate, write_pred, zip_name
from src.submit import main

IDS = ["000101", "000102", "000103"]


def _pred(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.kron(rng.integers(0, 13, (16, 16)), np.ones((32, 32), dtype=np.int64)).astype(np.uint8)


def _tif_bytes(arr: np.ndarray, **kwargs) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, **kwargs)
    return buf.getvalue()


@pytest.fixture
def good_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "pred"
    for k, pid in enumerate(IDS):
        write_pred(folder, pid, _pred(k))
    return folder


def _zip(path: Path, entries: list[tuple[str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries:
            if name.endswith("/"):
                zf.writestr(zipfile.ZipInfo(name), b"")
            else:
                zf.writestr(name, data)
    return path


def _good_entries(folder: Path) -> list[tuple[str, bytes]]:
    return [(p.name, p.read_bytes()) for p in sorted(folder.glob("PRED_*.tif"))]


# ---------------------------------------------------------------- write_pred

def test_write_pred_roundtrip(tmp_path):
    arr = _pred(1)
    path = write_pred(tmp_path / "out", "012345", arr.astype(np.int64))  # integer dtypes are stored as uint8
    assert path.name == "PRED_012345.tif"
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        assert page.compression.name == "LZW" and page.dtype == np.uint8 and page.shape == (512, 512)
        np.testing.assert_array_equal(page.asarray(), arr)
    np.testing.assert_array_equal(np.array(Image.open(path)), arr)  # what the official scorer reads
    assert write_pred(tmp_path / "out", 7, arr).name == "PRED_000007.tif"


@pytest.mark.parametrize("arr, match", [
    (np.zeros((3, 512, 512), np.uint8), "2-D 512x512"),
    (np.zeros((256, 256), np.uint8), "2-D 512x512"),
    (np.full((512, 512), 13, np.uint8), r"values outside 0..12: \[13\]"),
    (np.full((512, 512), -1, np.int16), r"values outside 0..12: \[-1\]"),
    (np.zeros((512, 512), np.float32), "integer"),
])
def test_write_pred_rejects(tmp_path, arr, match):
    with pytest.raises(ValueError, match=match):
        write_pred(tmp_path, "000001", arr)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="6 digits"):
        write_pred(tmp_path, "12345", _pred())


def _partial_then(exc: BaseException):
    """A tifffile.imwrite that writes half a file to its target, then fails (a crash mid-write)."""
    real = tifffile.imwrite

    def imwrite(target, data, *args, **kwargs):
        buf = io.BytesIO()
        real(buf, data, *args, **kwargs)
        Path(target).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise exc

    return imwrite


def test_interrupted_write_leaves_no_pred(tmp_path, monkeypatch):
    folder = tmp_path / "pred"
    old = write_pred(folder, "000001", _pred(0)).read_bytes()
    monkeypatch.setattr(tifffile, "imwrite", _partial_then(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        write_pred(folder, "000002", _pred(1))
    with pytest.raises(KeyboardInterrupt):
        write_pred(folder, "000001", _pred(2))  # overwriting: the old file must survive intact
    assert sorted(p.name for p in folder.iterdir()) == ["PRED_000001.tif"]
    assert (folder / "PRED_000001.tif").read_bytes() == old


def test_disk_full_while_writing_pred(tmp_path, monkeypatch):
    monkeypatch.setattr(tifffile, "imwrite", _partial_then(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(DiskFullError, match=r"disk full while writing .*PRED_000002\.tif.*MB.*free") as err:
        write_pred(tmp_path, "000002", _pred())
    assert err.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- validate

def test_valid_folder_and_zip(good_dir, tmp_path):
    summary = validate(good_dir, IDS)
    assert summary["files"] == 3 and sum(summary["class_pixels"]) == 3 * 512 * 512
    (good_dir / "notes.json").write_text("{}")  # non-TIFF files beside the predictions are not zipped
    assert validate(good_dir, set(IDS))["files"] == 3
    z = _zip(tmp_path / "ok.zip", _good_entries(good_dir))
    assert validate(z, IDS)["files"] == 3
    assert validate(z)["files"] == 3  # without an expected set: only the per-file checks


def _folder_case(kind: str, folder: Path) -> str:
    """Break a valid folder in one way; return the file name that the error must mention."""
    bad = folder / "PRED_000102.tif"
    z = np.zeros((512, 512), np.uint8)
    if kind == "missing":
        bad.unlink()
    elif kind == "extra":
        write_pred(folder, "000999", z)
        return "PRED_000999.tif"
    elif kind == "wrong name":
        (folder / "PRED_000102.tif").rename(folder / "PRED_00102.tif")
        return "PRED_00102.tif"
    else:
        arrays = {
            "3-D array": (np.zeros((3, 512, 512), np.uint8), {"compression": "lzw"}),
            "2 bands": (np.zeros((2, 512, 512), np.uint8),
                        {"compression": "lzw", "photometric": "minisblack", "planarconfig": "separate"}),
            "int16": (z.astype(np.int16), {"compression": "lzw"}),
            "float32": (z.astype(np.float32), {"compression": "lzw"}),
            "256x256": (z[:256, :256], {"compression": "lzw"}),
            "value 13": (z + 13, {"compression": "lzw"}),
            "uncompressed": (z, {}),
            "deflate": (z, {"compression": "zlib"}),
        }
        if kind == "not a TIFF":
            bad.write_bytes(b"PK\x03\x04 this is not a tiff")
        else:
            arr, kwargs = arrays[kind]
            bad.write_bytes(_tif_bytes(arr, **kwargs))
    return bad.name


FOLDER_CASES = {
    "missing": "missing: 1 of 3",
    "extra": "extra: 1 predictions",
    "wrong name": "wrong name",
    "3-D array": "3 bands",
    "2 bands": "2 bands",
    "int16": "dtype int16, expected uint8",
    "float32": "dtype float32, expected uint8",
    "256x256": "shape 256x256, expected 512x512",
    "value 13": r"values outside 0..12: [13]",
    "uncompressed": "compression NONE, expected LZW",
    "deflate": "compression ADOBE_DEFLATE, expected LZW",
    "not a TIFF": "not a readable TIFF",
}


@pytest.mark.parametrize("kind", list(FOLDER_CASES))
def test_malformed_folder_rejected(good_dir, tmp_path, kind):
    name = _folder_case(kind, good_dir)
    with pytest.raises(SubmissionError) as err:
        validate(good_dir, IDS)
    line = next((p for p in err.value.problems if name in p), None)
    assert line is not None, err.value.problems
    assert FOLDER_CASES[kind] in line
    assert name in str(err.value) and FOLDER_CASES[kind] in str(err.value)
    # the same breakage inside a zip is rejected the same way
    entries = [(p.name, p.read_bytes()) for p in sorted(good_dir.iterdir()) if p.suffix == ".tif"]
    with pytest.raises(SubmissionError, match=r"PRED_"):
        validate(_zip(tmp_path / "case.zip", entries), IDS)


ZIP_CASES = {
    "folder inside": ("preds/PRED_000101.tif", "inside a folder"),
    "folder entry": ("preds/", "folder inside the zip"),
    "duplicate": ("PRED_000101.tif", "appears 2 times"),
    "other file": ("readme.txt", "not a prediction file name"),
    "lower-case name": ("pred_000101.tif", "not a prediction file name"),
}


@pytest.mark.parametrize("kind", list(ZIP_CASES))
def test_malformed_zip_rejected(good_dir, tmp_path, kind):
    name, phrase = ZIP_CASES[kind]
    entries = _good_entries(good_dir)
    entries.append((name, entries[0][1]))
    if kind == "folder inside":
        entries = [(f"preds/{n}", d) for n, d in entries[:-1]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name, and writes it
        z = _zip(tmp_path / "case.zip", entries)
    with pytest.raises(SubmissionError) as err:
        validate(z, IDS)
    assert any(name in p and phrase in p for p in err.value.problems), err.value.problems


def test_empty_and_broken_zips(tmp_path):
    empty = _zip(tmp_path / "empty.zip", [])
    with pytest.raises(SubmissionError, match=r"missing: 3 of 3 .*PRED_000101\.tif"):
        validate(empty, IDS)
    with pytest.raises(SubmissionError, match="no PRED_"):
        validate(empty)
    not_zip = tmp_path / "fake.zip"
    not_zip.write_text("hello")
    with pytest.raises(SubmissionError, match="fake.zip: not a readable zip"):
        validate(not_zip, IDS)
    with pytest.raises(FileNotFoundError):
        validate(tmp_path / "nowhere", IDS)


def test_every_problem_is_listed(good_dir):
    (good_dir / "PRED_000101.tif").write_bytes(_tif_bytes(np.zeros((512, 512), np.int16), compression="lzw"))
    (good_dir / "PRED_000102.tif").write_bytes(_tif_bytes(np.full((512, 512), 200, np.uint8)))
    with pytest.raises(SubmissionError) as err:
        validate(good_dir, IDS + ["000104"])
    text = str(err.value)
    for piece in ["PRED_000101.tif: dtype int16", "PRED_000102.tif: compression NONE",
                  "PRED_000102.tif: values outside 0..12: [200]", "missing: 1 of 4", "PRED_000104.tif"]:
        assert piece in text
    assert len(err.value.problems) == 4


def test_many_problems_are_grouped(tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    raw = _tif_bytes(np.zeros((512, 512), np.uint8))
    ids = [f"{i:06d}" for i in range(40)]
    for pid in ids:
        (folder / f"PRED_{pid}.tif").write_bytes(raw)
    with pytest.raises(SubmissionError) as err:
        validate(folder, ids + [f"{i:06d}" for i in range(100, 130)])
    assert len(err.value.problems) == 41
    assert "compression NONE, expected LZW: 40 files: PRED_000000.tif" in str(err.value)
    assert "and 35 more" in str(err.value) and "and 10 more" in str(err.value)


# ---------------------------------------------------------------- zipping

def test_format_time_and_names():
    assert format_time(754) == "12-34" and format_time(59.6) == "1-00" and format_time("3-05") == "3-05"
    assert zip_name("unet") == "unet.zip"
    assert zip_name("unet_r34", 754, 600) == "unet_r34_12-34_10-00.zip"
    for bad in [dict(approach="a/b"), dict(approach=""), dict(approach="x", baseline_time=3),
                dict(approach="x", baseline_time="soon", your_time=3)]:
        with pytest.raises(ValueError):
            zip_name(**bad)


def test_make_zip(good_dir, tmp_path):
    out = tmp_path / "subs"
    z = make_zip(good_dir, "unet", out, baseline_time=754, your_time=601, ids=IDS)
    assert z == out / "unet_12-34_10-01.zip"
    with zipfile.ZipFile(z) as zf:
        assert zf.namelist() == [f"PRED_{i}.tif" for i in IDS]
        assert zf.read("PRED_000101.tif") == (good_dir / "PRED_000101.tif").read_bytes()
    assert validate(z, IDS)["files"] == 3
    before = z.read_bytes()
    with pytest.raises(FileExistsError, match="already exists"):
        make_zip(good_dir, "unet", out, baseline_time=754, your_time=601)
    assert z.read_bytes() == before
    assert make_zip(good_dir, "unet", out).name == "unet.zip"
    assert sorted(p.name for p in out.iterdir()) == ["unet.zip", "unet_12-34_10-01.zip"]


def test_make_zip_refuses_invalid_folder(good_dir, tmp_path):
    out = tmp_path / "subs"
    (good_dir / "PRED_000103.tif").write_bytes(_tif_bytes(np.zeros((256, 256), np.uint8), compression="lzw"))
    with pytest.raises(SubmissionError, match="PRED_000103.tif: shape 256x256"):
        make_zip(good_dir, "unet", out, ids=IDS)
    with pytest.raises(SubmissionError, match="missing: 1 of 4"):
        make_zip(good_dir, "unet", out, ids=IDS + ["000104"])
    assert not out.exists() or list(out.iterdir()) == []


def test_disk_full_while_zipping(good_dir, tmp_path, monkeypatch):
    out = tmp_path / "subs"
    real = zipfile.ZipFile.write
    calls = []

    def write(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "write", write)
    with pytest.raises(DiskFullError, match=r"the zip needs about [\d.]+ MB, .* free at least"):
        make_zip(good_dir, "unet", out)
    assert list(out.iterdir()) == []


def test_cli(good_dir, tmp_path, capsys):
    main(["--pred", str(good_dir), "--name", "cli", "--out", str(tmp_path / "subs"),
          "--baseline-time", "90", "--your-time", "75"])
    assert (tmp_path / "subs" / "cli_1-30_1-15.zip").is_file()
    main(["--pred", str(tmp_path / "subs" / "cli_1-30_1-15.zip"), "--validate-only"])
    assert "valid: 3 predictions" in capsys.readouterr().out
    (good_dir / "PRED_000101.tif").write_bytes(b"junk")
    with pytest.raises(SystemExit) as code:
        main(["--pred", str(good_dir), "--validate-only"])
    assert code.value.code == 1
    assert "PRED_000101.tif: not a readable TIFF" in capsys.readouterr().err
