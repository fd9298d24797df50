"""Synthetic FLAIR #2 dataset in the exact on-disk layout and formats of the real one (spec sections 2-6).

Why: every later check (index, S2 cropping, training, fusion, submission) must run on a machine without the
real 100 GB. The data is *learnable and honest*:

- each zone has one continuous label field (12 smooth class-score maps on the 10 m S2 pixel grid + rare-class
  disks); the 0.2 m aerial labels and the 10 m S2 super-area are both rendered from it, so the S2 pixels
  under a patch (at its centroid) agree with the patch's labels;
- classes have their own aerial signature + texture (R, G, B, NIR, nDSM) with a per-domain radiometric
  shift and per-domain class frequencies;
- classes have their own S2 phenology; herbaceous vegetation (raw 10) and agricultural land (raw 11) are
  identical in the aerial bands and differ only in the S2 time series (a model that uses S2 can win);
- S2 dates vary per zone (T 8..50 in the domain year), super-areas vary in size and are not square, clouds
  and snow appear on random dates with their probability masks (some dates fully covered).

`plan_dataset` exposes the ground truth (label fields, S2 labels, class profiles) that tests need; the tree
written by `make_dataset` holds only what the real dataset holds.
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from src.rasters import atomic_write, write_text, write_tif

PATCH = 512  # aerial patch side in pixels (0.2 m)
AERIAL_PER_S2 = 50  # 10 m / 0.2 m
PATCH_S2 = PATCH / AERIAL_PER_S2  # 10.24 S2 pixels under one patch
SLOT = 11  # patches sit on an 11 S2-pixel grid (10.24 px + a gap), so they never overlap
WINDOW = 40  # baseline S2 crop; most centroids get a full window inside the super-area
S2_BANDS = ("B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12")
NUM_MAIN = 12  # raw classes 1..12 come from the score fields; 13..19 are rare disks

# Real FLAIR #2 test domains (spec section 2); train codes are real-looking and disjoint from them.
TEST_DOMAINS = ["D015_2020", "D022_2021", "D026_2020", "D036_2020", "D061_2020",
                "D064_2021", "D068_2021", "D069_2020", "D071_2020", "D084_2021"]
TRAIN_DOMAINS = ["D004_2021", "D006_2020", "D007_2020", "D008_2019", "D009_2019", "D013_2020",
                 "D014_2020", "D016_2020", "D017_2018", "D021_2020", "D023_2020", "D029_2021",
                 "D030_2021", "D031_2019", "D032_2019", "D033_2021", "D034_2021", "D035_2020",
                 "D038_2021", "D041_2021", "D044_2020", "D046_2019", "D049_2020", "D051_2019",
                 "D052_2019", "D055_2018", "D058_2020", "D060_2021", "D063_2019", "D066_2021",
                 "D067_2021", "D070_2020", "D072_2019", "D074_2020", "D077_2021", "D078_2021",
                 "D080_2021", "D081_2020", "D083_2020", "D085_2019"]
CAMERAS = ["UCE-M3-f120-s06", "UCE-M3-f100-s06", "UCE-M3-f080-s06", "UCE-M1-f100-s06"]

# Base class frequencies for raw 1..12 (roughly FLAIR-like); each domain draws its own around them.
BASE_FREQ = np.array([0.08, 0.08, 0.10, 0.03, 0.04, 0.04, 0.15, 0.06, 0.03, 0.15, 0.15, 0.06])

# Aerial look per raw class 0..19 (row 0 unused): mean R, G, B, NIR; nDSM base and range; texture; amplitude.
# Texture ids: 0 smooth, 1 grain, 2 clumps (tree crowns), 3 fine stripes, 4 wide stripes, 5 field,
# 6 roof (flat planes at a few levels).
_TEX_NAMES = ("smooth", "grain", "clumps", "stripes_fine", "stripes_wide", "field", "roof")
_AERIAL = {
    1: ((150, 138, 132, 105), 30, 60, 6, 20),   # building: high, flat roofs
    2: ((118, 124, 100, 120), 1, 4, 1, 14),     # pervious surface
    3: ((96, 96, 98, 72), 0, 3, 1, 10),         # impervious surface
    4: ((160, 136, 106, 124), 0, 3, 1, 12),     # bare soil
    5: ((42, 62, 72, 22), 0, 1, 0, 6),          # water
    6: ((46, 64, 48, 118), 25, 50, 2, 16),      # coniferous
    7: ((72, 100, 62, 160), 18, 50, 2, 18),     # deciduous
    8: ((100, 110, 76, 138), 3, 15, 2, 15),     # brushwood
    9: ((122, 120, 92, 128), 1, 6, 3, 18),      # vineyard: rows
    10: ((106, 134, 82, 168), 0, 3, 5, 12),     # herbaceous vegetation  } identical on purpose:
    11: ((106, 134, 82, 168), 0, 3, 5, 12),     # agricultural land       } only S2 tells them apart
    12: ((140, 120, 96, 108), 0, 2, 4, 16),    # plowed land: furrows
    13: ((62, 170, 200, 40), 0, 1, 0, 6),       # swimming pool
    14: ((245, 245, 250, 200), 0, 2, 0, 4),     # snow
    15: ((126, 114, 86, 124), 1, 8, 1, 20),     # clear cut
    16: ((60, 84, 56, 142), 20, 50, 2, 16),     # mixed
    17: ((96, 110, 72, 140), 5, 20, 2, 14),     # ligneous
    18: ((220, 224, 226, 180), 2, 6, 0, 8),     # greenhouse
    19: ((130, 110, 120, 92), 0, 10, 1, 20),    # other
}
AERIAL_MEAN = np.zeros((20, 4), np.float32)
AERIAL_AMP = np.zeros(20, np.float32)
ELEV_BASE = np.zeros(20, np.float32)
ELEV_RANGE = np.zeros(20, np.float32)
TEXTURE = np.zeros(20, np.int64)
for _k, (_mean, _eb, _er, _tex, _amp) in _AERIAL.items():
    AERIAL_MEAN[_k], ELEV_BASE[_k], ELEV_RANGE[_k], TEXTURE[_k], AERIAL_AMP[_k] = _mean, _eb, _er, _tex, _amp
# Per-band texture weight (NIR varies more for vegetation, blue less).
_BAND_TEX = np.array([1.0, 1.0, 0.8, 1.3], np.float32)

# S2 reflectance spectra (B2 B3 B4 B5 B6 B7 B8 B8A B11 B12), 0..1.
_SPEC = {
    "veg": [0.03, 0.06, 0.03, 0.10, 0.30, 0.38, 0.42, 0.44, 0.22, 0.11],
    "conifer": [0.02, 0.04, 0.02, 0.07, 0.20, 0.25, 0.28, 0.30, 0.14, 0.07],
    "soil": [0.08, 0.11, 0.14, 0.17, 0.19, 0.21, 0.23, 0.25, 0.32, 0.27],
    "urban": [0.10, 0.11, 0.12, 0.13, 0.14, 0.15, 0.16, 0.17, 0.20, 0.18],
    "water": [0.06, 0.05, 0.03, 0.02, 0.015, 0.012, 0.01, 0.01, 0.005, 0.003],
    "pool": [0.14, 0.12, 0.06, 0.04, 0.03, 0.02, 0.02, 0.02, 0.01, 0.01],
    "snow": [0.86, 0.85, 0.83, 0.80, 0.78, 0.76, 0.74, 0.72, 0.10, 0.08],
    "cloud": [0.76, 0.75, 0.75, 0.75, 0.76, 0.76, 0.77, 0.77, 0.56, 0.45],
    "greenhouse": [0.30, 0.31, 0.31, 0.32, 0.33, 0.34, 0.35, 0.35, 0.30, 0.25],
}
SPECTRA = {k: np.array(v, np.float32) for k, v in _SPEC.items()}

# S2 phenology per raw class: (background spectrum, vegetation spectrum, green fraction curve).
# Curve: (low, high, green-up start, green-up end, senescence start, senescence end) in day of year;
# low == high means a flat curve.
_PHENO = {
    1: ("urban", "veg", (0.02, 0.02, 0, 0, 0, 0)),
    2: ("urban", "veg", (0.30, 0.45, 80, 130, 230, 290)),
    3: ("urban", "veg", (0.0, 0.0, 0, 0, 0, 0)),
    4: ("soil", "veg", (0.03, 0.08, 100, 150, 200, 250)),
    5: ("water", "veg", (0.0, 0.0, 0, 0, 0, 0)),
    6: ("soil", "conifer", (0.80, 0.85, 90, 150, 250, 300)),
    7: ("soil", "veg", (0.15, 0.90, 95, 140, 275, 320)),
    8: ("soil", "veg", (0.30, 0.65, 95, 140, 260, 310)),
    9: ("soil", "veg", (0.08, 0.55, 130, 180, 250, 290)),
    10: ("soil", "veg", (0.60, 0.85, 60, 110, 180, 230)),   # herbaceous: green all year
    11: ("soil", "veg", (0.02, 0.95, 80, 130, 170, 195)),   # agricultural: bare winter, harvest in July
    12: ("soil", "veg", (0.05, 0.12, 120, 150, 180, 220)),
    13: ("pool", "veg", (0.0, 0.0, 0, 0, 0, 0)),
    14: ("snow", "veg", (0.0, 0.0, 0, 0, 0, 0)),
    15: ("soil", "veg", (0.20, 0.40, 100, 150, 230, 280)),
    16: ("soil", "conifer", (0.50, 0.85, 95, 140, 275, 320)),
    17: ("soil", "veg", (0.40, 0.70, 95, 140, 260, 310)),
    18: ("greenhouse", "veg", (0.0, 0.0, 0, 0, 0, 0)),
    19: ("urban", "veg", (0.10, 0.15, 100, 150, 230, 280)),
}


@dataclass
class ZoneTruth:
    """Everything that defines one synthetic zone; tests compare the written files against it."""

    split: str
    domain: str
    zone: str
    year: int
    fields: np.ndarray  # (12, H, W) float32 class scores at S2 pixel centres (raw classes 1..12)
    blobs: np.ndarray  # (n, 4) float32: raw class 13..19, centre row, centre col, radius (S2 pixels)
    s2_labels: np.ndarray  # (H, W) uint8 raw class at each S2 pixel centre
    fractions: np.ndarray  # (20, H, W) float32 area fraction of each raw class in each S2 pixel
    days: np.ndarray  # (T,) int day of year of each S2 date
    profiles: np.ndarray  # (20, T, 10) float32 clear-sky reflectance (0..1) of each raw class
    patches: list[tuple[str, int, int]] = field(default_factory=list)  # (id, top row, left col) in S2 px
    style: dict = field(default_factory=dict)  # domain radiometry and zone geography

    @property
    def shape(self) -> tuple[int, int]:
        return self.s2_labels.shape

    @staticmethod
    def centroid(r0: int, c0: int) -> tuple[int, int]:
        """[row, col] written in the centroids JSON for a patch whose top-left S2 pixel is (r0, c0)."""
        return r0 + int(PATCH_S2 / 2), c0 + int(PATCH_S2 / 2)


# ----------------------------------------------------------------------------------------------- noise
def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Zero-mean, unit-std smooth random field whose features are about `scale` pixels wide."""
    h, w = shape
    gh, gw = int(np.ceil(h / scale)) + 3, int(np.ceil(w / scale)) + 3
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    up = cv2.resize(grid, (int(gw * scale), int(gh * scale)), interpolation=cv2.INTER_CUBIC)
    oy = int(rng.integers(0, max(1, up.shape[0] - h - int(scale))) + scale // 2)
    ox = int(rng.integers(0, max(1, up.shape[1] - w - int(scale))) + scale // 2)
    out = up[oy:oy + h, ox:ox + w]
    out = out - out.mean()
    return out / (out.std() + 1e-6)


def _sample(fields: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Bilinear samples of (K, H, W) fields at float pixel coordinates (H axis rows, W axis cols)."""
    mx, my = cols.astype(np.float32), rows.astype(np.float32)
    return np.stack([cv2.remap(f, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE) for f in fields])


def _labels_at(zt: ZoneTruth, rows: np.ndarray, cols: np.ndarray,
               jitter: np.ndarray | None = None) -> np.ndarray:
    """Raw labels (uint8 1..19) of the zone at S2 coordinates where pixel (a, b) has centre (a, b)."""
    scores = _sample(zt.fields, rows, cols)
    if jitter is not None:
        scores += jitter
    labels = (scores.argmax(0) + 1).astype(np.uint8)
    if len(zt.blobs):
        r_lo, r_hi, c_lo, c_hi = rows.min(), rows.max(), cols.min(), cols.max()
        for k, br, bc, rad in zt.blobs:
            if br + rad < r_lo or br - rad > r_hi or bc + rad < c_lo or bc - rad > c_hi:
                continue
            labels[(rows - br) ** 2 + (cols - bc) ** 2 <= rad * rad] = int(k)
    return labels


def _curve(doy: np.ndarray, low: float, high: float, g0: float, g1: float, s0: float,
           s1: float) -> np.ndarray:
    """Trapezoid green fraction over the year: low, linear green-up g0->g1, high, senescence s0->s1."""
    if low == high:
        return np.full(doy.shape, low, np.float32)
    up = np.clip((doy - g0) / max(g1 - g0, 1), 0, 1)
    down = np.clip((s1 - doy) / max(s1 - s0, 1), 0, 1)
    return (low + (high - low) * np.minimum(up, down)).astype(np.float32)


def class_profiles(days: np.ndarray, shift: float = 0.0,
                   rng: np.random.Generator | None = None) -> np.ndarray:
    """(20, T, 10) clear-sky reflectance of each raw class on the given days of year (row 0 unused)."""
    out = np.zeros((20, len(days), len(S2_BANDS)), np.float32)
    doy = days.astype(np.float32) - shift
    for k, (bg, veg, curve) in _PHENO.items():
        green = _curve(doy, *curve)
        if rng is not None:  # a little zone-to-zone variability in the strength of each class
            green = np.clip(green * rng.uniform(0.9, 1.1), 0, 1)
        out[k] = (1 - green)[:, None] * SPECTRA[bg][None] + green[:, None] * SPECTRA[veg][None]
    return out


# ------------------------------------------------------------------------------------------------ plan
def _domain_names(n_train: int, n_test: int) -> list[tuple[str, str]]:
    """(split, domain) pairs: real-looking train codes, real test codes (then made-up ones if more asked)."""
    train = list(TRAIN_DOMAINS[:n_train])
    test = list(TEST_DOMAINS[:n_test])
    used = {d[:4] for d in TRAIN_DOMAINS + TEST_DOMAINS}
    extra = (f"D{n:03d}" for n in range(100, 1000) if f"D{n:03d}" not in used)
    while len(train) < n_train:
        train.append(f"{next(extra)}_{2018 + len(train) % 4}")
    while len(test) < n_test:
        test.append(f"{next(extra)}_{2020 + len(test) % 2}")
    return [("train", d) for d in train] + [("test", d) for d in test]


def _zone_names(rng: np.random.Generator, n: int) -> list[str]:
    """Z<n>_<2 letters> names, unique inside a domain (letters as in the real data: N, U, A)."""
    nums = sorted(rng.choice(np.arange(1, 30), size=n, replace=False).tolist())
    return [f"Z{k}_{''.join(rng.choice(list('NUA'), 2))}" for k in nums]


def _domain_style(rng: np.random.Generator, year: int) -> dict:
    """Per-domain radiometry (gain/offset per band), class frequencies, flight date and camera."""
    freq = rng.dirichlet(BASE_FREQ * 40)
    flight = dt.date(year, 1, 1) + dt.timedelta(days=int(rng.integers(95, 260)))
    return {
        "gain": rng.uniform(0.85, 1.15, 4).astype(np.float32),
        "offset": rng.uniform(-12, 12, 4).astype(np.float32),
        "elev_gain": float(rng.uniform(0.9, 1.1)),
        "log_freq": np.log(freq).astype(np.float32),
        "rare_rate": float(rng.uniform(0.5, 2.0)),
        "flight": flight,
        "camera": str(rng.choice(CAMERAS)),
        "x0": float(rng.uniform(150_000, 1_150_000)),
        "y0": float(rng.uniform(6_150_000, 7_050_000)),
        "z0": float(rng.uniform(5, 900)),
    }


def _zone_truth(split: str, domain: str, zone: str, style: dict, patches: int,
                rng: np.random.Generator, ids: list[str], edge_rate: float) -> ZoneTruth:
    """Draw the zone: super-area size, label fields, rare blobs, S2 dates, profiles and patch positions."""
    year = int(domain.split("_")[1])
    h, w = (int(v) for v in rng.integers(60, 91, 2))
    if h == w:
        w += 3
    # Grow the super-area until enough non-overlapping slots keep a full 40x40 window inside.
    half = WINDOW // 2
    def slots(n: int) -> list[int]:
        return list(range(half - int(PATCH_S2 / 2), n - half - int(PATCH_S2 / 2) + 1, SLOT))
    while len(slots(h)) * len(slots(w)) < patches:
        if len(slots(h)) <= len(slots(w)):
            h += SLOT
        else:
            w += SLOT
    grid = [(r, c) for r in slots(h) for c in slots(w)]
    chosen = sorted(rng.choice(len(grid), size=patches, replace=False).tolist())
    positions = [grid[i] for i in chosen]
    # Occasionally put a patch against the border so that window padding gets exercised downstream.
    for i in range(len(positions)):
        if rng.random() < edge_rate:
            positions[i] = (int(rng.integers(0, 4)), positions[i][1])

    # Class score fields on the S2 pixel grid: two scales of smooth noise + the domain's class frequencies.
    fields = np.stack([1.0 * smooth_noise(rng, (h, w), 3.0) + 0.8 * smooth_noise(rng, (h, w), 9.0)
                       for _ in range(NUM_MAIN)]) + style["log_freq"][:, None, None]
    fields = fields.astype(np.float32)
    n_blobs = int(rng.poisson(style["rare_rate"] * h * w / 400))
    blobs = np.zeros((n_blobs, 4), np.float32)
    if n_blobs:
        blobs[:, 0] = rng.integers(13, 20, n_blobs)
        blobs[:, 1] = rng.uniform(0, h - 1, n_blobs)
        blobs[:, 2] = rng.uniform(0, w - 1, n_blobs)
        blobs[:, 3] = rng.uniform(0.4, 1.6, n_blobs)

    t = int(rng.integers(8, 51))
    n_days = 366 if year % 4 == 0 else 365
    days = np.sort(rng.choice(np.arange(1, n_days + 1), size=t, replace=False))
    profiles = class_profiles(days, shift=float(rng.uniform(-12, 12)), rng=rng)

    zt = ZoneTruth(split, domain, zone, year, fields, blobs, np.zeros((h, w), np.uint8),
                   np.zeros((20, h, w), np.float32), days, profiles,
                   [(i, r, c) for i, (r, c) in zip(ids, positions)], style)
    rr, cc = np.mgrid[0:h, 0:w].astype(np.float32)
    zt.s2_labels = _labels_at(zt, rr, cc)
    # Area fractions from a 5x5 supersampling of every S2 pixel (mixed pixels at class boundaries).
    s = 5
    sub = (np.arange(s, dtype=np.float32) + 0.5) / s - 0.5
    rs = (np.arange(h, dtype=np.float32)[:, None] + sub[None]).reshape(-1)
    cs = (np.arange(w, dtype=np.float32)[:, None] + sub[None]).reshape(-1)
    fine = _labels_at(zt, *np.meshgrid(rs, cs, indexing="ij")).reshape(h, s, w, s)
    zt.fractions = np.stack([(fine == k).mean((1, 3)) for k in range(20)]).astype(np.float32)
    zt.style = dict(style, zone_x=style["x0"] + rng.uniform(-20_000, 20_000),
                    zone_y=style["y0"] + rng.uniform(-20_000, 20_000),
                    zone_z=style["z0"] + rng.uniform(-50, 50), tile=_tile(rng),
                    orbit=int(rng.integers(1, 144)))
    return zt


def _tile(rng: np.random.Generator) -> str:
    letters = "CDEFGHJKLMNPQRSTUVWXYZ"
    a, b = rng.choice(list(letters), 2)
    return f"T{rng.integers(30, 33)}{rng.choice(list('TU'))}{a}{b}"


def plan_dataset(train_domains: int = 3, test_domains: int = 2, zones: int = 2, patches: int = 4,
                 seed: int = 0, edge_rate: float = 0.05) -> list[ZoneTruth]:
    """The ground truth of the dataset `make_dataset` writes with the same arguments (no files written)."""
    pairs = _domain_names(train_domains, test_domains)
    n_total = len(pairs) * zones * patches
    id_rng = np.random.default_rng([seed, 7, 7])
    ids = [f"{i:06d}" for i in np.sort(id_rng.choice(1_000_000, size=n_total, replace=False))]
    out: list[ZoneTruth] = []
    k = 0
    for di, (split, domain) in enumerate(pairs):
        drng = np.random.default_rng([seed, di, 0])
        style = _domain_style(drng, int(domain.split("_")[1]))
        for zi, zone in enumerate(_zone_names(drng, zones)):
            zrng = np.random.default_rng([seed, di, zi + 1])
            out.append(_zone_truth(split, domain, zone, style, patches, zrng, ids[k:k + patches], edge_rate))
            k += patches
    return out


# ------------------------------------------------------------------------------------------ rendering
def _textures(rng: np.random.Generator, needed: set[int]) -> np.ndarray:
    """(7, 512, 512) unit-scale texture images indexed by texture id (see _TEX_NAMES); only the ids in
    `needed` are drawn (the others stay zero), which keeps a patch at a few tens of milliseconds."""
    n = PATCH
    out = np.zeros((len(_TEX_NAMES), n, n), np.float32)
    grain = cv2.GaussianBlur(rng.standard_normal((n, n), dtype=np.float32), (0, 0), 1.2)
    grain /= grain.std() + 1e-6
    if needed & {3, 4}:
        theta = rng.uniform(0, np.pi)
        ax = np.arange(n, dtype=np.float32)
        along = ax[None, :] * np.float32(np.cos(theta)) + ax[:, None] * np.float32(np.sin(theta))
        along += 3 * smooth_noise(rng, (n, n), 64)
    builders = {
        0: lambda: smooth_noise(rng, (n, n), 48),
        1: lambda: grain,
        2: lambda: 0.8 * np.tanh(1.5 * smooth_noise(rng, (n, n), 10)) + 0.4 * grain,
        3: lambda: np.sin(along * np.float32(2 * np.pi / 14)) + 0.3 * grain,
        4: lambda: np.sin(along * np.float32(2 * np.pi / 7)) + 0.3 * grain,
        5: lambda: 0.6 * smooth_noise(rng, (n, n), 96) + 0.4 * smooth_noise(rng, (n, n), 12) + 0.3 * grain,
        6: lambda: np.round(1.2 * smooth_noise(rng, (n, n), 40)) / 1.5 + 0.15 * grain,
    }
    for tid in sorted(needed):
        out[tid] = builders[tid]()
    return out


def render_patch(zt: ZoneTruth, r0: int, c0: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Aerial image (5, 512, 512) uint8 and raw label (512, 512) uint8 of the patch at S2 pixel (r0, c0)."""
    coords = r0 + (np.arange(PATCH, dtype=np.float32) + 0.5) / AERIAL_PER_S2 - 0.5
    ccoords = c0 + (np.arange(PATCH, dtype=np.float32) + 0.5) / AERIAL_PER_S2 - 0.5
    rows, cols = np.meshgrid(coords, ccoords, indexing="ij")
    jitter = 0.12 * smooth_noise(rng, (PATCH, PATCH), 6)  # ragged boundaries
    per_class = rng.uniform(0.5, 1.5, (NUM_MAIN, 1, 1)).astype(np.float32)
    labels = _labels_at(zt, rows, cols, jitter[None] * per_class)

    lab = labels.astype(np.intp)
    present = np.flatnonzero(np.bincount(lab.ravel(), minlength=20))
    tex = _textures(rng, set(TEXTURE[present].tolist()))
    t = np.take_along_axis(tex, TEXTURE[lab][None], 0)[0]  # texture value of each pixel's class
    style = zt.style
    noise = rng.standard_normal((5, PATCH, PATCH), dtype=np.float32)
    img = np.empty((5, PATCH, PATCH), np.float32)
    amp = AERIAL_AMP[lab] * t
    for b in range(4):
        # class look + texture + sensor noise, then the domain's radiometry
        band = AERIAL_MEAN[:, b][lab] + amp * _BAND_TEX[b] + 2.5 * noise[b]
        img[b] = band * style["gain"][b] + style["offset"][b]
    height = 1 / (1 + np.exp(-1.5 * t))  # 0..1, crown/roof shape from the same texture
    img[4] = (ELEV_BASE[lab] + ELEV_RANGE[lab] * height) * style["elev_gain"] + 0.8 * np.abs(noise[4])
    np.rint(img, out=img)
    return np.clip(img, 0, 255).astype(np.uint8), labels


def render_s2(zt: ZoneTruth, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """S2 super-area: data (T, 10, H, W) uint16 reflectance x 10000; masks (T, 2, H, W) uint8 snow, cloud."""
    h, w = zt.shape
    t = len(zt.days)
    refl = np.einsum("ktb,khw->tbhw", zt.profiles, zt.fractions, optimize=True)
    refl *= 1 + 0.04 * smooth_noise(rng, (h, w), 2)[None, None]  # static within-class texture
    refl += rng.normal(0, 0.006, refl.shape).astype(np.float32)
    masks = np.zeros((t, 2, h, w), np.uint8)
    months = np.array([(dt.date(zt.year, 1, 1) + dt.timedelta(days=int(d) - 1)).month for d in zt.days])
    full = set(rng.choice(t, size=max(1, t // 12), replace=False).tolist())
    for i in range(t):
        speckle = rng.integers(0, 12, (2, h, w))
        masks[i] = speckle
        winter = months[i] in (12, 1, 2)
        layers = []
        if winter and rng.random() < 0.35:
            layers.append((0, "snow", rng.uniform(0.1, 0.9)))
        if i in full:
            layers.append((1, "cloud", 1.0))
        elif rng.random() < 0.35:
            layers.append((1, "cloud", rng.uniform(0.05, 0.9)))
        for ch, spec, cover in layers:
            prob = _cover_prob(rng, (h, w), cover)
            masks[i, ch] = np.maximum(masks[i, ch], prob)
            alpha = (prob.astype(np.float32) / 100.0)[None]
            refl[i] = (1 - alpha) * refl[i] + alpha * SPECTRA[spec][:, None, None]
    data = np.clip(np.rint(refl * 10000), 0, 65535).astype(np.uint16)
    return data, masks


def _cover_prob(rng: np.random.Generator, shape: tuple[int, int], cover: float) -> np.ndarray:
    """Probability map 0..100 with about `cover` of the pixels >= 60 (cover 1.0 = fully covered)."""
    if cover >= 1.0:
        return rng.integers(85, 101, shape).astype(np.uint8)
    f = smooth_noise(rng, shape, 8)
    th = np.quantile(f, 1 - cover)
    return np.clip(60 + (f - th) * 120, 0, 100).astype(np.uint8)


def product_names(zt: ZoneTruth, rng: np.random.Generator) -> list[str]:
    """L2A product names in time order, e.g. S2A_MSIL2A_20210415T105021_N0300_R051_T31UDP_20210415T135921."""
    names = []
    for d in zt.days:
        day = dt.date(zt.year, 1, 1) + dt.timedelta(days=int(d) - 1)
        stamp = day.strftime("%Y%m%d")
        sat = rng.choice(["S2A", "S2B"])
        base = "N0400" if zt.year >= 2022 else rng.choice(["N0300", "N0301", "N0212"])
        acq = f"10{rng.integers(30, 60):02d}{rng.integers(0, 60):02d}"
        proc = f"1{rng.integers(1, 6)}{rng.integers(0, 60):02d}{rng.integers(0, 60):02d}"
        names.append(f"{sat}_MSIL2A_{stamp}T{acq}_{base}_R{zt.style['orbit']:03d}_{zt.style['tile']}_{stamp}T{proc}")
    return names


def geotiff_tags(x_ul: float, y_ul: float, res: float = 0.2) -> list[tuple]:
    """tifffile extratags for a north-up Lambert-93 (EPSG:2154) GeoTIFF with upper-left corner (x, y)."""
    geokeys = (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 2154)
    return [
        (33550, "d", 3, (res, res, 0.0), True),  # ModelPixelScaleTag
        (33922, "d", 6, (0.0, 0.0, 0.0, x_ul, y_ul, 0.0), True),  # ModelTiepointTag
        (34735, "H", len(geokeys), geokeys, True),  # GeoKeyDirectoryTag
    ]


# --------------------------------------------------------------------------------------------- writing
def _folders(layout: str, split: str) -> tuple[str, str, str]:
    """(aerial, labels, sen) top folder names for a split in the official or toy layout."""
    if layout == "toy":
        kinds = ("aerial", "labels", "sen")
        return tuple(f"flair_2_toy_dataset/flair_2_toy_{kind}_{split}" for kind in kinds)
    if split == "train":
        return "flair_aerial_train", "flair_labels_train", "flair_sen_train"
    return "flair_2_aerial_test", "flair_2_labels_test", "flair_2_sen_test"


def _write_json(path: Path, obj: dict) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1))


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_write(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, arr)


def _write_zone(zt: ZoneTruth, root: Path, layout: str, seed: int, interleave: str, test_labels: bool,
                first: int) -> tuple[dict, dict]:
    """Write one zone (S2 triple, images, labels); returns its centroid and metadata JSON entries.

    Every random draw comes from generators seeded by (seed, zone) or (seed, id), so the output does not
    depend on the order or the process in which zones are written. `first` = dataset-wide patch number.
    """
    aerial, labels, sen = (root / f / zt.domain / zt.zone for f in _folders(layout, zt.split))
    srng = np.random.default_rng([seed, 11, *map(ord, zt.domain + zt.zone)])
    data, masks = render_s2(zt, srng)
    (sen / "sen").mkdir(parents=True, exist_ok=True)
    stem = sen / "sen" / f"SEN2_sp_{zt.domain}-{zt.zone}"
    _save_npy(Path(f"{stem}_data.npy"), data)
    _save_npy(Path(f"{stem}_masks.npy"), masks)
    write_text(Path(f"{stem}_products.txt"), "\n".join(product_names(zt, srng)) + "\n")
    with_labels = zt.split == "train" or test_labels
    (aerial / "img").mkdir(parents=True, exist_ok=True)
    if with_labels:
        (labels / "msk").mkdir(parents=True, exist_ok=True)
    st = zt.style
    centroids: dict[str, list[int]] = {}
    metadata: dict[str, dict] = {}
    for n, (pid, r0, c0) in enumerate(zt.patches, start=first):
        prng = np.random.default_rng([seed, 13, int(pid)])
        img, lab = render_patch(zt, r0, c0, prng)
        x_ul, y_ul = st["zone_x"] + c0 * 10.0, st["zone_y"] - r0 * 10.0
        planar = interleave == "planar" or (interleave == "mixed" and n % 2 == 0)
        tags = geotiff_tags(x_ul, y_ul)
        write_tif(aerial / "img" / f"IMG_{pid}.tif", img, planar=planar, extratags=tags)
        if with_labels:
            write_tif(labels / "msk" / f"MSK_{pid}.tif", lab, extratags=tags)
        centroids[f"IMG_{pid}.tif"] = list(ZoneTruth.centroid(r0, c0))
        minutes = 10 * 60 + 30 + n % 90 + int(prng.integers(0, 5))
        metadata[f"IMG_{pid}"] = {
            "domain": zt.domain, "zone": zt.zone, "camera": st["camera"],
            "date": (st["flight"] + dt.timedelta(days=int(prng.integers(0, 3)))).isoformat(),
            "time": f"{minutes // 60:02d}h{minutes % 60:02d}",
            "patch_centroid_x": round(x_ul + PATCH * 0.1, 2),
            "patch_centroid_y": round(y_ul - PATCH * 0.1, 2),
            "patch_centroid_z": round(st["zone_z"] + float(prng.normal(0, 5)), 2),
        }
    return centroids, metadata


def make_dataset(out: str | os.PathLike, train_domains: int = 3, test_domains: int = 2, zones: int = 2,
                 patches: int = 4, seed: int = 0, layout: str = "official", interleave: str = "planar",
                 test_labels: bool = True, edge_rate: float = 0.05, workers: int = 1) -> Path:
    """Write a synthetic FLAIR #2 tree under `out` (created) and return `out` as a Path.

    interleave: "planar" (C,H,W pages), "contig" (pixel-interleaved) or "mixed" (alternating per patch),
    so that readers are tested on both storage orders. test_labels=False leaves the test labels out.
    edge_rate: chance that a patch sits against the super-area border (its 40x40 window needs padding).
    workers > 1 writes zones in parallel processes (same output, byte for byte).
    """
    if layout not in ("official", "toy"):
        raise ValueError(f"layout must be 'official' or 'toy', got {layout!r}")
    if interleave not in ("planar", "contig", "mixed"):
        raise ValueError(f"interleave must be 'planar', 'contig' or 'mixed', got {interleave!r}")
    if min(zones, patches) < 1 or min(train_domains, test_domains) < 0:
        raise ValueError("need zones >= 1, patches >= 1 and non-negative domain counts")
    root = Path(out)
    json_dir = root / "flair_2_toy_dataset" if layout == "toy" else root
    json_dir.mkdir(parents=True, exist_ok=True)
    plan = plan_dataset(train_domains, test_domains, zones, patches, seed, edge_rate)
    jobs = [(zt, root, layout, seed, interleave, test_labels, i * patches) for i, zt in enumerate(plan)]
    if workers > 1 and len(jobs) > 1:
        ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads (torch, cv2)
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as pool:
            results = list(pool.map(_write_zone, *zip(*jobs)))
    else:
        results = [_write_zone(*job) for job in jobs]
    centroids: dict[str, list[int]] = {}
    metadata: dict[str, dict] = {}
    for cen, meta in results:
        centroids.update(cen)
        metadata.update(meta)
    _write_json(json_dir / "flair-2_centroids_sp_to_patch.json", centroids)
    _write_json(json_dir / "flair-2_aerial_metadata.json", metadata)
    return root


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write a synthetic FLAIR #2 dataset in the real layout.")
    p.add_argument("--out", required=True, help="output root folder")
    p.add_argument("--train-domains", type=int, default=4)
    p.add_argument("--test-domains", type=int, default=2)
    p.add_argument("--zones", type=int, default=2, help="zones per domain")
    p.add_argument("--patches", type=int, default=4, help="patches per zone")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layout", choices=["official", "toy"], default="official")
    p.add_argument("--interleave", choices=["planar", "contig", "mixed"], default="planar",
                   help="storage order of the aerial images")
    p.add_argument("--no-test-labels", action="store_true", help="do not write the test labels")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="parallel processes (zones are written independently)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    # Through the importable module, so that worker processes unpickle src.synth functions, not __main__ ones.
    module = importlib.import_module("src.synth")
    root = module.make_dataset(args.out, args.train_domains, args.test_domains, args.zones, args.patches,
                               args.seed, args.layout, args.interleave, not args.no_test_labels,
                               workers=args.workers)
    n = (args.train_domains + args.test_domains) * args.zones * args.patches
    print(f"synthetic FLAIR #2 ({args.layout} layout): {n} patches, "
          f"{(args.train_domains + args.test_domains) * args.zones} zones -> {root} "
          f"({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
