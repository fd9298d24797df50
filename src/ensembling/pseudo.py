"""Pseudo-labels from an ensemble's saved probabilities (`python -m src.pseudo`, `make pseudo`): each
PROB_<id>.npz becomes PSEUDO_<id>.tif (class and confidence, src.data.pseudo_labels), with pseudo.json
(source, ids, class and confidence counts) and pseudo_report.csv (per class: pixels and the share at or
above common thresholds).

Why: the threshold stays a training setting (the files keep the confidence), files are atomic and a re-run
writes only the missing ones, and a folder made from other probabilities is refused (or replaced with
overwrite) so one folder never mixes two teachers.
"""
from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from src.core.errors import DataError
from src.core.files import write_json, write_text
from src.core.flair import CLASS_NAMES, NUM_CLASSES
from src.core.progress import progress
from src.core.tables import load_index
from src.core.workers import default_workers
from src.data.pseudo_labels import (
    PSEUDO_FORMAT,
    PSEUDO_MANIFEST,
    PSEUDO_REPORT,
    THRESHOLDS,
    from_probs,
    kept_counts,
    level_counts,
    pseudo_path,
    read_pseudo,
    write_pseudo,
)
from src.prediction.stores import PROBS_MANIFEST, load_prob, prob_path


def source_identity(probs: Path, index: Path) -> dict[str, Any]:
    """What made the files: the probabilities folder, its probs.json setup (s_per_patch aside) and the
    index. A folder made from another source is refused."""
    try:
        setup = json.loads((probs / PROBS_MANIFEST).read_text())
        setup = {k: v for k, v in setup.items() if k != "s_per_patch"} if isinstance(setup, dict) else None
    except (OSError, ValueError):
        setup = None
    return {"probs_dir": str(probs.resolve()), "source": setup, "index": str(index.resolve())}


def skipped_ids(path: Path | None) -> set[str]:
    """Ids of predict's skipped.txt (unreadable patches: a fallback PRED, no PROB file); none when absent."""
    if path is None or not path.is_file():
        return set()
    return {line.split("\t", 1)[0].strip() for line in path.read_text().splitlines() if line.strip()}


def check_inputs(probs: Path, ids: list[str], skipped: set[str]) -> list[str]:
    """The ids to label; one-line errors naming the folder or the first missing PROB file."""
    if not probs.is_dir():
        raise DataError(f"{probs}: no such probabilities folder (make predict ... --save-probs {probs})")
    todo = [i for i in ids if i not in skipped]
    missing = [i for i in todo if not prob_path(probs, i).is_file()]
    if missing:
        raise DataError(f"{prob_path(probs, missing[0])}: probability file not found ({len(missing)} of "
                        f"{len(todo)} ids of the index have none)")
    return todo


def prepare_out(out: Path, identity: dict[str, Any], overwrite: bool) -> None:
    """Create the folder; refuse one made from another source unless `overwrite` (then empty it)."""
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / PSEUDO_MANIFEST
    prev = None
    if manifest.is_file():
        try:
            prev = json.loads(manifest.read_text())
        except ValueError:
            prev = {}
    stale = prev is None and any(out.glob("PSEUDO_*.tif"))
    differs = prev is not None and any(json.dumps(prev.get(k), sort_keys=True)
                                       != json.dumps(v, sort_keys=True) for k, v in identity.items())
    if (stale or differs) and not overwrite:
        what = "PSEUDO files but no pseudo.json" if stale else "pseudo-labels of another source"
        raise DataError(f"{out}: holds {what}; use another --out, or --overwrite")
    if overwrite:
        for p in out.glob("PSEUDO_*.tif"):
            p.unlink()
        manifest.unlink(missing_ok=True)


