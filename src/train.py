"""Train one fold: `python -m src.train --config C --fold K|all --resume 0|1 key=value ...`.

One loop, top to bottom (nanoGPT / timm train.py spirit). Trains on every fold but K and validates on
K with the official metric (one dataset-level confusion matrix, summed across DDP ranks); `--fold all`
trains on every training domain and saves each epoch's weights as best.pt too.

Why it is shaped this way:
- Exact resume: checkpoints are written at epoch ends, and everything random in an epoch (data order,
  augmentation, dropout) is re-seeded from (seed, epoch, rank), so re-running an epoch after a kill
  replays it bit for bit on CPU. The RNG states are saved too, for anything outside an epoch.
- Nothing is lost: checkpoints are replaced atomically (best.pt before last.pt, so a resumed run never
  forgets its best model); a non-finite loss skips the step, and too many in a row stop the run with
  the last good checkpoint untouched (src.training.loop).
- Errors in settings or data surface as one line before any model is built.
- Multi-GPU / multi-node: run under torchrun; batch_size is per process, logging and checkpoints
  are rank 0's, the validation matrix is all-reduced (src.core.runtime).

The pieces live below it: src.training.data (datasets, loaders, the epoch's sampler), src.training.state (model,
EMA, optimizer, progress; the checkpoint dict and resume), src.training.state (lr), src.training.loop (skipped
steps), src.training.validation (the validation pass), src.training.records (run folder, metrics.csv, curves.png).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch.utils.data import DataLoader

from src.core.checkpoint import load_checkpoint, save_checkpoint
from src.core.config import DEFAULTS, exit_on_config_error, load_config, parse_overrides, resolve, save_config
from src.core.errors import CheckpointError, ConfigError, DataError, TrainingDiverged
from src.core.progress import progress
from src.core.runtime import (
    PRECISIONS,
    all_sum,
    amp_dtype,
    any_rank,
    autocast,
    barrier,
    cleanup,
    precision_name,
    seed_everything,
    setup_distributed,
    tune_cuda,
)
from src.core.tables import fold_rows
from src.core.workers import loader_workers
from src.data.pseudo_labels import add_pseudo_rows
from src.ensembling.oof import write_fold_oof
from src.models.losses import Criterion, from_data
from src.models.weights import apply_init_from
from src.scoring.domains import format_lines, write_run_domains
from src.scoring.metrics import IOU_COLS, format_table
from src.training.data import (
    Data,
    as_setting_error,
    build_data,
    check_knobs,
    epoch_loader,
    missing_files,
    resolve_knobs,
)
from src.training.loop import NonFiniteGuard
from src.training.records import Tracker, run_dir_of, set_aside_previous_run, write_metrics
from src.training.records import check_settings as check_tracking
from src.training.state import (
    Nets,
    Progress,
    Schedule,
    average_epoch,
    build_nets,
    checkpoint_state,
    resume,
    save_average,
    set_lr,
    wrap,
)
from src.training.validation import to_device, validate


# ----------------------------------------------------------------------------- settings checks (cheap)
def check_settings(cfg: dict) -> None:
    """Values the config types cannot catch; raise ConfigError before anything heavy."""
    if cfg["precision"] not in PRECISIONS:
        raise ConfigError(f"precision: expected one of {', '.join(PRECISIONS)}, got {cfg['precision']!r}")
    if cfg["epochs"] < 1 or cfg["batch_size"] < 1 or cfg["accum_steps"] < 1:
        raise ConfigError("epochs, batch_size and accum_steps must be >= 1")
    if cfg["lr"] <= 0 or not 0 <= cfg["min_lr_ratio"] <= 1 or not 0 <= cfg["ema"] < 1:
        raise ConfigError("need lr > 0, 0 <= min_lr_ratio <= 1 and 0 <= ema < 1")
    loader_workers(cfg["workers"])  # a number >= 0 or auto
    if cfg["max_nan_steps"] < 0 or cfg["val_every"] < 1:
        raise ConfigError("need max_nan_steps >= 0 and val_every >= 1")
    # S2 feeds only the fusion branch and/or the early channels: either side alone trains dead weights or
    # reads S2 for nothing (use_s2=false switches the early channels off: src.models.s2_features.early_mode)
    early = cfg.get("s2_early", "none")
    if cfg["fusion"] != "none" and not cfg["use_s2"]:
        raise ConfigError(f"fusion={cfg['fusion']} needs use_s2=true")
    if cfg["use_s2"] and cfg["fusion"] == "none" and early == "none":
        raise ConfigError("use_s2=true does nothing with fusion=none: set fusion=utt or use_s2=false "
                          "(or s2_early=ndvi|bands)")
    check_knobs(cfg)  # encoder_lr_ratio, avg_last
    # loss, class_weights, label_smoothing; inverse|inverse_sqrt are numbers only once resolve_knobs has read
    # the training masks (and checks them then): here the word alone is valid
    Criterion({**cfg, "class_weights": "none"} if from_data(cfg["class_weights"]) else cfg)
    check_tracking(cfg)  # tb_images, loggers, a missing tensorboard package


def better(new: float, best: float) -> bool:
    """Is a validation mIoU an improvement? (the first finite value always is; NaN never beats a number)"""
    return not math.isnan(new) and (math.isnan(best) or new > best)


# ----------------------------------------------------------------------------- one epoch
def optimizer_step(cfg: dict, nets: Nets, lr: float, guard: NonFiniteGuard, epoch: int, batch: int) -> None:
    """Clip and step (or skip a non-finite gradient), then update the EMA."""
    set_lr(nets.optimizer, lr)
    nets.scaler.unscale_(nets.optimizer)
    clip = cfg["grad_clip"] if cfg["grad_clip"] > 0 else math.inf
    gnorm = torch.nn.utils.clip_grad_norm_(nets.model.parameters(), clip)
    if not nets.scaler.is_enabled() and not torch.isfinite(gnorm):  # (fp16: the scaler skips those itself)
        guard.skip("gradient", epoch + 1, batch)
        return
    nets.scaler.step(nets.optimizer)
    nets.scaler.update()
    nets.optimizer.zero_grad(set_to_none=True)
    guard.ok()
    if nets.ema is not None:
        nets.ema.update(nets.model)


def train_epoch(cfg: dict, epoch: int, loader: DataLoader, n_batches: int, nets: Nets, sched: Schedule,
                run: Progress, guard: NonFiniteGuard, device: torch.device, dtype: torch.dtype | None,
                world: int, main_proc: bool, tracker: Tracker) -> tuple[torch.Tensor, float]:
    """One pass over the training loader: ([loss * n, s2 loss * n, n] summed over ranks, seconds)."""
    nets.train_model.train()
    nets.optimizer.zero_grad(set_to_none=True)
    guard.new_epoch()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss * n, s2 loss * n, n
    micro, t0, accum = 0, time.time(), cfg["accum_steps"]
    bar = progress(total=n_batches, desc=f"epoch {epoch + 1}/{cfg['epochs']}", unit="batch",
                   disable=not main_proc, leave=False, file=sys.stderr)
    try:  # the bar is closed even when a data error ends the epoch, so its message stands alone
        for i, batch in enumerate(loader):
            if i >= n_batches:
                break
            image, extra, mask, s2_valid = to_device(batch, cfg, device, dtype, cfg["channels_last"],
                                                     augment=True)
            weight = extra.pop("weight", None)  # per-sample loss weights: pseudo-labels (src.data.pseudo_labels)
            guard.snapshot()
            with autocast(device, dtype):
                out = nets.train_model(image, **extra)
            loss, parts = nets.criterion(out, mask, s2_valid=s2_valid, weight=weight)
            # a non-finite loss on any rank skips the step everywhere (ranks must stay in lockstep)
            if any_rank(not bool(torch.isfinite(loss)), device):
                guard.skip("loss", epoch + 1, i)
                micro = 0
                bar.update(1)
                continue
            last_micro = micro + 1 == accum or i + 1 == n_batches
            sync = contextlib.nullcontext() if nets.ddp is None or last_micro else nets.ddp.no_sync()
            with sync:
                nets.scaler.scale(loss / accum).backward()
            micro += 1
            n = len(mask)
            s2_loss, step_loss = float(torch.as_tensor(parts.get("s2", 0.0)).detach()), float(loss.detach())
            sums += torch.tensor([step_loss * n, s2_loss * n, n], dtype=torch.float64,
                                 device=device)
            if last_micro:
                micro = 0
                optimizer_step(cfg, nets, sched.lr(run.step), guard, epoch, i)
                run.step += 1
            bar.update(1)
            if main_proc and (i % max(1, cfg["log_every"]) == 0 or i + 1 == n_batches):
                seen, lr = float(sums[2]), nets.optimizer.param_groups[0]["lr"]
                img_s = seen * world / (time.time() - t0)
                bar.set_postfix(loss=f"{float(sums[0]) / max(seen, 1):.4f}", img_s=f"{img_s:.1f}",
                                lr=f"{lr:.2e}")
                tracker.step(run.step, loss=step_loss, lr=lr, img_s=img_s)
    finally:
        bar.close()
    all_sum(sums)
    return sums, time.time() - t0


def epoch_row(epoch: int, run: Progress, nets: Nets, sums: torch.Tensor, epoch_s: float, nan_steps: int,
              s2_head: bool) -> dict[str, Any]:
    """The epoch's history row (metrics.csv columns); the validation columns stay NaN until validated."""
    return {"epoch": epoch + 1, "step": run.step, "lr": nets.optimizer.param_groups[0]["lr"],
            "train_loss": float(sums[0] / sums[2].clamp_min(1)),
            "train_s2_loss": float(sums[1] / sums[2].clamp_min(1)) if s2_head else math.nan,
            "val_loss": math.nan, "miou": math.nan, **{c: math.nan for c in IOU_COLS},
            "img_s": float(sums[2]) / epoch_s, "epoch_s": epoch_s, "nan_steps": nan_steps,
            "val_skipped": math.nan}


