"""Whole-orthophoto inference: one georeferenced land-cover GeoTIFF per input raster, of any size
(`python -m src.infer`, docs/data-format.md "Whole orthophotos").

- The models, weights, TTA and ensembling are those of `make predict` (src.prediction.ensemble): an
  orthophoto is predicted window by window exactly as a test patch would be.
- Windows of the patch size overlap and their probabilities are blended with weights that vanish at
  window borders (src.deploy.orthophoto), so there are no seams and every pixel is predicted with context on
  all sides; one strip of windows is held in memory at a time and finished rows go to disk at once, so
  memory stays flat whatever the raster's height.
- The output keeps the input's CRS and transform, carries the official colour table, and is 255 where
  the input has no data (nodata value, mask or alpha).
- Resumable per raster: an output is written under a temporary name and renamed when complete, so an
  existing output is a finished one and a re-run skips it (`overwrite` redoes it).
- Only aerial models (src.core.settings, job rules of "infer"): a fusion model needs a Sentinel-2 series per
  window and metadata models need per-patch metadata, neither of which an orthophoto has; they are refused
  before any work. So are models normalised with per-patch S2 statistics (norm=s2_stats), unless
  `norm=mean_std` forces the train ones.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch

from src.core.errors import DataError, PredictError, one_line
from src.core.files import atomic_write, remove_stale_temps
from src.core.flair import AERIAL_GSD_M, NUM_CLASSES
from src.core.progress import progress
from src.core.settings import Settings
from src.deploy.orthophoto import NODATA, GeoWriter, Orthophoto, Strip, blend_weights, grid, io_env, output_ok
from src.prediction.ensemble import Ensemble, device_tta, load_ensemble, place_prediction, quantise
from src.prediction.onnx_engine import use_engine
from src.prediction.tta import views

RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".jp2", ".img")


@dataclass(frozen=True)
class RasterOptions:
    """How rasters are read and written: the names of their bands (None: R,G,B,NIR,E up to the band count),
    a 13-band probabilities file beside each output, and whether finished outputs are redone."""

    bands: list[str] | None = None
    probs: bool = False
    overwrite: bool = False


# ------------------------------------------------------------------------------------- inputs
def list_inputs(src: str | Path) -> list[Path]:
    """Rasters named by --src: a raster file, a folder of rasters, or a text file listing rasters."""
    src = Path(src)
    if src.is_dir():
        found = sorted(p for p in src.iterdir() if p.suffix.lower() in RASTER_SUFFIXES and p.is_file())
        if not found:
            raise PredictError(f"{src}: no raster ({', '.join(RASTER_SUFFIXES)}) in this folder")
        return found
    if not src.is_file():
        raise PredictError(f"{src}: no such raster, folder or list file")
    if src.suffix.lower() in RASTER_SUFFIXES:
        return [src]
    lines = [ln.strip() for ln in src.read_text().splitlines()]
    found = [p if p.is_absolute() else src.parent / p for p in map(Path, lines) if p.parts and
             not str(p).startswith("#")]
    missing = [str(p) for p in found if not p.is_file()]
    if not found or missing:
        raise PredictError(f"{src}: " + (f"{len(missing)} listed rasters missing (first: {missing[0]})"
                                         if missing else "lists no raster"))
    return found


def plan_outputs(inputs: Sequence[Path], src: str | Path, out: str | Path) -> list[tuple[Path, Path]]:
    """(input, output) pairs: a single raster to a .tif path, else <out>/<input stem>.tif."""
    out = Path(out)
    if Path(src).is_file() and Path(src).suffix.lower() in RASTER_SUFFIXES and out.suffix.lower() in (
            ".tif", ".tiff"):
        return [(inputs[0], out)]
    pairs = [(p, out / f"{p.stem}.tif") for p in inputs]
    clash = [p for p, o in pairs if o.resolve() == p.resolve()]
    if clash:
        raise PredictError(f"{clash[0]}: the output would overwrite this input; choose another --out folder")
    names = [o.name for _, o in pairs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise PredictError(f"{src}: several inputs would write {out / dup[0]} (same file name); "
                           "rename them or run them separately")
    return pairs


def probs_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}_probs.tif")


# ------------------------------------------------------------------------------------- windows
def needed_bands(ens: Ensemble) -> list[str]:
    """The raster bands the ensemble reads, in order of first use."""
    needed: list[str] = []
    for s in ens.settings:
        needed += [b for b in (str(x).upper() for x in s.bands) if b not in needed]
    return needed


def predict_tiles(ens: Ensemble, needed: list[str], tiles: np.ndarray, tta: str) -> np.ndarray:
    """(n, k, win, win) uint8 windows of the `needed` bands -> (n, 13, win, win) float32 probabilities. Each
    input group of the ensemble gets its bands, fed as a loader's batch would be (src.prediction.ensemble:
    normalised with its settings, or raw for an ONNX file)."""
    raw = torch.from_numpy(tiles)
    groups = [{"image": raw[:, [needed.index(str(b).upper()) for b in s.bands]]} for s in ens.group_settings]
    return ens.predict(ens.feed(groups), tta).float().cpu().numpy()


def count_windows(pairs: Sequence[tuple[Path, Path]], cfg: Settings) -> int:
    """The windows of every raster to predict (0 for one that cannot be opened: its own error comes later)."""
    n = 0
    for path, _ in pairs:
        try:
            with rasterio.open(path) as ds:
                h, w = ds.height, ds.width
        except rasterio.errors.RasterioIOError:
            continue
        n += len(grid(h, cfg.infer_window, cfg.infer_overlap)[0]) * len(grid(w, cfg.infer_window,
                                                                          cfg.infer_overlap)[0])
    return n


# ------------------------------------------------------------------------------------- one raster
def check_gsd(src: Orthophoto, log: Callable[[str], None]) -> None:
    """Warn when the pixel size is far from the 0.2 m the models were trained on."""
    crs = src.ds.crs
    if crs is not None and crs.is_projected and str(crs.linear_units).lower() in ("metre", "meter", "m"):
        res = max(abs(src.ds.res[0]), abs(src.ds.res[1]))
        if abs(res - AERIAL_GSD_M) > 0.25 * AERIAL_GSD_M:
            log(f"infer: warning: {src.path}: pixel size {res:g} m; the models were trained on "
                f"{AERIAL_GSD_M} m orthophotos")


def predict_raster(src: Orthophoto, writer: GeoWriter, ens: Ensemble, desc: str) -> int:
    """Predict every window of `src`, strip by strip, into `writer`; the number of windows."""
    cfg, needed = ens.cfg, needed_bands(ens)
    win, overlap = cfg.infer_window, cfg.infer_overlap
    ys, _ = grid(src.height, win, overlap)
    xs, width = grid(src.width, win, overlap)
    strip = Strip(NUM_CLASSES, win, width, blend_weights(win, overlap))
    bar = progress(total=len(ys) * len(xs), desc=desc, unit="win")
    with ThreadPoolExecutor(1) as reader:  # the next strip is read while this one is predicted
        ahead = reader.submit(src.read_strip, ys[0], win, width)
        for r, y0 in enumerate(ys):
            data, valid = ahead.result()
            if r + 1 < len(ys):
                ahead = reader.submit(src.read_strip, ys[r + 1], win, width)
            for i in range(0, len(xs), cfg.batch_size):
                chunk = xs[i:i + cfg.batch_size]
                tiles = np.stack([data[:, :, x:x + win] for x in chunk])
                for p, x in zip(predict_tiles(ens, needed, tiles, cfg.tta), chunk):
                    strip.add(p, x)
                bar.update(len(chunk))
            rows = src.height - y0 if r == len(ys) - 1 else win - overlap
            write_rows(writer, strip, rows, src.width, valid)
    bar.close()
    return len(ys) * len(xs)


def write_rows(writer: GeoWriter, strip: Strip, rows: int, width: int, valid: np.ndarray | None) -> None:
    """The strip's finished rows to disk: class map (NODATA where the input has none) and probabilities."""
    labels, probs = strip.pop(rows, width, probs=writer.probs is not None)
    q = quantise(torch.from_numpy(probs)).numpy() if probs is not None else None
    if valid is not None:
        labels[~valid[:rows]] = NODATA
        if q is not None:
            q[:, ~valid[:rows]] = 0
    writer.write(labels, q)


