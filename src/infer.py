"""Whole-orthophoto inference: one georeferenced land-cover GeoTIFF per input raster, of any size.

    python -m src.infer --runs RUNS... --src ortho.tif --out landcover.tif [--tta none|flip|d4]
        [--weights w1,w2,...] [--bands R,G,B,NIR,E] [--window 512] [--overlap 128] [--probs]
        [--overwrite] [--device auto] [key=value ...]
    --src may be a folder of rasters or a text file listing them (one path a line, relative to the
    file's folder); --out is then a folder receiving <input stem>.tif per input.
    torchrun --nproc-per-node N -m src.infer ...   shares the rasters over N processes (one device each)

Why it is built this way:
- The models, weights, TTA and ensembling are those of `make predict` (src.prediction.ensemble.predict_batch):
  an orthophoto is predicted window by window exactly as a test patch would be.
- Windows of the patch size overlap and their probabilities are blended with weights that vanish at
  window borders (src/deploy/orthophoto.py), so there are no seams and every pixel is predicted with context on
  all sides; one strip of windows is held in memory at a time and finished rows go to disk at once
  (src/deploy/orthophoto.py), so memory stays flat whatever the raster's height.
- The output keeps the input's CRS and transform, carries the official colour table, and is 255 where
  the input has no data (nodata value, mask or alpha).
- Resumable per raster: an output is written under a temporary name and renamed when complete, so an
  existing output is a finished one and a re-run skips it (`--overwrite` redoes it).
- Only aerial models: a fusion model needs a Sentinel-2 series per window and metadata models need
  per-patch metadata, neither of which an orthophoto has; they are refused before any work. So are models
  normalised with per-patch S2 statistics (norm=s2_stats), unless `norm=mean_std` forces the train ones.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from src.core.checkpoint import load_checkpoint
from src.core.config import ConfigError, exit_on_config_error, parse_overrides, resolve, split_overrides
from src.core.errors import DataError, PredictError, one_line
from src.core.files import atomic_write, remove_stale_temps
from src.core.flair import AERIAL_GSD_M, NUM_CLASSES, PATCH_SIZE
from src.core.progress import progress
from src.core.runtime import PRECISIONS, pick_device, tune_cuda
from src.core.workers import cpu_count
from src.data.normalize import normalize
from src.deploy.orthophoto import (
    NODATA,
    GeoWriter,
    Orthophoto,
    Strip,
    blend_weights,
    grid,
    io_env,
    output_ok,
    parse_bands,
)
from src.models.flair_model import load_for_inference
from src.models.s2_features import model_reads_s2
from src.prediction import tta as T
from src.prediction.ensemble import predict_batch, quantise, resolve_checkpoints

RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".jp2", ".img")
ALIGN = 32  # encoder output stride: windows on a grid of this step see the features a whole-raster pass sees


@dataclass
class Settings:
    """How the rasters are cut and predicted (see the module docstring)."""

    window: int = PATCH_SIZE
    overlap: int = 128
    tta: str = "none"
    ensemble: str = "probs"
    precision: str = "auto"
    batch_size: int = 8
    channels_last: bool = False
    bands: list[str] | None = None
    probs: bool = False

    def check(self) -> None:
        if self.tta not in T.LEVELS:
            raise ConfigError(f"tta: expected one of {', '.join(T.LEVELS)}, got {self.tta!r}")
        if self.ensemble not in ("probs", "logits"):
            raise ConfigError(f"ensemble: expected probs or logits, got {self.ensemble!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision: expected one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: expected >= 1, got {self.batch_size}")
        if self.window % ALIGN or self.overlap % ALIGN or not 0 <= self.overlap < self.window:
            raise ConfigError(f"--window {self.window} / --overlap {self.overlap}: need multiples of {ALIGN} "
                              "with 0 <= overlap < window")


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


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) under torchrun; (0, 1, 0) otherwise."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


# ------------------------------------------------------------------------------------- models
def load_models(runs: Sequence[str | Path], weights: Sequence[float] | None, device: torch.device,
                overrides: dict[str, Any], log: Callable[[str], None]
                ) -> tuple[list[torch.nn.Module], list[dict[str, Any]], list[float] | None, list[Path]]:
    """Every checkpoint under `runs` on `device`, with its resolved config; fusion models are refused."""
    paths, w = resolve_checkpoints(runs, weights)
    models, cfgs = [], []
    for p in paths:
        model, cfg = load_for_inference(p, device)
        if model_reads_s2(cfg):
            raise PredictError(f"{p}: this model needs Sentinel-2 time series (fusion={cfg['fusion']}, "
                               f"s2_early={cfg.get('s2_early', 'none')}); "
                               "whole-orthophoto inference supports aerial-only models")
        if cfg.get("use_metadata"):
            raise PredictError(f"{p}: this model needs per-patch metadata (use_metadata=true); "
                               "whole-orthophoto inference supports aerial-only models")
        cfg = resolve(overrides, cfg, "command line")
        if cfg.get("norm") == "s2_stats":
            raise PredictError(f"{p}: this model normalises each patch with its Sentinel-2 statistics "
                               "(norm=s2_stats); whole orthophotos have no S2: use another model, or force "
                               "the train statistics with norm=mean_std (expect worse predictions)")
        if cfg.get("channels_last"):
            model = model.to(memory_format=torch.channels_last)
        models.append(model)
        cfgs.append(cfg)
        log(f"infer: loaded {p} ({cfg['arch']}/{cfg['encoder']}, bands {','.join(cfg['bands'])})")
    return models, cfgs, w, paths


def input_groups(cfgs: Sequence[dict[str, Any]]) -> tuple[list[str], list[tuple[str, ...]], list[int]]:
    """(bands to read, distinct (bands, norm) inputs, input index of each model): models fed the same
    bands and normalisation share one normalised batch."""
    needed: list[str] = []
    keys: list[tuple[str, ...]] = []
    group: list[int] = []
    for cfg in cfgs:
        bands = [str(b).upper() for b in cfg["bands"]]
        needed += [b for b in bands if b not in needed]
        key = (*bands, cfg.get("norm", "mean_std"))
        if key not in keys:
            keys.append(key)
        group.append(keys.index(key))
    return needed, keys, group


def predict_tiles(models: Sequence[torch.nn.Module], cfgs: Sequence[dict[str, Any]],
                  weights: list[float] | None, needed: list[str], tiles: np.ndarray,
                  s: Settings) -> np.ndarray:
    """(n, k, win, win) uint8 windows of the `needed` bands -> (n, 13, win, win) float32 probabilities."""
    _, keys, group = input_groups(cfgs)
    dev = next(models[0].parameters()).device
    raw = torch.from_numpy(tiles).to(dev)
    batches = []
    for g in range(len(keys)):
        cfg = cfgs[group.index(g)]
        idx = [needed.index(str(b).upper()) for b in cfg["bands"]]
        batches.append({"image": normalize(raw[:, idx], cfg)})
    probs = predict_batch(models, weights, [batches[g] for g in group], tta=s.tta, ensemble=s.ensemble,
                          precision=s.precision, channels_last=s.channels_last)
    return probs.float().cpu().numpy()


# ------------------------------------------------------------------------------------- one raster
def check_gsd(src: Orthophoto, log: Callable[[str], None]) -> None:
    """Warn when the pixel size is far from the 0.2 m the models were trained on."""
    crs = src.ds.crs
    if crs is not None and crs.is_projected and str(crs.linear_units).lower() in ("metre", "meter", "m"):
        res = max(abs(src.ds.res[0]), abs(src.ds.res[1]))
        if abs(res - AERIAL_GSD_M) > 0.25 * AERIAL_GSD_M:
            log(f"infer: warning: {src.path}: pixel size {res:g} m; the models were trained on "
                f"{AERIAL_GSD_M} m orthophotos")


def predict_raster(src: Orthophoto, writer: GeoWriter, models: Sequence[torch.nn.Module],
                   cfgs: Sequence[dict[str, Any]], weights: list[float] | None, s: Settings,
                   desc: str) -> int:
    """Predict every window of `src`, strip by strip, into `writer`; the number of windows."""
    needed = input_groups(cfgs)[0]
    win, step = s.window, s.window - s.overlap
    ys, _ = grid(src.height, win, s.overlap)
    xs, width = grid(src.width, win, s.overlap)
    strip = Strip(NUM_CLASSES, win, width, blend_weights(win, s.overlap))
    bar = progress(total=len(ys) * len(xs), desc=desc, unit="win")
    with ThreadPoolExecutor(1) as reader:  # the next strip is read while this one is predicted
        ahead = reader.submit(src.read_strip, ys[0], win, width)
        for r, y0 in enumerate(ys):
            data, valid = ahead.result()
            if r + 1 < len(ys):
                ahead = reader.submit(src.read_strip, ys[r + 1], win, width)
            for i in range(0, len(xs), s.batch_size):
                chunk = xs[i:i + s.batch_size]
                tiles = np.stack([data[:, :, x:x + win] for x in chunk])
                for p, x in zip(predict_tiles(models, cfgs, weights, needed, tiles, s), chunk):
                    strip.add(p, x)
                bar.update(len(chunk))
            rows = src.height - y0 if r == len(ys) - 1 else step
            labels, probs = strip.pop(rows, src.width, probs=writer.probs is not None)
            q = quantise(torch.from_numpy(probs)).numpy() if probs is not None else None
            if valid is not None:
                labels[~valid[:rows]] = NODATA
                if q is not None:
                    q[:, ~valid[:rows]] = 0
            writer.write(labels, q)
    bar.close()
    return len(ys) * len(xs)


def infer_raster(path: Path, out: Path, models: Sequence[torch.nn.Module], cfgs: Sequence[dict[str, Any]],
                 weights: list[float] | None, s: Settings, tags: dict[str, str],
                 log: Callable[[str], None]) -> dict[str, Any]:
    """One raster -> its land-cover GeoTIFF (and probabilities), written atomically; a report dict."""
    needed = input_groups(cfgs)[0]
    t0 = time.perf_counter()
    src = Orthophoto(path, s.bands, needed)
    try:
        if src.assumed:
            log(f"infer: {path}: bands 1..{len(src.given)} taken as {','.join(src.given)} (else set --bands)")
        check_gsd(src, log)
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out)
        remove_stale_temps(probs_path(out))
        with ExitStack() as stack:  # probabilities are renamed into place before the class map
            tmp = stack.enter_context(atomic_write(out))
            tmp_p = stack.enter_context(atomic_write(probs_path(out))) if s.probs else None
            writer = GeoWriter(src, tmp, tmp_p, tags)
            try:
                n = predict_raster(src, writer, models, cfgs, weights, s, desc=f"infer {path.name}")
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
          weights: Sequence[float] | None = None, settings: Settings | None = None,
          overrides: dict[str, Any] | None = None, overwrite: bool = False, device: str = "auto",
          log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Predict every raster named by `src` (this process's share under torchrun) into `out`; reports."""
    rank, world, local = dist_env()
    if world > 1:
        log = (lambda f: lambda msg: f(f"[rank {rank}/{world}] {msg}"))(log)
    pairs = plan_outputs(list_inputs(src), src, out)[rank::world]
    s = settings or Settings()
    if device == "auto" and world > 1 and torch.cuda.is_available():
        device = f"cuda:{local}"
    dev = pick_device(device)
    if dev.type == "cpu" and world > 1:  # processes on one machine share its cores
        torch.set_num_threads(max(1, cpu_count() // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    tune_cuda(dev)
    reports, todo = [], []
    for path, target in pairs:
        done = output_ok(target, path) and (not s.probs or output_ok(probs_path(target), path, NUM_CLASSES))
        if done and not overwrite:
            log(f"infer: {target} exists, skipped (--overwrite to redo)")
            reports.append({"src": str(path), "out": str(target), "skipped": True})
        else:
            todo.append((path, target))
    if not todo:
        return reports
    models, cfgs, w, paths = load_models(runs, weights, dev, dict(overrides or {}), log)
    tags = {"flair2_models": ";".join(str(p) for p in paths), "flair2_tta": s.tta,
            "flair2_windows": f"window {s.window} overlap {s.overlap}"}
    with io_env():
        for path, target in todo:
            try:
                reports.append(infer_raster(path, target, models, cfgs, w, s, tags, log))
            except DataError as err:  # one bad raster does not stop the others; main() exits 1 at the end
                log(f"infer: error: {one_line(err)}")
                reports.append({"src": str(path), "out": str(target), "error": one_line(err)})
    return reports


def settings_from(args: argparse.Namespace, cfg: dict[str, Any]) -> Settings:
    """Command-line flags over the first model's (overridden) prediction settings."""
    s = Settings(window=args.window, overlap=args.overlap, tta=args.tta or cfg["tta"],
                 ensemble=cfg["ensemble"], precision=cfg["precision"], batch_size=int(cfg["batch_size"]),
                 channels_last=bool(cfg["channels_last"]),
                 bands=parse_bands(args.bands) if args.bands else None, probs=args.probs)
    s.check()
    return s


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m src.infer", description=__doc__.split("\n")[0])
    ap.add_argument("--runs", nargs="+", required=True, help="run folders (best.pt under them), checkpoints")
    ap.add_argument("--src", required=True, help="a raster, a folder of rasters, or a text file of rasters")
    ap.add_argument("--out", required=True, help="output .tif for one raster, else a folder")
    ap.add_argument("--weights", help="comma-separated: one per --runs item or per checkpoint")
    ap.add_argument("--tta", choices=T.LEVELS, help="none | flip | d4 (default: the checkpoint's tta)")
    ap.add_argument("--bands", help="names of input bands 1, 2, ... e.g. R,G,B,NIR,E (- skips a band); "
                    "default: R,G,B,NIR,E up to the raster's band count")
    ap.add_argument("--window", type=int, default=PATCH_SIZE, help="window side (px, multiple of 32)")
    ap.add_argument("--overlap", type=int, default=128, help="overlap of windows (px, multiple of 32)")
    ap.add_argument("--probs", action="store_true", help="also write <out>_probs.tif: 13 bands, round(p*255)")
    ap.add_argument("--overwrite", action="store_true", help="redo rasters whose output exists")
    ap.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK under torchrun) | cpu | cuda:1")
    ap.add_argument("overrides", nargs="*", help="key=value settings (batch_size, precision, ensemble, ...)")
    args = ap.parse_args(argv)
    runs, overrides = split_overrides(args.runs, args.overrides)  # nargs="+" swallows key=value
    try:
        weights = [float(x) for x in args.weights.split(",")] if args.weights else None
        ov = parse_overrides(overrides)
        first = resolve(ov, dict(load_checkpoint(resolve_checkpoints(runs, weights)[0][0])["config"]),
                        "command line")
        settings = settings_from(args, first)  # checked before any model is built
        reports = infer(runs, args.src, args.out, weights=weights, settings=settings, overrides=ov,
                        overwrite=args.overwrite, device=args.device)
        failed = [r for r in reports if "error" in r]
        if failed:
            first = failed[0]["error"]
            raise PredictError(f"{len(failed)} of {len(reports)} rasters failed (first: {first})")
    except ConfigError as err:
        exit_on_config_error(err)
    except ValueError as err:  # PredictError, DataError (CheckpointError), bad --weights
        print(f"infer: error: {one_line(err)}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
