"""The index of a FLAIR #2 tree: one walk joining its files into the index tables, and the `make index`
step that reports and writes them.

Walk a FLAIR #2 data root and join its files into the index tables (docs/data-format.md, "The index").

Files are found by one recursive walk (official, toy and Hugging Face mirror layouts at any depth); the
split comes from the top folder name ("train" / "test"), domain and zone from the DOMAIN/ZONE folders,
and each zone's Sentinel-2 triple is matched by folder, never by file name. The walk is where a broken
download shows up, so every problem found is listed with its file (`Problem`, src.prep.index_checks).

The `make index` step: scan a data root, print its patch counts and problems, write
index_problems.txt and (unless a problem is fatal) index_train.csv / index_test.csv.

Shared by `python -m src.index` and `python -m src.download` (which indexes what it extracted), so both
say and write the same thing."""
from __future__ import annotations

import json
import os
import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from src.core.errors import DataError, raise_machine_limit
from src.core.files import write_text
from src.core.flair import S2_WINDOW
from src.core.progress import count
from src.core.tables import COLUMNS, INDEX_FAILED, META_FLOATS, empty_index, write_index
from src.prep.index_checks import Problem, check_files

IMG_RE = re.compile(r"^IMG_(\d+)\.tiff?$", re.IGNORECASE)
MSK_RE = re.compile(r"^MSK_(\d+)\.tiff?$", re.IGNORECASE)
S2_RE = re.compile(r"^(.*)_(data|masks)\.npy$|^(.*)_(products)\.txt$")
DOMAIN_RE = re.compile(r"^D\d{3}_\d{4}$")
ZONE_RE = re.compile(r"^Z\d+_[A-Za-z]{2}$")
ID_IN_KEY = re.compile(r"(\d+)(?:\.tiff?)?$", re.IGNORECASE)


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


@dataclass
class _Tree:
    """The files of a root joined by patch id and by zone (what every per-patch decision needs)."""

    root: Path
    images: dict[str, list[Path]]
    labels: dict[str, list[Path]]
    triples: dict[tuple[str, str], dict]
    shapes: dict[tuple[str, str], tuple[int, ...]]
    centroids: dict[str, tuple[int, int]]
    metadata: dict[str, dict]


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


def _by_id(paths: list[Path], pattern: re.Pattern) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = defaultdict(list)
    for path in paths:
        out[pattern.match(path.name).group(1)].append(path)
    return out


def _duplicates(images: dict[str, list[Path]], labels: dict[str, list[Path]]) -> list[Problem]:
    problems = []
    for what, table in (("image", images), ("label", labels)):
        for pid, paths in table.items():
            if len(paths) > 1:
                listing = ", ".join(str(p) for p in sorted(paths))
                problems.append(Problem("duplicate-id", str(sorted(paths)[0]),
                                        f"{what} id {pid} found {len(paths)} times: {listing}", True))
    return problems


def _load_jsons(paths: list[Path], problems: list[Problem]) -> tuple[dict, dict]:
    """Centroids {id: (row, col)} and metadata {id: dict}, recognised by content (JSON names vary)."""
    centroids: dict[str, tuple[int, int]] = {}
    metadata: dict[str, dict] = {}
    for path in sorted(paths):
        try:
            with open(path) as f:
                obj = json.load(f)
        except (OSError, ValueError, MemoryError) as err:
            raise_machine_limit(err, path)
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
    """{(domain, zone): {"data", "masks", "products", "split"}} for complete triples, grouped by folder."""
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


def _s2_shapes(triples: dict[tuple[str, str], dict], problems: list[Problem]) -> dict:
    """Array shape of every S2 data file, from the .npy header only (memory-mapped, no data read)."""
    shapes: dict[tuple[str, str], tuple[int, ...]] = {}
    for key, triple in triples.items():
        try:
            shapes[key] = tuple(np.load(triple["data"], mmap_mode="r").shape)
        except Exception as err:
            raise_machine_limit(err, triple["data"])
            problems.append(Problem("unreadable", str(triple["data"]),
                                    f"unreadable .npy header ({type(err).__name__}: {err})", True))
    return shapes