def record_validation(row: dict[str, Any], res: dict[str, Any], data: Data, bad_log: Path | None,
                      log: Callable[[str], None], domains_dir: Path | None) -> None:
    """Validation results into the history row (the confusion matrix is kept in the checkpoint's history,
    not the CSV) and the log: the per-class table, each domain's mIoU and weakest class, unreadable patches
    left out; rank 0 (`domains_dir`) also writes the run's domains.csv / domains.png."""
    row.update(val_loss=res["loss"], miou=res["miou"], **dict(zip(IOU_COLS, res["ious"].tolist())),
               confusion=res["confusion"].tolist(), val_skipped=res["skipped"])
    log(format_table(res["ious"], support=res["confusion"].sum(1)))
    if domains_dir is not None:
        rows = write_run_domains(domains_dir, row["epoch"], res["per_domain"], data.domains, data.domain_of)
        for line in format_lines(rows[:-1]):  # (the last row is the whole fold: the table above)
            log(line)
    if res["skipped"]:
        log(f"validation: {res['skipped']} unreadable patches skipped (listed in {bad_log})")


def save_epoch(cfg: dict, fold: str, run_dir: Path, nets: Nets, run: Progress, sched: Schedule,
               improved: bool, bad_log: Path | None, log: Callable[[str], None], plot: bool = True) -> None:
    """Rank 0's outputs at an epoch end: best.pt (when improved), last.pt, metrics.csv, curves.png (redrawn
    when `plot`: epochs that add a validation point, src.training.records.write_metrics) and avg.pt after the last
    epoch with avg_last."""
    averaged = average_epoch(cfg, nets, run)  # avg_last: the epoch's weights into last.pt's sum
    state = checkpoint_state(cfg, fold, nets, run, sched)
    if averaged:  # avg.pt before last.pt: a resume from the final last.pt has no epoch left to write it
        save_average(cfg, run_dir, nets, state, log)
    if improved:  # best first: a kill between the two writes must not lose the best model
        save_checkpoint(run_dir / "best.pt", state)
    save_checkpoint(run_dir / "last.pt", state)
    write_metrics(run.history, run_dir, plot=plot)
    if bad_log is not None and bad_log.exists():
        ids = {line.split("\t", 1)[0] for line in bad_log.read_text().splitlines() if line}
        log(f"skip_bad: {len(ids)} unreadable patches skipped so far, listed in {bad_log}")


