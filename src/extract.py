"""Idempotent, all-or-nothing zip extraction with completion markers.

Members go to a hidden temp folder inside the target, and are moved into place only once every member
has been read (CRC checked); a marker `OUT/.extracted/<key>.done` is written last. A zip with a marker
and its files present is skipped without reading it (nor fetching it again); a corrupt zip (bad
archive, CRC error) is deleted so the next run downloads it again.
"""
from __future__ import annotations

import json
import os
import shutil
import zipfile
import zlib
from pathlib import Path

from src.disk_space import require_space
from src.download_log import Result
from src.errors import CorruptZipError
from src.fileio import write_json
from src.progress import progress as progress_bar

MARKERS = ".extracted"
TMP_PREFIX = ".tmp-extract-"


def marker_path(out: Path, key: str) -> Path:
    """Marker of a finished extraction; `key` is the zip name (or its repo path for HF)."""
    return out / MARKERS / (key.replace("/", "__") + ".done")


def write_marker(out: Path, key: str, info: dict, indent: int | None = 1) -> Path:
    """Mark `key` done under `out`/.extracted (atomically: a marker is either whole or absent)."""
    marker = marker_path(out, key)
    marker.parent.mkdir(parents=True, exist_ok=True)
    return write_json(marker, info, indent=indent)


def is_extracted(out: Path, key: str) -> bool:
    """True when the marker exists and every top-level entry it lists is still present."""
    marker = marker_path(out, key)
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    base = out / info.get("dest", ".")  # relative to out, so a moved data folder stays valid
    return all((base / e).exists() for e in info.get("entries", []))


def _merge_move(src: Path, dst: Path) -> None:
    """Move a tree into place, merging into existing folders (several zips may share a top folder)."""
    if src.is_dir() and dst.is_dir():
        for child in src.iterdir():
            _merge_move(child, dst / child.name)
        src.rmdir()
        return
    if dst.is_dir() and not dst.is_symlink():
        shutil.rmtree(dst)
    elif src.is_dir() and dst.exists():
        dst.unlink()
    os.replace(src, dst)


def extract(zip_path: Path, dest: Path, out: Path | None = None, key: str | None = None,
            progress: bool = True, check_space: bool = True) -> list[str]:
    """Extract `zip_path` into `dest` all-or-nothing, then write its marker under `out`/.extracted.

    Returns the top-level entries. Raises CorruptZipError naming the zip (nothing left in `dest`).
    """
    out = out or dest
    key = key or zip_path.name
    dest.mkdir(parents=True, exist_ok=True)
    # A temp *folder*, not fileio.atomic_write: a zip holds thousands of files, and a folder on the same
    # filesystem as `dest` lets every member be renamed into place once the whole archive has been read.
    tmp = dest / f"{TMP_PREFIX}{zip_path.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        with zipfile.ZipFile(zip_path) as zf:
            infos = zf.infolist()
            total = sum(i.file_size for i in infos)
            if check_space:
                require_space(dest, total, f"extracting {zip_path.name}")
            with progress_bar(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                              desc=f"unzip {zip_path.name}", disable=not progress) as bar:
                for info in infos:
                    zf.extract(info, tmp)
                    bar.update(info.file_size)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CorruptZipError(f"{zip_path.name}: corrupt or truncated zip ({err})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    entries = sorted(p.name for p in tmp.iterdir())
    for name in entries:
        _merge_move(tmp / name, dest / name)
    shutil.rmtree(tmp, ignore_errors=True)
    rel = os.path.relpath(dest.absolute(), out.absolute())
    write_marker(out, key, {"zip": key, "dest": rel, "entries": entries, "files": len(infos), "bytes": total})
    return entries


def extract_or_report(zip_path: Path, dest: Path, out: Path, key: str, res: Result, keep_zip: bool,
                      progress: bool, check_space: bool) -> None:
    """Extract one zip into `res`; the rule for a corrupt zip: report it by name and delete it."""
    try:
        res.entries = extract(zip_path, dest, out, key, progress=progress, check_space=check_space)
    except CorruptZipError as err:
        zip_path.unlink(missing_ok=True)
        res.status, res.extracted = "failed", "failed"
        res.message = f"{err}; deleted, re-run to download it again"
        print(f"error: {res.message}")
        return
    res.extracted = "yes"
    res.status = "ok"
    if not keep_zip:
        zip_path.unlink(missing_ok=True)


def extract_tree(src: Path, out: Path, keep_zips: bool = True, progress: bool = True,
                 check_space: bool = True) -> list[Result]:
    """Extract every zip found under `src` (any depth) next to itself, skipping finished ones.

    Used for the Hugging Face mirror, whose zips sit in nested folders; the marker key is the zip's
    path relative to `src`, so two `D004_2021.zip` in different folders do not collide.
    """
    src, out = Path(src), Path(out)
    results = []
    for zip_path in sorted(src.rglob("*.zip")):
        if MARKERS in zip_path.parts or any(p.startswith(TMP_PREFIX) for p in zip_path.parts):
            continue
        key = zip_path.relative_to(src).as_posix()
        res = Result(key, size=zip_path.stat().st_size)
        if is_extracted(out, key):
            res.status, res.extracted = "skipped", "already"
        else:
            extract_or_report(zip_path, zip_path.parent, out, key, res, keep_zips, progress, check_space)
        results.append(res)
    return results
