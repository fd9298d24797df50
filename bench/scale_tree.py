"""Write a full-size FLAIR #2 tree (the real dataset's counts) cheaply, as the input of the scale benchmark.

What: the official layout (docs/data-format.md, "Layout on disk"; the challenge's own description)
with the real counts: 40 training domains and 10 test domains under their real names
(src.prep.synth_scene.TRAIN_DOMAINS / TEST_DOMAINS), 916 zones, 61,712 training and 16,050 test patches with
unique 6-digit ids, one Sentinel-2 triple per zone, the centroids JSON and the aerial metadata JSON.

Why: the index, folds, loader, prediction and submission steps must be timed on 77,762 patches, but
writing (or downloading) 100 GB of distinct pixels would take hours. Only the file *names* need to be
distinct, so every IMG/MSK is a hard link to one of a few dozen real-size files (512x512, 5-band / 1-band
uint8 GeoTIFF, LZW) written once by the synthetic generator (src.prep.synth_write.make_dataset), and every
zone's S2 triple is a hard link to one of a few real-size triples (data (T,10,H,W) uint16, masks (T,2,H,W)
uint8, products.txt with T lines; about 56 MB each) rendered with the generator's functions
(src.prep.synth_scene, render_s2, product_names) at the real size. A hard link costs a directory entry,
not bytes: the whole tree takes well under 1 GB.

Figures. Zones: 916 in all (spec); the spec gives no train/test split of zones, so zones follow the
patches: round(916 x 61,712 / 77,762) = 727 train zones and 189 test zones. Patches per zone: lognormal
around the real mean (77,762 / 916 = 85), clipped to 20..200, summing exactly to the counts; zones per
domain vary the same way (at least 1). S2: T around the real mean (51,244 acquisitions / 916 zones = 56,
drawn in 48..64), H and W around 207 (190..224, never square); each domain year (2018..2021) has its own
variants, so the product dates lie in the domain's year. Centroids sit on a 10-pixel grid (adjacent
patches are 10.24 S2 pixels apart) with the whole 40x40 window inside the super-area: inside, distinct
within a zone, no padding warning. Metadata: domain, zone, camera, date, time, patch_centroid_x/y/z as
the generator writes them (x/y from the centroid; the GeoTIFF tags of the linked files are the pool's).

    python bench/scale_tree.py --out DIR [--seed 0] [--scale 1.0] [--pool 48] [--s2-per-year 2]

--scale shrinks every count proportionally (at least one zone per domain and one patch per zone), so a
test can build a small tree. DIR is created; a DIR left by an earlier run of this script (it holds the
hidden marker .scale_tree.json) is deleted and rebuilt; any other non-empty DIR is refused. The distinct
files live in DIR/.pool/ (hidden: the index walk skips it), on the same file system as the links.
"""
from __future__ import annotations

import argparse
import datetime as dt
import math
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from src.core.files import atomic_write, write_json, write_text  # noqa: E402
from src.core.flair import AERIAL_GSD_M, PATCH_SIZE, S2_GSD_M, S2_WINDOW  # noqa: E402
from src.prep.synth_scene import (  # noqa: E402
    BASE_FREQ,
    CAMERAS,
    NUM_MAIN,
    PATCH_S2,
    TEST_DOMAINS,
    TRAIN_DOMAINS,
    ZoneTruth,
    class_profiles,
    labels_at,
    smooth_noise,
)
from src.prep.synth_write import INTERLEAVES, SynthSpec, make_dataset, product_names, render_s2  # noqa: E402

N_TRAIN, N_TEST, N_ZONES = 61_712, 16_050, 916  # the real counts (spec section 2)
TRAIN_ZONES = round(N_ZONES * N_TRAIN / (N_TRAIN + N_TEST))  # 727: zones in proportion to patches
PER_ZONE = (20, 200)  # patches per zone, clipped
GRID = 10  # S2 pixels between neighbouring centroids (a patch spans 10.24)
HALF = S2_WINDOW // 2
MARKER = ".scale_tree.json"
CENTROIDS_JSON = "flair-2_centroids_sp_to_patch.json"
METADATA_JSON = "flair-2_aerial_metadata.json"
FOLDERS = {"train": ("flair_aerial_train", "flair_labels_train", "flair_sen_train"),
           "test": ("flair_2_aerial_test", "flair_2_labels_test", "flair_2_sen_test")}