def label_one(probs: Path, out: Path, pid: str) -> np.ndarray:
    """Write PSEUDO_<id>.tif unless a readable one exists; its (13, 256) class x confidence counts."""
    path = pseudo_path(out, pid)
    if path.is_file():
        try:
            return level_counts(read_pseudo(path))
        except DataError:
            pass  # unreadable: written again below
    q = load_prob(prob_path(probs, pid))
    pair = from_probs(q)
    write_pseudo(path, pair)
    return level_counts(pair)


def report_rows(levels: np.ndarray) -> list[dict[str, Any]]:
    """Per class: predicted pixels, their share of all pixels, and the share of them kept per threshold."""
    total = max(int(levels.sum()), 1)
    kept = {t: kept_counts(levels, t) for t in THRESHOLDS}
    rows = []
    for c in range(NUM_CLASSES):
        n = int(levels[c].sum())
        rows.append({"class": c, "name": CLASS_NAMES[c], "pixels": n, "share": n / total,
                     **{f"kept_{t}": (float(kept[t][c]) / n if n else float("nan")) for t in THRESHOLDS}})
    return rows


def format_report(rows: list[dict[str, Any]]) -> str:
    head = f"{'class':<26}{'pixels':>12}{'share':>8}" + "".join(f"{'>=' + str(t):>8}" for t in THRESHOLDS)
    lines = [head]
    for r in rows:
        kept = (r[f"kept_{t}"] for t in THRESHOLDS)
        lines.append(f"{r['class']:>2} {r['name']:<23}{r['pixels']:>12}{r['share']:>8.1%}"
                     + "".join(f"{'-':>8}" if np.isnan(k) else f"{k:>8.1%}" for k in kept))
    return "\n".join(lines)


def make_pseudo(probs: str | Path, index: str | Path, out: str | Path, *, skipped: str | Path | None = None,
                overwrite: bool = False, workers: int | None = None) -> dict[str, Any]:
    """Pseudo-label every id of `index` from `probs` into `out`; returns the manifest written."""
    probs, index, out = Path(probs), Path(index), Path(out)
    ids = load_index(index)["id"].astype(str).tolist()
    left_out = sorted(skipped_ids(Path(skipped) if skipped else None) & set(ids))
    todo = check_inputs(probs, ids, set(left_out))
    identity = source_identity(probs, index)
    prepare_out(out, identity, overwrite)
    manifest: dict[str, Any] = {"format": PSEUDO_FORMAT, **identity, "ids": todo, "skipped": left_out,
                                "complete": False}
    write_json(out / PSEUDO_MANIFEST, manifest, indent=None)
    levels = np.zeros((NUM_CLASSES, 256), dtype=np.int64)
    with ThreadPoolExecutor(max_workers=workers or default_workers(8)) as pool:
        bar = progress(total=len(todo), desc="pseudo-labels", unit="patch", leave=False, file=sys.stderr)
        for counts in pool.map(lambda pid: label_one(probs, out, pid), todo):
            levels += counts
            bar.update(1)
        bar.close()
    rows = report_rows(levels)
    total = max(int(levels.sum()), 1)
    manifest.update(complete=True, pixels=int(levels.sum()), levels=levels.tolist(),
                    class_pixels_at={str(t): kept_counts(levels, t).tolist() for t in (0.0, *THRESHOLDS)},
                    share_at={str(t): float(kept_counts(levels, t).sum()) / total for t in THRESHOLDS})
    header = "class,name,pixels,share," + ",".join(f"kept_{t}" for t in THRESHOLDS)
    write_text(out / PSEUDO_REPORT, "\n".join([header] + [",".join(str(v) for v in r.values())
                                                          for r in rows]) + "\n")
    write_json(out / PSEUDO_MANIFEST, manifest, indent=None)
    print(format_report(rows))
    print(f"pseudo: {len(todo)} pseudo-labelled patches in {out} from {probs}"
          + (f" ({len(left_out)} unreadable patches left out)" if left_out else "") + "; kept pixels: "
          + ", ".join(f">={t}: {s:.1%}" for t, s in zip(THRESHOLDS, manifest["share_at"].values())))
    return manifest
