"""Validate a prediction folder or zip against the test index, then zip it for Codalab (`make submit`).

    python -m src.submit --pred PRED_DIR_OR_ZIP [--index DATA/index_test.csv] --validate-only
    python -m src.submit --pred PRED_DIR --index DATA/index_test.csv --name NAME
        [--baseline-time S --your-time S] [--out submissions] [--deflate]

The format, the checks and the zip live in `src.scoring.submission` (docs/data-format.md, "Submission"); this
is only its command line.
"""
from __future__ import annotations

import argparse
import sys
import time
import zipfile

from src.core.errors import DataError, DiskFullError, SubmissionError, exit_interrupted
from src.scoring.submission import fmt_mb, make_zip, validate


def main(argv: list[str] | None = None) -> None:
    """Validate a prediction folder or zip against the test index, then (unless --validate-only) zip it."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--pred", required=True, help="folder of PRED_<id>.tif, or a submission zip")
    parser.add_argument("--index", help="index CSV (e.g. data/index_test.csv): the expected ids")
    parser.add_argument("--name", help="approach name; the zip is <name>[_<baseline>_<yours>].zip")
    parser.add_argument("--out", default="submissions", help="where zips go (default submissions/)")
    parser.add_argument("--baseline-time", type=float, help="baseline inference time, seconds")
    parser.add_argument("--your-time", type=float, help="your inference time, seconds")
    parser.add_argument("--validate-only", action="store_true", help="only check, write nothing")
    parser.add_argument("--deflate", action="store_true", help="deflate zip entries (default: stored)")
    parser.add_argument("--workers", type=int, default=None, help="reader threads (default: CPUs, max 16)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        if args.validate_only:
            summary = validate(args.pred, args.index, args.workers)
            print(f"valid: {summary['files']} predictions, {fmt_mb(summary['bytes'])} ({args.pred})")
        else:
            if not args.name:
                parser.error("--name is required unless --validate-only")
            out = make_zip(args.pred, args.name, args.out, args.baseline_time, args.your_time, args.index,
                           args.workers, zipfile.ZIP_DEFLATED if args.deflate else zipfile.ZIP_STORED)
            print(f"wrote {out} ({fmt_mb(out.stat().st_size)}), validated")
    except KeyboardInterrupt:
        exit_interrupted("submit", "no zip written", "re-run the same command")
    except (SubmissionError, DataError, DiskFullError, FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
