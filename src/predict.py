"""Predict a split with one or many checkpoints: batched TTA, weighted ensembles, resumable PRED files.

    python -m src.predict --runs RUNS_DIR_OR_CKPTS... --split test --out PRED_DIR [--tta none|flip|d4]
        [--weights w1,w2,...] [--save-probs DIR] [--submit NAME [--baseline-time S]] [key=value ...]
    python -m src.predict --combine PROBS_DIR1 PROBS_DIR2 ... --out PRED_DIR [--weights ...] [--submit NAME]

Why it is built this way (formats: docs/data-format.md, "Predictions and probabilities"):
- Every model is rebuilt from its own checkpoint's settings (src.prediction.ensemble: the one engine of
  predict, oof, pseudo and infer); `key=value` overrides apply on top of every checkpoint's settings (use
  them for data_dir, batch_size, workers, tta...) and are checked before torch is imported.
- One loader feeds the whole ensemble: a patch is read once per distinct input setting, not once per
  model (src.data.loader). The batch maths (TTA views in one forward, weights, probs or logits) are in
  src.prediction.ensemble.
- PRED files are written in background threads through the atomic `src.scoring.submission.write_pred`, so a
  killed run never leaves a partial file. Re-running with the same --out writes only the missing ones;
  a `predict.json` manifest records which checkpoints/weights/TTA made them, and a different setup is
  refused (use --overwrite) rather than silently mixing two ensembles in one submission
  (src.prediction.stores).
- `bn_adapt=domain` re-estimates every model's BatchNorm statistics on each test domain's patches before
  predicting that domain (src.prediction.bn_adapt; `--bn-adapt-patches N` caps the patches per domain,
  default 256).
- The pass over the split (loader, writer, manifest, measured time) is src.prediction.passes.
- `--save-probs DIR` keeps the ensemble's softmax per patch as `PROB_<id>.npz` (src.prediction.stores) so
  separately predicted models can be combined later with `--combine` (src.prediction.passes) without
  re-running them.
- The time in the zip name (--submit with --baseline-time) is the measured inference time for the
  split; for --combine it adds up the times of the runs that saved the probabilities (from their
  probs.json) and the combination's own time.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from src.core.config import exit_on_config_error, load_settings, parse_overrides, split_overrides
from src.core.errors import (
    ConfigError,
    DataError,
    MachineLimitError,
    PredictError,
    exit_interrupted,
    exit_on_machine_limit,
    is_disk_full,
    one_line,
)
from src.core.settings import TTA_CHOICES


# ------------------------------------------------------------------------------------------ commands
def predict_runs(args: argparse.Namespace, weights: list[float] | None, overrides: dict[str, Any],
                 log: Callable[[str], None] = print) -> tuple[dict[str, Any], Any]:
    """Predict the split with the checkpoints of --runs or --recipe: (report, the split's index)."""
    from src.core.flair import PATCH_SIZE
    from src.core.tables import split_index
    from src.ensembling.recipe import load_recipe, recipe_checkpoints
    from src.prediction.ensemble import device_tta, load_ensemble, place_prediction
    from src.prediction.onnx_engine import use_engine
    from src.prediction.passes import Target, run_prediction
    from src.prediction.tta import views

    recipe = load_recipe(args.recipe) if args.recipe else {}  # its checkpoints, TTA, class weights, biases
    runs, mix = recipe_checkpoints(recipe) if recipe else (args.runs, None)
    place = place_prediction(args.device)
    found: dict[str, Any] = {}

    def index_of(first: Any) -> None:  # the split's rows, checked before any model is built
        found["index"] = split_index(first.data_dir, args.split, args.index)

    ens = load_ensemble([str(r) for r in runs], place.device, weights=weights, overrides=overrides, mix=mix,
                        on_first=index_of, log=log)
    tta = args.tta or recipe.get("tta")  # None: the settings' tta, or the time budget's choice
    views_each = len(views(device_tta(tta or ens.cfg.tta, ens.device)))
    ens = use_engine(ens, len(found["index"]) * views_each, PATCH_SIZE, "predict", log)
    target = Target(Path(args.out), Path(args.save_probs) if args.save_probs else None, args.overwrite)
    report = run_prediction(ens, found["index"], target, tta=tta, log=log)
    return report, found["index"]


def combine_folders(args: argparse.Namespace, weights: list[float] | None, overrides: dict[str, Any]
                    ) -> tuple[dict[str, Any], Any]:
    """--combine: the weighted average of saved probability folders: (report, the split's index or None)."""
    from src.core.tables import split_index
    from src.prediction.passes import combine

    cfg = load_settings(None, overrides)
    index_df = None
    if args.index or (Path(cfg.data_dir) / f"index_{args.split}.csv").is_file():
        index_df = split_index(cfg.data_dir, args.split, args.index)
    report = combine(args.combine, args.out, None if index_df is None else index_df["id"].tolist(), weights,
                     probs_dir=args.save_probs, overwrite=args.overwrite)
    return report, index_df


def submit_and_score(out_dir: Path, index_df: Any, name: str, infer_s: float | None,
                     baseline_s: float | None, submissions: str | Path = "submissions",
                     log: Callable[[str], None] = print) -> dict[str, Any]:
    """Zip the PRED folder into submissions/ (make_zip validates it against the split's ids first), then
    score the zip when the split has labels, writing what `make evaluate` writes (src.scoring.score's
    `score_and_write`) beside the folder: `<out>_scores.json`, `<out>_confusion.png` and the per-domain
    report `<out>_domains.csv/.png`. Times go in the zip name only when both are known (make_zip wants
    both or neither)."""
    from src.core.tables import has_labels
    from src.scoring.score import ScoreFiles, domains_prefix, score_and_write
    from src.scoring.submission import make_zip

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
        base = Path(out_dir)
        out["scores"] = str(base.with_name(base.name + "_scores.json"))
        out["confusion_png"] = str(base.with_name(base.name + "_confusion.png"))
        res = score_and_write(zip_path, index_df, ScoreFiles(out["scores"], out["confusion_png"]),
                              log=log)
        out["miou"] = res["miou"]
        if res["per_domain"]:
            out["domains"] = domains_prefix(out["scores"])
        miou = "n/a" if res["miou"] is None else f"{res['miou']:.4f}"
        log(f"predict: mIoU {miou} on {len(ids)} labelled patches; scores {out['scores']}, "
            f"confusion {out['confusion_png']}")
    return out


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m src.predict", description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--runs", nargs="+", help="run folders (every best.pt under them), checkpoint files")
    src.add_argument("--combine", nargs="+", help="folders of saved probabilities (--save-probs) to ensemble")
    src.add_argument("--recipe", help="ensemble recipe JSON of `make ensemble` (runs, TTA, class weights)")
    ap.add_argument("--split", default="test", help="index split to predict: DATA/index_<split>.csv")
    ap.add_argument("--index", help="explicit index CSV (default: data_dir/index_<split>.csv)")
    ap.add_argument("--out", required=True, help="folder for PRED_<id>.tif (re-running resumes)")
    ap.add_argument("--tta", choices=TTA_CHOICES,
                    help="none | flip (3 views) | d4 (8 views); default: cfg tta")
    ap.add_argument("--weights", help="comma-separated weights: one per --runs item, per checkpoint, "
                    "or per --combine folder")
    ap.add_argument("--save-probs", help="also save uint8 softmax per patch here (PROB_<id>.npz)")
    ap.add_argument("--submit", metavar="NAME", help="validate and zip into submissions/ (approach name)")
    ap.add_argument("--baseline-time", type=float, help="baseline inference seconds, for the zip name")
    ap.add_argument("--submit-dir", default="submissions", help="where --submit puts the zip")
    ap.add_argument("--overwrite", action="store_true", help="delete this split's PRED files in --out first")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1")
    ap.add_argument("--bn-adapt-patches", type=int, metavar="N", help="bn_adapt=domain: patches per domain "
                    "the BatchNorm statistics are re-estimated on (evenly spaced; 0: all; default 256)")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides (data_dir=..., batch_size=...)")
    return ap


def _run_command(args: argparse.Namespace, weights: list[float] | None) -> None:
    items = args.combine or args.runs or []
    items, rest = split_overrides([str(p) for p in items], args.overrides)  # nargs="+" swallows key=value
    overrides = parse_overrides(rest)  # unknown settings and bad values fail here, before torch loads
    if args.bn_adapt_patches is not None:
        overrides["bn_adapt_patches"] = args.bn_adapt_patches
    if args.combine:
        args.combine = items
        report, index_df = combine_folders(args, weights, overrides)
    else:
        args.runs = items or args.runs
        report, index_df = predict_runs(args, weights, overrides)
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
    except KeyboardInterrupt as stop:
        exit_interrupted("predict", str(stop) or "the PRED files written so far are kept",
                         "re-run the same command to write the missing ones")
    except ConfigError as err:
        exit_on_config_error(err)
    except (PredictError, DataError) as err:
        print(f"predict: error: {one_line(err)}", file=sys.stderr)
        raise SystemExit(1) from None
    except OSError as err:
        if not is_disk_full(err):
            exit_on_machine_limit("predict", err)
        print(f"predict: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except (MachineLimitError, MemoryError) as err:
        exit_on_machine_limit("predict", err)


if __name__ == "__main__":
    main()
