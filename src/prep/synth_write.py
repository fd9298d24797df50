"""The synthetic dataset's files: the pixels of each zone (aerial, labels, S2 super-area), written in the
exact on-disk layout of the real tree.

Pixels of a synthetic zone (src.prep.synth_scene): the aerial patches with their labels, the S2 super-area
with its snow/cloud masks and product names, and the GeoTIFF tags (docs/data-format.md, "Aerial images",
"Sentinel-2 super-areas").

Classes have their own aerial signature + texture (R, G, B, NIR, nDSM) under the domain's radiometric
shift; herbaceous vegetation (raw 10) and agricultural land (raw 11) are identical in the aerial bands and
differ only in the S2 time series (a model that uses S2 can win); under the "events" phenology plowed land
(raw 12) also takes bare soil's aerial look (`AERIAL_LOOK`). Clouds and snow appear on random dates with their
probability masks (some dates fully covered; under "events", every date of a zone's cloudy month).

Write a synthetic FLAIR #2 tree in the exact on-disk layout and formats of the real one
(docs/data-format.md, "Layout on disk", "Aerial images", "Labels and classes", "Sentinel-2 super-areas",
"Metadata").

Why: every later check (index, S2 cropping, training, fusion, submission) must run on a machine without
the real 100 GB. The truth comes from src.prep.synth_scene, the pixels from src.prep.synth_write; the tree
written here holds only what the real dataset holds. Zones are written independently (in parallel processes
when
asked) from generators seeded by (seed, zone) or (seed, id), so the bytes never depend on the order."""
from __future__ import annotations

import datetime as dt
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from src.core.files import atomic_write, write_json, write_text, write_tif
from src.core.flair import AERIAL_GSD_M, AERIAL_PER_S2, PATCH_SIZE, S2_GSD_M
from src.prep.synth_scene import (
    BARE,
    NUM_MAIN,
    PHENOLOGIES,
    PLOWED,
    SPECTRA,
    ZoneTruth,
    hidden_dates,
    labels_at,
    plan_dataset,
    smooth_noise,
)

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
# The class whose aerial look each raw class takes, per phenology. Under "events" plowed land looks like
# bare soil (its furrows would give it away): like herbaceous vegetation and agricultural land, the pair
# is drawn identically and only S2 tells it apart.
AERIAL_LOOK = {name: np.arange(20) for name in PHENOLOGIES}
AERIAL_LOOK["events"][PLOWED] = BARE
# Per-band texture weight (NIR varies more for vegetation, blue less).
_BAND_TEX = np.array([1.0, 1.0, 0.8, 1.3], np.float32)