# ----------------------------------------------------------------------------- the loop
def setup(cfg: dict) -> tuple[int, int, torch.device, torch.dtype | None]:
    """(rank, world size, device, autocast dtype): processes, determinism and the initial seed."""
    rank, world, device = setup_distributed()
    # determinism: CPU kernels are deterministic; on GPU it is opt-in (slower)
    if device.type == "cpu" or cfg["deterministic"]:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    tune_cuda(device, cfg["deterministic"])
    seed_everything(cfg["seed"])  # model init is identical on every rank
    return rank, world, device, amp_dtype(cfg["precision"], device)


def train(cfg: dict, fold: str, train_df: pd.DataFrame, val_df: pd.DataFrame | None,
          resume_state: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train one fold; returns {"best_miou", "last_miou", "run_dir", "history"}."""
    from src.models.flair_model import build_model  # (imported here: the settings checks stay fast)

    rank, world, device, dtype = setup(cfg)
    main_proc = rank == 0
    log: Callable[[str], None] = print if main_proc else (lambda *a, **k: None)
    run_dir = run_dir_of(cfg, fold)

    # data: the training order is a function of (seed, epoch) through the sampler
    bad_log = run_dir / "skipped.tsv" if cfg["skip_bad"] else None  # id <tab> error, one line per skip
    data = build_data(cfg, train_df, val_df, rank, world, bad_log)
    sched = Schedule.of(cfg, data.n_batches)

    # model, EMA, loss, optimizer; the run folder
    with as_setting_error():
        model = build_model(cfg).to(device)
    if resume_state is None:  # init_from warm start; prints what weights files loaded (src.models.weights)
        apply_init_from(model, cfg, fold, log)
    if main_proc:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_state is None:
            set_aside_previous_run(run_dir, log)
        save_config(cfg, run_dir / "config.yaml")
    nets = build_nets(cfg, model, device)
    run = Progress() if resume_state is None else resume(nets, resume_state)
    if resume_state is not None:
        log(f"resumed from {run_dir / 'last.pt'}: epoch {run.epoch} done, step {run.step}, "
            f"best mIoU {run.best_miou:.4f}")
    guard = NonFiniteGuard(nets.model, nets.optimizer, cfg["max_nan_steps"], run_dir / "last.pt", log)
    n_params = sum(p.numel() for p in nets.model.parameters())
    log(f"{cfg['arch']}/{cfg['encoder']} fusion={cfg['fusion']} ({n_params / 1e6:.1f} M params) on {device}"
        f" x{world}, precision {precision_name(dtype)}; train {len(data.train_ds)} patches"
        + (f", validate on fold {fold}: {len(val_df)} patches, {len(data.domains)} domains"
           if val_df is not None else " (all folds, no validation)")
        + f"; {data.n_batches} batches x {cfg['batch_size']} per process per epoch, "
          f"{sched.total_steps} optimizer steps")
    wrap(nets, cfg, world, device)
    tracker = Tracker.open(run_dir, cfg, enabled=main_proc, device=device,
                           resume_step=None if resume_state is None else run.step)

    for epoch in range(run.epoch, cfg["epochs"]):
        loader = epoch_loader(cfg, data, epoch, rank)
        sums, epoch_s = train_epoch(cfg, epoch, loader, data.n_batches, nets, sched, run, guard, device,
                                    dtype, world, main_proc, tracker)
        row = epoch_row(epoch, run, nets, sums, epoch_s, guard.epoch, s2_head=cfg["fusion"] != "none")
        validating = data.val_loader is not None and (
            (epoch + 1) % cfg["val_every"] == 0 or epoch + 1 == cfg["epochs"])
        if validating:
            res = validate(nets.eval_model, data.val_loader, nets.criterion, device, dtype,
                           cfg["channels_last"], data.domain_of, len(data.domains), cfg["max_val_batches"],
                           cfg=cfg, samples=cfg["tb_images"] if main_proc else 0, show=main_proc)
            record_validation(row, res, data, bad_log, log, run_dir if main_proc else None)
        # fold "all" has no validation: every epoch's weights are the "best" ones
        improved = data.val_loader is None or (validating and better(row["miou"], run.best_miou))
        if validating and improved:
            run.best_miou = row["miou"]
        run.epoch, run.nan_steps = epoch + 1, run.nan_steps + guard.epoch
        run.history.append(row)
        log(f"epoch {epoch + 1}/{cfg['epochs']}: train loss {row['train_loss']:.4f}"
            + (f", val loss {row['val_loss']:.4f}, mIoU {row['miou']:.4f} (best {run.best_miou:.4f})"
               if validating else "")
            + f", {row['img_s']:.1f} img/s, {epoch_s:.0f} s"
            + (f", {guard.epoch} steps skipped" if guard.epoch else ""))
        if main_proc:
            save_epoch(cfg, fold, run_dir, nets, run, sched, improved, bad_log, log,
                       plot=validating or data.val_loader is None)
        tracker.epoch(row, data.domains, res["per_domain"] if validating else None,
                      res["samples"] if validating else None)
        barrier()
    tracker.close()
    write_fold_oof(cfg, fold, val_df, nets.eval_model, run_dir, rank, world, device, log)  # for src.blend

    last = run.history[-1]["miou"] if run.history else math.nan
    if data.val_loader is None:
        log(f"done: trained on all folds (no validation); weights in {run_dir}")
    else:
        log(f"done: best mIoU {run.best_miou:.4f}, last {last:.4f}; outputs in {run_dir}")
    return {"best_miou": run.best_miou, "last_miou": last, "run_dir": run_dir, "history": run.history}


# ----------------------------------------------------------------------------- CLI
def prepare(args: argparse.Namespace) -> tuple[dict, str, pd.DataFrame, pd.DataFrame | None, dict | None]:
    """Everything that can fail on settings or files, before any model is built."""
    cfg = load_config(args.config, args.overrides)
    fold = str(args.fold)
    if fold != "all" and not fold.isdigit():
        raise ConfigError(f"--fold: expected a fold number or 'all', got {fold!r}")
    state = None
    if args.resume:
        last = run_dir_of(cfg, fold) / "last.pt"
        if not last.is_file():
            raise ConfigError(f"nothing to resume: {last} not found (start with --resume 0)")
        state = load_checkpoint(last, map_location="cpu")
        saved = {**DEFAULTS, **state["config"]}
        # the run continues with the settings it started with; command-line overrides still apply
        overrides = parse_overrides(args.overrides)
        changed = sorted(k for k in cfg if k not in overrides and cfg[k] != saved.get(k))
        cfg = resolve(overrides, saved, "command line")
        if changed:
            print(f"note: resuming with the settings saved in {last}; {args.config} differs on "
                  f"{', '.join(changed)} (pass key=value to change a setting)")
    check_settings(cfg)  # cheap: before any data is read
    train_df, val_df = fold_rows(cfg["data_dir"], fold)
    # class_weights=inverse|inverse_sqrt -> 13 numbers from the training masks, before config.yaml is written
    cfg = resolve_knobs(cfg, train_df)
    train_df = add_pseudo_rows(cfg, fold, train_df, val_df)  # pseudo_dir: test patches, training rows only
    missing = missing_files(pd.concat([train_df, val_df]) if val_df is not None else train_df, cfg["use_s2"])
    if missing:
        index_path = Path(cfg["data_dir"]) / "index_train.csv"
        msg = f"{len(missing)} files listed in {index_path} are missing (e.g. {missing[0]})"
        if not cfg["skip_bad"]:
            raise DataError(msg + " (re-run `make index`, or skip_bad=1 to skip those patches)")
        print(f"warning: {msg}; skip_bad=1: those patches will be skipped")
    return cfg, fold, train_df, val_df, state


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=None, help="YAML settings (configs/*.yaml)")
    parser.add_argument("--fold", default="0", help="validation fold (trains on the others) or 'all'")
    parser.add_argument("--resume", type=int, choices=[0, 1], default=0, help="1: continue from last.pt")
    parser.add_argument("overrides", nargs="*", help="key=value settings overriding the config")
    args = parser.parse_args(argv)
    try:
        cfg, fold, train_df, val_df, state = prepare(args)
    except ConfigError as err:
        exit_on_config_error(err)
    except (DataError, CheckpointError) as err:
        print(f"data error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        return train(cfg, fold, train_df, val_df, state)
    except ConfigError as err:
        exit_on_config_error(err)
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(3) from None
    except DataError as err:
        print(f"data error: {err} (skip_bad=1 skips unreadable samples)", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        cleanup()


if __name__ == "__main__":
    main()
