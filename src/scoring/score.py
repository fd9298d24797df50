"""Scoring a PRED folder or a submission zip with the official FLAIR #2 mIoU (docs/data-format.md,
"Metric"), for `python -m src.evaluate` and `python -m src.predict --submit`.

Every PRED_<id>.tif is matched to MSK_<id>.tif (a missing or extra id is an error listing the ids),
each pair becomes a 13x13 confusion matrix in a worker thread (libtiff, through imagecodecs, decodes
LZW with the GIL released; one table lookup and one bincount follow), and the matrices are summed:
dataset-level mIoU exactly as `src.scoring.metrics` defines it. The matrices are also summed per domain (the
index's `domain` column, or the D<nnn>_<year> folder of each label), since the test set is 10 unseen
domains and domain shift decides the ranking (tables and figure: src.scoring.domains). Also the scores
JSON and the row-normalised confusion-matrix picture, and `score_and_write`: what `make evaluate` and
`predict --submit` both print and write, from one place so that both leave the same files."""
from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from src.core.errors import DataError
from src.core.files import save_figure, write_json
from src.core.flair import CLASS_NAMES, NUM_CLASSES, NUM_SCORED
from src.core.progress import progress
from src.core.workers import default_workers
from src.scoring.domains import domain_rows, format_lines, write_report
from src.scoring.metrics import confusion_from_raw, format_table, ious_from_confusion, miou_from_confusion
from src.scoring.submission import PredSource, decode_2d, short_list

MSK_PREFIX, MSK_SUFFIX = "MSK_", ".tif"
DOMAIN_DIR = re.compile(r"^D\d{3}_\d{4}$")  # a domain folder of the official layout, e.g. D015_2020

BACKENDS = ("thread", "process")  # how PRED and label files are read in parallel


def find_labels(folder: str | os.PathLike) -> dict[str, Path]:
    """id -> path of every MSK_<id>.tif under `folder` (recursive); a duplicated id is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: labels folder not found")
    out: dict[str, Path] = {}
    for p in folder.rglob(f"{MSK_PREFIX}*{MSK_SUFFIX}"):
        pid = p.name[len(MSK_PREFIX):-len(MSK_SUFFIX)]
        if pid in out:
            raise DataError(f"{folder}: two labels for id {pid}: {out[pid]} and {p}")
        out[pid] = p
    if not out:
        raise DataError(f"{folder}: no MSK_*.tif files found")
    return out


def truth_paths(truth, labels: str | os.PathLike | None = None) -> dict[str, Path]:
    """id -> MSK path from a labels folder, an index CSV / DataFrame (id, msk_path) or a mapping.

    With `labels`, the ids come from `truth` (an index) and the files from the `labels` folder.
    """
    if isinstance(truth, (str, os.PathLike)) and Path(truth).is_dir():
        return find_labels(truth)
    if isinstance(truth, Mapping):
        return {str(k): Path(v) for k, v in truth.items()}
    if isinstance(truth, (str, os.PathLike)):
        if not Path(truth).is_file():
            raise DataError(f"{truth}: no such labels folder or index CSV")
        from src.core.tables import load_index

        truth = load_index(truth)
    if not hasattr(truth, "columns") or "id" not in truth.columns:
        raise DataError(f"truth must be a labels folder, an index CSV or a DataFrame with an id column, "
                        f"got {type(truth).__name__}")
    ids = [str(i) for i in truth["id"]]
    if labels is not None:
        found = find_labels(labels)
        missing = [i for i in ids if i not in found]
        if missing:
            raise DataError(f"{labels}: no MSK_<id>.tif for {len(missing)} of {len(ids)} index ids: "
                            + short_list(missing))
        return {i: found[i] for i in ids}
    paths = truth["msk_path"].fillna("").astype(str) if "msk_path" in truth.columns else None
    if paths is None or (paths == "").any():
        n = len(ids) if paths is None else int((paths == "").sum())
        empty = ids if paths is None else [i for i, p in zip(ids, paths) if p == ""]
        raise DataError(f"the index has no label (msk_path) for {n} of {len(ids)} ids "
                        f"({short_list(empty)}): pass --labels DIR")
    return {i: Path(p) for i, p in zip(ids, paths)}


def truth_domains(truth, msks: Mapping[str, Path]) -> dict[str, str] | None:
    """id -> domain: the index's `domain` column when `truth` is an index, else the D<nnn>_<year> folder
    in each label's path; None when some id has neither (no per-domain report then)."""
    if hasattr(truth, "columns") and "domain" in truth.columns:
        table = {str(i): str(d) for i, d in zip(truth["id"], truth["domain"]) if isinstance(d, str) and d}
        if all(i in table for i in msks):
            return {i: table[i] for i in msks}
    out = {}
    for i, p in msks.items():
        found = [part for part in Path(p).parts if DOMAIN_DIR.match(part)]
        if not found:
            return None
        out[i] = found[-1]
    return out