@dataclass(frozen=True)
class TreeSpec:
    """What the tree holds: count scale, seed, distinct IMG/MSK pairs, distinct S2 triples per domain year
    with their mean side (S2 pixels) and mean number of dates, and the aerial storage order."""

    scale: float = 1.0
    seed: int = 0
    pool: int = 48
    s2_per_year: int = 2
    s2_side: int = 207
    s2_dates: int = 56
    interleave: str = "planar"


@dataclass
class Zone:
    """One zone of the tree: where it goes, its patch ids, its S2 variant and its patches' centroids."""

    split: str
    domain: str
    name: str
    size: int
    variant: int = -1
    ids: list[str] = field(default_factory=list)
    cells: list[tuple[int, int]] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ plan
def bounded_counts(total: int, n: int, lo: int, hi: int, rng: np.random.Generator,
                   sigma: float = 0.6) -> np.ndarray:
    """n lognormal-spread integers in [lo, hi] that sum exactly to total."""
    if n < 1 or not n * lo <= total <= n * hi:
        raise ValueError(f"cannot split {total} into {n} counts in [{lo}, {hi}]")
    w = rng.lognormal(0.0, sigma, n)
    x = np.clip(np.floor(w / w.sum() * total), lo, hi).astype(np.int64)
    while (diff := total - int(x.sum())) != 0:
        room = np.flatnonzero(x < hi) if diff > 0 else np.flatnonzero(x > lo)
        pick = rng.choice(room, size=min(abs(diff), len(room)), replace=False)
        x[pick] += 1 if diff > 0 else -1
    return x


def split_counts(scale: float) -> dict[str, tuple[list[str], int, int]]:
    """{split: (domains, zones, patches)} at `scale` (>= 1 zone per domain, >= 1 patch per zone)."""
    if not 0 < scale <= 1:
        raise ValueError(f"--scale must be in (0, 1], got {scale}")
    out = {}
    for split, domains, zones, patches in (("train", TRAIN_DOMAINS, TRAIN_ZONES, N_TRAIN),
                                           ("test", TEST_DOMAINS, N_ZONES - TRAIN_ZONES, N_TEST)):
        n_zones = max(len(domains), round(zones * scale))
        out[split] = (list(domains), n_zones, max(n_zones, round(patches * scale)))
    return out


def variant_shapes(spec: TreeSpec) -> list[tuple[int, int, int, int]]:
    """(year, T, H, W) of every distinct S2 triple: `s2_per_year` per domain year, never square."""
    rng = np.random.default_rng([spec.seed, 3])
    years = sorted({int(d.split("_")[1]) for d in TRAIN_DOMAINS + TEST_DOMAINS})
    out = []
    for year in years:
        for _ in range(spec.s2_per_year):
            t = max(2, round(spec.s2_dates * rng.uniform(0.85, 1.15)))
            h, w = (max(S2_WINDOW, round(spec.s2_side * f)) for f in rng.uniform(0.92, 1.08, 2))
            out.append((year, t, h, w + (h == w)))
    return out


def grid_cells(h: int, w: int) -> list[tuple[int, int]]:
    """Centroid slots of an H x W super-area whose whole S2 window lies inside it."""
    rows, cols = range(HALF, h - HALF + 1, GRID), range(HALF, w - HALF + 1, GRID)
    return [(r, c) for r in rows for c in cols]


