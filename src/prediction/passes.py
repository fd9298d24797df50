"""The passes that write a PRED folder: by an ensemble over a split's index, or by combining saved
probability folders (`predict --combine`).

A pass over a split writes the missing PRED files of an index with a ready ensemble. Why it is built this
way:
- One loader feeds the whole ensemble (src.data.loader); the batch maths are in src.prediction.ensemble.
- PRED files are written in background threads through the atomic writer (src.prediction.stores), so a killed
  run never leaves a partial file, and a re-run with the same setup writes only the missing ones; a
  different setup is refused (predict.json).
- The measured inference time (data loading, networks, writing) is summed over resumed runs.
- `bn_adapt=domain` (src.prediction.bn_adapt): before predicting a test domain's patches, the BatchNorm
  statistics of each model are re-estimated on that domain's patches, on a copy; the estimate takes the
  domain's rows of the whole index (not only the missing ones), so where a run was killed never changes a
  result.

`predict --combine`: a weighted average of saved probability folders (PROB_<id>.npz, src.prediction.stores)
written as a resumable PRED folder, so separately predicted models are ensembled without re-running them
(docs/data-format.md, "Predictions and probabilities").

The folder's measured time (for the zip name) adds up the seconds per patch that each source folder's
probs.json records (the runs that saved them) and the combination's own; a source that recorded none
leaves only the combination's own time, with a warning."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from src.core.errors import ConfigError, PredictError
from src.core.flair import N_TEST_PATCHES
from src.core.progress import fmt_duration as fmt_s
from src.core.progress import progress
from src.core.workers import default_workers
from src.data.loader import prediction_loader
from src.models.batchnorm import has_batchnorm
from src.prediction.bn_adapt import adapt, estimate_rows
from src.prediction.ensemble import Ensemble, choose_tta, device_tta, normalise_weights, quantise
from src.prediction.stores import (
    PROBS_MANIFEST,
    RunRecord,
    Writer,
    average,
    folder_ids,
    prepare_out,
    saved_s_per_patch,
    scan_done,
    split_seconds,
    write_fallback,
)


# ----------------------------------------------------------------------------------------- one split
@dataclass(frozen=True)
class Target:
    """Where a prediction pass writes: the PRED folder, the probabilities folder (--save-probs) or None, and
    whether this split's files there are deleted first (--overwrite)."""

    out_dir: Path
    probs_dir: Path | None = None
    overwrite: bool = False


def _identity(ens: Ensemble, index_df: pd.DataFrame) -> dict[str, Any]:
    """The setup a resume must match: the checkpoints, weights, ensembling, recipe and bn_adapt (they change
    the predictions)."""
    cfg = ens.cfg
    identity = ens.identity() if ens.paths else {"models": [type(m).__name__ for m in ens.models]}
    identity.update(weights=[round(x, 6) for x in ens.weights], ensemble=cfg.ensemble)
    if ens.mix is not None:
        identity["mix"] = [[round(x, 6) for x in row] for row in (*ens.mix.class_weights, ens.mix.biases)]
    identity["bn_adapt"] = cfg.bn_adapt
    if cfg.bn_adapt == "domain":
        identity["bn_adapt_patches"] = cfg.bn_adapt_patches
        if "domain" not in index_df.columns:
            raise ConfigError("bn_adapt=domain needs the index's domain column (the index has none)")
    return identity


