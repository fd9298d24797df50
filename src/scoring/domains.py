"""Per-domain scores: a table (one row per domain: patches, pixels, mIoU, the 13 IoUs), its CSV and a figure.

Why: the FLAIR #2 test set is 10 domains never seen in training, so the ranking is decided by domain shift;
one dataset-level mIoU hides the domain where a model collapses. Validation (each held-out domain of a
fold) and `make evaluate` (each test domain) write the same table from a (D, 13, 13) stack of confusion
matrices (rows = truth; docs/data-format.md, "Metric"). Each domain's mIoU is the official metric on that
domain alone; the last row, "all", is the dataset-level score (the sum of the matrices, not a mean of
domains), equal to the run's mIoU."""
from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from src.core.files import atomic_write, save_figure
from src.core.flair import CLASS_NAMES, NUM_SCORED
from src.scoring.metrics import IOU_COLS, ious_from_confusion, miou_from_confusion

ALL = "all"
COLUMNS = ["domain", "patches", "pixels", "miou", *IOU_COLS]


def domain_rows(per_domain: Any, domains: Sequence[str], patches: Sequence[int] | None = None
                ) -> list[dict[str, Any]]:
    """One row per domain (in the given order) + the "all" row; `patches` per domain when known."""
    stack = np.asarray(per_domain, dtype=np.int64).reshape(-1, len(CLASS_NAMES), len(CLASS_NAMES))
    if len(stack) != len(domains):
        raise ValueError(f"{len(stack)} confusion matrices for {len(domains)} domains")
    counts = list(patches) if patches is not None else [math.nan] * len(domains)

    def row(name: str, matrix: np.ndarray, n: Any) -> dict[str, Any]:
        ious = ious_from_confusion(matrix).tolist()
        return {"domain": name, "patches": n, "pixels": int(matrix.sum()),
                "miou": miou_from_confusion(matrix), **dict(zip(IOU_COLS, ious))}

    total_n = sum(counts) if patches is not None else math.nan
    return [*(row(d, m, n) for d, m, n in zip(domains, stack, counts)), row(ALL, stack.sum(0), total_n)]


def _cell(v: Any) -> Any:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6f}"
    return v


def write_csv(rows: Sequence[dict[str, Any]], path: str | os.PathLike, lead: Sequence[str] = ()) -> Path:
    """The table as CSV (NaN: empty cell = class absent from that domain's truth and predictions);
    `lead` names extra first columns the rows carry (e.g. epoch)."""
    with atomic_write(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[*lead, *COLUMNS], extrasaction="ignore")
            writer.writeheader()
            for r in rows:
                writer.writerow({k: _cell(v) for k, v in r.items()})
    return Path(path)


def read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    """Rows of a CSV written by `write_csv` (cells as text); [] when the file does not exist."""
    if not Path(path).is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def plot(rows: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "") -> Path:
    """Heatmap of the per-class IoU (classes 0..11) of each domain next to its mIoU bar, "all" last;
    the worst domain is named in the title (the one that decides a model's rank under domain shift)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [str(r["domain"]) for r in rows]
    ious = np.array([[float(r[c]) for c in IOU_COLS[:NUM_SCORED]] for r in rows], dtype=np.float64)
    mious = np.array([float(r["miou"]) for r in rows], dtype=np.float64)
    fig, (ax, bar) = plt.subplots(1, 2, figsize=(12, 1.2 + 0.42 * len(rows)), sharey=True,
                                  gridspec_kw={"width_ratios": [4, 1]})
    cmap = plt.get_cmap("RdYlGn").with_extremes(bad="0.85")  # grey: class absent from the domain
    ax.imshow(np.ma.masked_invalid(ious), cmap=cmap, vmin=0, vmax=1, aspect="auto")
    for i, j in np.ndindex(ious.shape):
        ax.text(j, i, "-" if np.isnan(ious[i, j]) else f"{ious[i, j]:.2f}", ha="center", va="center",
                fontsize=7)
    ax.set_xticks(range(NUM_SCORED), CLASS_NAMES[:NUM_SCORED], rotation=45, ha="right", fontsize=8)
    labels = [n if r.get("patches") in ("", None) or (isinstance(r.get("patches"), float)
                                                      and math.isnan(r["patches"]))
              else f"{n} ({int(float(r['patches']))} patches)" for n, r in zip(names, rows)]
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    if len(rows) > 1:
        ax.axhline(len(rows) - 1.5, color="black", lw=1)
    bar.barh(range(len(rows)), np.nan_to_num(mious), color=["C0"] * (len(rows) - 1) + ["C3"])
    for i, v in enumerate(mious):
        bar.text(0.02 + (0 if np.isnan(v) else v), i, "nan" if np.isnan(v) else f"{v:.3f}", va="center",
                 fontsize=8)
    bar.set_xlim(0, 1.2)
    bar.set_xlabel("mIoU (classes 0..11)")
    per_domain = mious[:-1]
    if per_domain.size and not np.isnan(per_domain).all():
        worst = int(np.nanargmin(per_domain))
        title = f"{title} worst domain {names[worst]}: {per_domain[worst]:.3f}".strip()
    fig.suptitle(title or "IoU per domain", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)


def write_report(per_domain: Any, domains: Sequence[str], prefix: str | os.PathLike,
                 patches: Sequence[int] | None = None, title: str = "") -> list[dict[str, Any]]:
    """`<prefix>.csv` and `<prefix>.png` for one set of predictions (make evaluate); returns the rows."""
    rows = domain_rows(per_domain, domains, patches)
    write_csv(rows, f"{prefix}.csv")
    plot(rows, f"{prefix}.png", title)
    return rows


def write_run_domains(run_dir: str | os.PathLike, epoch: int, per_domain: Any, domains: Sequence[str],
                      domain_of: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """A training run's `domains.csv` (every validated epoch, `epoch` first; a replayed epoch after a
    resume replaces its rows) and `domains.png` (this epoch); `domain_of` (id -> domain index) gives the
    patch counts. Returns this epoch's rows."""
    run_dir = Path(run_dir)
    patches = None
    if domain_of is not None:
        codes = list(domain_of.values())
        patches = [codes.count(d) for d in range(len(domains))]
    rows = domain_rows(per_domain, domains, patches)
    path = run_dir / "domains.csv"
    kept = [r for r in read_csv(path) if str(r.get("epoch", "")).isdigit() and int(r["epoch"]) < epoch]
    write_csv([*kept, *({"epoch": epoch, **r} for r in rows)], path, lead=("epoch",))
    plot(rows, run_dir / "domains.png", f"{run_dir.parent.name}/{run_dir.name}, epoch {epoch}:")
    return rows


def format_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One log line per domain: mIoU, pixels and the weakest scored class present."""
    out = []
    for r in rows:
        ious = {CLASS_NAMES[k]: float(r[c]) for k, c in enumerate(IOU_COLS[:NUM_SCORED])
                if not math.isnan(float(r[c]))}
        weak = min(ious, key=ious.get) if ious else ""
        weakest = f", weakest class {weak} {ious[weak]:.3f}" if weak else ""
        out.append(f"    {r['domain']}: mIoU {float(r['miou']):.4f}{weakest}")
    return out