def score_pair(src: PredSource, name: str, msk_path: Path) -> np.ndarray:
    """13x13 confusion matrix of one prediction against its label (official truth rule)."""
    label = src.label(name)
    pred = decode_2d(src.read(name), label)
    try:
        raw = decode_2d(Path(msk_path).read_bytes(), str(msk_path))  # = rasters.read_label, 2x faster
    except OSError as err:
        raise DataError(f"{msk_path}: cannot read label ({err.strerror or err})") from None
    try:
        return confusion_from_raw(pred, raw, label, str(msk_path))
    except ValueError as err:
        raise DataError(str(err)) from None


def _score_chunk(args: tuple[PredSource, list[tuple[str, Path]]]) -> np.ndarray:
    src, pairs = args
    total = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    for name, msk in pairs:
        total += score_pair(src, name, msk)
    return total


def _domain_chunks(src: PredSource, pairs: list[tuple[str, Path]], domains: list[str], workers: int
                   ) -> tuple[list[tuple[PredSource, list[tuple[str, Path]]]], list[str]]:
    """Work units of at most 64 (prediction, label) pairs, each within one domain so that its summed
    matrix belongs to that domain: (chunks, the domain of each chunk)."""
    size = max(1, min(64, len(pairs) // (4 * workers) or 1))
    chunks, chunk_domain = [], []
    for d in sorted(set(domains)):
        group = [pair for pair, dom in zip(pairs, domains) if dom == d]
        chunks += [(src, group[k:k + size]) for k in range(0, len(group), size)]
        chunk_domain += [d] * (len(chunks) - len(chunk_domain))
    return chunks, chunk_domain


def _none_if_nan(v: float) -> float | None:
    return None if np.isnan(v) else float(v)


def evaluate(pred: str | os.PathLike, truth, workers: int | None = None, labels=None,
             backend: str = "thread") -> dict:
    """Official scores of a PRED folder or zip against `truth` (see `truth_paths`).

    Returns {"miou", "ious" (12 floats, None for NaN), "iou_other", "confusion" (13x13 lists,
    rows = truth), "class_names", "n_patches", "per_domain"}; "per_domain" is {"domains" (sorted),
    "n_patches", "miou", "confusion" (D x 13 x 13)}, or None when the domains are unknown (see
    `truth_domains`). Raises DataError on mismatched ids or bad files.
    """
    src = PredSource(pred)
    preds = src.predictions()
    if isinstance(truth, (str, os.PathLike)) and Path(truth).is_file():  # an index CSV: read it once
        from src.core.tables import load_index

        truth = load_index(truth)
    msks = truth_paths(truth, labels)
    missing, extra = set(msks) - set(preds), set(preds) - set(msks)
    if missing or extra:
        lines = [f"{pred}: predictions do not match the labels "
                 f"({len(preds)} predictions, {len(msks)} labels)"]
        if missing:
            lines.append(f"  missing {len(missing)} predictions for ids: {short_list(missing)}")
        if extra:
            lines.append(f"  {len(extra)} predictions with no label, ids: {short_list(extra)}")
        raise DataError("\n".join(lines))
    domain_of = truth_domains(truth, msks) or {}
    ids = sorted(msks)
    names = sorted(set(domain_of.values()))
    workers = workers or default_workers()
    chunks, chunk_domain = _domain_chunks(src, [(preds[i], msks[i]) for i in ids],
                                          [domain_of.get(i, "") for i in ids], workers)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be thread or process, got {backend!r}")
    pool_cls = ThreadPoolExecutor if backend == "thread" else ProcessPoolExecutor
    per_domain = np.zeros((max(len(names), 1), NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    code = {d: k for k, d in enumerate(names)}
    pool = pool_cls(workers) if workers != 1 else nullcontext()
    with src, pool, progress(total=len(ids), desc="evaluate", unit="patch") as bar:
        results = pool.map(_score_chunk, chunks) if workers != 1 else map(_score_chunk, chunks)
        for (_, part), d, m in zip(chunks, chunk_domain, results):
            per_domain[code.get(d, 0)] += m
            bar.update(len(part))
    matrix = per_domain.sum(0)
    ious = ious_from_confusion(matrix)
    miou = miou_from_confusion(matrix)
    return {
        "miou": _none_if_nan(miou),  # None (JSON null) only when no scored class occurs
        "ious": [_none_if_nan(v) for v in ious[:NUM_SCORED]],
        "iou_other": _none_if_nan(ious[NUM_SCORED]),
        "confusion": matrix.tolist(),
        "class_names": CLASS_NAMES,
        "n_patches": len(ids),
        "per_domain": None if not names else {
            "domains": names, "n_patches": [sum(domain_of[i] == d for i in ids) for d in names],
            "miou": [_none_if_nan(miou_from_confusion(m)) for m in per_domain],
            "confusion": per_domain.tolist()},
    }


def save_json(result: dict, path: str | os.PathLike) -> None:
    """The scores JSON (`--json`, and `<out>_scores.json` of `predict --submit`)."""
    write_json(path, result, indent=1)


def save_confusion_png(matrix, path: str | os.PathLike, names: list[str] | None = None,
                       title: str = "") -> None:
    """Row-normalised confusion matrix (each row: where the truth pixels of a class went)."""
    import matplotlib

    matrix_ = np.asarray(matrix, dtype=np.float64)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(CLASS_NAMES if names is None else names)
    rows = matrix_.sum(axis=1, keepdims=True)
    norm = np.divide(matrix_, rows, out=np.zeros_like(matrix_), where=rows > 0)
    n = len(names)
    fig, ax = plt.subplots(figsize=(9.5, 8.5))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            if norm[i, j] >= 0.005:
                ax.text(j, i, f"{100 * norm[i, j]:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(n), names, rotation=60, ha="right", fontsize=8)
    ious = ious_from_confusion(matrix_)
    ax.set_yticks(range(n), [f"{nm}  (absent)" if r == 0 else f"{nm}  IoU {iou:.2f}"
                             for nm, r, iou in zip(names, rows[:, 0], ious)], fontsize=8)
    ax.set_xlabel("prediction")
    ax.set_ylabel("truth")
    ax.set_title(title or "confusion matrix (% of each truth row)")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


@dataclass(frozen=True)
class ScoreFiles:
    """What a scoring writes: the scores JSON, the confusion picture and the per-domain report (PREFIX of
    PREFIX.csv/.png; by default beside the JSON: X_scores.json -> X_domains); None writes none."""

    json_path: str | os.PathLike | None = None
    png_path: str | os.PathLike | None = None
    domains: str | None = None


def score_and_write(pred: str | os.PathLike, truth, files: ScoreFiles = ScoreFiles(), *,
                    workers: int | None = None, labels=None, backend: str = "thread",
                    log: Callable[[str], None] = print) -> dict:
    """`evaluate` `pred`, then what `make evaluate` and `predict --submit` both show and write: the class
    table and each domain's mIoU (`log`), then `files`. Returns `evaluate`'s result."""
    json_path, png_path, domains = files.json_path, files.png_path, files.domains
    start = time.perf_counter()
    result = evaluate(pred, truth, workers, labels=labels, backend=backend)
    matrix = np.asarray(result["confusion"], dtype=np.int64)
    log(format_table(ious_from_confusion(matrix), support=matrix.sum(axis=1)))
    log(f"{result['n_patches']} patches scored in {time.perf_counter() - start:.1f} s")
    if json_path:
        save_json(result, json_path)
        log(f"wrote {json_path}")
    if png_path:
        title = f"{Path(pred).name}: mIoU {miou_from_confusion(matrix):.4f}"
        save_confusion_png(matrix, png_path, title=title)
        log(f"wrote {png_path}")
    report_domains(result, domains or domains_prefix(json_path), Path(pred).name, log)
    return result


def domains_prefix(json_path: str | os.PathLike | None) -> str | None:
    """`X_scores.json` or `X.json` -> `X_domains` (None without a JSON path)."""
    if not json_path:
        return None
    stem = str(json_path).removesuffix(".json").removesuffix("_scores")
    return f"{stem}_domains"


def report_domains(result: dict, prefix: str | None, title: str, log: Callable[[str], None] = print) -> None:
    """Each domain's mIoU (`log`); with a prefix, the CSV and figure of src.scoring.domains."""
    per = result.get("per_domain")
    if not per:
        log("per-domain report: domains unknown (no domain column in the index, no D<nnn>_<year> folders)")
        return
    confusion = np.asarray(per["confusion"], dtype=np.int64)
    if prefix is None:
        rows = domain_rows(confusion, per["domains"], per["n_patches"])
    else:
        rows = write_report(confusion, per["domains"], prefix, per["n_patches"], f"{title}:")
    log(f"per-domain mIoU ({len(per['domains'])} domains):")
    log("\n".join(format_lines(rows[:-1])))
    if prefix is not None:
        log(f"wrote {prefix}.csv, {prefix}.png")
