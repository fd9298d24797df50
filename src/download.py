"""Download, verify and extract the real FLAIR #2 data (`make download`), then index it.

Why: the full dataset is ~94 GB of zips from one OVH bucket; a download that dies at 40 GB must
continue, not restart, and a bad file must never end up looking complete. The pieces: the zip table
(src.prep.archives), resumable verified HTTP (src.prep.download), all-or-nothing extraction with markers
(src.prep.archives), the Hugging Face mirror (src.prep.archives, `--source hf`) and the index
(src.prep.index_scan).
A zip already extracted costs no network access; a re-run after a failure resumes where it stopped.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from src.core.errors import DownloadError, exit_interrupted
from src.prep.archives import (
    BASE_URL,
    SUBSETS,
    Mirror,
    download,
    download_hf,
)
from src.prep.download import Transfer, summary
from src.prep.index_scan import make_index


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
    p.add_argument("--retries", type=int, default=Transfer.retries)
    p.add_argument("--backoff", type=float, default=Transfer.backoff,
                   help="first retry delay in s, doubled each time")
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
            results = download(args.subset, out, mirror=Mirror(args.base_url, md5=_parse_md5(args.md5)),
                               transfer=Transfer(args.retries, args.backoff), keep_zips=bool(args.keep_zips),
                               check_space=not args.no_space_check)
    except KeyboardInterrupt:
        exit_interrupted("download", f"finished zips and the .part of the one in progress are kept in {out}",
                         "re-run the same command to resume")
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
