"""Download, verify and extract the real FLAIR #2 data (`make download`), then index it.

Why this module exists: the full dataset is ~94 GB of zips from one OVH bucket; a download that
dies at 40 GB must continue, not restart, and a bad file must never end up looking complete.

- HTTP with `Range` resume into `NAME.zip.part`; the file is renamed to `NAME.zip` only after its
  size (Content-Length) and md5 (where known) match, so a present `.zip` is always a verified one.
- The md5 is computed while streaming; on resume the bytes already on disk are hashed once first.
- Connection errors and HTTP 5xx are retried with exponential backoff (bounded).
- Extraction goes to a temp folder inside the target, then is moved into place; a marker
  `RAW/.extracted/<zip>.done` is written last. A zip with a marker and its files present is skipped
  without any network access. A corrupt zip (bad archive, CRC error) is deleted so the next run
  fetches it again.
- `--source hf`: the Hugging Face mirror `IGNF/FLAIR` (other layout, see `HF_PATTERNS`).

Sizes and md5 sums: spec section 1. Sizes are approximate (the challenge page's figures) and only
feed the free-disk-space check.
"""
from __future__ import annotations

import argparse
import fnmatch
import hashlib
import http.client
import json
import os
import shutil
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

BASE_URL = "https://storage.gra.cloud.ovh.net/v1/AUTH_366279ce616242ebb14161b7991a8461/defi-ia/flair_data_2/"
HF_REPO = "IGNF/FLAIR"
SUBSETS = ("toy", "aux", "train", "test", "all")
MARKERS = ".extracted"
CHUNK = 1 << 20
GB = 10**9
MB = 10**6


@dataclass(frozen=True)
class ZipSpec:
    """One downloadable zip: name on the server, approximate size, md5 (None = unknown), unpack factor.

    `factor` estimates extracted bytes / zip bytes for the disk check. The aerial and label TIFFs seem
    to be stored uncompressed (raw sizes: 61,712 x 1.31 MB = 81 GB vs a 50.7 GB zip; masks
    61,712 x 262 KB = 16 GB vs 485 MB), so labels inflate ~33x. S2 and JSON factors are guesses [?].
    The exact extracted size is read from the zip itself before extracting.
    """

    name: str
    size: int
    md5: str | None
    factor: float
    subsets: tuple[str, ...]


_TRAIN = ("train", "all")
_TEST = ("test", "all")
_AUX = ("aux", "train", "test", "all")

# The one table of the official zips (spec section 1; md5 sums from torchgeo PR #2394, none from IGN).
ZIPS: dict[str, ZipSpec] = {z.name: z for z in [
    ZipSpec("flair_aerial_train.zip", int(50.7 * GB), "0f575b360800f58add19c08f05e18429", 1.6, _TRAIN),
    ZipSpec("flair_sen_train.zip", int(22.8 * GB), "56fbbd465726ea4dfeea02734edd7cc5", 1.5, _TRAIN),
    ZipSpec("flair_labels_train.zip", 485 * MB, "80d3cd2ee117a61128faa08cbb842c0c", 34.0, _TRAIN),
    ZipSpec("flair_2_aerial_test.zip", int(13.4 * GB), "a647e0ba7e5345b28c48d7887ee79888", 1.6, _TEST),
    ZipSpec("flair_2_sen_test.zip", 6 * GB, "aae8649dbe457620a76269d915d07624", 1.5, _TEST),
    ZipSpec("flair_2_labels_test.zip", 108 * MB, "394a769ffcb4a783335eecd3f8baef57", 40.0, _TEST),
    ZipSpec("flair_2_aerial_metadata.zip", 16 * MB, None, 8.0, _AUX),
    ZipSpec("flair_2_centroids_sp_to_patch.zip", 16 * MB, "f8ba3b176197c254b6c165c97e93c759", 8.0, _AUX),
    ZipSpec("flair_2_toy_dataset.zip", int(1.6 * GB), "ffde17f275fc258dce19331b5e17e10a", 2.5, ("toy",)),
]}