def _textures(rng: np.random.Generator, needed: set[int]) -> np.ndarray:
    """(7, 512, 512) unit-scale texture images indexed by texture id (see _TEX_NAMES); only the ids in
    `needed` are drawn (the others stay zero), which keeps a patch at a few tens of milliseconds."""
    n = PATCH_SIZE
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
    coords = r0 + (np.arange(PATCH_SIZE, dtype=np.float32) + 0.5) / AERIAL_PER_S2 - 0.5
    ccoords = c0 + (np.arange(PATCH_SIZE, dtype=np.float32) + 0.5) / AERIAL_PER_S2 - 0.5
    rows, cols = np.meshgrid(coords, ccoords, indexing="ij")
    jitter = 0.12 * smooth_noise(rng, (PATCH_SIZE, PATCH_SIZE), 6)  # ragged boundaries
    per_class = rng.uniform(0.5, 1.5, (NUM_MAIN, 1, 1)).astype(np.float32)
    labels = labels_at(zt, rows, cols, jitter[None] * per_class)

    lab = AERIAL_LOOK[zt.style.get("phenology", "smooth")][labels]  # the look class of each pixel
    present = np.flatnonzero(np.bincount(lab.ravel(), minlength=20))
    tex = _textures(rng, set(TEXTURE[present].tolist()))
    t = np.take_along_axis(tex, TEXTURE[lab][None], 0)[0]  # texture value of each pixel's class
    style = zt.style
    noise = rng.standard_normal((5, PATCH_SIZE, PATCH_SIZE), dtype=np.float32)
    img = np.empty((5, PATCH_SIZE, PATCH_SIZE), np.float32)
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
    full = set(rng.choice(t, size=max(1, t // 12), replace=False).tolist()) | hidden_dates(zt)
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


def geotiff_tags(x_ul: float, y_ul: float, res: float = AERIAL_GSD_M) -> list[tuple]:
    """tifffile extratags for a north-up Lambert-93 (EPSG:2154) GeoTIFF with upper-left corner (x, y)."""
    geokeys = (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 2154)
    return [
        (33550, "d", 3, (res, res, 0.0), True),  # ModelPixelScaleTag
        (33922, "d", 6, (0.0, 0.0, 0.0, x_ul, y_ul, 0.0), True),  # ModelTiepointTag
        (34735, "H", len(geokeys), geokeys, True),  # GeoKeyDirectoryTag
    ]


HALF_PATCH_M = PATCH_SIZE * AERIAL_GSD_M / 2  # patch centre from its upper-left corner, in metres


def _folders(layout: str, split: str) -> tuple[str, str, str]:
    """(aerial, labels, sen) top folder names for a split in the official or toy layout."""
    if layout == "toy":
        kinds = ("aerial", "labels", "sen")
        return tuple(f"flair_2_toy_dataset/flair_2_toy_{kind}_{split}" for kind in kinds)
    if split == "train":
        return "flair_aerial_train", "flair_labels_train", "flair_sen_train"
    return "flair_2_aerial_test", "flair_2_labels_test", "flair_2_sen_test"


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
        x_ul, y_ul = st["zone_x"] + c0 * S2_GSD_M, st["zone_y"] - r0 * S2_GSD_M
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
            "patch_centroid_x": round(x_ul + HALF_PATCH_M, 2),
            "patch_centroid_y": round(y_ul - HALF_PATCH_M, 2),
            "patch_centroid_z": round(st["zone_z"] + float(prng.normal(0, 5)), 2),
        }
    return centroids, metadata


LAYOUTS = ("official", "toy")  # the real tree, or the toy zip's
INTERLEAVES = ("planar", "contig", "mixed")  # storage orders of the aerial images (mixed: alternating)


@dataclass(frozen=True)
class SynthSpec:
    """What a synthetic tree holds and how it is written: domains, zones per domain, patches per zone and the
    seed of it all; the official layout or the toy zip's; "planar" (C,H,W pages), "contig"
    (pixel-interleaved) or "mixed" (alternating per patch) aerial images, so readers are tested on both
    storage orders; the test labels or not; the chance that a patch sits against the super-area border
    (its 40x40 window needs padding); the S2 phenology, "smooth" (the default: the kit's figures before
    issue 28, byte for byte) or "events" (short dated events, a rare S2-only class, mowing, calendar
    shifts, cloudy months: src.prep.synth_scene.add_events)."""

    train_domains: int = 3
    test_domains: int = 2
    zones: int = 2
    patches: int = 4
    seed: int = 0
    layout: str = "official"
    interleave: str = "planar"
    test_labels: bool = True
    edge_rate: float = 0.05
    phenology: str = "smooth"


def make_dataset(out: str | os.PathLike, spec: SynthSpec = SynthSpec(), workers: int = 1) -> Path:
    """Write a synthetic FLAIR #2 tree under `out` (created) and return `out` as a Path; workers > 1 writes
    zones in parallel processes (same output, byte for byte)."""
    train_domains, test_domains, zones, patches, seed = (spec.train_domains, spec.test_domains, spec.zones,
                                                          spec.patches, spec.seed)
    layout, interleave = spec.layout, spec.interleave
    test_labels, edge_rate = spec.test_labels, spec.edge_rate
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'official' or 'toy', got {layout!r}")
    if interleave not in INTERLEAVES:
        raise ValueError(f"interleave must be 'planar', 'contig' or 'mixed', got {interleave!r}")
    if min(zones, patches) < 1 or min(train_domains, test_domains) < 0:
        raise ValueError("need zones >= 1, patches >= 1 and non-negative domain counts")
    plan = plan_dataset(train_domains, test_domains, zones, patches, seed, edge_rate, spec.phenology)
    root = Path(out)
    json_dir = root / "flair_2_toy_dataset" if layout == "toy" else root
    json_dir.mkdir(parents=True, exist_ok=True)
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
    write_json(json_dir / "flair-2_centroids_sp_to_patch.json", centroids)
    write_json(json_dir / "flair-2_aerial_metadata.json", metadata)
    return root
