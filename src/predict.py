"""Predict a split with one or many checkpoints: batched TTA, weighted ensembles, resumable PRED files.

    python -m src.predict --runs RUNS_DIR_OR_CKPTS... --split test --out PRED_DIR [--tta none|flip|d4]
        [--weights w1,w2,...] [--save-probs DIR] [--submit NAME [--baseline-time S]] [key=value ...]
    python -m src.predict --combine PROBS_DIR1 PROBS_DIR2 ... --out PRED_DIR [--weights ...] [--submit NAME]

Why it is built this way (formats: docs/data-format.md, "Predictions and probabilities"):
- Every model is rebuilt from its own checkpoint config (`src.models.load_for_inference`); `key=value`
  overrides apply on top of every checkpoint's config (use them for data_dir, batch_size, workers, tta...).
- One loader feeds the whole ensemble: a patch is read once per distinct input setting, not once per
  model (src.multi_input). The batch maths (TTA views in one forward, weights, probs or logits) are in
  src.ensemble.
- PRED files are written in background threads through the atomic `src.submission.write_pred`, so a
  killed run never leaves a partial file. Re-running with the same --out writes only the missing ones;
  a `predict.json` manifest records which checkpoints/weights/TTA made them, and a different setup is
  refused (use --overwrite) rather than silently mixing two ensembles in one submission (src.predstore).
- `--save-probs DIR` keeps the ensemble's softmax per patch as `PROB_<id>.npz` (src.probstore) so
  separately predicted models can be combined later with `--combine` (src.combine) without re-running
  them.
- The time in the zip name (--submit with --baseline-time) is the measured inference time for the
  split; for --combine it adds up the times of the runs that saved the probabilities (from their
  probs.json) and the combination's own time.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from src import tta as T
from src.combine import combine
from src.config import exit_on_config_error, parse_overrides, resolve
from src.device_augment import device_batch
from src.ensemble import (
    Mix,
    choose_tta,
    model_device,
    normalise_weights,
    predict_batch,
    quantise,
    resolve_checkpoints,
)
from src.errors import ConfigError, DataError, PredictError, is_disk_full, one_line
from src.geometry import N_TEST_PATCHES
from src.multi_input import prediction_loader
from src.predstore import (
    RunRecord,
    Writer,
    prepare_out,
    scan_done,
    split_seconds,
    write_fallback,
)
from src.progress import fmt_duration as fmt_s
from src.progress import progress
from src.recipe import load_recipe, recipe_checkpoints
from src.runtime import amp_dtype, pick_device, precision_name, tune_cuda
from src.tables import has_labels, split_index
from src.workers import default_workers, loader_workers


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
    tta, time_budget_s, skip_bad). `tta` given explicitly wins over `cfg`; otherwise a positive
    time_budget_s picks the level. `identity` describes the setup for the resume check. A `mix` (blend
    recipe: per-class weights and biases, src.recipe) replaces `weights`.
    """
    out_dir = Path(out_dir)
    probs_dir = Path(probs_dir) if probs_dir else None
    w = normalise_weights(weights, len(models))
    identity = dict(identity or {"models": [type(m).__name__ for m in models]})
    identity.update(weights=[round(x, 6) for x in w], ensemble=cfg["ensemble"])
    if mix is not None:
        identity["mix"] = [[round(x, 6) for x in row] for row in (*mix.class_weights, mix.biases)]
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
    run.mix = mix
    return run.predict(todo, model_cfgs, identity, tta, budget, n_total or len(index_df))


class _Run:
    """One prediction pass over the missing patches: its loader, writer, manifest and measured time."""

    mix: Mix | None = None

    def __init__(self, models: Sequence[nn.Module], weights: list[float], cfg: dict[str, Any], out_dir: Path,
                 probs_dir: Path | None, report: dict[str, Any], log: Callable[[str], None]):
        self.models, self.w, self.cfg, self.log = models, weights, cfg, log
        self.out_dir, self.probs_dir, self.report = out_dir, probs_dir, report
        self.device = model_device(models[0])
        self.bad: list[tuple[str, str]] = []

    def predict(self, todo: pd.DataFrame, model_cfgs: Sequence[dict[str, Any]], identity: dict[str, Any],
                tta: str | None, budget: float, n_total: int) -> dict[str, Any]:
        loader, self.group_of = prediction_loader(todo, model_cfgs, self.cfg)
        self.group_cfgs = [model_cfgs[self.group_of.index(g)] for g in range(max(self.group_of) + 1)]
        t0 = time.perf_counter()  # the measured inference time: data loading, networks, writing
        batches = iter(loader)
        first = self._first_readable(batches)
        if tta is None:
            tta = "none"
            if first is not None:
                t_sel = time.perf_counter()
                tta = choose_tta(self.models, self.w, self._inputs(first), self.cfg, n_total, budget,
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
                 f"{precision_name(amp_dtype(self.cfg['precision'], self.device))}, {len(todo)} patches "
                 "to write")
        items = chain([first] if first is not None else [], batches)
        elapsed, written = self._write_all(items, todo, tta, record, t0)
        return self._finish(todo, written, elapsed, record)

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
        probs = predict_batch(self.models, self.w, self._inputs(item), **kw)
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


