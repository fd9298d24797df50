"""The `make index` step: scan a data root, print its patch counts and problems, write
index_problems.txt and (unless a problem is fatal) index_train.csv / index_test.csv.

Shared by `python -m src.index` and `python -m src.download` (which indexes what it extracted), so both
say and write the same thing.
"""
from __future__ import annotations

import os
import sys
from collections import defaultdict
from pathlib import Path

import pandas as pd

from src.fileio import write_text
from src.geometry import S2_WINDOW
from src.index_checks import Problem
from src.index_scan import scan
from src.tables import write_index


def format_problems(problems: list[Problem], per_kind: int = 10) -> str:
    """Problems grouped by kind, fatal kinds first, at most `per_kind` lines each."""
    groups: dict[tuple[bool, str], list[Problem]] = defaultdict(list)
    for p in problems:
        groups[(not p.fatal, p.kind)].append(p)
    lines = []
    for (_, kind), items in sorted(groups.items()):
        label = "ERROR" if items[0].fatal else "warning"
        lines.append(f"{label} {kind} ({len(items)}):")
        lines.extend(f"  {p.path}: {p.message}" for p in items[:per_kind])
        if len(items) > per_kind:
            lines.append(f"  ... and {len(items) - per_kind} more")
    return "\n".join(lines)


def format_counts(counts: pd.DataFrame) -> str:
    """One line per split and per domain, with the patch count of each zone."""
    lines = []
    for split, sdf in counts.groupby("split", sort=False):
        lines.append(f"{split}: {sdf['domain'].nunique()} domains, {len(sdf)} zones, "
                     f"{int(sdf['patches'].sum())} patches ({int(sdf['labelled'].sum())} labelled)")
        for domain, ddf in sdf.groupby("domain"):
            zones = " ".join(f"{z}:{n}" for z, n in zip(ddf["zone"], ddf["patches"]))
            lines.append(f"  {domain}  {len(ddf)} zones  {int(ddf['patches'].sum())} patches "
                         f"({int(ddf['labelled'].sum())} labelled)  {zones}")
    return "\n".join(lines)


def make_index(root: str | os.PathLike, out: str | os.PathLike, check: bool = False,
               window: int = S2_WINDOW, workers: int | None = None, lenient: bool = False) -> int:
    """Index `root` into `out`; 0 on success, 1 when a fatal problem left the CSVs unwritten."""
    report = scan(root, check=check, window=window, workers=workers)
    out = Path(out)
    if report.counts is not None and len(report.counts):
        print(format_counts(report.counts))
    problems_file = out / "index_problems.txt"
    if report.problems:
        print(format_problems(report.problems))
        out.mkdir(parents=True, exist_ok=True)
        write_text(problems_file, "\n".join(str(p) for p in report.problems) + "\n")
        print(f"all {len(report.problems)} problem(s) listed in {problems_file}")
    elif problems_file.exists():
        problems_file.unlink()
    if report.fatal and not lenient:
        print(f"index FAILED: {report.summary()}; no CSV written (see above; --lenient writes anyway)",
              file=sys.stderr)
        return 1
    paths = write_index(report.frames, out)
    n_train, n_test = len(report.frames["train"]), len(report.frames["test"])
    warn = len(report.problems) - len(report.fatal)
    print(f"index: {n_train} train + {n_test} test patches -> {', '.join(map(str, paths))}"
          f" ({len(report.fatal)} fatal, {warn} warnings)")
    return 0