def run_prediction(ens: Ensemble, index_df: pd.DataFrame, target: Target, *, tta: str | None = None,
                   n_total: int | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write PRED_<id>.tif for every row of `index_df` that lacks one in `target`; returns a report dict.

    The prediction settings are the ensemble's (batch_size, workers, ensemble, precision, channels_last,
    tta, time_budget_s, skip_bad, bn_adapt, bn_adapt_patches). `tta` given explicitly wins over them;
    otherwise a positive time_budget_s picks the level (for `n_total` patches, the index's by default). With
    bn_adapt=domain each domain of `index_df` is predicted by copies re-estimated on its patches."""
    cfg, out_dir, probs_dir = ens.cfg, target.out_dir, target.probs_dir
    identity = _identity(ens, index_df)
    budget = cfg.time_budget_s if tta is None else 0.0
    if tta is None and budget <= 0:
        tta = cfg.tta
    if tta == "auto":
        tta = device_tta(tta, ens.device)
        log(f"predict: tta=auto: {tta} on {ens.device.type} (auto is d4 on a GPU, none on a CPU; "
            "TTA=none|flip|d4 chooses)")
    if tta is not None:
        identity["tta"] = tta
    prev = prepare_out(out_dir, identity, index_df, target.overwrite, probs_dir)
    if tta is None and prev is not None and prev.get("tta"):
        tta = prev["tta"]
        log(f"predict: resuming with tta={tta} (chosen by the time budget on the first run)")
    ids = index_df["id"].astype(str).tolist()
    done = set() if target.overwrite else scan_done(index_df, out_dir, probs_dir)
    todo = index_df[~index_df["id"].astype(str).isin(done)].reset_index(drop=True)
    prev = prev or {}
    report: dict[str, Any] = {"out": str(out_dir), "n_ids": len(ids), "n_skipped_existing": len(done),
                              "n_written": 0, "tta": tta, "infer_s": float(prev.get("infer_s", 0.0)),
                              "n_timed": int(prev.get("n_timed", 0)), "fallback": []}
    if done and not todo.empty:
        log(f"predict: {len(done)}/{len(ids)} PRED files already in {out_dir}: writing only the missing ones")
    if todo.empty:
        report["s_per_patch"] = report["infer_s"] / report["n_timed"] if report["n_timed"] else None
        report["time_s"] = split_seconds({**prev, "split_ids": len(ids)})
        log(f"predict: all {len(ids)} predictions already present in {out_dir}")
        return report
    run = _Run(ens, target, report, log)
    run.full_index = index_df
    run.bn_mode = "domain" if cfg.bn_adapt == "domain" and _has_bn(ens.models, log) else "none"
    return run.predict(todo, identity, tta, budget, n_total or len(index_df))


def _has_bn(models: Sequence[nn.Module], log: Callable[[str], None]) -> bool:
    """Whether bn_adapt=domain has anything to adapt; a note for each model it leaves as it is."""
    with_bn = [has_batchnorm(m) for m in models]
    for k, (m, bn) in enumerate(zip(models, with_bn)):
        if not bn:
            log(f"predict: bn_adapt: model {k + 1} ({type(m).__name__}) has no BatchNorm layer (LayerNorm or "
                "GroupNorm only, e.g. SegFormer): used as it is")
    return any(with_bn)


class _Run:
    """One prediction pass over the missing patches: its loader, writer, manifest and measured time."""

    bn_mode, full_index = "none", pd.DataFrame()

    def __init__(self, ens: Ensemble, target: Target, report: dict[str, Any], log: Callable[[str], None]):
        self.ens, self.cfg, self.log = ens, ens.cfg, log
        self.out_dir, self.probs_dir, self.report = target.out_dir, target.probs_dir, report
        self.device = ens.device
        self.active = ens  # what predicts the current batch: the ensemble, or its re-estimated copy
        self.bad: list[tuple[str, str]] = []

    def predict(self, todo: pd.DataFrame, identity: dict[str, Any], tta: str | None, budget: float,
                n_total: int) -> dict[str, Any]:
        t0 = time.perf_counter()  # the measured inference time: data loading, (estimates,) networks, writing
        batches = self._items(todo)
        first = self._first_readable(batches)
        if tta is None:
            tta = "none"
            if first is not None:
                t_sel = time.perf_counter()
                tta = choose_tta(self.active, self.active.feed(first["batches"]), n_total, budget, self.log)
                t0 += time.perf_counter() - t_sel  # the trial runs are not inference of the split
        identity["tta"] = self.report["tta"] = tta
        record = RunRecord(self.out_dir, self.probs_dir, identity, {
            "split_ids": self.report["n_ids"], "infer_s": self.report["infer_s"],
            "n_timed": self.report["n_timed"], "complete": False,
            "probs_dir": str(self.probs_dir) if self.probs_dir else None})
        record.write()
        self.log(f"predict: {self.ens.describe(tta)}, bn_adapt={self.bn_mode}, {len(todo)} patches to write")
        items = chain([first] if first is not None else [], batches)
        elapsed, written = self._write_all(items, todo, tta, record, t0)
        return self._finish(todo, written, elapsed, record)

    def _items(self, todo: pd.DataFrame) -> Iterator[dict[str, Any]]:
        """The loader's items; with bn_adapt=domain one domain after the other, each once `self.active`
        holds copies re-estimated on that domain's patches (batches are consumed one at a time, so no
        batch of one domain is predicted by another's copies)."""
        if self.bn_mode != "domain":
            yield from prediction_loader(todo, self.ens.settings, self.cfg)[0]
            return
        for domain, rows in todo.groupby(todo["domain"].astype(str), sort=False):
            self.active = self.ens  # the previous domain's copies are freed first
            self.active = self._adapt(str(domain))
            yield from prediction_loader(rows, self.ens.settings, self.cfg)[0]
        self.active = self.ens

    def _adapt(self, domain: str) -> Ensemble:
        """Copies of the models re-estimated on the domain's rows of the whole index (capped), never only
        on the rows still to write: where a run was killed does not change the statistics."""
        t = time.perf_counter()
        rows = self.full_index[self.full_index["domain"].astype(str) == domain]
        sample = estimate_rows(rows, self.cfg.bn_adapt_patches)
        loader = prediction_loader(sample, self.ens.settings, self.cfg)[0]
        adapted = adapt(self.ens, (self.ens.feed(item["batches"]) for item in loader
                                   if item["batches"] is not None))
        self.log(f"predict: bn_adapt: domain {domain}: BatchNorm statistics re-estimated on {len(sample)} of "
                 f"its {len(rows)} patches ({time.perf_counter() - t:.1f} s)")
        return adapted

    def _first_readable(self, batches: Iterator[dict[str, Any]]) -> dict[str, Any] | None:
        """The first batch holding a readable patch (skip_bad: a batch may hold only unreadable ones)."""
        for item in batches:
            self.bad += item["bad"]
            if item["batches"] is not None:
                return item
        return None

    def _write_all(self, items: Iterator[dict[str, Any]], todo: pd.DataFrame, tta: str, record: RunRecord,
                   t0: float) -> tuple[float, list[str]]:
        """Predict and write every batch (then the fallback files); the manifest keeps the time either way."""
        writer = Writer(self.out_dir, self.probs_dir, threads=max(2, default_workers(8)))
        writer.n_left = len(todo)
        try:
            with progress(total=len(todo), desc="predict", unit="patch") as bar:
                bar.update(len(self.bad))
                for i, item in enumerate(items):
                    if i > 0:  # the first batch's unreadable patches are already counted
                        self.bad += item["bad"]
                        bar.update(len(item["bad"]))
                    if item["batches"] is not None:
                        t_batch = time.perf_counter()
                        self._predict_one(item, tta, writer)
                        if i == 0:
                            self._project(time.perf_counter() - t_batch, item, len(todo))
                        bar.update(len(item["batches"][0]["id"]))
            writer.close()
            if self.bad:
                self.report["fallback"] = write_fallback(self.out_dir, self.bad, self.log)
        except KeyboardInterrupt:
            writer.abort()
            kept = f"{len(writer.written)} new PRED files in {self.out_dir} are kept"
            raise KeyboardInterrupt(kept) from None
        except BaseException:
            writer.abort()
            self.log(f"predict: stopped after {len(writer.written)} new files; re-run the same command to "
                     "resume")
            raise
        finally:
            elapsed = time.perf_counter() - t0
            self.report["n_written"] = len(writer.written)
            self.report["infer_s"] += elapsed
            self.report["n_timed"] += len(writer.written)
            record.write(infer_s=self.report["infer_s"], n_timed=self.report["n_timed"])
        return elapsed, writer.written

    def _project(self, seconds: float, item: dict[str, Any], n_todo: int) -> None:
        """One line after the first batch: its time per patch and what it projects (warm-up included)."""
        per = seconds / len(item["batches"][0]["id"])
        self.log(f"predict: first batch {per:.3f} s/patch (warm-up included): about {fmt_s(per * n_todo)} "
                 f"for the {n_todo} patches to write, {fmt_s(per * N_TEST_PATCHES)} for the "
                 f"{N_TEST_PATCHES} test patches")

    def _predict_one(self, item: dict[str, Any], tta: str, writer: Writer) -> None:
        batch = item["batches"]
        probs = self.active.predict(self.active.feed(batch), tta)
        pred = probs.max(1).indices.to(torch.uint8).cpu().numpy()  # max: 5x faster than argmax on CPU
        q = quantise(probs).cpu().numpy() if self.probs_dir is not None else None
        for j, pid in enumerate(batch[0]["id"]):
            writer.submit(str(pid), pred[j], None if q is None else q[j])

    def _finish(self, todo: pd.DataFrame, written: list[str], elapsed: float, record: RunRecord
                ) -> dict[str, Any]:
        done = set(written) | set(self.report["fallback"])
        missing = [pid for pid in todo["id"].astype(str) if pid not in done]
        if missing:  # cannot happen unless a dataset dropped rows silently: never hand out an incomplete set
            raise PredictError(f"{len(missing)} patches got no prediction (first: {missing[:5]})")
        per = elapsed / max(len(written), 1)
        record.write(complete=True)
        self.report.update(elapsed_s=elapsed, s_per_patch=per, projected_test_s=per * N_TEST_PATCHES,
                           time_s=record.split_seconds())
        self.log(f"predict: wrote {len(written)} PRED files to {self.out_dir} in {fmt_s(elapsed)} "
                 f"({per:.3f} s/patch); projected for the {N_TEST_PATCHES} test patches: "
                 f"{fmt_s(per * N_TEST_PATCHES)}")
        return self.report


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
