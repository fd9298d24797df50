"""Score predictions (a PRED folder or a submission zip) with the official FLAIR #2 mIoU (`make evaluate`).

    python -m src.evaluate --pred PRED_DIR_OR_ZIP --index DATA/index_test.csv [--labels DIR]
        [--json SCORES.json] [--png CONFUSION.png] [--domains PREFIX] [--workers N] [--backend thread|process]

Outputs: a per-class table and each domain's mIoU on stdout, optional JSON and a row-normalised
confusion-matrix PNG, and the per-domain report (PREFIX.csv: mIoU and the 13 IoUs of each domain;
PREFIX.png: the same as a figure), by default beside the JSON (`X_scores.json` -> `X_domains.csv/.png`):
the test set is 10 unseen domains and domain shift decides the ranking. The scoring and the writing live
in `src.scoring.score` (docs/data-format.md, "Metric"; `score_and_write`, which `predict --submit` uses too)
and the report in `src.scoring.domains`; this is only the command line.
"""
from __future__ import annotations

import argparse
import sys

from src.core.errors import DataError, MachineLimitError, exit_interrupted
from src.scoring.score import BACKENDS, ScoreFiles, score_and_write


def main(argv: list[str] | None = None) -> None:
    """Official mIoU of a PRED folder or submission zip against labels (a folder or an index CSV)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--pred", required=True, help="folder of PRED_<id>.tif or a submission zip")
    parser.add_argument("--labels", help="folder searched recursively for MSK_<id>.tif")
    parser.add_argument("--index", help="index CSV (id, msk_path); with --labels it only sets the ids")
    parser.add_argument("--json", help="write {miou, ious, confusion, ...} here")
    parser.add_argument("--png", help="write the row-normalised confusion matrix picture here")
    parser.add_argument("--domains", help="write the per-domain report PREFIX.csv + PREFIX.png "
                        "(default: beside --json)")
    parser.add_argument("--workers", type=int, default=None, help="readers (default: CPUs, max 16)")
    parser.add_argument("--backend", choices=BACKENDS, default="thread",
                        help="threads (default; LZW decoding releases the GIL) or processes")
    args = parser.parse_args(argv)
    if not args.labels and not args.index:
        parser.error("give --labels DIR or --index CSV")
    try:
        score_and_write(args.pred, args.index or args.labels, ScoreFiles(args.json, args.png, args.domains),
                        workers=args.workers, labels=args.labels if args.index else None,
                        backend=args.backend)
    except KeyboardInterrupt:
        exit_interrupted("evaluate", "nothing written", "re-run the same command")
    except (DataError, FileNotFoundError, ValueError, MachineLimitError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