# Hugging Face mirror layout [P]: one zip per domain under data/train-val/ and data/flair#2-test/,
# the JSONs under aux-data/. Inner depth of the domain zips is not documented [?]: everything is
# extracted next to its zip under RAW/hf/ and the index finds files by recursive glob.
HF_AUX = ["aux-data/*.json"]
HF_PATTERNS: dict[str, list[str]] = {
    "aux": HF_AUX,
    "train": ["data/train-val/*.zip", *HF_AUX],
    "test": ["data/flair#2-test/*.zip", *HF_AUX],
    "all": ["data/train-val/*.zip", "data/flair#2-test/*.zip", *HF_AUX],
}
HF_FACTOR = 1.6  # extracted / zipped for a domain zip (mostly aerial TIFFs) [?]


class DownloadError(RuntimeError):
    """A file could not be fetched or verified; the message names it and says what was done."""


class ChecksumError(DownloadError):
    """Size or md5 mismatch; the bad file has been deleted."""


class DiskSpaceError(DownloadError):
    """Not enough free disk space; the message says how much is missing."""


class CorruptZipError(DownloadError):
    """A zip that cannot be read or fails its CRC check."""


@dataclass
class Result:
    """What happened to one zip in this run (one row of the summary table)."""

    name: str
    status: str = "pending"    # ok | skipped | failed
    size: int = 0              # bytes of the zip (0 when unknown)
    fetched: int = 0           # bytes received in this run
    resumed_from: int = 0      # bytes already in the .part file when this run started
    seconds: float = 0.0
    md5: str = "-"             # ok | unknown | mismatch | -
    extracted: str = "-"       # yes | already | failed | -
    message: str = ""
    entries: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------- helpers