def infer_raster(path: Path, out: Path, ens: Ensemble, options: RasterOptions, tags: dict[str, str],
                 log: Callable[[str], None]) -> dict[str, Any]:
    """One raster -> its land-cover GeoTIFF (and probabilities), written atomically; a report dict."""
    t0 = time.perf_counter()
    src = Orthophoto(path, options.bands, needed_bands(ens))
    try:
        if src.assumed:
            log(f"infer: {path}: bands 1..{len(src.given)} taken as {','.join(src.given)} (else set --bands)")
        check_gsd(src, log)
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out)
        remove_stale_temps(probs_path(out))
        with ExitStack() as stack:  # probabilities are renamed into place before the class map
            tmp = stack.enter_context(atomic_write(out))
            tmp_p = stack.enter_context(atomic_write(probs_path(out))) if options.probs else None
            writer = GeoWriter(src, tmp, tmp_p, tags)
            try:
                n = predict_raster(src, writer, ens, desc=f"infer {path.name}")
                writer.close()
            except BaseException:
                writer.abort()
                raise
    finally:
        src.close()
    dt = time.perf_counter() - t0
    pixels = src.height * src.width
    log(f"infer: {path} -> {out} ({src.width}x{src.height} px, {n} windows, {dt:.1f} s, "
        f"{pixels / dt / 1e6:.2f} Mpx/s)")
    return {"src": str(path), "out": str(out), "pixels": pixels, "windows": n, "seconds": dt}


