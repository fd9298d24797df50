"""K validation folds over the training *domains*, balanced in patch counts and class distributions.

    python -m src.folds --data DATA --k K --seed SEED --scheme stratified|hf [--workers N]

reads DATA/index_train.csv and writes DATA/folds.csv (id, domain, zone, fold), DATA/class_hist.csv (the
per-patch class pixel counts, a cache reused until a mask changes: src.prep.class_hist) and DATA/folds.png.
The search, the fixed Hugging Face split, the report and the figure: src.prep.folds (docs/data-format.md,
"Folds").
"""
from __future__ import annotations

import argparse
import sys
import warnings

from src.core.errors import DataError, MachineLimitError, exit_interrupted
from src.prep.folds import SCHEMES, make_folds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="data", help="folder holding index_train.csv (outputs go here)")
    parser.add_argument("--k", type=int, default=5, help="number of folds (stratified scheme)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--scheme", choices=SCHEMES, default="stratified",
                        help="stratified: balanced K folds; hf: the Hugging Face card's fixed 32/8 split")
    parser.add_argument("--workers", type=int, default=None, help="processes reading masks (default <= 8)")
    parser.add_argument("--restarts", type=int, default=64, help="seeded restarts of the fold search")
    parser.add_argument("--no-plot", action="store_true", help="skip folds.png")
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *_args, **_kw: print(f"warning: {message}", file=sys.stderr)
        try:
            make_folds(args.data, args.k, args.seed, args.scheme, args.workers, args.restarts,
                       not args.no_plot)
        except KeyboardInterrupt:
            exit_interrupted("folds", f"folds.csv in {args.data} is unchanged", "re-run the same command")
        except (DataError, ValueError, MachineLimitError) as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(1) from None


if __name__ == "__main__":
    sys.exit(main())