def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the filesystem that holds `path` (tests replace this to simulate a full disk)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def human(n: float) -> str:
    """Bytes in decimal units, as the challenge page states sizes (50.7 GB)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def require_space(folder: Path, need: int, what: str) -> None:
    """Raise DiskSpaceError naming the missing amount when `need` bytes do not fit in `folder`."""
    free = free_bytes(folder)
    if need > free:
        raise DiskSpaceError(
            f"not enough free disk space in {folder} for {what}: need about {human(need)}, "
            f"{human(free)} free, {human(need - free)} missing (free some space or choose another --out)")


def marker_path(out: Path, key: str) -> Path:
    """Marker of a finished extraction; `key` is the zip name (or its repo path for HF)."""
    return out / MARKERS / (key.replace("/", "__") + ".done")


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


def _hash_file(path: Path, h: Any) -> int:
    """Feed an existing partial file to the hash once (resume), return its size."""
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            n += len(chunk)
    return n


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """'bytes 100-199/1000' -> (100, 1000); 'bytes */1000' -> (None, 1000)."""
    if not value or not value.startswith("bytes "):
        return None, None
    span, _, total = value[6:].partition("/")
    start = None if span.strip() == "*" else int(span.split("-")[0])
    return start, (int(total) if total.strip().isdigit() else None)


def _url(base_url: str, name: str) -> str:
    return base_url.rstrip("/") + "/" + urllib.parse.quote(name)


_RETRYABLE = (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException, ssl.SSLError)


class _Truncated(ConnectionError):
    """The server closed the stream before Content-Length bytes arrived."""


# ---------------------------------------------------------------------------------------- fetch

def fetch(url: str, dest: Path, md5: str | None = None, *, retries: int = 5, backoff: float = 2.0,
          timeout: float = 60.0, progress: bool = True, result: Result | None = None) -> Result:
    """Download `url` to `dest` through `dest.part`, resuming, retrying and verifying.

    The md5 is updated chunk by chunk as bytes arrive (after hashing any existing `.part` once), so
    there is no second read of a 50 GB file. `dest` appears only once size and md5 are right; an
    md5 mismatch deletes the `.part` and raises ChecksumError. A `.part` is kept on network failure.
    """
    res = result or Result(dest.name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    h = hashlib.md5()
    offset = _hash_file(part, h) if part.exists() else 0
    res.resumed_from = offset
    total: int | None = None
    failures = 0
    bar: tqdm | None = None
    t0 = time.monotonic()
    try:
        while True:
            got = 0
            try:
                headers = {"Range": f"bytes={offset}-"} if offset else {}
                req = urllib.request.Request(url, headers=headers)
                with urllib.request.urlopen(req, timeout=timeout) as resp:
                    if resp.status == 206:
                        start, total = _content_range(resp.headers.get("Content-Range"))
                        if start != offset:
                            raise DownloadError(f"{dest.name}: asked for bytes from {offset}, got {start}")
                    else:
                        if offset:
                            print(f"{dest.name}: server ignored the Range request, restarting from 0")
                            offset, h = 0, hashlib.md5()
                        length = resp.headers.get("Content-Length")
                        total = int(length) if length and length.isdigit() else None
                    if bar is None:
                        bar = tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                                   desc=dest.name, disable=not progress, dynamic_ncols=True)
                    else:
                        bar.reset(total=total)
                        bar.update(offset)
                    with open(part, "ab" if offset else "wb") as f:
                        # read1 returns what has arrived, so a dropped connection loses no received byte
                        while chunk := resp.read1(CHUNK):
                            f.write(chunk)
                            h.update(chunk)
                            offset += len(chunk)
                            got += len(chunk)
                            res.fetched += len(chunk)
                            bar.update(len(chunk))
                    if total is not None and offset < total:
                        raise _Truncated(f"stream ended at {offset} of {total} bytes")
                break
            except urllib.error.HTTPError as err:
                if err.code == 416:  # nothing left to send: the .part may already be complete
                    _, total = _content_range(err.headers.get("Content-Range"))
                    if total is not None and total == offset:
                        break
                    print(f"{dest.name}: partial file ({offset} bytes) does not fit the server's "
                          f"({total}); restarting from 0")
                    part.unlink(missing_ok=True)
                    offset, h = 0, hashlib.md5()
                    failures += 1
                elif err.code >= 500 or err.code in (408, 429):  # server-side or throttling: retry
                    failures += 1
                else:
                    raise DownloadError(f"{dest.name}: HTTP {err.code} {err.reason} from {url}") from None
                if failures > retries:
                    raise DownloadError(f"{dest.name}: giving up after {retries} retries (HTTP {err.code}); "
                                        f"re-run to resume from {offset} bytes") from None
                last = f"HTTP {err.code}"
            except _RETRYABLE as err:
                failures = 1 if got else failures + 1
                if failures > retries:
                    raise DownloadError(f"{dest.name}: giving up after {retries} retries ({err}); the "
                                        f"{offset} bytes in {part.name} are kept, re-run to resume") from None
                last = f"{type(err).__name__}: {err}"
            wait = min(backoff * 2 ** (failures - 1), 60.0)
            print(f"{dest.name}: {last}; retry {failures}/{retries} from byte {offset} in {wait:.0f} s")
            time.sleep(wait)
    finally:
        if bar is not None:
            bar.close()
        res.seconds += time.monotonic() - t0
    if total is not None and offset != total:
        part.unlink(missing_ok=True)
        raise ChecksumError(f"{dest.name}: got {offset} bytes, Content-Length says {total}; file deleted")
    res.size = offset
    if md5:
        digest = h.hexdigest()
        if digest != md5.lower():
            part.unlink(missing_ok=True)
            res.md5 = "mismatch"
            raise ChecksumError(f"{dest.name}: md5 mismatch (expected {md5.lower()}, got {digest}); "
                                f"the file was deleted, re-run to download it again")
        res.md5 = "ok"
    else:
        res.md5 = "unknown"
    os.replace(part, dest)
    return res


# ---------------------------------------------------------------------------------------- extract

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

    Members go to a hidden temp folder inside `dest` (same filesystem, so the final moves are
    renames); only after every member has been read (CRC checked) are they moved into place, and
    the marker comes last. Returns the top-level entries. Raises CorruptZipError naming the zip.
    """
    out = out or dest
    key = key or zip_path.name
    dest.mkdir(parents=True, exist_ok=True)
    tmp = dest / f".tmp-extract-{zip_path.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        with zipfile.ZipFile(zip_path) as zf:
            infos = zf.infolist()
            total = sum(i.file_size for i in infos)
            if check_space:
                require_space(dest, total, f"extracting {zip_path.name}")
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                      desc=f"unzip {zip_path.name}", disable=not progress, dynamic_ncols=True) as bar:
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
    marker = marker_path(out, key)
    marker.parent.mkdir(parents=True, exist_ok=True)
    tmp_marker = marker.with_name(marker.name + ".tmp")
    rel = os.path.relpath(dest.absolute(), out.absolute())
    tmp_marker.write_text(json.dumps({"zip": key, "dest": rel, "entries": entries,
                                      "files": len(infos), "bytes": total}, indent=1))
    os.replace(tmp_marker, marker)
    return entries


