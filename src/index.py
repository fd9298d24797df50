"""Index a FLAIR #2 data root into one CSV per split (data/index_train.csv, data/index_test.csv).

Why: every later step (folds, datasets, prediction, scoring) reads one flat table instead of walking
77k files; and the walk is the place where a broken download shows up, so problems are listed here with
file names. The walk and join: src.prep.index_scan; the --check file reads: src.prep.index_checks; what is
printed and written: src.prep.index_scan. Columns (one row per patch, sorted by id): src.core.tables.COLUMNS
(docs/data-format.md, "The index").
"""
from __future__ import annotations

import argparse
import sys

from src.core.errors import MachineLimitError, exit_interrupted
from src.core.flair import S2_WINDOW
from src.prep.index_scan import make_index


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Index a FLAIR #2 data root into index_{train,test}.csv.")
    p.add_argument("--root", required=True, help="data root (official, toy or Hugging Face layout)")
    p.add_argument("--out", required=True, help="folder for index_train.csv, index_test.csv")
    p.add_argument("--check", action="store_true", help="also read every file header and S2 shape")
    p.add_argument("--window", type=int, default=S2_WINDOW, help="S2 window size checked at each centroid")
    p.add_argument("--workers", type=int, default=None,
                   help="processes for --check (default: one per core, up to 16)")
    p.add_argument("--lenient", action="store_true", help="write the CSVs even with fatal problems")
    args = p.parse_args(argv)
    try:
        return make_index(args.root, args.out, check=args.check, window=args.window, workers=args.workers,
                          lenient=args.lenient)
    except KeyboardInterrupt:
        exit_interrupted("index", f"nothing written (an earlier index in {args.out} is unchanged)",
                         "re-run the same command")
    except MachineLimitError as err:
        print(f"index: error: {err} (nothing written; an earlier index in {args.out} is unchanged)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
