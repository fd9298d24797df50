"""One prediction pass over a split: the missing PRED files of an index, written by a ready ensemble.

Moved out of the `src.predict` job (which keeps the commands: checkpoints, submission, CLI) so that the
pass can grow without the job growing. Why it is built this way:
- One loader feeds the whole ensemble (src.data.loader); the batch maths are in src.prediction.ensemble.
- PRED files are written in background threads through the atomic writer (src.prediction.stores), so a killed
  run never leaves a partial file, and a re-run with the same setup writes only the missing ones; a
  different setup is refused (predict.json).
- The measured inference time (data loading, networks, writing) is summed over resumed runs.
- `bn_adapt=domain` (src.prediction.bn_adapt): before predicting a test domain's patches, the BatchNorm statistics
  of each model are re-estimated on that domain's patches, on a copy; the estimate takes the domain's
  rows of the whole index (not only the missing ones), so where a run was killed never changes a result.

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
from src.core.runtime import amp_dtype, precision_name
from src.core.workers import default_workers, loader_workers
from src.data.device_augment import device_batch
from src.data.loader import group_configs, input_groups, prediction_loader
from src.prediction import tta as T
from src.prediction.bn_adapt import DEFAULT_PATCHES, adapt_ensemble, estimate_rows, has_batchnorm
from src.prediction.bn_adapt import check_settings as bn_settings
from src.prediction.ensemble import Mix, choose_tta, model_device, normalise_weights, predict_batch, quantise
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


# ------------------------------------------------------------------------------------------ settings
def check_settings(cfg: dict[str, Any]) -> None:
    """Prediction settings the config types cannot check; one-line errors before any model is loaded."""
    if cfg["tta"] not in T.LEVELS:
        raise ConfigError(f"tta: expected one of {', '.join(T.LEVELS)}, got {cfg['tta']!r}")
    if cfg["ensemble"] not in ("probs", "logits"):
        raise ConfigError(f"ensemble: expected probs or logits, got {cfg['ensemble']!r}")
    amp_dtype(cfg["precision"], torch.device("cpu"))  # raises ConfigError for an unknown precision
    loader_workers(cfg["workers"])  # likewise for workers
    if cfg["batch_size"] < 1 or cfg["time_budget_s"] < 0:
        raise ConfigError("need batch_size >= 1 and time_budget_s >= 0")
    bn_settings(cfg.get("bn_adapt", "none"), cfg.get("bn_adapt_patches", DEFAULT_PATCHES))


def _bn_identity(cfg: dict[str, Any], index_df: pd.DataFrame, identity: dict[str, Any]) -> tuple[str, int]:
    """bn_adapt and its cap go in the setup a resume must match (they change the predictions)."""
    mode, cap = bn_settings(cfg.get("bn_adapt", "none"), cfg.get("bn_adapt_patches", DEFAULT_PATCHES))
    identity["bn_adapt"] = mode
    if mode == "domain":
        identity["bn_adapt_patches"] = cap
        if "domain" not in index_df.columns:
            raise ConfigError("bn_adapt=domain needs the index's domain column (the index has none)")
    return mode, cap


# ----------------------------------------------------------------------------------------- one split
def run_prediction(models: Sequence[nn.Module], model_cfgs: Sequence[dict[str, Any]],
                   weights: Sequence[float] | None, index_df: pd.DataFrame, out_dir: str | Path,
                   cfg: dict[str, Any], *, tta: str | None = None, probs_dir: str | Path | None = None,
                   identity: dict[str, Any] | None = None, overwrite: bool = False,
                   n_total: int | None = None, mix: Mix | None = None,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write PRED_<id>.tif for every row of `index_df` that lacks one; returns a report dict.

    `models` are ready nn.Modules (on their device, eval mode), `model_cfgs` their configs (input
    settings), `cfg` the prediction settings (batch_size, workers, ensemble, precision, channels_last,
    tta, time_budget_s, skip_bad, bn_adapt, bn_adapt_patches). `tta` given explicitly wins over `cfg`;
    otherwise a positive time_budget_s picks the level. `identity` describes the setup for the resume check.
    A `mix` (blend recipe: per-class weights and biases, src.ensembling.recipe) replaces `weights`. With
    bn_adapt=domain each domain of `index_df` is predicted by copies re-estimated on its patches.
    """
    out_dir = Path(out_dir)
    probs_dir = Path(probs_dir) if probs_dir else None
    w = normalise_weights(weights, len(models))
    identity = dict(identity or {"models": [type(m).__name__ for m in models]})
    identity.update(weights=[round(x, 6) for x in w], ensemble=cfg["ensemble"])
    if mix is not None:
        identity["mix"] = [[round(x, 6) for x in row] for row in (*mix.class_weights, mix.biases)]
    bn_mode, bn_cap = _bn_identity(cfg, index_df, identity)
    budget = float(cfg.get("time_budget_s") or 0) if tta is None else 0.0
    if tta is None and budget <= 0:
        tta = cfg["tta"]
    if tta is not None:
        T.views(tta)  # validates the level before any work
        identity["tta"] = tta
    prev = prepare_out(out_dir, identity, index_df, overwrite, probs_dir)
    if tta is None and prev is not None and prev.get("tta"):
        tta = prev["tta"]
        log(f"predict: resuming with tta={tta} (chosen by the time budget on the first run)")
    ids = index_df["id"].astype(str).tolist()
    done = set() if overwrite else scan_done(index_df, out_dir, probs_dir)
    todo = index_df[~index_df["id"].astype(str).isin(done)].reset_index(drop=True)
    prev = prev or {}
    report: dict[str, Any] = {"out": str(out_dir), "n_ids": len(ids), "n_skipped_existing": len(done),
                              "n_written": 0, "tta": tta, "infer_s": float(prev.get("infer_s", 0.0)),
                              "n_timed": int(prev.get("n_timed", 0)), "fallback": []}
    if done:
        log(f"predict: {len(done)}/{len(ids)} PRED files already in {out_dir}: writing only the missing ones")
    if todo.empty:
        report["s_per_patch"] = report["infer_s"] / report["n_timed"] if report["n_timed"] else None
        report["time_s"] = split_seconds({**prev, "split_ids": len(ids)})
        log(f"predict: all {len(ids)} predictions already present in {out_dir}")
        return report
    run = _Run(models, w, cfg, out_dir, probs_dir, report, log)
    run.mix, run.bn_cap, run.full_index = mix, bn_cap, index_df
    run.bn_mode = bn_mode if bn_mode == "domain" and _has_bn(models, log) else "none"
    return run.predict(todo, model_cfgs, identity, tta, budget, n_total or len(index_df))


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

    mix: Mix | None = None
    bn_mode, bn_cap, full_index = "none", DEFAULT_PATCHES, pd.DataFrame()

    def __init__(self, models: Sequence[nn.Module], weights: list[float], cfg: dict[str, Any], out_dir: Path,
                 probs_dir: Path | None, report: dict[str, Any], log: Callable[[str], None]):
        self.models, self.w, self.cfg, self.log = models, weights, cfg, log
        self.out_dir, self.probs_dir, self.report = out_dir, probs_dir, report
        self.device = model_device(models[0])
        self.active = list(models)  # what predicts the current batch: the models, or adapted copies
        self.bad: list[tuple[str, str]] = []

    def predict(self, todo: pd.DataFrame, model_cfgs: Sequence[dict[str, Any]], identity: dict[str, Any],
                tta: str | None, budget: float, n_total: int) -> dict[str, Any]:
        self.model_cfgs, self.group_of = model_cfgs, input_groups(model_cfgs)
        self.group_cfgs = group_configs(model_cfgs, self.group_of)
        t0 = time.perf_counter()  # the measured inference time: data loading, (estimates,) networks, writing
        batches = self._items(todo)
        first = self._first_readable(batches)
        if tta is None:
            tta = "none"
            if first is not None:
                t_sel = time.perf_counter()
                tta = choose_tta(self.active, self.w, self._inputs(first), self.cfg, n_total, budget,
                                 self.device, self.log)
                t0 += time.perf_counter() - t_sel  # the trial runs are not inference of the split
        identity["tta"] = self.report["tta"] = tta
        record = RunRecord(self.out_dir, self.probs_dir, identity, {
            "split_ids": self.report["n_ids"], "infer_s": self.report["infer_s"],
            "n_timed": self.report["n_timed"], "complete": False,
            "probs_dir": str(self.probs_dir) if self.probs_dir else None})
        record.write()
        n_views = len(T.views(tta))
        self.log(f"predict: {len(self.models)} model(s), weights {', '.join(f'{x:.3g}' for x in self.w)}, "
                 f"tta={tta} ({n_views} views, up to {n_views * int(self.cfg['batch_size'])} images per "
                 f"forward), ensemble={self.cfg['ensemble']}, device {self.device}, precision "
                 f"{precision_name(amp_dtype(self.cfg['precision'], self.device))}, bn_adapt={self.bn_mode}, "
                 f"{len(todo)} patches to write")
        items = chain([first] if first is not None else [], batches)
        elapsed, written = self._write_all(items, todo, tta, record, t0)
        return self._finish(todo, written, elapsed, record)

    def _items(self, todo: pd.DataFrame) -> Iterator[dict[str, Any]]:
        """The loader's items; with bn_adapt=domain one domain after the other, each once `self.active`
        holds copies re-estimated on that domain's patches (batches are consumed one at a time, so no
        batch of one domain is predicted by another's copies)."""
        if self.bn_mode != "domain":
            yield from prediction_loader(todo, self.model_cfgs, self.cfg)[0]
            return
        for domain, rows in todo.groupby(todo["domain"].astype(str), sort=False):
            self.active = list(self.models)  # the previous domain's copies are freed first
            self.active = self._adapt(str(domain))
            yield from prediction_loader(rows, self.model_cfgs, self.cfg)[0]
        self.active = list(self.models)

    def _adapt(self, domain: str) -> list[nn.Module]:
        """Copies of the models re-estimated on the domain's rows of the whole index (capped), never only
        on the rows still to write: where a run was killed does not change the statistics."""
        t = time.perf_counter()
        rows = self.full_index[self.full_index["domain"].astype(str) == domain]
        sample = estimate_rows(rows, self.bn_cap)
        loader = prediction_loader(sample, self.model_cfgs, self.cfg)[0]
        inputs = (self._inputs(item) for item in loader if item["batches"] is not None)
        adapted = adapt_ensemble(self.models, inputs, precision=self.cfg["precision"],
                                 channels_last=bool(self.cfg["channels_last"]))
        self.log(f"predict: bn_adapt: domain {domain}: BatchNorm statistics re-estimated on {len(sample)} of "
                 f"its {len(rows)} patches ({time.perf_counter() - t:.1f} s)")
        return adapted

    def _inputs(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        """The batch each model is fed: its input setting's raw batch, copied to the device and normalised
        there in the autocast dtype (once per input setting, shared by the models that read it)."""
        dtype = amp_dtype(self.cfg["precision"], self.device)
        ready = [device_batch(b, c, self.device, dtype=dtype)
                 for b, c in zip(item["batches"], self.group_cfgs)]
        return [ready[g] for g in self.group_of]

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
        kw = dict(tta=tta, ensemble=self.cfg["ensemble"], precision=self.cfg["precision"],
                  channels_last=self.cfg["channels_last"], mix=self.mix)
        ok = False
        try:
            with progress(total=len(todo), desc="predict", unit="patch") as bar:
                bar.update(len(self.bad))
                for i, item in enumerate(items):
                    if i > 0:  # the first batch's unreadable patches are already counted
                        self.bad += item["bad"]
                        bar.update(len(item["bad"]))
                    if item["batches"] is not None:
                        self._predict_one(item, kw, writer)
                        bar.update(len(item["batches"][0]["id"]))
            writer.close()
            if self.bad:
                self.report["fallback"] = write_fallback(self.out_dir, self.bad, self.log)
            ok = True
        except BaseException:
            writer.abort()
            raise
        finally:
            elapsed = time.perf_counter() - t0
            self.report["n_written"] = len(writer.written)
            self.report["infer_s"] += elapsed
            self.report["n_timed"] += len(writer.written)
            record.write(infer_s=self.report["infer_s"], n_timed=self.report["n_timed"])
            if not ok:
                self.log(f"predict: stopped after {len(writer.written)} new files; re-run the same command "
                         "to resume")
        return elapsed, writer.written

    def _predict_one(self, item: dict[str, Any], kw: dict[str, Any], writer: Writer) -> None:
        batch = item["batches"]
        probs = predict_batch(self.active, self.w, self._inputs(item), **kw)
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
