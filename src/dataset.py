"""Index rows -> training/inference samples (aerial bands, 0..12 mask, S2 series, metadata), and batches.

Sample keys (notes/CONTRACTS.md): "image" float32 (C,H,W) normalised per band; "mask" int64 (H,W) 0..12
(only for rows with a label when `labels`); with `use_s2`: "s2" float32 (T,10,S,S) reflectance/10000,
"s2_days" int64 (T,), "s2_pad" bool (T,) (all False for one sample, True on padded dates after
`collate`), "s2_valid" bool (S,S) (False where the S2 window left the super-area, or, after a crop or
rotation, where S2 pixels came from outside the crop); with `use_metadata`: "meta" float32 (META_DIM,);
"id" str.

Why it is fast: TIFFs through tifffile (src.rasters, no rasterio), S2 arrays memory-mapped so only the
40x40 window of the kept dates is read, products.txt parsed once per zone and per worker, integer data
turned into float32 once, label checks by a 256-bin count instead of a sort. Workers: the dataset holds
only numpy columns and settings (pickles small, no per-row Python objects whose refcounts would copy
pages in forked workers); memmaps are opened lazily in each worker and dropped when pickled.
"""
from __future__ import annotations

import datetime as dt
import logging
import math
import os
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from src.augment import build_augment
from src.bands import BAND_MEAN, BAND_NAMES, BAND_STD
from src.classes import invalid_label_values, remap
from src.rasters import DataError, read_image, read_label
from src.sentinel import read_products, s2_series

log = logging.getLogger(__name__)

S2_SCALE = np.float32(10000.0)  # stored reflectance x 10000 -> ~[0, 1] (the baseline feeds raw values)

# Metadata vector: x, y (Lambert-93, ~[-1, 1] over mainland France), altitude (km), sin/cos of the day of
# year, hour of day ((h - 12) / 6), then a one-hot of the camera name hashed (crc32) into CAMERA_SLOTS.
# A missing field encodes as 0 (a missing camera as an all-zero one-hot).
CAMERA_SLOTS = 8
META_DIM = 6 + CAMERA_SLOTS
_L93_X = (675_000.0, 575_000.0)    # centre, half range
_L93_Y = (6_580_000.0, 540_000.0)

_STR_COLS = ("id", "img_path", "msk_path", "camera", "date", "time")
_S2_COLS = ("s2_data", "s2_masks", "s2_products")
_NUM_COLS = ("s2_row", "s2_col", "patch_centroid_x", "patch_centroid_y", "patch_centroid_z")


def band_indices(bands: Sequence[str]) -> list[int]:
    """Band names (R, G, B, NIR, E; case-insensitive) -> indices into the 5-band aerial image."""
    out = []
    for b in bands:
        name = str(b).upper()
        if name not in BAND_NAMES:
            raise ValueError(f"unknown band {b!r}: expected a subset of {', '.join(BAND_NAMES)}")
        out.append(BAND_NAMES.index(name))
    if not out or len(set(out)) != len(out):
        raise ValueError(f"bands must be a non-empty list without repeats, got {list(bands)}")
    return out


