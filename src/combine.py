"""`predict --combine`: a weighted average of saved probability folders (PROB_<id>.npz, src.probstore)
written as a resumable PRED folder, so separately predicted models are ensembled without re-running them
(docs/data-format.md, "Predictions and probabilities").

The folder's measured time (for the zip name) adds up the seconds per patch that each source folder's
probs.json records (the runs that saved them) and the combination's own; a source that recorded none
leaves only the combination's own time, with a warning.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from src.ensemble import normalise_weights
from src.predstore import RunRecord, Writer, prepare_out, scan_done
from src.probstore import PROBS_MANIFEST, average, folder_ids, saved_s_per_patch
from src.progress import fmt_duration as fmt_s


def _sources_s_per_patch(dirs: Sequence[Path], log: Callable[[str], None]) -> float | None:
    """Seconds per patch of the runs that saved the folders' probabilities (each folder counted once);
    None, with a warning, when one of them did not record it."""
    folders = list(dict.fromkeys(d.resolve() for d in dirs))
    times = [saved_s_per_patch(d) for d in folders]
    unknown = [str(d) for d, t in zip(folders, times) if t is None]
    if unknown:
        log(f"predict: warning: no inference time in the {PROBS_MANIFEST} of {', '.join(unknown)}: the "
            "submission time counts only this combination")
        return None
    return float(sum(times))


def combine(dirs: Sequence[str | Path], out_dir: str | Path, ids: Sequence[str] | None = None,
            weights: Sequence[float] | None = None, *, probs_dir: str | Path | None = None,
            overwrite: bool = False, threads: int = 4, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Weighted average of saved probabilities (PROB_<id>.npz folders) -> PRED files, resumable.

    `ids` defaults to the ids of the first folder; every folder must hold every id."""
    dirs = [Path(d) for d in dirs]
    ids = folder_ids(dirs, ids)
    w = normalise_weights(weights, len(dirs))
    out_dir = Path(out_dir)
    probs_dir = Path(probs_dir) if probs_dir else None
    index_df = pd.DataFrame({"id": ids})
    identity = {"combine": [str(d.resolve()) for d in dirs], "weights": [round(x, 6) for x in w]}
    prev = prepare_out(out_dir, identity, index_df, overwrite, probs_dir) or {}
    done = set() if overwrite else scan_done(index_df, out_dir, probs_dir)
    todo = [i for i in ids if i not in done]
    record = RunRecord(out_dir, probs_dir, identity, {
        "split_ids": len(ids), "complete": False, "infer_s": float(prev.get("infer_s", 0)),
        "n_timed": int(prev.get("n_timed", 0)), "sources_s_per_patch": _sources_s_per_patch(dirs, log)})
    record.write()
    writer = Writer(out_dir, probs_dir, threads=threads)
    writer.n_left = len(todo)

    def one(pid: str) -> tuple[np.ndarray, np.ndarray | None]:
        return average(dirs, w, pid, keep_probs=probs_dir is not None)

    t0 = time.perf_counter()
    try:
        with ThreadPoolExecutor(threads) as pool:
            for pid, (pred, q) in zip(todo, pool.map(one, todo)):
                writer.submit(pid, pred, q)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        elapsed = time.perf_counter() - t0
        record.write(infer_s=record.fields["infer_s"] + elapsed,
                     n_timed=record.fields["n_timed"] + len(writer.written))
    record.write(complete=True)
    log(f"predict: combined {len(dirs)} probability folders (weights {', '.join(f'{x:.3g}' for x in w)}) "
        f"into {len(writer.written)} PRED files in {out_dir} ({fmt_s(elapsed)}); {len(done)} already present")
    return {"out": str(out_dir), "n_ids": len(ids), "n_written": len(writer.written),
            "n_skipped_existing": len(done), "infer_s": record.fields["infer_s"],
            "n_timed": record.fields["n_timed"], "time_s": record.split_seconds()}
