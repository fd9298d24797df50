"""K validation folds over the training *domains*, balanced in patch counts and class distributions.

    python -m src.folds --data DATA --k K --seed SEED --scheme stratified|hf [--workers N]

reads DATA/index_train.csv and writes DATA/folds.csv (id, domain, zone, fold), DATA/class_hist.csv (the
per-patch class pixel counts, a cache reused until a mask changes: src.prep.class_hist) and DATA/folds.png.
The search and the fixed Hugging Face split: src.prep.folds; the report and the figure:
src.prep.folds (docs/data-format.md, "Folds").
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import pandas as pd

from src.core.errors import DataError
from src.core.tables import train_index, write_folds
from src.prep.class_hist import class_histograms, domain_table
from src.prep.folds import (
    assign_folds,
    check_k,
    fold_stats,
    folds_frame,
    groupkfold_folds,
    hf_folds,
    plot_folds,
    report,
    summarize,
)


def make_folds(data_dir: str | os.PathLike, k: int = 5, seed: int = 42, scheme: str = "stratified",
               workers: int | None = None, restarts: int = 64, plot: bool = True) -> pd.DataFrame:
    """The whole `make folds` step; returns the folds table that was written."""
    data_dir = Path(data_dir)
    index_df = train_index(data_dir)
    if scheme == "stratified":  # fail before reading any mask
        check_k(k, sorted(index_df["domain"].astype(str).unique()))
    hist = class_histograms(index_df, data_dir / "class_hist.csv", workers)
    table = domain_table(index_df, hist)
    if scheme == "stratified":
        assignment = assign_folds(table, k, seed, restarts=restarts)
    elif scheme == "hf":
        if k != 2:
            print(f"hf scheme: fixed split, K={k} ignored "
                  "(fold 0 = HF validation domains, fold 1 = the rest)")
        assignment = hf_folds(table.index)
    else:
        raise ValueError(f"unknown scheme {scheme!r} (stratified | hf)")
    folds = folds_frame(index_df, assignment)
    write_folds(folds, data_dir / "folds.csv")
    folds = folds.reset_index(drop=True)
    stats = fold_stats(table, assignment)
    print(f"scheme {scheme}: {len(table)} domains, {len(folds)} patches -> {len(stats)} folds"
          + (f" (K={k}, seed={seed})" if scheme == "stratified" else ""))
    print(report(stats, table))
    js, dev = summarize(stats)
    print(f"mean JS divergence {js:.5f} bits, largest patch-count deviation {100 * dev:.1f}%")
    if scheme == "stratified":
        ref_js, ref_dev = summarize(fold_stats(table, groupkfold_folds(table, k)))
        print(f"sklearn GroupKFold on domains: mean JS divergence {ref_js:.5f} bits, "
              f"largest patch-count deviation {100 * ref_dev:.1f}%")
    else:
        print("FOLD=0 trains on fold 1 (HF train domains) and validates on fold 0 (HF validation domains)")
    if plot:
        plot_folds(stats, table, data_dir / "folds.png", title=f"class distribution per fold ({scheme})")
    print(f"wrote {data_dir / 'folds.csv'}" + (f", {data_dir / 'folds.png'}" if plot else ""))
    return folds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="data", help="folder holding index_train.csv (outputs go here)")
    parser.add_argument("--k", type=int, default=5, help="number of folds (stratified scheme)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--scheme", choices=["stratified", "hf"], default="stratified",
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
        except (DataError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(1) from None


if __name__ == "__main__":
    sys.exit(main())