def compact_cells(cells: list[tuple[int, int]], n: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """n distinct cells forming a ragged blob around a random one (a zone's patches are neighbours)."""
    pts = np.array(cells, np.float64)
    centre = pts[rng.integers(len(pts))]
    dist = ((pts - centre) ** 2).sum(1) + rng.uniform(0, 4 * GRID**2, len(pts))  # ragged outline
    return sorted(cells[i] for i in np.argsort(dist, kind="stable")[:n].tolist())


def _zone_names(rng: np.random.Generator, n: int) -> list[str]:
    """Z<n>_<2 letters>, unique inside a domain (letters as in the real data: N, U, A)."""
    nums = sorted(rng.choice(np.arange(1, max(30, 2 * n) + 1), size=n, replace=False).tolist())
    return [f"Z{k}_{''.join(rng.choice(list('NUA'), 2))}" for k in nums]


def plan_zones(spec: TreeSpec, shapes: list[tuple[int, int, int, int]]) -> list[Zone]:
    """Every zone with its patch count, S2 variant, centroids and ids (sorted ids, in domain order)."""
    rng = np.random.default_rng([spec.seed, 1])
    capacity = min(len(grid_cells(h, w)) for _, _, h, w in shapes)
    zones: list[Zone] = []
    for split, (domains, n_zones, n_patches) in split_counts(spec.scale).items():
        lo = min(PER_ZONE[0], max(1, n_patches // (2 * n_zones)))
        hi = max(min(PER_ZONE[1], capacity), math.ceil(n_patches / n_zones))
        if hi > capacity:
            raise ValueError(f"S2 super-areas hold {capacity} patches, {split} needs {hi} per zone")
        per_domain = bounded_counts(n_zones, len(domains), 1, n_zones, rng, sigma=0.4)
        sizes = iter(bounded_counts(n_patches, n_zones, lo, hi, rng).tolist())
        for domain, k in zip(domains, per_domain):
            zones += [Zone(split, domain, name, next(sizes)) for name in _zone_names(rng, int(k))]
    zones.sort(key=lambda z: (z.domain, int(z.name[1:].split("_")[0])))
    ids = np.sort(rng.choice(1_000_000, size=sum(z.size for z in zones), replace=False))
    start = 0
    for z in zones:
        year = int(z.domain.split("_")[1])
        z.variant = int(rng.choice([i for i, s in enumerate(shapes) if s[0] == year]))
        z.cells = compact_cells(grid_cells(*shapes[z.variant][2:]), z.size, rng)
        z.ids = [f"{i:06d}" for i in ids[start:start + z.size]]
        start += z.size
    return zones


# ------------------------------------------------------------------------------------------ distinct files
def _s2_truth(rng: np.random.Generator, year: int, t: int, h: int, w: int) -> ZoneTruth:
    """A zone's truth at the real super-area size, drawn as src.prep.synth_scene draws a zone's (label
    fields at two scales + class frequencies, T dates in the year, class phenology), without patches."""
    freq = rng.dirichlet(BASE_FREQ * 40)
    fields = np.stack([smooth_noise(rng, (h, w), 3.0) + 0.8 * smooth_noise(rng, (h, w), 9.0)
                       for _ in range(NUM_MAIN)]) + np.log(freq)[:, None, None]
    n_days = 366 if year % 4 == 0 else 365
    days = np.sort(rng.choice(np.arange(1, n_days + 1), size=t, replace=False))
    profiles = class_profiles(days, shift=float(rng.uniform(-12, 12)), rng=rng)
    tile = f"T{rng.integers(30, 33)}{rng.choice(list('TU'))}{''.join(rng.choice(list('CDEFGHJKLMN'), 2))}"
    zt = ZoneTruth("train", "", "", year, fields.astype(np.float32), np.zeros((0, 4), np.float32),
                   np.zeros((h, w), np.uint8), np.zeros((20, h, w), np.float32), days, profiles,
                   style={"orbit": int(rng.integers(1, 144)), "tile": tile})
    rr, cc = np.mgrid[0:h, 0:w].astype(np.float32)
    zt.s2_labels = labels_at(zt, rr, cc)
    sub = (np.arange(3, dtype=np.float32) + 0.5) / 3 - 0.5  # 3x3 supersampling: mixed pixels at borders
    rs = (np.arange(h, dtype=np.float32)[:, None] + sub[None]).reshape(-1)
    cs = (np.arange(w, dtype=np.float32)[:, None] + sub[None]).reshape(-1)
    fine = labels_at(zt, *np.meshgrid(rs, cs, indexing="ij")).reshape(h, 3, w, 3)
    zt.fractions = np.stack([(fine == k).mean((1, 3)) for k in range(20)]).astype(np.float32)
    return zt


def write_s2_variant(pool: Path, k: int, shape: tuple[int, int, int, int], seed: int) -> dict[str, Path]:
    """Render and write S2 triple number k (year, T, H, W) under `pool`; returns its three paths."""
    year, t, h, w = shape
    rng = np.random.default_rng([seed, 5, k])
    zt = _s2_truth(rng, year, t, h, w)
    data, masks = render_s2(zt, rng)
    paths = {kind: pool / f"s2_{k:02d}_{kind}.npy" for kind in ("data", "masks")}
    for kind, arr in (("data", data), ("masks", masks)):
        with atomic_write(paths[kind]) as tmp, open(tmp, "wb") as f:
            np.save(f, arr)
    names = "\n".join(product_names(zt, rng)) + "\n"
    paths["products"] = write_text(pool / f"s2_{k:02d}_products.txt", names)
    return paths


def write_pool(pool: Path, spec: TreeSpec, workers: int) -> list[tuple[Path, Path]]:
    """`spec.pool` (IMG, MSK) pairs written once by the synthetic generator, moved into `pool`."""
    domains = min(8, spec.pool)
    synth = make_dataset(pool / "synth", SynthSpec(train_domains=domains, test_domains=0, zones=1,
                                                   patches=math.ceil(spec.pool / domains), seed=spec.seed,
                                                   interleave=spec.interleave), workers=workers)
    pairs = []
    for n, img in enumerate(sorted(synth.rglob("IMG_*.tif"))[:spec.pool]):
        (msk,) = synth.rglob(f"MSK_{img.stem[4:]}.tif")
        pair = (pool / f"img_{n:03d}.tif", pool / f"msk_{n:03d}.tif")
        os.replace(img, pair[0])
        os.replace(msk, pair[1])
        pairs.append(pair)
    shutil.rmtree(synth)
    return pairs


# ----------------------------------------------------------------------------------------------- writing
def link_zone(root: Path, zone: Zone, pairs: list[tuple[Path, Path]], first: int,
              s2: dict[str, Path]) -> None:
    """Hard-link a zone's images, labels and S2 triple into the official layout; the patches take the
    pool's pairs in turn from number `first` (so each pair gets the same number of links)."""
    aerial, labels, sen = (root / top / zone.domain / zone.name for top in FOLDERS[zone.split])
    for folder in (aerial / "img", labels / "msk", sen / "sen"):
        folder.mkdir(parents=True, exist_ok=True)
    for n, pid in enumerate(zone.ids, start=first):
        img, msk = pairs[n % len(pairs)]
        os.link(img, aerial / "img" / f"IMG_{pid}.tif")
        os.link(msk, labels / "msk" / f"MSK_{pid}.tif")
    stem = f"SEN2_sp_{zone.domain}-{zone.name}"
    for kind, ext in (("data", "npy"), ("masks", "npy"), ("products", "txt")):
        os.link(s2[kind], sen / "sen" / f"{stem}_{kind}.{ext}")


def metadata(zones: list[Zone], seed: int) -> dict[str, dict]:
    """The aerial metadata JSON's entries, as src.prep.synth_write writes them (x/y from the centroid)."""
    out: dict[str, dict] = {}
    half_m = PATCH_SIZE * AERIAL_GSD_M / 2
    offset = int(PATCH_S2 / 2)  # centroid - top-left S2 pixel, as ZoneTruth.centroid
    for domain in sorted({z.domain for z in zones}):
        drng = np.random.default_rng([seed, 2, *map(ord, domain)])
        year = int(domain.split("_")[1])
        flight = dt.date(year, 1, 1) + dt.timedelta(days=int(drng.integers(95, 260)))
        camera = str(drng.choice(CAMERAS))
        x0, y0 = drng.uniform(150_000, 1_150_000), drng.uniform(6_150_000, 7_050_000)
        z0 = drng.uniform(5, 900)
        for zone in (z for z in zones if z.domain == domain):
            zx, zy = x0 + drng.uniform(-20_000, 20_000), y0 + drng.uniform(-20_000, 20_000)
            zz = z0 + drng.uniform(-50, 50)
            for n, (pid, (row, col)) in enumerate(zip(zone.ids, zone.cells)):
                x_ul, y_ul = zx + (col - offset) * S2_GSD_M, zy - (row - offset) * S2_GSD_M
                minutes = 10 * 60 + 30 + n % 90 + int(drng.integers(0, 5))
                out[f"IMG_{pid}"] = {
                    "domain": domain, "zone": zone.name, "camera": camera,
                    "date": (flight + dt.timedelta(days=int(drng.integers(0, 3)))).isoformat(),
                    "time": f"{minutes // 60:02d}h{minutes % 60:02d}",
                    "patch_centroid_x": round(x_ul + half_m, 2), "patch_centroid_y": round(y_ul - half_m, 2),
                    "patch_centroid_z": round(zz + float(drng.normal(0, 5)), 2),
                }
    return out


def prepare_out(out: Path) -> None:
    """Create `out`; delete an earlier scale tree there first; refuse any other non-empty folder."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not (out / MARKER).is_file():
            raise SystemExit(f"{out}: exists, is not empty and holds no {MARKER} (not a scale tree): "
                             "refusing to touch it")
        shutil.rmtree(out)
    (out / ".pool").mkdir(parents=True, exist_ok=True)


def disk_usage(root: Path) -> dict[str, int]:
    """Directory entries, distinct inodes and the bytes they occupy (st_blocks, like du) under root."""
    seen: set[tuple[int, int]] = set()
    used = entries = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            st = os.lstat(os.path.join(dirpath, name))
            entries += 1
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                used += st.st_blocks * 512
    return {"entries": entries, "inodes": len(seen), "bytes": used}


def build_tree(out: str | os.PathLike, spec: TreeSpec = TreeSpec(), workers: int = 1) -> dict:
    """Write the tree under `out`; returns its figures (also written to out/.scale_tree.json)."""
    t0 = time.perf_counter()
    root = Path(out).resolve()
    prepare_out(root)
    write_json(root / MARKER, {"spec": asdict(spec), "complete": False})
    pool = root / ".pool"
    shapes = variant_shapes(spec)
    zones = plan_zones(spec, shapes)
    used = sorted({z.variant for z in zones})
    pairs = write_pool(pool, spec, workers)
    if workers > 1 and len(used) > 1:
        ctx = multiprocessing.get_context("spawn")  # as make_dataset: no fork of a threaded process
        with ProcessPoolExecutor(min(workers, len(used)), mp_context=ctx) as ex:
            triples = dict(zip(used, ex.map(write_s2_variant, *zip(*[(pool, k, shapes[k], spec.seed)
                                                                      for k in used]))))
    else:
        triples = {k: write_s2_variant(pool, k, shapes[k], spec.seed) for k in used}
    first = 0
    for zone in zones:
        link_zone(root, zone, pairs, first, triples[zone.variant])
        first += zone.size
    write_json(root / CENTROIDS_JSON, {f"IMG_{pid}.tif": list(cell) for z in zones
                                       for pid, cell in zip(z.ids, z.cells)})
    write_json(root / METADATA_JSON, metadata(zones, spec.seed))
    stats = _figures(zones, pairs, triples, shapes)
    stats.update(disk_usage(root), seconds=round(time.perf_counter() - t0, 1))
    write_json(root / MARKER, {"spec": asdict(spec), "complete": True, **stats})
    return stats


def _figures(zones: list[Zone], pairs: list, triples: dict, shapes: list) -> dict:
    """Counts per split and what lies behind the links."""
    per_split = {}
    for split in FOLDERS:
        zs = [z for z in zones if z.split == split]
        sizes = [z.size for z in zs]
        per_split[split] = {"domains": len({z.domain for z in zs}), "zones": len(zs), "patches": sum(sizes),
                            "per_zone_min": min(sizes), "per_zone_max": max(sizes)}
    return {"splits": per_split, "distinct_img_msk_pairs": len(pairs), "distinct_s2_triples": len(triples),
            "s2_shapes": [list(shapes[k]) for k in sorted(triples)]}


def _report(root: Path, stats: dict) -> str:
    lines = [f"scale tree: {root}"]
    for split, s in stats["splits"].items():
        lines.append(f"  {split}: {s['domains']} domains, {s['zones']} zones, {s['patches']} patches "
                     f"({s['per_zone_min']}..{s['per_zone_max']} per zone)")
    shapes = ", ".join("{}:T{}x{}x{}".format(*s) for s in stats["s2_shapes"])
    lines += [f"  behind the links: {stats['distinct_img_msk_pairs']} IMG/MSK pairs, "
              f"{stats['distinct_s2_triples']} S2 triples (year:T x H x W: {shapes})",
              f"  disk: {stats['bytes'] / 2**20:.0f} MiB used, {stats['inodes']} inodes, "
              f"{stats['entries']} directory entries",
              f"  time: {stats['seconds']} s"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Write a full-size FLAIR #2 tree (real counts) of hard links to a few real-size files.",
        epilog=f"An existing DIR holding {MARKER} (an earlier run) is deleted and rebuilt; any other "
               "non-empty DIR is refused.")
    p.add_argument("--out", required=True, help="tree root (DIR)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="shrink every count by this factor, in (0, 1]")
    p.add_argument("--pool", type=int, default=48, help="distinct IMG/MSK pairs behind the links")
    p.add_argument("--s2-per-year", type=int, default=2, help="distinct S2 triples per domain year")
    p.add_argument("--interleave", choices=INTERLEAVES, default="planar",
                   help="storage order of the pool's aerial images")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="processes")
    a = p.parse_args(argv)
    spec = TreeSpec(scale=a.scale, seed=a.seed, pool=a.pool, s2_per_year=a.s2_per_year,
                    interleave=a.interleave)
    try:
        stats = build_tree(a.out, spec, a.workers)
    except ValueError as err:
        print(f"scale_tree: {err}", file=sys.stderr)
        return 2
    print(_report(Path(a.out).resolve(), stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