# ------------------------------------------------------------------------------------------ commands
def predict(runs: Sequence[str | Path], out_dir: str | Path, *, split: str = "test",
            weights: Sequence[float] | None = None, tta: str | None = None,
            overrides: dict[str, Any] | list[str] | None = None, probs_dir: str | Path | None = None,
            index: str | Path | None = None, overwrite: bool = False, device: str = "auto",
            mix: Mix | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Load the checkpoints under `runs`, predict the split's index into `out_dir`; report dict."""
    from src.checkpoint import load_checkpoint
    from src.models import load_for_inference

    ov = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    paths, w = resolve_checkpoints(runs, weights)
    dev = pick_device(device)
    # settings are checked (one-line errors) before any model is built
    first_cfg = resolve(ov, dict(load_checkpoint(paths[0])["config"]), "command line")
    check_settings({**first_cfg, **({"tta": tta} if tta else {})})
    index_df = split_index(first_cfg["data_dir"], split, index)
    models, cfgs = [], []
    for p in paths:
        model, mcfg = load_for_inference(p, dev)
        if first_cfg.get("channels_last"):  # faster on GPU, and on CPU too (oneDNN, ~1.3x measured)
            model = model.to(memory_format=torch.channels_last)
        models.append(model)
        cfgs.append(resolve(ov, mcfg, "command line"))
        log(f"predict: loaded {p} (arch {mcfg.get('arch')}, encoder {mcfg.get('encoder')}, "
            f"bands {','.join(map(str, mcfg.get('bands', [])))}, s2 {mcfg.get('use_s2')})")
    tune_cuda(dev)  # fixed 512x512 inputs: cuDNN picks its fastest kernels; TF32 for fp32 runs
    identity = {"models": [{"path": str(p.resolve()), "size": p.stat().st_size,
                            "mtime_ns": p.stat().st_mtime_ns} for p in paths]}
    report = run_prediction(models, cfgs, w, index_df, out_dir, first_cfg, tta=tta, probs_dir=probs_dir,
                            identity=identity, overwrite=overwrite, mix=mix, log=log)
    report["index_df"] = index_df
    return report


def submit_and_score(out_dir: Path, index_df: pd.DataFrame, name: str, infer_s: float | None,
                     baseline_s: float | None, submissions: str | Path = "submissions",
                     log: Callable[[str], None] = print) -> dict[str, Any]:
    """Zip the PRED folder into submissions/ (make_zip validates it against the split's ids first), then
    score the zip when the split has labels: mIoU printed, `<out>_scores.json` and `<out>_confusion.png`
    written beside the folder (the names `make evaluate` uses). Times go in the zip name only when both
    are known (make_zip wants both or neither)."""
    from src.metrics import format_table, ious_from_confusion
    from src.scoring import evaluate, save_confusion_png, save_json
    from src.submission import make_zip

    ids = index_df["id"].astype(str).tolist()
    if baseline_s is not None and infer_s is None:
        log(f"predict: warning: {out_dir} records no inference time: the zip is named without times")
        baseline_s = None
    try:
        zip_path = make_zip(out_dir, name, submissions, baseline_time=baseline_s,
                            your_time=infer_s if baseline_s is not None else None, ids=ids)
    except (ValueError, FileExistsError) as err:  # SubmissionError is a ValueError; so is a bad name
        raise PredictError(str(err)) from None
    log(f"predict: submission {zip_path} ({len(ids)} predictions, validated)")
    out: dict[str, Any] = {"zip": str(zip_path)}
    if has_labels(index_df):
        res = evaluate(zip_path, index_df)
        matrix = np.asarray(res["confusion"], dtype=np.int64)
        log(format_table(ious_from_confusion(matrix), support=matrix.sum(axis=1)))
        base = Path(out_dir)
        out["scores"] = str(base.with_name(base.name + "_scores.json"))
        out["confusion_png"] = str(base.with_name(base.name + "_confusion.png"))
        save_json(res, out["scores"])
        save_confusion_png(matrix, out["confusion_png"], title=f"{zip_path.name}: mIoU {res['miou']:.4f}")
        out["miou"] = res["miou"]
        log(f"predict: mIoU {res['miou']:.4f} on {len(ids)} labelled patches; "
            f"scores {out['scores']}, confusion {out['confusion_png']}")
    return out


def _split_runs_and_overrides(items: list[str], overrides: list[str]) -> tuple[list[str], list[str]]:
    """argparse's nargs='+' swallows key=value tokens placed after --runs/--combine: move them back."""
    keep = [x for x in items if not ("=" in x and not Path(x).exists())]
    return keep, overrides + [x for x in items if x not in keep]


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m src.predict", description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--runs", nargs="+", help="run folders (every best.pt under them), checkpoint files")
    src.add_argument("--combine", nargs="+", help="folders of saved probabilities (--save-probs) to ensemble")
    src.add_argument("--recipe", help="ensemble recipe JSON of `make ensemble` (runs, TTA, class weights)")
    ap.add_argument("--split", default="test", help="index split to predict: DATA/index_<split>.csv")
    ap.add_argument("--index", help="explicit index CSV (default: data_dir/index_<split>.csv)")
    ap.add_argument("--out", required=True, help="folder for PRED_<id>.tif (re-running resumes)")
    ap.add_argument("--tta", choices=T.LEVELS, help="none | flip (3 views) | d4 (8 views); default: cfg tta")
    ap.add_argument("--weights", help="comma-separated weights: one per --runs item, per checkpoint, "
                    "or per --combine folder")
    ap.add_argument("--save-probs", help="also save uint8 softmax per patch here (PROB_<id>.npz)")
    ap.add_argument("--submit", metavar="NAME", help="validate and zip into submissions/ (approach name)")
    ap.add_argument("--baseline-time", type=float, help="baseline inference seconds, for the zip name")
    ap.add_argument("--submit-dir", default="submissions", help="where --submit puts the zip")
    ap.add_argument("--overwrite", action="store_true", help="delete this split's PRED files in --out first")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides (data_dir=..., batch_size=...)")
    return ap


