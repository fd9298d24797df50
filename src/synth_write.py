"""Write a synthetic FLAIR #2 tree in the exact on-disk layout and formats of the real one
(docs/data-format.md, "Layout on disk", "Aerial images", "Labels and classes", "Sentinel-2 super-areas",
"Metadata").

Why: every later check (index, S2 cropping, training, fusion, submission) must run on a machine without
the real 100 GB. The truth comes from src.synth_scene, the pixels from src.synth_render; the tree written
here holds only what the real dataset holds. Zones are written independently (in parallel processes when
asked) from generators seeded by (seed, zone) or (seed, id), so the bytes never depend on the order.
"""
from __future__ import annotations

import datetime as dt
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from src.fileio import atomic_write, write_json, write_text
from src.geometry import AERIAL_GSD_M, PATCH_SIZE, S2_GSD_M
from src.rasters import write_tif
from src.synth_render import geotiff_tags, product_names, render_patch, render_s2
from src.synth_scene import ZoneTruth, plan_dataset

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
    write_json(json_dir / "flair-2_centroids_sp_to_patch.json", centroids)
    write_json(json_dir / "flair-2_aerial_metadata.json", metadata)
    return root
