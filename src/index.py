"""Index a FLAIR #2 data root into one CSV per split (data/index_train.csv, data/index_test.csv).

Why: every later step (folds, datasets, prediction, scoring) reads one flat table instead of walking
77k files; and the walk is the place where a broken download shows up, so problems are listed here with
file names. Files are found by a recursive walk (official, toy and Hugging Face mirror layouts at any
depth); the split comes from the top folder name ("train" / "test"), domain and zone from the DOMAIN/ZONE
folders, and each zone's Sentinel-2 triple is matched by folder, never by file name.
Columns (one row per patch, sorted by id): see COLUMNS and notes/CONTRACTS.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import sys
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile

from src.rasters import DataError, atomic_write, write_text

COLUMNS = ["id", "split", "domain", "zone", "img_path", "msk_path", "s2_data", "s2_masks", "s2_products",
           "s2_row", "s2_col", "camera", "date", "time",
           "patch_centroid_x", "patch_centroid_y", "patch_centroid_z"]
STR_COLUMNS = ["id", "split", "domain", "zone", "img_path", "msk_path", "s2_data", "s2_masks", "s2_products",
               "camera", "date", "time"]
META_FLOATS = ["patch_centroid_x", "patch_centroid_y", "patch_centroid_z"]
PATCH_SIZE = 512

IMG_RE = re.compile(r"^IMG_(\d+)\.tiff?$", re.IGNORECASE)
MSK_RE = re.compile(r"^MSK_(\d+)\.tiff?$", re.IGNORECASE)
S2_RE = re.compile(r"^(.*)_(data|masks)\.npy$|^(.*)_(products)\.txt$")
DOMAIN_RE = re.compile(r"^D\d{3}_\d{4}$")
ZONE_RE = re.compile(r"^Z\d+_[A-Za-z]{2}$")
ID_IN_KEY = re.compile(r"(\d+)(?:\.tiff?)?$", re.IGNORECASE)


@dataclass
class Problem:
    """One thing wrong with the tree; `fatal` ones stop the index (the CSVs would be wrong or unusable)."""

    kind: str
    path: str
    message: str
    fatal: bool

    def __str__(self) -> str:
        return f"{'ERROR' if self.fatal else 'warning'} [{self.kind}] {self.path}: {self.message}"


@dataclass
class IndexReport:
    """What `scan` found: the per-split tables, every problem, and patch counts per zone."""

    frames: dict[str, pd.DataFrame]
    problems: list[Problem] = field(default_factory=list)
    counts: pd.DataFrame | None = None

    @property
    def fatal(self) -> list[Problem]:
        return [p for p in self.problems if p.fatal]

    def summary(self) -> str:
        """One line: fatal problems by kind (what a failing CLI prints last)."""
        kinds = Counter(p.kind for p in self.fatal)
        if not kinds:
            return "no fatal problem"
        detail = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
        return f"{len(self.fatal)} fatal problem(s): {detail}"


@dataclass
class _Place:
    split: str
    domain: str
    zone: str


def _place(path: Path, root: Path) -> tuple[_Place, str | None]:
    """Split/domain/zone of a file from its folders relative to root, plus a complaint when one is missing.

    Only parts *below* root count for the split (a root such as /tmp/test_x/ must not say "test"); the
    root's own name is the fallback, for a root that is itself e.g. flair_aerial_train/.
    """
    parts = path.relative_to(root).parts[:-1]
    split = ""
    for part in (*parts, root.name):
        low = part.lower()
        if "test" in low:
            split = "test"
            break
        if "train" in low:
            split = "train"
            break
    domain = next((p for p in reversed(parts) if DOMAIN_RE.match(p)), "")
    zone = next((p for p in reversed(parts) if ZONE_RE.match(p)), "")
    complaint = None
    if not domain or not zone:
        complaint = "not under <DOMAIN>/<ZONE> folders (e.g. D004_2021/Z1_NN)"
    elif not split:
        complaint = "no 'train' or 'test' in its top folder names: assumed train"
    return _Place(split or "train", domain, zone), complaint


def _walk(root: Path) -> dict[str, list[Path]]:
    """One recursive walk collecting images, labels, S2 files and JSONs (any depth, symlinks followed)."""
    found: dict[str, list[Path]] = defaultdict(list)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        base = Path(dirpath)
        for name in filenames:
            if name.startswith("."):
                continue  # temp files of atomic writes, OS litter
            if IMG_RE.match(name):
                found["img"].append(base / name)
            elif MSK_RE.match(name):
                found["msk"].append(base / name)
            elif S2_RE.match(name):
                found["s2"].append(base / name)
            elif name.lower().endswith(".json"):
                found["json"].append(base / name)
    return found


def _load_jsons(paths: list[Path], problems: list[Problem]) -> tuple[dict, dict]:
    """Centroids {id: (row, col)} and metadata {id: dict}, recognised by content (JSON names vary)."""
    centroids: dict[str, tuple[int, int]] = {}
    metadata: dict[str, dict] = {}
    for path in sorted(paths):
        try:
            with open(path) as f:
                obj = json.load(f)
        except (OSError, ValueError) as err:
            problems.append(Problem("unreadable", str(path), f"not valid JSON ({err})", True))
            continue
        if not isinstance(obj, dict) or not obj:
            continue
        first = next(iter(obj.values()))
        if isinstance(first, list) and len(first) == 2:
            target = "centroids"
        elif isinstance(first, dict) and ({"domain", "patch_centroid_x"} & set(first)):
            target = "metadata"
        else:
            continue  # some other JSON (e.g. scores): not ours
        for key, value in obj.items():
            m = ID_IN_KEY.search(str(key))
            if not m:
                problems.append(Problem("bad-json-key", str(path), f"key {key!r} has no patch id", False))
                continue
            pid = m.group(1)
            if target == "centroids":
                try:
                    centroids[pid] = (int(value[0]), int(value[1]))
                except (TypeError, ValueError, IndexError):
                    problems.append(Problem("bad-centroid", str(path), f"{key}: {value!r} is not [row, col]",
                                            True))
            else:
                metadata[pid] = value if isinstance(value, dict) else {}
    return centroids, metadata


def _s2_triples(files: list[Path], root: Path, problems: list[Problem]) -> dict[tuple[str, str], dict]:
    """{(domain, zone): {"data", "masks", "products", "dir"}} for complete triples, grouped by folder."""
    by_dir: dict[tuple[Path, str], dict[str, Path]] = defaultdict(dict)
    for path in files:
        m = S2_RE.match(path.name)
        stem, kind = (m.group(1), m.group(2)) if m.group(1) is not None else (m.group(3), m.group(4))
        by_dir[(path.parent, stem)][kind] = path
    triples: dict[tuple[str, str], dict] = {}
    for (folder, stem), parts in sorted(by_dir.items()):
        missing = [k for k in ("data", "masks", "products") if k not in parts]
        if missing:
            problems.append(Problem("incomplete-s2", str(folder / stem),
                                    f"S2 triple lacks {', '.join(f'_{k}' for k in missing)}", True))
            continue
        place, complaint = _place(parts["data"], root)
        if not place.domain or not place.zone:
            problems.append(Problem("misplaced", str(parts["data"]), complaint or "", True))
            continue
        key = (place.domain, place.zone)
        if key in triples:
            problems.append(Problem("duplicate-s2", str(parts["data"]),
                                    f"zone {key[0]}/{key[1]} already has {triples[key]['data']}", True))
            continue
        triples[key] = {**parts, "split": place.split}
    return triples


def _s2_shape(path: Path) -> tuple[int, ...]:
    """Array shape from the .npy header only (memory-mapped, no data read)."""
    return tuple(np.load(path, mmap_mode="r").shape)


def _check_tif(path: Path, kind: str) -> str | None:
    """Header check of an image (5 bands, 512x512, uint8; planar or interleaved) or label; None when fine."""
    try:
        size = path.stat().st_size
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            shape, dtype = tuple(series.shape), np.dtype(series.dtype)
            # Truncated downloads keep a valid header: the strips must also end inside the file.
            end = max((o + n for page in tif.pages for o, n in zip(page.dataoffsets, page.databytecounts)),
                      default=0)
    except Exception as err:  # tifffile raises many types for corrupt files
        return f"unreadable TIFF ({type(err).__name__}: {err})"
    if end > size:
        return f"unreadable TIFF (truncated: image data ends at byte {end}, file has {size})"
    if dtype != np.uint8:
        return f"dtype {dtype}, expected uint8"
    if kind == "img":
        ok = shape in ((5, PATCH_SIZE, PATCH_SIZE), (PATCH_SIZE, PATCH_SIZE, 5))
        return None if ok else f"shape {shape}, expected 5 bands of {PATCH_SIZE}x{PATCH_SIZE}"
    ok = shape in ((PATCH_SIZE, PATCH_SIZE), (1, PATCH_SIZE, PATCH_SIZE), (PATCH_SIZE, PATCH_SIZE, 1))
    return None if ok else f"shape {shape}, expected one band of {PATCH_SIZE}x{PATCH_SIZE}"


def _check_s2(triple: dict) -> list[tuple[str, str]]:
    """(path, message) for every inconsistency of one S2 triple: shapes, dtypes, dates vs products.txt."""
    out: list[tuple[str, str]] = []
    try:
        data = np.load(triple["data"], mmap_mode="r")
    except Exception as err:
        return [(str(triple["data"]), f"unreadable .npy ({type(err).__name__}: {err})")]
    try:
        masks = np.load(triple["masks"], mmap_mode="r")
    except Exception as err:
        return [(str(triple["masks"]), f"unreadable .npy ({type(err).__name__}: {err})")]
    if data.ndim != 4 or data.shape[1] != 10:
        out.append((str(triple["data"]), f"shape {data.shape}, expected (T, 10, H, W)"))
    elif data.dtype.kind not in "iu":
        out.append((str(triple["data"]), f"dtype {data.dtype}, expected integer reflectance"))
    if masks.ndim != 4 or masks.shape[1] != 2:
        out.append((str(triple["masks"]), f"shape {masks.shape}, expected (T, 2, H, W)"))
    elif data.ndim == 4 and (masks.shape[0] != data.shape[0] or masks.shape[2:] != data.shape[2:]):
        out.append((str(triple["masks"]), f"shape {masks.shape} does not match data {data.shape}"))
    try:
        lines = [ln.strip() for ln in Path(triple["products"]).read_text().splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as err:
        return [*out, (str(triple["products"]), f"unreadable ({err})")]
    if data.ndim == 4 and len(lines) != data.shape[0]:
        out.append((str(triple["products"]), f"{len(lines)} products but data has T={data.shape[0]} dates"))
    for line in lines:
        try:
            dt.datetime.strptime(line[11:19], "%Y%m%d")
        except ValueError:
            out.append((str(triple["products"]), f"no date at chars 11..18 of {line!r}"))
            break
    return out


def scan(root: str | os.PathLike, check: bool = False, window: int = 40,
         workers: int | None = None) -> IndexReport:
    """Walk `root`, join images, labels, S2 triples, centroids and metadata; list every problem found."""
    root = Path(root).resolve()
    problems: list[Problem] = []
    if not root.is_dir():
        problems.append(Problem("no-root", str(root), "folder not found", True))
        return IndexReport({"train": _empty(), "test": _empty()}, problems)
    found = _walk(root)
    if not found["img"]:
        problems.append(Problem("no-images", str(root), "no IMG_<id>.tif found at any depth", True))

    images: dict[str, list[Path]] = defaultdict(list)
    for path in found["img"]:
        images[IMG_RE.match(path.name).group(1)].append(path)
    labels: dict[str, list[Path]] = defaultdict(list)
    for path in found["msk"]:
        labels[MSK_RE.match(path.name).group(1)].append(path)
    for what, table in (("image", images), ("label", labels)):
        for pid, paths in table.items():
            if len(paths) > 1:
                listing = ", ".join(str(p) for p in sorted(paths))
                problems.append(Problem("duplicate-id", str(sorted(paths)[0]),
                                        f"{what} id {pid} found {len(paths)} times: {listing}", True))

    triples = _s2_triples(found["s2"], root, problems)
    centroids, metadata = _load_jsons(found["json"], problems)
    if found["img"] and not centroids:
        problems.append(Problem("no-centroids", str(root),
                                "no centroids JSON (flair-2_centroids_sp_to_patch.json) found", True))
    if found["img"] and not metadata:
        problems.append(Problem("no-metadata", str(root),
                                "no aerial metadata JSON found: camera/date/time/x/y/z left empty", False))

    shapes: dict[tuple[str, str], tuple[int, ...]] = {}
    for key, triple in triples.items():
        try:
            shapes[key] = _s2_shape(triple["data"])
        except Exception as err:
            problems.append(Problem("unreadable", str(triple["data"]),
                                    f"unreadable .npy header ({type(err).__name__}: {err})", True))

    any_test_labels = any(_place(p[0], root)[0].split == "test" for p in labels.values())
    rows = []
    zones_without_s2: dict[tuple[str, str], int] = Counter()
    no_meta = 0
    for pid, paths in sorted(images.items()):
        img = sorted(paths)[0]
        place, complaint = _place(img, root)
        if complaint:
            fatal = not place.domain or not place.zone
            problems.append(Problem("misplaced", str(img), complaint, fatal))
        msk = sorted(labels.get(pid, []))
        if not msk:
            if place.split == "train":
                problems.append(Problem("missing-label", str(img), f"no MSK_{pid}.tif anywhere under root",
                                        True))
            elif any_test_labels:
                problems.append(Problem("missing-label", str(img),
                                        f"no MSK_{pid}.tif (other test labels exist)", False))
        else:
            lplace, _ = _place(msk[0], root)
            if (lplace.domain, lplace.zone) != (place.domain, place.zone):
                problems.append(Problem("label-elsewhere", str(msk[0]),
                                        f"label folder {lplace.domain}/{lplace.zone} differs from its "
                                        f"image's {place.domain}/{place.zone}", False))
        key = (place.domain, place.zone)
        triple = triples.get(key)
        if triple is None and place.domain and place.zone:
            zones_without_s2[key] += 1
        row, col = centroids.get(pid, (-1, -1))
        if pid not in centroids and centroids:
            problems.append(Problem("missing-centroid", str(img),
                                    f"IMG_{pid}.tif has no entry in the centroids JSON", True))
        elif key in shapes and pid in centroids:
            h, w = shapes[key][-2:]
            if not (0 <= row < h and 0 <= col < w):
                problems.append(Problem("centroid-outside", str(img),
                                        f"centroid [{row}, {col}] outside the {h}x{w} super-area "
                                        f"{triple['data'].name}", True))
            elif min(row, col) < window // 2 or row + window // 2 > h or col + window // 2 > w:
                problems.append(Problem("window-outside", str(img),
                                        f"{window}x{window} S2 window at [{row}, {col}] leaves the {h}x{w} "
                                        f"super-area (will be padded)", False))
        meta = metadata.get(pid)
        if meta is None:
            no_meta += 1
            meta = {}
        elif meta.get("domain", place.domain) != place.domain or meta.get("zone", place.zone) != place.zone:
            problems.append(Problem("metadata-mismatch", str(img),
                                    f"metadata says {meta.get('domain')}/{meta.get('zone')}", False))
        rows.append({
            "id": pid, "split": place.split, "domain": place.domain, "zone": place.zone,
            "img_path": str(img), "msk_path": str(msk[0]) if msk else "",
            **{f"s2_{kind}": str(triple[kind]) if triple else "" for kind in ("data", "masks", "products")},
            "s2_row": row, "s2_col": col,
            "camera": str(meta.get("camera", "")), "date": str(meta.get("date", "")),
            "time": str(meta.get("time", "")),
            **{k: _float(meta.get(k)) for k in META_FLOATS},
        })
    for (domain, zone), n in sorted(zones_without_s2.items()):
        problems.append(Problem("zone-without-s2", f"{domain}/{zone}",
                                f"{n} patch(es) but no SEN2_*_data/_masks/_products triple in a "
                                f"{domain}/{zone} folder", True))
    if no_meta and metadata:
        problems.append(Problem("missing-metadata", str(root), f"{no_meta} patch(es) absent from the "
                                "metadata JSON: their camera/date/time/x/y/z are empty", False))
    orphans = sorted(set(labels) - set(images))
    for pid in orphans:
        problems.append(Problem("orphan-label", str(sorted(labels[pid])[0]), "label without an image", False))
    used = {(r["domain"], r["zone"]) for r in rows}
    for key, triple in sorted(triples.items()):
        if key not in used:
            problems.append(Problem("s2-without-patches", str(triple["data"]), "S2 zone with no image",
                                    False))

    if check:
        problems.extend(_check_files(rows, [t for k, t in triples.items() if k in used], workers))

    df = pd.DataFrame(rows, columns=COLUMNS) if rows else _empty()
    frames = {s: df[df["split"] == s].sort_values("id").reset_index(drop=True) for s in ("train", "test")}
    counts = (df.assign(labelled=df["msk_path"] != "").groupby(["split", "domain", "zone"])
              .agg(patches=("id", "size"), labelled=("labelled", "sum")).reset_index())
    return IndexReport(frames, problems, counts)


def _check_files(rows: list[dict], triples: list[dict], workers: int | None) -> list[Problem]:
    """--check: every image/label TIFF header and every S2 triple, read in parallel threads (I/O bound)."""
    jobs = [(Path(r["img_path"]), "img") for r in rows]
    jobs += [(Path(r["msk_path"]), "msk") for r in rows if r["msk_path"]]
    workers = workers or min(32, (os.cpu_count() or 2) * 4)
    problems: list[Problem] = []
    with ThreadPoolExecutor(workers) as pool:
        for (path, _kind), msg in zip(jobs, pool.map(lambda j: _check_tif(*j), jobs)):
            if msg:
                kind = "unreadable" if msg.startswith("unreadable") else "bad-file"
                problems.append(Problem(kind, str(path), msg, True))
        for found in pool.map(_check_s2, triples):
            for path, msg in found:
                kind = "unreadable" if msg.startswith("unreadable") else "bad-s2"
                problems.append(Problem(kind, path, msg, True))
    return problems


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _empty() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="int64" if c in ("s2_row", "s2_col") else
                                      "float64" if c in META_FLOATS else "object") for c in COLUMNS})


def build_index(root: str | os.PathLike, check: bool = False, window: int = 40,
                strict: bool = True) -> dict[str, pd.DataFrame]:
    """{"train": df, "test": df} for a data root; raises DataError listing the fatal problems when strict."""
    report = scan(root, check=check, window=window)
    if strict and report.fatal:
        listing = "\n".join(str(p) for p in report.fatal[:20])
        raise DataError(f"{root}: {report.summary()}\n{listing}")
    return report.frames


def load_index(path: str | os.PathLike) -> pd.DataFrame:
    """Read an index CSV: id stays a 6-digit string, empty paths and text fields are "" (never NaN)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: index not found (run `make index`)")
    df = pd.read_csv(path, dtype={c: str for c in STR_COLUMNS})
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{path}: not an index CSV, missing columns {missing}")
    for c in STR_COLUMNS:
        df[c] = df[c].fillna("")
    for c in ("s2_row", "s2_col"):
        df[c] = df[c].fillna(-1).astype("int64")
    return df