def _run_command(args: argparse.Namespace, weights: list[float] | None) -> None:
    if args.runs or args.recipe:  # a recipe (src.recipe): its checkpoints, TTA, class weights and biases
        recipe = load_recipe(args.recipe) if args.recipe else {}
        paths, mix = recipe_checkpoints(recipe) if recipe else (args.runs, None)
        runs, overrides = _split_runs_and_overrides([str(p) for p in paths], args.overrides)
        report = predict(runs, args.out, split=args.split, weights=weights, tta=args.tta or recipe.get("tta"),
                         overrides=overrides, probs_dir=args.save_probs, index=args.index,
                         overwrite=args.overwrite, device=args.device, mix=mix)
        index_df = report["index_df"]
    else:
        dirs, overrides = _split_runs_and_overrides(args.combine, args.overrides)
        cfg = resolve(parse_overrides(overrides))
        index_df = None
        if args.index or (Path(cfg["data_dir"]) / f"index_{args.split}.csv").is_file():
            index_df = split_index(cfg["data_dir"], args.split, args.index)
        report = combine(dirs, args.out, None if index_df is None else index_df["id"].tolist(), weights,
                         probs_dir=args.save_probs, overwrite=args.overwrite)
    if args.submit:
        if index_df is None:
            raise PredictError("--submit needs the split's index (data_dir=... or --index)")
        submit_and_score(Path(args.out), index_df, args.submit, report.get("time_s"), args.baseline_time,
                         args.submit_dir)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        weights = [float(x) for x in args.weights.split(",")] if args.weights else None
    except ValueError:
        print(f"predict: error: --weights must be numbers separated by commas, got {args.weights!r}",
              file=sys.stderr)
        raise SystemExit(2) from None
    try:
        _run_command(args, weights)
    except ConfigError as err:
        exit_on_config_error(err)
    except (PredictError, DataError) as err:
        print(f"predict: error: {one_line(err)}", file=sys.stderr)
        raise SystemExit(1) from None
    except OSError as err:
        if not is_disk_full(err):
            raise
        print(f"predict: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