def _join(root: Path, problems: list[Problem]) -> _Tree:
    """Walk `root` and join what it holds by id and zone, listing the tree-level problems."""
    found = _walk(root)
    if not found["img"]:
        problems.append(Problem("no-images", str(root), "no IMG_<id>.tif found at any depth", True))
    images, labels = _by_id(found["img"], IMG_RE), _by_id(found["msk"], MSK_RE)
    problems.extend(_duplicates(images, labels))
    triples = _s2_triples(found["s2"], root, problems)
    centroids, metadata = _load_jsons(found["json"], problems)
    if found["img"] and not centroids:
        problems.append(Problem("no-centroids", str(root),
                                "no centroids JSON (flair-2_centroids_sp_to_patch.json) found", True))
    if found["img"] and not metadata:
        problems.append(Problem("no-metadata", str(root),
                                "no aerial metadata JSON found: camera/date/time/x/y/z left empty", False))
    return _Tree(root, images, labels, triples, _s2_shapes(triples, problems), centroids, metadata)


def _label_of(tree: _Tree, pid: str, img: Path, place: _Place, any_test_labels: bool,
              problems: list[Problem]) -> list[Path]:
    """The label files of a patch (sorted), with the problems of a missing or misplaced one."""
    msk = sorted(tree.labels.get(pid, []))
    if not msk:
        if place.split == "train":
            problems.append(Problem("missing-label", str(img), f"no MSK_{pid}.tif anywhere under root", True))
        elif any_test_labels:
            problems.append(Problem("missing-label", str(img),
                                    f"no MSK_{pid}.tif (other test labels exist)", False))
    else:
        lplace, _ = _place(msk[0], tree.root)
        if (lplace.domain, lplace.zone) != (place.domain, place.zone):
            problems.append(Problem("label-elsewhere", str(msk[0]),
                                    f"label folder {lplace.domain}/{lplace.zone} differs from its "
                                    f"image's {place.domain}/{place.zone}", False))
    return msk


def _centroid_problems(tree: _Tree, pid: str, img: Path, key: tuple[str, str], window: int,
                       problems: list[Problem]) -> None:
    """A patch's centroid must exist and lie in its zone's super-area; a window leaving it is a warning."""
    if pid not in tree.centroids and tree.centroids:
        problems.append(Problem("missing-centroid", str(img),
                                f"IMG_{pid}.tif has no entry in the centroids JSON", True))
    elif key in tree.shapes and pid in tree.centroids:
        row, col = tree.centroids[pid]
        h, w = tree.shapes[key][-2:]
        if not (0 <= row < h and 0 <= col < w):
            problems.append(Problem("centroid-outside", str(img),
                                    f"centroid [{row}, {col}] outside the {h}x{w} super-area "
                                    f"{tree.triples[key]['data'].name}", True))
        elif min(row, col) < window // 2 or row + window // 2 > h or col + window // 2 > w:
            problems.append(Problem("window-outside", str(img),
                                    f"{window}x{window} S2 window at [{row}, {col}] leaves the {h}x{w} "
                                    f"super-area (will be padded)", False))


def _rows(tree: _Tree, window: int, problems: list[Problem]) -> tuple[list[dict], Counter, int]:
    """One index row per image (sorted by id), plus patches per zone without S2 and patches without
    metadata (reported once per zone / once in all by `_leftovers`)."""
    any_test_labels = any(_place(p[0], tree.root)[0].split == "test" for p in tree.labels.values())
    rows = []
    zones_without_s2: Counter = Counter()
    no_meta = 0
    for pid, paths in sorted(tree.images.items()):
        img = sorted(paths)[0]
        place, complaint = _place(img, tree.root)
        if complaint:
            problems.append(Problem("misplaced", str(img), complaint, not place.domain or not place.zone))
        msk = _label_of(tree, pid, img, place, any_test_labels, problems)
        key = (place.domain, place.zone)
        triple = tree.triples.get(key)
        if triple is None and place.domain and place.zone:
            zones_without_s2[key] += 1
        row, col = tree.centroids.get(pid, (-1, -1))
        _centroid_problems(tree, pid, img, key, window, problems)
        meta = tree.metadata.get(pid)
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
    return rows, zones_without_s2, no_meta


def _leftovers(tree: _Tree, rows: list[dict], zones_without_s2: Counter, no_meta: int) -> list[Problem]:
    """Problems of the whole tree once the rows are known: zones without S2, patches without metadata,
    labels without image, S2 zones without patches."""
    problems = []
    for (domain, zone), n in sorted(zones_without_s2.items()):
        problems.append(Problem("zone-without-s2", f"{domain}/{zone}",
                                f"{n} patch(es) but no SEN2_*_data/_masks/_products triple in a "
                                f"{domain}/{zone} folder", True))
    if no_meta and tree.metadata:
        problems.append(Problem("missing-metadata", str(tree.root), f"{no_meta} patch(es) absent from the "
                                "metadata JSON: their camera/date/time/x/y/z are empty", False))
    for pid in sorted(set(tree.labels) - set(tree.images)):
        problems.append(Problem("orphan-label", str(sorted(tree.labels[pid])[0]), "label without an image",
                                False))
    used = {(r["domain"], r["zone"]) for r in rows}
    for key, triple in sorted(tree.triples.items()):
        if key not in used:
            problems.append(Problem("s2-without-patches", str(triple["data"]), "S2 zone with no image",
                                    False))
    return problems