def write_index(frames: dict[str, pd.DataFrame], out: str | os.PathLike) -> list[Path]:
    """Write index_<split>.csv atomically for each split; returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for split, df in frames.items():
        path = out / f"index_{split}.csv"
        with atomic_write(path) as tmp:
            df.to_csv(tmp, index=False)
        written.append(path)
    return written


def format_problems(problems: list[Problem], per_kind: int = 10) -> str:
    """Problems grouped by kind, fatal kinds first, at most `per_kind` lines each."""
    groups: dict[tuple[bool, str], list[Problem]] = defaultdict(list)
    for p in problems:
        groups[(not p.fatal, p.kind)].append(p)
    lines = []
    for (_, kind), items in sorted(groups.items()):
        label = "ERROR" if items[0].fatal else "warning"
        lines.append(f"{label} {kind} ({len(items)}):")
        lines.extend(f"  {p.path}: {p.message}" for p in items[:per_kind])
        if len(items) > per_kind:
            lines.append(f"  ... and {len(items) - per_kind} more")
    return "\n".join(lines)


def format_counts(counts: pd.DataFrame) -> str:
    """One line per split and per domain, with the patch count of each zone."""
    lines = []
    for split, sdf in counts.groupby("split", sort=False):
        lines.append(f"{split}: {sdf['domain'].nunique()} domains, {len(sdf)} zones, "
                     f"{int(sdf['patches'].sum())} patches ({int(sdf['labelled'].sum())} labelled)")
        for domain, ddf in sdf.groupby("domain"):
            zones = " ".join(f"{z}:{n}" for z, n in zip(ddf["zone"], ddf["patches"]))
            lines.append(f"  {domain}  {len(ddf)} zones  {int(ddf['patches'].sum())} patches "
                         f"({int(ddf['labelled'].sum())} labelled)  {zones}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Index a FLAIR #2 data root into index_{train,test}.csv.")
    p.add_argument("--root", required=True, help="data root (official, toy or Hugging Face layout)")
    p.add_argument("--out", required=True, help="folder for index_train.csv, index_test.csv")
    p.add_argument("--check", action="store_true", help="also read every file header and S2 shape")
    p.add_argument("--window", type=int, default=40, help="S2 window size checked at each centroid")
    p.add_argument("--workers", type=int, default=None, help="threads for --check")
    p.add_argument("--lenient", action="store_true", help="write the CSVs even with fatal problems")
    args = p.parse_args(argv)

    report = scan(args.root, check=args.check, window=args.window, workers=args.workers)
    out = Path(args.out)
    if report.counts is not None and len(report.counts):
        print(format_counts(report.counts))
    problems_file = out / "index_problems.txt"
    if report.problems:
        print(format_problems(report.problems))
        out.mkdir(parents=True, exist_ok=True)
        write_text(problems_file, "\n".join(str(p) for p in report.problems) + "\n")
        print(f"all {len(report.problems)} problem(s) listed in {problems_file}")
    elif problems_file.exists():
        problems_file.unlink()
    if report.fatal and not args.lenient:
        print(f"index FAILED: {report.summary()}; no CSV written (see above; --lenient writes anyway)",
              file=sys.stderr)
        return 1
    paths = write_index(report.frames, out)
    n_train, n_test = len(report.frames["train"]), len(report.frames["test"])
    warn = len(report.problems) - len(report.fatal)
    print(f"index: {n_train} train + {n_test} test patches -> {', '.join(map(str, paths))}"
          f" ({len(report.fatal)} fatal, {warn} warnings)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
