"""Download, verify and extract the real FLAIR #2 data (`make download`), then index it.

Why: the full dataset is ~94 GB of zips from one OVH bucket; a download that dies at 40 GB must
continue, not restart, and a bad file must never end up looking complete. The pieces: the zip table
(src.prep.archives), resumable verified HTTP (src.prep.download), all-or-nothing extraction with markers
(src.prep.archives), the Hugging Face mirror (src.prep.archives, `--source hf`) and the index (src.prep.index_scan).
A zip already extracted costs no network access; a re-run after a failure resumes where it stopped.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

from src.core.errors import DiskSpaceError, DownloadError
from src.prep.archives import (
    BASE_URL,
    SUBSETS,
    ZipSpec,
    download_hf,
    extract_or_report,
    is_extracted,
    select,
    zip_url,
)
from src.prep.download import Result, fetch, human, require_space, summary
from src.prep.index_scan import make_index


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
                fetch(zip_url(base_url, z.name), zip_path, md5.get(z.name, z.md5), retries=retries,
                      backoff=backoff, timeout=timeout, progress=progress, result=res)
            except DiskSpaceError:
                raise
            except DownloadError as err:
                res.status, res.message = "failed", str(err)
                print(f"error: {err}")
                continue
        extract_or_report(zip_path, out, out, z.name, res, keep_zips, progress, check_space)
    return results


def _parse_md5(items: list[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for item in items:
        name, sep, hexsum = item.partition("=")
        if not sep:
            raise ValueError(f"--md5 {item!r}: expected NAME=HEX (or NAME= to skip the check)")
        out[name] = hexsum.strip().lower() or None
    return out


def _parser() -> argparse.ArgumentParser:
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
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
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
    return make_index(out, index_out)  # the same step as `make index`


if __name__ == "__main__":
    sys.exit(main())