# ------------------------------------------------------------------------------------- top level
def infer(runs: Sequence[str | Path], src: str | Path, out: str | Path, *,
          weights: Sequence[float] | None = None,
          overrides: dict[str, Any] | None = None, options: RasterOptions = RasterOptions(),
          device: str = "auto", log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Predict every raster named by `src` (this process's share under torchrun) into `out`; reports.
    `overrides` (key=value settings: tta, batch_size, infer_window, ...) apply on top of every
    checkpoint's."""
    place = place_prediction(device)
    if place.world > 1:
        log = (lambda f: lambda msg: f(f"[rank {place.rank}/{place.world}] {msg}"))(log)
    pairs = plan_outputs(list_inputs(src), src, out)[place.rank::place.world]
    reports, todo = [], []
    for path, target in pairs:
        done = output_ok(target, path) and (not options.probs or output_ok(probs_path(target), path,
                                                                           NUM_CLASSES))
        if done and not options.overwrite:
            log(f"infer: {target} exists, skipped (--overwrite to redo)")
            reports.append({"src": str(path), "out": str(target), "skipped": True})
        else:
            todo.append((path, target))
    if not todo:
        return reports
    ens = load_ensemble(runs, place.device, weights=weights, overrides=overrides, job="infer", log=log)
    ens = ens.with_settings(ens.cfg.with_values(tta=device_tta(ens.cfg.tta, ens.device)))
    cfg = ens.cfg
    work = count_windows(todo, cfg) * len(views(cfg.tta))
    ens = use_engine(ens, work, cfg.infer_window, "infer", log)
    log(f"infer: {ens.describe(cfg.tta)}, windows {cfg.infer_window} px overlapping {cfg.infer_overlap}")
    tags = {"flair2_models": ";".join(str(p) for p in ens.paths), "flair2_tta": cfg.tta,
            "flair2_windows": f"window {cfg.infer_window} overlap {cfg.infer_overlap}"}
    with io_env():
        for path, target in todo:
            try:
                reports.append(infer_raster(path, target, ens, options, tags, log))
            except DataError as err:  # one bad raster does not stop the others; the job exits 1 at the end
                log(f"infer: error: {one_line(err)}")
                reports.append({"src": str(path), "out": str(target), "error": one_line(err)})
    return reports