def scan(root: str | os.PathLike, check: bool = False, window: int = S2_WINDOW,
         workers: int | None = None) -> IndexReport:
    """Walk `root`, join images, labels, S2 triples, centroids and metadata; list every problem found.
    `check` also opens every file of the index (src.prep.index_checks), in `workers` processes."""
    root = Path(root).resolve()
    problems: list[Problem] = []
    if not root.is_dir():
        problems.append(Problem("no-root", str(root), "folder not found", True))
        return IndexReport({"train": empty_index(), "test": empty_index()}, problems)
    tree = _join(root, problems)
    rows, zones_without_s2, no_meta = _rows(tree, window, problems)
    problems.extend(_leftovers(tree, rows, zones_without_s2, no_meta))
    if rows and not tree.triples:  # no S2 anywhere: a legitimate aerial-only dataset, not a broken tree
        problems[:] = [p for p in problems if p.kind not in ("no-centroids", "zone-without-s2")]
        problems.append(Problem("aerial-only", str(root), "no Sentinel-2 anywhere in this tree (no SEN2_* "
                                "triple): an aerial-only index; models with use_s2=true cannot train on it",
                                False))
    if check:
        used = {(r["domain"], r["zone"]) for r in rows}
        problems.extend(check_files(rows, [t for k, t in tree.triples.items() if k in used], workers))
    df = pd.DataFrame(rows, columns=COLUMNS) if rows else empty_index()
    frames = {s: df[df["split"] == s].sort_values("id").reset_index(drop=True) for s in ("train", "test")}
    counts = (df.assign(labelled=df["msk_path"] != "").groupby(["split", "domain", "zone"])
              .agg(patches=("id", "size"), labelled=("labelled", "sum")).reset_index())
    return IndexReport(frames, problems, counts)


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def build_index(root: str | os.PathLike, check: bool = False, window: int = S2_WINDOW,
                strict: bool = True) -> dict[str, pd.DataFrame]:
    """{"train": df, "test": df} for a data root; raises DataError listing the fatal problems when strict."""
    report = scan(root, check=check, window=window)
    if strict and report.fatal:
        listing = "\n".join(str(p) for p in report.fatal[:20])
        raise DataError(f"{root}: {report.summary()}\n{listing}")
    return report.frames


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
        lines.append(f"{split}: {count(sdf['domain'].nunique(), 'domain')}, {count(len(sdf), 'zone')}, "
                     f"{count(int(sdf['patches'].sum()), 'patch', 'patches')} "
                     f"({int(sdf['labelled'].sum())} labelled)")
        for domain, ddf in sdf.groupby("domain"):
            zones = " ".join(f"{z}:{n}" for z, n in zip(ddf["zone"], ddf["patches"]))
            patches = count(int(ddf["patches"].sum()), "patch", "patches")
            labelled = int(ddf["labelled"].sum())
            lines.append(f"  {domain}  {count(len(ddf), 'zone')}  {patches} ({labelled} labelled)  {zones}")
    return "\n".join(lines)


def make_index(root: str | os.PathLike, out: str | os.PathLike, check: bool = False,
               window: int = S2_WINDOW, workers: int | None = None, lenient: bool = False) -> int:
    """Index `root` into `out`; 0 on success, 1 when a fatal problem left the CSVs unwritten."""
    report = scan(root, check=check, window=window, workers=workers)
    out = Path(out)
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
    failed = out / INDEX_FAILED
    if report.fatal and not lenient:
        out.mkdir(parents=True, exist_ok=True)
        write_text(failed, f"{report.summary()}; problems in {problems_file}\n")  # the old CSVs are refused
        print(f"index FAILED: {report.summary()}; no CSV written, and {failed} marks this folder's index as "
              "unusable until an index succeeds (see above; --lenient writes anyway)", file=sys.stderr)
        return 1
    paths = write_index(report.frames, out)
    failed.unlink(missing_ok=True)
    n_train, n_test = len(report.frames["train"]), len(report.frames["test"])
    warn = len(report.problems) - len(report.fatal)
    print(f"index: {n_train} train + {n_test} test patches -> {', '.join(map(str, paths))}"
          f" ({len(report.fatal)} fatal, {count(warn, 'warning')})")
    return 0
