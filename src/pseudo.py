"""Pseudo-label a split from saved ensemble probabilities: `python -m src.pseudo --probs PROBS_DIR
--index DATA/index_test.csv --out data/pseudo [--skipped PRED/skipped.txt] [--overwrite] [--workers N]`.

`make pseudo` runs `src.predict --save-probs` (an ensemble of RUNS or a RECIPE, with TTA) and then this
job, which turns each PROB_<id>.npz into PSEUDO_<id>.tif (class and confidence, src.data.pseudo_labels) and
writes pseudo.json (source, ids, class and confidence counts) and pseudo_report.csv (per class: pixels and
the share at or above common thresholds). Training reads the folder with `pseudo_dir=...`.

The files, their manifest and report: src.ensembling.pseudo; training on them: src.data.pseudo_labels.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from src.core.errors import (
    ConfigError,
    DataError,
    MachineLimitError,
    exit_interrupted,
    exit_on_machine_limit,
    one_line,
)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m src.pseudo", description=__doc__.split("\n")[0])
    ap.add_argument("--probs", required=True, help="folder of PROB_<id>.npz (predict --save-probs)")
    ap.add_argument("--index", required=True, help="index CSV of the pseudo-labelled split (index_test.csv)")
    ap.add_argument("--out", required=True, help="folder for PSEUDO_<id>.tif and pseudo.json")
    ap.add_argument("--skipped", help="predict's skipped.txt: unreadable ids (no PROB file) are left out")
    ap.add_argument("--overwrite", action="store_true", help="replace pseudo-labels of another source")
    ap.add_argument("--workers", type=int, default=None, help="threads (default: the cores, at most 8)")
    args = ap.parse_args(argv)
    try:
        from src.ensembling.pseudo import make_pseudo

        return make_pseudo(args.probs, args.index, args.out, skipped=args.skipped, overwrite=args.overwrite,
                           workers=args.workers)
    except KeyboardInterrupt:
        exit_interrupted("pseudo", f"the PSEUDO files written in {args.out} are kept",
                         "re-run the same command to write the missing ones")
    except (DataError, ConfigError) as err:
        print(f"pseudo: error: {one_line(err)}", file=sys.stderr)
        raise SystemExit(1) from None
    except (MachineLimitError, OSError, MemoryError) as err:
        exit_on_machine_limit("pseudo", err)


if __name__ == "__main__":
    main()
