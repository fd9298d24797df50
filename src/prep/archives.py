"""The official zips: extraction with completion markers, the zip table, the Hugging Face mirror, and the
whole download of a subset.

Idempotent, all-or-nothing zip extraction with completion markers.

Members go to a hidden temp folder inside the target, and are moved into place only once every member
has been read (CRC checked); a marker `OUT/.extracted/<key>.done` is written last. A zip with a marker
and its files present is skipped without reading it (nor fetching it again); a corrupt zip (bad
archive, CRC error) is deleted so the next run downloads it again.

The official FLAIR #2 zips on the OVH bucket: names, approximate sizes, md5 sums, and which subset
(`make download SUBSET=...`) needs each one (docs/data-format.md, "Layout on disk").

Sizes are approximate (the challenge page's figures) and only feed the free-disk-space check.

The Hugging Face mirror `IGNF/FLAIR` of FLAIR #2 (`make download SOURCE=hf`): its file patterns and
the download of a subset through huggingface_hub, which resumes interrupted files itself.

Layout [P]: one zip per domain under data/train-val/ and data/flair#2-test/, the JSONs under aux-data/.
The inner depth of the domain zips is not documented [?]: everything is extracted next to its zip under
RAW/hf/ and the index finds files by recursive walk."""
from __future__ import annotations

import fnmatch
import json
import os
import shutil
import urllib.parse
import zipfile
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from src.core.errors import CorruptZipError, DiskSpaceError, DownloadError
from src.core.files import write_json
from src.core.progress import progress as progress_bar
from src.prep.download import Result, Transfer, fetch, human, require_space

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


BASE_URL = "https://storage.gra.cloud.ovh.net/v1/AUTH_366279ce616242ebb14161b7991a8461/defi-ia/flair_data_2/"
SUBSETS = ("toy", "aux", "train", "test", "all")
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

# The one table of the official zips (docs/data-format.md, "Layout on disk"; md5 sums from torchgeo
# PR #2394, none from IGN).
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


def select(subset: str, table: Mapping[str, ZipSpec] | None = None) -> list[ZipSpec]:
    """The zips of a subset, in table order."""
    if subset not in SUBSETS:
        raise ValueError(f"unknown subset {subset!r} (choose from {', '.join(SUBSETS)})")
    return [z for z in (table or ZIPS).values() if subset in z.subsets]


def zip_url(base_url: str, name: str) -> str:
    """URL of a zip on the bucket (or on a mirror with the same file names)."""
    return base_url.rstrip("/") + "/" + urllib.parse.quote(name)


HF_REPO = "IGNF/FLAIR"
HF_AUX = ["aux-data/*.json"]
HF_PATTERNS: dict[str, list[str]] = {
    "aux": HF_AUX,
    "train": ["data/train-val/*.zip", *HF_AUX],
    "test": ["data/flair#2-test/*.zip", *HF_AUX],
    "all": ["data/train-val/*.zip", "data/flair#2-test/*.zip", *HF_AUX],
}
HF_FACTOR = 1.6  # extracted / zipped for a domain zip (mostly aerial TIFFs) [?]


def _wanted(repo_id: str, patterns: list[str]) -> list[tuple[str, int]]:
    """(repo path, size) of the mirror's files matching `patterns`; DownloadError when none can be listed."""
    from huggingface_hub import HfApi

    try:
        info = HfApi().dataset_info(repo_id, files_metadata=True)
    except Exception as err:  # offline mode, network, auth: one clear line instead of a traceback
        raise DownloadError(f"Hugging Face {repo_id}: cannot list files "
                            f"({type(err).__name__}: {err})") from None
    wanted = [(s.rfilename, s.size or 0) for s in info.siblings or []
              if any(fnmatch.fnmatch(s.rfilename, p) for p in patterns)]
    if not wanted:
        raise DownloadError(f"no file of {repo_id} matches {patterns}: the mirror's layout changed?")
    return wanted


def download_hf(subset: str = "all", out: str | os.PathLike = "data/raw", *, repo_id: str = HF_REPO,
                keep_zips: bool = True, check_space: bool = True, progress: bool = True) -> list[Result]:
    """Fetch the subset from the Hugging Face mirror into `out`/hf, then extract its zips in place.

    A subset marker makes a re-run offline; zips already extracted (and possibly deleted with
    keep_zips off) are not requested again.
    """
    out = Path(out)
    if subset == "toy":
        raise ValueError("the toy zip is not on the Hugging Face mirror: use --source ovh")
    select(subset)  # validates the name
    hf_dir = out / "hf"
    if is_extracted(out, f"hf-{subset}"):
        print(f"{subset}: already downloaded from {repo_id} into {hf_dir}; nothing to do")
        return []
    from huggingface_hub import snapshot_download

    wanted = _wanted(repo_id, HF_PATTERNS[subset])
    todo = [(f, n) for f, n in wanted if not (is_extracted(out, f) or (hf_dir / f).is_file())]
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
        write_marker(out, f"hf-{subset}", {"zip": f"hf-{subset}", "dest": "hf", "entries": []}, indent=None)
    return results


# ------------------------------------------------------------------------------------ the whole download
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


@dataclass(frozen=True)
class Mirror:
    """Where the zips come from: a base URL with the official file names, the zip table (None: the official
    one) and md5 overrides by zip name (None or "" = do not check), so tests serve small synthetic zips."""

    base_url: str = BASE_URL
    table: Mapping[str, ZipSpec] | None = None
    md5: Mapping[str, str | None] = field(default_factory=dict)


def download(subset: str, out: str | os.PathLike, *, mirror: Mirror = Mirror(),
             transfer: Transfer = Transfer(),
             keep_zips: bool = True, check_space: bool = True) -> list[Result]:
    """Fetch, verify and extract every zip of `subset` into `out`; finished zips cost no network.

    Raises DiskSpaceError before anything is fetched when the estimate does not fit; per-file failures
    are recorded in the results."""
    out = Path(out)
    specs = select(subset, mirror.table)
    md5 = dict(mirror.md5)
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
                fetch(zip_url(mirror.base_url, z.name), zip_path, md5.get(z.name, z.md5), transfer, res)
            except DiskSpaceError:
                raise
            except DownloadError as err:
                res.status, res.message = "failed", str(err)
                print(f"error: {err}")
                continue
        extract_or_report(zip_path, out, out, z.name, res, keep_zips, transfer.progress, check_space)
    return results