def _extract_or_report(zip_path: Path, dest: Path, out: Path, key: str, res: Result, keep_zip: bool,
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
        if MARKERS in zip_path.parts or any(p.startswith(".tmp-extract-") for p in zip_path.parts):
            continue
        key = zip_path.relative_to(src).as_posix()
        res = Result(key, size=zip_path.stat().st_size)
        if is_extracted(out, key):
            res.status, res.extracted = "skipped", "already"
        else:
            _extract_or_report(zip_path, zip_path.parent, out, key, res, keep_zips, progress, check_space)
        results.append(res)
    return results


# ---------------------------------------------------------------------------------------- plan + run

def select(subset: str, table: Mapping[str, ZipSpec] | None = None) -> list[ZipSpec]:
    """The zips of a subset, in table order."""
    if subset not in SUBSETS:
        raise ValueError(f"unknown subset {subset!r} (choose from {', '.join(SUBSETS)})")
    return [z for z in (table or ZIPS).values() if subset in z.subsets]


def space_needed(specs: Iterable[ZipSpec], out: Path, keep_zips: bool) -> tuple[int, int]:
    """(bytes still to download, bytes still to extract) for the unfinished zips.

    With keep_zips off each zip is deleted after its extraction, so the peak is all extractions plus
    the largest single download rather than all downloads.
    """
    downloads, extracts = [], []
    for z in specs:
        if is_extracted(out, z.name):
            continue
        zip_path = out / z.name
        part = zip_path.with_name(z.name + ".part")
        have = zip_path.stat().st_size if zip_path.exists() else part.stat().st_size if part.exists() else 0
        downloads.append(0 if zip_path.exists() else max(z.size - have, 0))
        extracts.append(int(z.size * z.factor))
    dl = sum(downloads) if keep_zips else max(downloads, default=0)
    return dl, sum(extracts)


def download(subset: str = "all", out: str | os.PathLike = "data/raw", *, base_url: str = BASE_URL,
             table: Mapping[str, ZipSpec] | None = None, md5: Mapping[str, str | None] | None = None,
             keep_zips: bool = True, retries: int = 5, backoff: float = 2.0, timeout: float = 60.0,
             check_space: bool = True, progress: bool = True) -> list[Result]:
    """Fetch, verify and extract every zip of `subset` into `out`; finished zips cost no network.

    `table` replaces the zip table and `md5` overrides md5 sums by zip name (None or "" = do not
    check), so tests can serve small synthetic zips. Raises DiskSpaceError before anything is
    fetched when the estimate does not fit; per-file failures are recorded in the results.
    """
    out = Path(out)
    specs = select(subset, table)
    md5 = dict(md5 or {})
    results = [Result(z.name, size=z.size) for z in specs]
    pending = []
    for z, r in zip(specs, results):
        if is_extracted(out, z.name):
            r.status, r.extracted = "skipped", "already"
        else:
            pending.append((z, r))
    if not pending:
        print(f"{subset}: every zip is already extracted in {out}; nothing to do")
        return results
    if check_space:
        dl, ex = space_needed([z for z, _ in pending], out, keep_zips)
        require_space(out, dl + ex, f"subset {subset!r} ({human(dl)} to download + {human(ex)} to extract)")
    out.mkdir(parents=True, exist_ok=True)
    for z, res in pending:
        zip_path = out / z.name
        if zip_path.exists():  # renamed from .part only after verification, so it is a good one
            res.size, res.md5 = zip_path.stat().st_size, "earlier"
        else:
            try:
                fetch(_url(base_url, z.name), zip_path, md5.get(z.name, z.md5), retries=retries,
                      backoff=backoff, timeout=timeout, progress=progress, result=res)
            except DiskSpaceError:
                raise
            except DownloadError as err:
                res.status, res.message = "failed", str(err)
                print(f"error: {err}")
                continue
        _extract_or_report(zip_path, out, out, z.name, res, keep_zips, progress, check_space)
    return results


def download_hf(subset: str = "all", out: str | os.PathLike = "data/raw", *, repo_id: str = HF_REPO,
                keep_zips: bool = True, check_space: bool = True, progress: bool = True) -> list[Result]:
    """Fetch the subset from the Hugging Face mirror into `out`/hf, then extract its zips in place.

    huggingface_hub resumes interrupted files itself. A subset marker makes a re-run offline; zips
    already extracted (and possibly deleted with keep_zips off) are not requested again.
    """
    out = Path(out)
    if subset == "toy":
        raise ValueError("the toy zip is not on the Hugging Face mirror: use --source ovh")
    select(subset)  # validates the name
    hf_dir = out / "hf"
    if is_extracted(out, f"hf-{subset}"):
        print(f"{subset}: already downloaded from {repo_id} into {hf_dir}; nothing to do")
        return []
    from huggingface_hub import HfApi, snapshot_download

    patterns = HF_PATTERNS[subset]
    try:
        info = HfApi().dataset_info(repo_id, files_metadata=True)
    except Exception as err:  # offline mode, network, auth: one clear line instead of a traceback
        raise DownloadError(f"Hugging Face {repo_id}: cannot list files "
                            f"({type(err).__name__}: {err})") from None
    wanted = [(s.rfilename, s.size or 0) for s in info.siblings or []
              if any(fnmatch.fnmatch(s.rfilename, p) for p in patterns)]
    todo = [(f, n) for f, n in wanted if not (is_extracted(out, f) or (hf_dir / f).is_file())]
    if not wanted:
        raise DownloadError(f"no file of {repo_id} matches {patterns}: the mirror's layout changed?")
    if todo:
        if check_space:
            dl = sum(n for _, n in todo)
            ex = int(sum(n for f, n in todo if f.endswith(".zip")) * HF_FACTOR)
            require_space(out, dl + ex, f"subset {subset!r} from {repo_id} ({human(dl)} to download "
                                        f"+ {human(ex)} to extract)")
        print(f"{subset}: {len(todo)} files from {repo_id} into {hf_dir}")
        try:
            snapshot_download(repo_id, repo_type="dataset", allow_patterns=[f for f, _ in todo],
                              local_dir=hf_dir)
        except Exception as err:
            raise DownloadError(f"Hugging Face {repo_id}: download failed ({type(err).__name__}: {err}); "
                                "re-run to resume") from None
    results = extract_tree(hf_dir, out, keep_zips=keep_zips, progress=progress, check_space=check_space)
    if all(r.status != "failed" for r in results):
        marker = marker_path(out, f"hf-{subset}")
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"zip": f"hf-{subset}", "dest": "hf", "entries": []}))
    return results


