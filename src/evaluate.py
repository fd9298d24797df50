"""Score predictions (a PRED folder or a submission zip) with the official FLAIR #2 mIoU (`make evaluate`).

    python -m src.evaluate --pred PRED_DIR_OR_ZIP --index DATA/index_test.csv [--labels DIR]
        [--json SCORES.json] [--png CONFUSION.png] [--domains PREFIX] [--workers N] [--backend thread|process]

Outputs: a per-class table and each domain's mIoU on stdout, optional JSON and a row-normalised
confusion-matrix PNG, and the per-domain report (PREFIX.csv: mIoU and the 13 IoUs of each domain;
PREFIX.png: the same as a figure), by default beside the JSON (`X_scores.json` -> `X_domains.csv/.png`):
the test set is 10 unseen domains and domain shift decides the ranking. The scoring lives in
`src.scoring` (docs/data-format.md, "Metric") and the report in `src.domain_report`; this is only the
command line.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from src.domain_report import domain_rows, format_lines, write_report
from src.errors import DataError
from src.metrics import format_table, ious_from_confusion, miou_from_confusion
from src.scoring import evaluate, save_confusion_png, save_json


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
    parser.add_argument("--backend", choices=["thread", "process"], default="thread",
                        help="threads (default; LZW decoding releases the GIL) or processes")
    args = parser.parse_args(argv)
    if not args.labels and not args.index:
        parser.error("give --labels DIR or --index CSV")
    start = time.perf_counter()
    try:
        result = evaluate(args.pred, args.index or args.labels, args.workers,
                          labels=args.labels if args.index else None, backend=args.backend)
    except (DataError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    matrix = np.asarray(result["confusion"], dtype=np.int64)
    print(format_table(ious_from_confusion(matrix), support=matrix.sum(axis=1)))
    print(f"{result['n_patches']} patches scored in {time.perf_counter() - start:.1f} s")
    if args.json:
        save_json(result, args.json)
        print(f"wrote {args.json}")
    if args.png:
        title = f"{Path(args.pred).name}: mIoU {miou_from_confusion(matrix):.4f}"
        save_confusion_png(matrix, args.png, title=title)
        print(f"wrote {args.png}")
    report_domains(result, args.domains or domains_prefix(args.json), Path(args.pred).name)


def domains_prefix(json_path: str | None) -> str | None:
    """`X_scores.json` or `X.json` -> `X_domains` (None without a JSON path)."""
    if not json_path:
        return None
    stem = str(json_path).removesuffix(".json").removesuffix("_scores")
    return f"{stem}_domains"


def report_domains(result: dict, prefix: str | None, title: str) -> None:
    """Each domain's mIoU on stdout; with a prefix, the CSV and figure of src.domain_report."""
    per = result.get("per_domain")
    if not per:
        print("per-domain report: domains unknown (no domain column in the index, no D<nnn>_<year> folders)")
        return
    confusion = np.asarray(per["confusion"], dtype=np.int64)
    if prefix is None:
        rows = domain_rows(confusion, per["domains"], per["n_patches"])
    else:
        rows = write_report(confusion, per["domains"], prefix, per["n_patches"], f"{title}:")
    print(f"per-domain mIoU ({len(per['domains'])} domains):")
    print("\n".join(format_lines(rows[:-1])))
    if prefix is not None:
        print(f"wrote {prefix}.csv, {prefix}.png")


if __name__ == "__main__":
    main()
