"""Whole-orthophoto inference (src.infer, src.deploy.infer, src.deploy.orthophoto) on real GeoTIFFs with a
tiny model."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.crs import CRS

from src.core.checkpoint import save_checkpoint
from src.core.config import load_settings
from src.core.errors import DataError, PredictError
from src.core.flair import PALETTE
from src.data.normalize import normalize
from src.deploy.infer import RasterOptions, infer, list_inputs, plan_outputs
from src.deploy.orthophoto import FLOOR, NODATA, Orthophoto, Strip, blend_weights, grid, parse_bands, ramp
from src.infer import main
from src.models.flair_model import build_model

ROOT = Path(__file__).resolve().parents[1]
H, W = 600, 830  # 3 x 4 windows of 256 with overlap 64; not multiples of 32, so the edges are padded
WINDOW, OVERLAP = 256, 64
WINDOWS = {"infer_window": WINDOW, "infer_overlap": OVERLAP}


def tiny_cfg(**over) -> dict:
    return load_settings(ROOT / "configs/demo.yaml", {"use_s2": False, "fusion": "none", "tta": "none",
                                                    "batch_size": 4, "channels_last": False, **over})


def local_model(cfg: dict) -> torch.nn.Module:
    """The demo's U-Net R18 with the three deepest decoder blocks zeroed: their outputs are exactly 0
    everywhere, so a pixel depends only on input within ~11 px (stem conv 7x7/2, two 3x3 convs at 1/2,
    two at 1/1, the 3x3 head). An untrained network's receptive field is the whole window, so no window
    size could reproduce a whole-raster pass of it; with a bounded field the tiling, blending and strip
    bookkeeping must reproduce it exactly, which is what the test checks."""
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for block in model.net.decoder.blocks[:3]:
            block.conv1[0].weight.zero_()
            block.conv2[0].weight.zero_()
    return model


def write_raster(path: Path, bands: np.ndarray, **extra) -> Path:
    """A GeoTIFF in Lambert-93 at 0.2 m (the FLAIR #2 aerial frame)."""
    c, h, w = bands.shape
    transform = rasterio.Affine(0.2, 0.0, 651000.0, 0.0, -0.2, 6862000.0)
    profile = {"driver": "GTiff", "width": w, "height": h, "count": c, "dtype": bands.dtype.name,
               "crs": CRS.from_epsg(2154), "transform": transform, **extra}
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(bands)
    return path


def scene(h: int, w: int, seed: int = 0) -> np.ndarray:
    """5 smooth uint8 bands with texture: varied, spatially coherent predictions."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    out = [128 + 70 * np.sin(x / (23 + 7 * b) + b) * np.cos(y / (31 - 3 * b) - b)
           + 12 * rng.standard_normal((h, w)) for b in range(5)]
    return np.clip(out, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    cfg = tiny_cfg()
    path = tmp_path_factory.mktemp("runs") / "tiny" / "fold0" / "best.pt"
    save_checkpoint(path, {"model": local_model(cfg).state_dict(), "config": cfg.to_dict()})
    return path


@pytest.fixture(scope="module")
def ortho(tmp_path_factory) -> tuple[Path, np.ndarray]:
    img = scene(H, W)
    return write_raster(tmp_path_factory.mktemp("ortho") / "ortho.tif", img), img


@pytest.fixture(scope="module")
def inferred(tiny, ortho, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out") / "landcover.tif"
    infer([tiny], ortho[0], out, overrides={**WINDOWS, "batch_size": 4}, options=RasterOptions(probs=True))
    return out


# ------------------------------------------------------------------------------------- windows
def test_grid_and_weights():
    starts, padded = grid(600, 256, 64)
    assert starts == [0, 192, 384] and padded == 640
    assert grid(100, 256, 64) == ([0], 256)              # smaller than a window: one padded window
    r = ramp(256, 64)
    assert r.min() == pytest.approx(FLOOR) and r.max() == 1.0 and np.all(r > 0)
    assert np.array_equal(r, r[::-1])
    assert np.all(r[:16] == r[0]) and np.all(r[48:208] == 1.0)  # floor on the outer quarter of the overlap
    assert blend_weights(256, 64).shape == (256, 256)


def test_strip_normalises_and_shifts():
    """Constant windows blend to the same constant in every finished row, however they overlap."""
    strip = Strip(2, 8, 14, blend_weights(8, 4))
    for x in (0, 4, 6):
        strip.add(np.stack([np.full((8, 8), 0.25), np.full((8, 8), 0.75)]).astype(np.float32), x)
    labels, top = strip.pop(4, 13, probs=True)
    assert top.shape == (2, 4, 13) and np.allclose(top[0], 0.25) and np.allclose(top[1], 0.75)
    assert labels.shape == (4, 13) and np.all(labels == 1)
    assert np.all(strip.acc[:, 4:] == 0) and np.all(strip.wsum[:4] > 0)
    assert strip.pop(4, 13)[1] is None


# ------------------------------------------------------------------------------------- one raster
def test_tiles_equal_whole_raster_forward(tiny, ortho, inferred):
    """Windows of 256 with overlap 64 give the whole-raster forward pass, except near the bottom/right
    edges (padded differently). Bound: the model's field (~11 px) is below overlap/4 = 16 px, so every
    window weighted above FLOOR predicts a pixel exactly as the whole pass does; a window within 16 px of
    its border contributes at most FLOOR relative weight -> |dp| <= 1e-3, plus 0.5/255 of uint8 rounding
    in the probability file. Labels must agree wherever the top two classes are further apart than that."""
    cfg = tiny_cfg()
    _, img = ortho
    with torch.no_grad():
        ref = local_model(cfg)(normalize(torch.from_numpy(img[None]), cfg))["logits"].softmax(1)[0].numpy()
    with rasterio.open(inferred.with_name("landcover_probs.tif")) as ds:
        probs = ds.read().astype(np.float32) / 255
    with rasterio.open(inferred) as ds:
        labels = ds.read(1)
    inner = (slice(None), slice(0, H - 32), slice(0, W - 32))
    tol = FLOOR + 0.5 / 255 + 1e-5
    assert np.abs(probs[inner] - ref[inner]).max() <= tol
    top2 = np.sort(ref, axis=0)[-2:]
    clear = (top2[1] - top2[0] > 2 * FLOOR)[inner[1:]]
    assert clear.mean() > 0.95
    assert np.array_equal(labels[inner[1:]][clear], ref.argmax(0)[inner[1:]][clear])
    assert len(np.unique(labels)) > 1


def test_onnx_engine_maps_the_raster_like_torch(tiny, ortho, inferred, tmp_path, capsys):
    """`make infer ENGINE=onnx`: the checkpoint's export at the window size (made once, checked), run by
    onnxruntime, gives the PyTorch map on >= 99.9% of the pixels and its probabilities within a uint8 step."""
    import shutil

    ckpt = shutil.copy(tiny, tmp_path / "best.pt")
    out = tmp_path / "landcover.tif"
    infer([ckpt], ortho[0], out, overrides={**WINDOWS, "engine": "onnx"}, options=RasterOptions(probs=True))
    said = capsys.readouterr().out
    assert "exported" in said and "engine onnx" in said and (tmp_path / "best.onnx.json").is_file()
    with rasterio.open(out) as a, rasterio.open(inferred) as b:
        assert np.mean(a.read(1) == b.read(1)) >= 0.999
    with rasterio.open(probs_of(out)) as a, rasterio.open(probs_of(inferred)) as b:
        assert np.abs(a.read().astype(int) - b.read().astype(int)).max() <= 1


def probs_of(out: Path) -> Path:
    return out.with_name(f"{out.stem}_probs.tif")


def test_georeferencing_round_trips(ortho, inferred):
    with rasterio.open(ortho[0]) as src, rasterio.open(inferred) as out:
        assert out.crs == src.crs == CRS.from_epsg(2154)
        assert out.transform == src.transform and out.shape == src.shape == (H, W)
        assert (out.count, out.dtypes[0], out.nodata) == (1, "uint8", NODATA)
        cmap = out.colormap(1)
        assert all(cmap[c][:3] == tuple(int(v) for v in PALETTE[c]) for c in range(13))
        assert out.block_shapes[0] == (256, 256) and out.compression.name == "deflate"
        assert out.overviews(1) == [2, 4]
    with rasterio.open(inferred.with_name("landcover_probs.tif")) as probs:
        assert probs.count == 13 and probs.crs == CRS.from_epsg(2154) and probs.overviews(1) == [2, 4]


def test_resume_skips_finished_output(tiny, ortho, inferred, capsys):
    before = inferred.stat().st_mtime_ns
    reports = infer([tiny], ortho[0], inferred, overrides=WINDOWS, options=RasterOptions(probs=True))
    assert reports == [{"src": str(ortho[0]), "out": str(inferred), "skipped": True}]
    assert inferred.stat().st_mtime_ns == before and "skipped" in capsys.readouterr().out
    assert not list(inferred.parent.glob(".*.tmp"))


# ------------------------------------------------------------------------------------- folders, edges
def test_folder_small_raster_nodata_and_bad_file(tiny, tmp_path):
    """One output per input; a raster smaller than a window is padded and cropped back; nodata -> 255;
    an unreadable raster is reported by name and does not stop the others."""
    src = tmp_path / "in"
    src.mkdir()
    small = scene(100, 150, seed=1)
    small[:, :30, :40] = 0
    write_raster(src / "a.tif", small, nodata=0)
    write_raster(src / "b.tif", scene(200, 300, seed=2)[[2, 0, 1, 3, 4]])  # bands B,R,G,NIR,E
    (src / "notes.txt").write_text("not a raster")
    (src / "c.tif").write_bytes(b"truncated")
    out = tmp_path / "out"
    bands = parse_bands("B,R,G,NIR,E")
    reports = infer([tiny], src, out, overrides=WINDOWS, options=RasterOptions(bands=bands))
    assert [r.get("error", "").split(":")[0] for r in reports] == ["", "", str(src / "c.tif")]
    assert sorted(p.name for p in out.iterdir()) == ["a.tif", "b.tif"]  # no temporary left behind
    with rasterio.open(out / "a.tif") as ds:
        a = ds.read(1)
    assert a.shape == (100, 150) and np.all(a[:30, :40] == NODATA) and np.all(a[30:, 40:] < 13)
    with rasterio.open(out / "b.tif") as ds:
        assert ds.shape == (200, 300) and ds.read(1).max() < 13


def test_inputs_from_list_file(tmp_path):
    for name in ("x.tif", "y.tif"):
        write_raster(tmp_path / name, scene(8, 8))
    listing = tmp_path / "rasters.txt"
    listing.write_text("x.tif\n\n# a comment\ny.tif\n")
    pairs = plan_outputs(list_inputs(listing), listing, tmp_path / "out")
    assert pairs == [(tmp_path / f"{n}.tif", tmp_path / f"out/{n}.tif") for n in "xy"]
    with pytest.raises(PredictError, match="would overwrite this input"):
        plan_outputs(list_inputs(tmp_path), tmp_path, tmp_path)
    listing.write_text("x.tif\nmissing.tif\n")
    with pytest.raises(PredictError, match="missing.tif"):
        list_inputs(listing)


def test_band_errors_name_the_file(tmp_path):
    path = write_raster(tmp_path / "rgb.tif", scene(8, 8)[:3])
    needs = r"rgb.tif: the model needs bands R,G,B,NIR,E; bands 1..3 are R,G,B: NIR,E missing"
    with pytest.raises(DataError, match=needs + r" \(a model trained with bands=R,G,B reads this raster\)"):
        Orthophoto(path, None, ["R", "G", "B", "NIR", "E"])
    deep = write_raster(tmp_path / "deep.tif", scene(8, 8).astype(np.uint16))
    with pytest.raises(DataError, match="deep.tif: band 1 is uint16"):
        Orthophoto(deep, None, ["R"])
    with pytest.raises(DataError, match="given twice"):
        parse_bands("R,R,G")
    assert parse_bands("nir, r, -, g") == ["NIR", "R", "-", "G"]


def test_fusion_model_is_refused(tmp_path, ortho, capsys):
    cfg = load_settings(ROOT / "configs/demo.yaml")  # U-T&T: needs Sentinel-2
    ckpt = save_checkpoint(tmp_path / "utt.pt", {"model": build_model(cfg).state_dict(),
                                                 "config": cfg.to_dict()})
    with pytest.raises(SystemExit) as exit_info:
        main(["--runs", str(ckpt), "--src", str(ortho[0]), "--out", str(tmp_path / "x.tif")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1  # a setting the job cannot serve
    assert "utt.pt: this model needs Sentinel-2" in err and "aerial-only models" in err
    assert not (tmp_path / "x.tif").exists()


@pytest.mark.slow
def test_torchrun_shards_rasters_over_processes(tiny, tmp_path):
    """2 CPU processes under torchrun: rank r takes inputs r, r+2, ...; each writes its own outputs."""
    src = tmp_path / "in"
    src.mkdir()
    for k in range(2):
        write_raster(src / f"r{k}.tif", scene(120, 140, seed=k))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    torchrun = Path(sys.executable).with_name("torchrun")
    run = subprocess.run([str(torchrun), "--nproc-per-node", "2", "-m", "src.infer", "--runs", str(tiny),
                          "--src", str(src), "--out", str(tmp_path / "out"), "--window", "256", "--overlap",
                          "64", "--device", "cpu"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["r0.tif", "r1.tif"]
    assert "[rank 0/2] infer: " in run.stdout and "[rank 1/2] infer: " in run.stdout
    assert run.stdout.count("-> ") == 2  # each raster predicted once


def test_a_raster_without_the_model_bands_is_one_message_with_what_helps(tiny, tmp_path, capsys):
    """A 4-band raster for a 5-band model, bands named: the error is said once, naming what the model needs
    and what would read the raster (not "set --bands", which cannot help)."""
    four = write_raster(tmp_path / "rgbn.tif", scene(64, 64)[:4])
    with pytest.raises(SystemExit) as stop:
        main(["--runs", str(tiny), "--src", str(four), "--out", str(tmp_path / "o.tif"),
              "--bands", "R,G,B,NIR"])
    out, err = capsys.readouterr()
    assert stop.value.code == 1
    said = [line for line in (out + err).splitlines() if "needs bands" in line]
    assert len(said) == 1 and "E missing (a model trained with bands=R,G,B,NIR reads this raster)" in said[0]
    assert "set --bands" not in out + err and err.strip().endswith("1 of 1 rasters failed (said above)")