def summary(results: list[Result]) -> str:
    """Plain-text table, one row per zip."""
    head = ("file", "status", "size", "fetched", "resumed", "time", "speed", "md5", "extract")
    rows = [head]
    for r in results:
        speed = human(r.fetched / r.seconds) + "/s" if r.fetched and r.seconds > 0 else "-"
        rows.append((r.name, r.status, human(r.size) if r.size else "-",
                     human(r.fetched) if r.fetched else "-", human(r.resumed_from) if r.resumed_from else "-",
                     f"{r.seconds:.1f} s" if r.seconds else "-", speed, r.md5, r.extracted))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += [r.message if r.message.startswith(r.name) else f"{r.name}: {r.message}"
              for r in results if r.message]
    return "\n".join(lines)


def run_index(root: Path, index_out: Path) -> int:
    """Index the extracted tree with src.index (the same code as `make index`)."""
    from src import index

    return index.main(["--root", str(root), "--out", str(index_out)]) or 0


def _parse_md5(items: list[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for item in items:
        name, sep, hexsum = item.partition("=")
        if not sep:
            raise ValueError(f"--md5 {item!r}: expected NAME=HEX (or NAME= to skip the check)")
        out[name] = hexsum.strip().lower() or None
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m src.download", description=__doc__.split("\n")[0])
    p.add_argument("--subset", choices=SUBSETS, default="all",
                   help="toy: 1.6 GB toy zip; aux: metadata + centroid JSONs; train/test: aerial, S2, "
                        "labels + aux; all: train + test")
    p.add_argument("--out", default="data/raw", help="target folder (default data/raw)")
    p.add_argument("--source", choices=("ovh", "hf"), default="ovh")
    p.add_argument("--keep-zips", type=int, choices=(0, 1), default=1,
                   help="0 deletes each zip once extracted")
    p.add_argument("--index-out", default="data", help="where index_{train,test}.csv go")
    p.add_argument("--base-url", default=BASE_URL, help="mirror of the OVH bucket (same file names)")
    p.add_argument("--md5", action="append", default=[], metavar="NAME=HEX",
                   help="override a zip's md5 (NAME= skips the check); repeatable")
    p.add_argument("--retries", type=int, default=5)
    p.add_argument("--backoff", type=float, default=2.0, help="first retry delay in s, doubled each time")
    p.add_argument("--no-space-check", action="store_true", help="skip the free-disk-space check")
    p.add_argument("--no-index", action="store_true", help="do not run the index afterwards")
    args = p.parse_args(argv)
    out, index_out = Path(args.out), Path(args.index_out)
    try:
        if args.source == "hf":
            results = download_hf(args.subset, out, keep_zips=bool(args.keep_zips),
                                  check_space=not args.no_space_check)
        else:
            results = download(args.subset, out, base_url=args.base_url, md5=_parse_md5(args.md5),
                               keep_zips=bool(args.keep_zips), retries=args.retries, backoff=args.backoff,
                               check_space=not args.no_space_check)
    except (DownloadError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if results:
        print(summary(results))
    failed = [r.name for r in results if r.status == "failed"]
    if failed:
        print(f"error: {len(failed)} file(s) failed: {', '.join(failed)}; re-run the same command to retry",
              file=sys.stderr)
        return 1
    changed = any(r.status == "ok" for r in results)
    have_index = (index_out / "index_train.csv").exists() or (index_out / "index_test.csv").exists()
    if args.no_index or args.subset == "aux" or (not changed and have_index):
        return 0
    print(f"indexing {out} -> {index_out}")
    return run_index(out, index_out)


if __name__ == "__main__":
    sys.exit(main())
