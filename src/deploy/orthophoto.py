"""Whole orthophotos: georeferenced reading strip by strip and writing of the land-cover GeoTIFF, and the
sliding-window maths (where windows go, how their probabilities blend).

Georeferenced rasters for whole-orthophoto inference: read an orthophoto strip by strip, write the
land-cover GeoTIFF (and its probabilities) block row by block row, with rasterio.

Why it is built this way:
- Reading and writing go through windows, never the whole raster, and GDAL's block cache is bounded
  (`io_env`), so memory does not grow with the raster's height (an orthophoto of tens of thousands of
  pixels a side is several GB of bands).
- Outputs keep the input's CRS and transform, are tiled (256) and deflate-compressed with overviews
  (mode for classes, average for probabilities), and the class map carries the official colour table
  (src/core/flair.py) and nodata 255, so GIS software shows them as they are.
- Rows are buffered and written in multiples of the 256-pixel tile height: a compressed tile written
  half-full would be compressed and appended twice.
- Input bands are named explicitly (`--bands R,G,B,NIR,E`: band 1 is R, ...): orthophotos come in many
  band orders, and a silently wrong order still "works", badly. Values must be 8-bit (0..255), the
  scale the models were trained on (docs/data-format.md, "Aerial images").

Sliding-window maths for whole-orthophoto inference: where the windows go, how they are weighted, and
the strip of accumulated probabilities that keeps memory flat (numpy only).

Windows sit on a regular grid of step `window - overlap` starting at the raster's top-left corner, and the
raster is padded at the bottom/right up to the last window (`grid`). A regular grid keeps every window
aligned on the encoder's stride (32 px) relative to the whole raster when window and overlap are multiples
of it, so a window computes the same features as a forward pass over the whole raster would, except for the
context it lacks near its own borders.

Blending (`blend_weights`): each window's probabilities are multiplied by a separable weight and the sum is
divided by the summed weights. Along one axis the weight is `floor` (1e-3) for the outer quarter of the
overlap, rises with a smoothstep (C1, no seam) to 1 across the middle half of the overlap, and is 1 beyond
it. Where two windows overlap, their weights cross in the middle of the overlap, so every pixel takes its
value from windows in which it has at least overlap/4 pixels of real context (and mostly overlap/2); the
floor keeps the weight > 0 everywhere so a pixel seen by a single window (the raster's edges) is still
defined. A linear ramp over the whole overlap would also be seamless but lets windows with almost no
context on one side contribute: against a whole-raster forward pass of the bounded-field model of
tests/test_infer.py (window 256, overlap 64), the largest probability difference is 0.033 with a linear
ramp and 0.0007 with this profile (the floor's share)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import MaskFlags, Resampling
from rasterio.windows import Window

from src.core.errors import DataError
from src.core.flair import BAND_NAMES, NUM_CLASSES, PALETTE, class_argmax

BLOCK = 256    # output tile side, and the row granularity of writes
NODATA = 255   # class value written where the input has no data
SKIP = "-"     # band name meaning "this input band is not used"
CACHE_MB = 256  # GDAL block cache; its default (5% of RAM) keeps blocks already used, growing with the raster
PROFILE = {"driver": "GTiff", "tiled": True, "blockxsize": BLOCK, "blockysize": BLOCK,
           "compress": "deflate", "predictor": 2, "bigtiff": "IF_SAFER"}


def parse_bands(text: str) -> list[str]:
    """"R,G,B,NIR,E" -> names of input bands 1, 2, ... (upper case; "-" skips a band)."""
    names = [b.strip().upper() for b in str(text).split(",") if b.strip()]
    unknown = [b for b in names if b not in BAND_NAMES and b != SKIP]
    if not names or unknown:
        raise DataError(f"--bands {text!r}: expected names among {', '.join(BAND_NAMES)} (or {SKIP} to skip "
                        "a band) separated by commas")
    repeated = sorted({b for b in names if b != SKIP and names.count(b) > 1})
    if repeated:
        raise DataError(f"--bands {text!r}: {', '.join(repeated)} given twice")
    return names


def overview_factors(height: int, width: int) -> list[int]:
    """2, 4, 8, ... until the smallest overview is under one tile."""
    out, f = [], 2
    while max(height, width) / (f // 2) > BLOCK:
        out.append(f)
        f *= 2
    return out


def io_env() -> rasterio.Env:
    """The rasterio environment of strip I/O: a bounded GDAL block cache, so that memory stays flat (measured
    reading a 6000 x 6000 raster strip by strip: +231 MB with GDAL's default cache, +48 MB with this one)."""
    return rasterio.Env(GDAL_CACHEMAX=CACHE_MB)


class Orthophoto:
    """An input raster opened for strip reading of the bands the models need, in their order."""

    def __init__(self, path: str | Path, bands: Sequence[str] | None, needed: Sequence[str]):
        self.path = Path(path)
        try:
            self.ds = rasterio.open(self.path)
        except rasterio.errors.RasterioIOError as err:
            raise DataError(f"{self.path}: cannot open raster ({str(err).splitlines()[0]})") from None
        ds = self.ds
        given = list(bands) if bands else list(BAND_NAMES[:ds.count])
        if len(given) > ds.count:
            self.close()
            raise DataError(f"{self.path}: --bands names {len(given)} bands, the raster has {ds.count}")
        missing = [b for b in needed if b not in given]
        if missing:
            self.close()
            named = [b for b in given if b != "-"]
            fix = ("name them with --bands" if len(named) < ds.count
                   else f"a model trained with bands={','.join(named)} reads this raster")
            raise DataError(f"{self.path}: the model needs bands {','.join(needed)}; bands 1..{len(given)} "
                            f"are {','.join(given)}: {','.join(missing)} missing ({fix})")
        self.indexes = [given.index(b) + 1 for b in needed]  # rasterio band numbers, 1-based
        bad = [f"band {i} is {ds.dtypes[i - 1]}" for i in self.indexes if ds.dtypes[i - 1] != "uint8"]
        if bad:
            self.close()
            raise DataError(f"{self.path}: {'; '.join(bad)}: the models expect 8-bit bands (0..255)")
        self.given, self.assumed = given, not bands
        self.height, self.width = ds.height, ds.width
        # read a validity mask only when there is one (nodata value, internal mask or alpha)
        self.masked = ds.nodata is not None or any(
            MaskFlags.all_valid not in flags for flags in ds.mask_flag_enums)

    def read_strip(self, y0: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Bands (k, height, width) uint8 of rows y0.. , reflect-padded past the raster's bottom/right edges,
        and the validity mask (rows inside the raster, raster width) bool, or None when all is valid."""
        rows = min(height, self.height - y0)
        win = Window(0, y0, self.width, rows)
        try:
            data = self.ds.read(self.indexes, window=win)
            valid = self.ds.dataset_mask(window=win) > 0 if self.masked else None
        except rasterio.errors.RasterioIOError as err:
            raise DataError(f"{self.path}: unreadable rows {y0}..{y0 + rows} "
                            f"({str(err).splitlines()[0]})") from None
        pad = ((0, 0), (0, height - rows), (0, width - self.width))
        return (np.pad(data, pad, mode="reflect") if any(p[1] for p in pad) else data), valid

    def close(self) -> None:
        self.ds.close()


class GeoWriter:
    """The class map (1 band, uint8, colour table, nodata 255) and optional probabilities (13 bands, uint8
    round(p*255), 0 where nodata) of one raster, written row block by row block to the given paths."""

    def __init__(self, like: Orthophoto, path: Path, probs_path: Path | None = None,
                 tags: dict | None = None):
        src = like.ds
        base = {**PROFILE, "width": src.width, "height": src.height, "crs": src.crs,
                "transform": src.transform, "dtype": "uint8"}
        self.width, self.height = src.width, src.height
        self.labels = rasterio.open(path, "w", **base, count=1, nodata=NODATA)
        self.labels.write_colormap(1, {**{c: (*map(int, PALETTE[c]), 255) for c in range(NUM_CLASSES)},
                                       NODATA: (0, 0, 0, 0)})
        self.labels.set_band_description(1, "FLAIR #2 land cover (13 classes)")
        self.labels.update_tags(**(tags or {}))
        self.probs = None
        if probs_path is not None:
            self.probs = rasterio.open(probs_path, "w", **base, count=NUM_CLASSES, interleave="band")
            self.probs.update_tags(**(tags or {}), scale="probability * 255")
        self.y = 0  # first row not yet written
        self.pending: list[tuple[np.ndarray, np.ndarray | None]] = []

    def write(self, labels: np.ndarray, probs: np.ndarray | None = None) -> None:
        """Queue the next rows: labels (rows, width) uint8, probs (13, rows, width) uint8 or None."""
        self.pending.append((labels, probs))
        queued = sum(p[0].shape[0] for p in self.pending)
        if queued >= BLOCK:
            self._flush(queued - queued % BLOCK)

    def _flush(self, rows: int) -> None:
        labels = np.concatenate([p[0] for p in self.pending], axis=0)
        probs = (np.concatenate([p[1] for p in self.pending], axis=1) if self.probs is not None else None)
        win = Window(0, self.y, self.width, rows)
        self.labels.write(labels[None, :rows], window=win)
        if probs is not None:
            self.probs.write(probs[:, :rows], window=win)
        self.y += rows
        self.pending = [(labels[rows:], probs[:, rows:] if probs is not None else None)] if rows < len(
            labels) else []

    def close(self, overviews: bool = True) -> None:
        """Write what is queued, build the overviews, close the files."""
        queued = sum(p[0].shape[0] for p in self.pending)
        if queued:
            self._flush(queued)
        if self.y != self.height:
            raise DataError(f"{self.labels.name}: wrote {self.y} rows of {self.height}")
        outputs = ((self.labels, Resampling.mode), (self.probs, Resampling.average))
        paths = [(ds.name, how) for ds, how in outputs if ds is not None]
        self.abort()
        factors = overview_factors(self.height, self.width) if overviews else []
        for path, how in paths if factors else []:
            # on the closed file: GDAL builds class-map overviews in write mode without the colour table
            with rasterio.open(path, "r+") as ds:
                ds.build_overviews(factors, how)
                ds.update_tags(ns="rio_overview", resampling=how.name)

    def abort(self) -> None:
        """Close the files as they are (the caller deletes them)."""
        for ds in (self.labels, self.probs):
            if ds is not None and not ds.closed:
                ds.close()


def output_ok(path: Path, like: Path, count: int = 1) -> bool:
    """A finished output: opens as a `count`-band uint8 raster of the input's size (outputs are renamed into
    place only when complete, so this is a sanity check, not a completeness scan)."""
    if not path.is_file():
        return False
    try:
        with rasterio.open(path) as out, rasterio.open(like) as src:
            return (out.count, out.dtypes[0], out.shape) == (count, "uint8", src.shape)
    except rasterio.errors.RasterioIOError:
        return False


FLOOR = 1e-3  # weight at a window's border: > 0 so that every covered pixel is defined


def grid(length: int, window: int, overlap: int) -> tuple[list[int], int]:
    """(window starts along one axis, padded length) covering `length` pixels with a step of
    window - overlap; the padded length is where the last window ends (>= length, >= window)."""
    if not 0 <= overlap < window:
        raise ValueError(f"overlap must be in [0, window): got overlap {overlap}, window {window}")
    step = window - overlap
    n = 1 + max(0, math.ceil((length - window) / step))
    starts = [i * step for i in range(n)]
    return starts, starts[-1] + window


def ramp(window: int, overlap: int, floor: float = FLOOR) -> np.ndarray:
    """1-D float32 weights of a window (see the module docstring): floor at the border, 1 past the overlap."""
    d = np.minimum(np.arange(window), np.arange(window)[::-1]) + 0.5  # distance to the nearest border
    if overlap <= 0:
        return np.ones(window, np.float32)
    t = np.clip((d - overlap / 4) / (overlap / 2), 0.0, 1.0)
    return (floor + (1.0 - floor) * t * t * (3.0 - 2.0 * t)).astype(np.float32)


def blend_weights(window: int, overlap: int, floor: float = FLOOR) -> np.ndarray:
    """(window, window) float32 separable blending weights, > 0 everywhere."""
    r = ramp(window, overlap, floor)
    return np.outer(r, r)


class Strip:
    """Accumulated weighted probabilities of one row of windows: (classes, window, padded width).

    After a window row is added, its top `step` rows are final (no later window reaches them): `pop`
    returns their classes (and probabilities) and shifts the overlap up, so memory holds one window
    height of the raster's width whatever the raster's height.
    """

    def __init__(self, classes: int, window: int, width: int, weights: np.ndarray):
        self.window, self.weights = window, weights
        self.acc = np.zeros((classes, window, width), np.float32)
        self.wsum = np.zeros((window, width), np.float32)

    def add(self, probs: np.ndarray, x0: int) -> None:
        """Add one window's (classes, window, window) float32 probabilities whose left edge is at column x0
        (weighted in place: `probs` is consumed)."""
        x1 = x0 + self.window
        np.multiply(probs, self.weights, out=probs)  # in place: the window's probabilities are not kept
        self.acc[:, :, x0:x1] += probs
        self.wsum[:, x0:x1] += self.weights

    def pop(self, rows: int, width: int, probs: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """(classes (rows, width) uint8, probabilities (classes, rows, width) float32 when `probs`) of the top
        `rows` rows, then shift the rest up. The argmax is taken on the weighted sums, which order the
        classes like the probabilities do (a pixel's weight sum is > 0), so no normalised copy of the strip
        is made unless the probabilities are asked for."""
        acc = self.acc[:, :rows, :width]
        labels = class_argmax(acc)[0]
        out = acc / np.maximum(self.wsum[:rows, :width], np.finfo(np.float32).tiny) if probs else None
        keep = self.window - rows
        self.acc[:, :keep] = self.acc[:, rows:]
        self.acc[:, keep:] = 0.0
        self.wsum[:keep] = self.wsum[rows:]
        self.wsum[keep:] = 0.0
        return labels, out