def _text(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def encode_metadata(camera: str, date: str, hour: str, x: float, y: float, z: float) -> np.ndarray:
    """float32 (META_DIM,) encoding of one patch's aerial metadata (see META_DIM comment)."""
    out = np.zeros(META_DIM, dtype=np.float32)
    if np.isfinite(x):
        out[0] = (x - _L93_X[0]) / _L93_X[1]
    if np.isfinite(y):
        out[1] = (y - _L93_Y[0]) / _L93_Y[1]
    if np.isfinite(z):
        out[2] = z / 1000.0
    try:
        day = dt.date.fromisoformat(date[:10])
        angle = 2 * math.pi * (day.timetuple().tm_yday - 1) / 365.25
        out[3], out[4] = math.sin(angle), math.cos(angle)
    except ValueError:
        pass
    try:
        hh, mm = hour.lower().split("h")
        out[5] = (int(hh) + int(mm or 0) / 60.0 - 12.0) / 6.0
    except ValueError:
        pass
    if camera:
        out[6 + zlib.crc32(camera.encode()) % CAMERA_SLOTS] = 1.0
    return out


class FlairDataset(Dataset):
    """Torch dataset over index rows (src.index schema); see the module docstring for the sample keys.

    `train` selects the training augmentation (cfg["augment"], crop_size, s2_date_dropout); otherwise the
    identity at full size. `labels=False` never reads masks (test-time inference).
    With cfg["skip_bad"], a sample whose files raise DataError is logged (logging + one line appended to
    `bad_log` when given), counted in `bad_count` (per process) and replaced by the next readable index
    (wrapping around); without it the DataError propagates, naming the file.
    `timings` (a dict, None by default) accumulates seconds per stage (read, s2, augment, finalize) when set,
    measured with `clock` (wall time by default; the benchmark uses per-thread CPU time).
    """

    def __init__(self, index_df: pd.DataFrame, cfg: dict, train: bool, labels: bool = True,
                 bad_log: str | os.PathLike | None = None):
        missing = [c for c in ("id", "img_path", "msk_path") if c not in index_df.columns]
        if missing:
            raise ValueError(f"index is missing columns {missing}")
        self.n = len(index_df)
        # Text as fixed-width UTF-8 bytes (1 byte per character, no Python object per row) and the S2
        # triple as a zone code into a short list: ~10 MB per path column for the full 77k-patch index.
        self.cols: dict[str, np.ndarray] = {}
        for c in _STR_COLS:
            values = index_df[c].tolist() if c in index_df.columns else [""] * self.n
            self.cols[c] = np.array([_text(v).encode() for v in values], dtype=bytes)
        s2_lists = [index_df[c].tolist() if c in index_df.columns else [""] * self.n for c in _S2_COLS]
        triples = ["\n".join(_text(v) for v in t) for t in zip(*s2_lists)]
        codes, uniques = pd.factorize(pd.Series(triples, dtype=object))
        self.zone_code = codes.astype(np.int32)
        self.zone_paths: list[tuple[str, ...]] = [tuple(u.split("\n")) for u in uniques]
        for c in _NUM_COLS:
            values = index_df[c] if c in index_df.columns else pd.Series(np.nan, index=index_df.index)
            self.cols[c] = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
        self.train, self.labels = train, labels
        self.band_idx = band_indices(cfg["bands"])
        norm = cfg.get("norm", "mean_std")
        if norm == "mean_std":
            self.mean, self.std = BAND_MEAN[self.band_idx], BAND_STD[self.band_idx]
        elif norm == "scale":
            self.mean = np.zeros(len(self.band_idx), np.float32)
            self.std = np.full(len(self.band_idx), 255.0, np.float32)
        else:
            raise ValueError(f"norm {norm!r}: expected mean_std or scale")
        # (x - mean) / std for every uint8 value, per band, in float32: the exact formula, applied by lookup
        levels = np.arange(256, dtype=np.float32)[:, None]
        self.norm_lut = np.ascontiguousarray((levels - self.mean) / self.std, dtype=np.float32)
        self.use_s2 = bool(cfg.get("use_s2", False))
        self.s2_kw = dict(size=int(cfg.get("s2_size", 40)),
                          filter_clouds=bool(cfg.get("s2_filter_clouds", True)),
                          cover_max=float(cfg.get("s2_cover_max", 0.5)),
                          prob_min=int(cfg.get("s2_prob_min", 60)),
                          monthly=bool(cfg.get("s2_monthly", True)))
        self.use_metadata = bool(cfg.get("use_metadata", False))
        self.skip_bad = bool(cfg.get("skip_bad", False))
        self.bad_log = Path(bad_log) if bad_log else None
        self.bad_count = 0
        self.augment = build_augment(cfg, train)
        self.timings: dict[str, float] | None = None
        self.clock = time.perf_counter
        self._bad: set[int] = set()
        self._zones: dict[str, tuple[np.ndarray, np.ndarray, list[str]]] = {}
        self._owner: tuple[int, int | None] | None = None

    def __len__(self) -> int:
        return self.n

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_zones"], state["_owner"] = {}, None  # memmaps are reopened in the receiving process
        return state

    def _check_worker(self) -> None:
        """First call in a new process/worker: fresh zone cache and a per-worker augmentation seed."""
        info = torch.utils.data.get_worker_info()
        owner = (os.getpid(), info.id if info is not None else None)
        if owner != self._owner:
            if self._owner is not None or info is not None:
                self._zones = {}
            if info is not None:
                self.augment.reseed(info.seed)  # (never touch OpenCV's thread pool here: after a fork
                # cv2.setNumThreads deadlocks on the parent's pool; make_loader sets it before forking)
            self._owner = owner

    def __getitem__(self, i: int) -> dict[str, Any]:
        self._check_worker()
        if not self.skip_bad:
            return self.load(i)
        for step in range(self.n):
            j = (i + step) % self.n
            if j in self._bad:
                continue
            try:
                return self.load(j)
            except DataError as err:
                self._record_bad(j, err)
        raise DataError(f"every one of the {self.n} samples failed to load (see {self.bad_log or 'the log'})")

    def _record_bad(self, i: int, err: DataError) -> None:
        self._bad.add(i)
        self.bad_count += 1
        line = f"{self.text('id', i)}\t{err}"
        log.warning("skipping sample %s", line)
        if self.bad_log is not None:
            with open(self.bad_log, "a") as fh:  # one short line per write: safe across workers
                fh.write(line.replace("\n", " ") + "\n")

    def text(self, column: str, i: int) -> str:
        """Text field of row i (id, img_path, msk_path, camera, date, time)."""
        return self.cols[column][i].decode()

    def _zone(self, i: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(data, masks, products) of the row's S2 zone, memmapped once per process."""
        key = int(self.zone_code[i])
        zone = self._zones.get(key)
        if zone is None:
            paths = self.zone_paths[key]
            if not all(paths):
                raise DataError(f"{self.text('img_path', i)}: no Sentinel-2 files for this patch "
                                "in the index")
            arrays = []
            for p in paths[:2]:
                try:
                    arrays.append(np.load(p, mmap_mode="r"))
                except FileNotFoundError:
                    raise DataError(f"{p}: file not found") from None
                except (OSError, ValueError) as err:
                    raise DataError(f"{p}: unreadable .npy ({err})") from None
            data, masks = arrays
            products = read_products(paths[2])
            if data.ndim != 4 or masks.ndim != 4 or masks.shape[0] != data.shape[0] \
                    or masks.shape[2:] != data.shape[2:] or len(products) != data.shape[0]:
                raise DataError(f"{paths[0]}: S2 triple does not match: data {data.shape}, "
                                f"masks {masks.shape}, {len(products)} products in {paths[2]}")
            zone = (data, masks, products)
            self._zones[key] = zone
        return zone

    def _tick(self, key: str, start: float) -> float:
        now = self.clock()
        if self.timings is not None:
            self.timings[key] = self.timings.get(key, 0.0) + now - start
        return now

    def load(self, i: int) -> dict[str, Any]:
        """Sample i without the skip_bad replacement (DataError names the failing file)."""
        c = self.cols
        t = self.clock()
        path = self.text("img_path", i)
        img = read_image(path, bands=5)
        if img.dtype != np.uint8:
            raise DataError(f"{path}: expected uint8 aerial bands, got {img.dtype}")
        image = cv2.merge([img[b] for b in self.band_idx]).reshape(*img.shape[1:], -1)  # HWC, one copy
        mask = None
        msk_path = self.text("msk_path", i)
        if self.labels and msk_path:
            raw = read_label(msk_path)
            if raw.shape != image.shape[:2]:
                raise DataError(f"{msk_path}: label shape {raw.shape} differs from image {image.shape[:2]} "
                                f"of {path}")
            if raw.dtype == np.uint8:  # a 256-bin count is ~10x faster than np.unique
                counts = np.bincount(raw.ravel(), minlength=256)
                bad = bool(counts[0] or counts[20:].any())
            else:
                bad = bool(invalid_label_values(raw))
            if bad:
                raise DataError(f"{msk_path}: label values outside 1..19: {invalid_label_values(raw)}")
            mask = remap(raw)
        t = self._tick("read", t)

        s2 = s2_valid = s2_days = None
        if self.use_s2:
            data, masks, products = self._zone(i)
            row, col = c["s2_row"][i], c["s2_col"][i]
            if not (np.isfinite(row) and np.isfinite(col)) or row < 0 or col < 0:
                raise DataError(f"{path}: no S2 centroid for this patch in the index")
            try:
                s2, s2_days = s2_series(data, masks, products, (int(row), int(col)), **self.s2_kw)
            except ValueError as err:
                raise DataError(f"{self.zone_paths[self.zone_code[i]][0]}: patch {self.text('id', i)}: "
                                f"{err}") from None
            nan = np.isnan(s2)
            s2_valid = ~nan.any(axis=(0, 1))
            s2[nan] = 0.0
            s2 /= S2_SCALE
        t = self._tick("s2", t)

        out = self.augment(image, mask, s2, s2_valid, s2_days)
        t = self._tick("augment", t)

        hwc = np.ascontiguousarray(out["image"])
        chw = np.empty((hwc.shape[2], *hwc.shape[:2]), dtype=np.float32)
        for b, plane in enumerate(cv2.split(hwc)):  # uint8 -> normalised float32 through a lookup table
            cv2.LUT(plane, self.norm_lut[:, b], dst=chw[b])
        sample: dict[str, Any] = {"image": torch.from_numpy(chw), "id": self.text("id", i)}
        if out["mask"] is not None:
            sample["mask"] = torch.from_numpy(out["mask"].astype(np.int64))
        if self.use_s2:
            sample["s2"] = torch.from_numpy(np.ascontiguousarray(out["s2"], dtype=np.float32))
            sample["s2_days"] = torch.from_numpy(np.asarray(out["s2_days"], dtype=np.int64))
            sample["s2_pad"] = torch.zeros(len(out["s2_days"]), dtype=torch.bool)
            sample["s2_valid"] = torch.from_numpy(np.ascontiguousarray(out["s2_valid"]))
        if self.use_metadata:
            sample["meta"] = torch.from_numpy(encode_metadata(
                self.text("camera", i), self.text("date", i), self.text("time", i), c["patch_centroid_x"][i],
                c["patch_centroid_y"][i], c["patch_centroid_z"][i]))
        self._tick("finalize", t)
        return sample


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples into a batch; S2 series are zero-padded to the longest T, `s2_pad` marks padding."""
    if not samples:
        raise ValueError("collate: empty batch")
    batch: dict[str, Any] = {"id": [s["id"] for s in samples]}
    keys = set().union(*samples) - {"id", "s2", "s2_days", "s2_pad"}
    for key in sorted(keys):
        if not all(key in s for s in samples):
            raise ValueError(f"collate: key {key!r} present in some samples only "
                             "(mixed labelled and unlabelled rows?)")
        batch[key] = torch.stack([s[key] for s in samples])
    if any("s2" in s for s in samples):
        if not all("s2" in s for s in samples):
            raise ValueError("collate: key 's2' present in some samples only")
        lengths = [s["s2"].shape[0] for s in samples]
        t_max = max(lengths)
        first = samples[0]["s2"]
        s2 = first.new_zeros((len(samples), t_max, *first.shape[1:]))
        days = torch.zeros((len(samples), t_max), dtype=torch.int64)
        pad = torch.ones((len(samples), t_max), dtype=torch.bool)
        for b, (s, n) in enumerate(zip(samples, lengths)):
            s2[b, :n] = s["s2"]
            days[b, :n] = s["s2_days"]
            pad[b, :n] = False
        batch["s2"], batch["s2_days"], batch["s2_pad"] = s2, days, pad
    return batch


def make_loader(ds: Dataset, cfg: dict, train: bool, sampler: Any = None) -> DataLoader:
    """DataLoader with the kit's defaults: cfg workers (persistent), pin_memory on CUDA, `collate`.

    With workers, OpenCV is set to one thread in this process first (inherited by the workers).

    Training shuffles (unless a sampler is given) and drops the last incomplete batch, except when the
    dataset is smaller than one batch (tiny demos would otherwise get empty epochs).
    """
    workers = int(cfg.get("workers", 0))
    if workers > 0:
        cv2.setNumThreads(1)  # one worker = one core: no OpenCV pool per worker (set here, before the fork)
    batch_size = int(cfg.get("batch_size", 8))
    return DataLoader(ds, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler,
                      num_workers=workers, collate_fn=collate, pin_memory=torch.cuda.is_available(),
                      drop_last=train and len(ds) > batch_size, persistent_workers=workers > 0,
                      prefetch_factor=4 if workers > 0 else None)
