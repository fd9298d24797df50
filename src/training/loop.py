"""The training loop of one fold, top to bottom (nanoGPT / timm train.py spirit); `python -m src.train` parses
the settings and calls `train`.

It trains on every fold but K and validates on K with the official metric (one dataset-level confusion
matrix, summed across DDP ranks); fold "all" trains on every training domain and saves each epoch's
weights as best.pt too. Why it is shaped this way:
- Exact resume: checkpoints are written at epoch ends, and everything random in an epoch (data order,
  augmentation, dropout) is re-seeded from (seed, epoch, rank), so re-running an epoch after a kill
  replays it bit for bit on CPU. The RNG states are saved too, for anything outside an epoch.
- Nothing is lost: checkpoints are replaced atomically (best.pt before last.pt, so a resumed run never
  forgets its best model); a non-finite loss skips the step without poisoning the weights, the optimizer
  moments or the BatchNorm statistics (`NonFiniteGuard`), and too many in a row stop the run with
  TrainingDiverged, the last good checkpoint untouched.
- Multi-GPU / multi-node: run under torchrun; batch_size is per process, logging and checkpoints are rank
  0's, the validation matrix is all-reduced (src.core.runtime).
The pieces: src.training.data (datasets, loaders, the epoch's sampler), src.training.state (model, EMA,
optimizer, schedule, progress; the checkpoint dict and resume), src.training.validation (the validation
pass), src.training.records (run folder, metrics.csv, curves.png, TensorBoard).
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch.utils.data import DataLoader

from src.core.checkpoint import save_checkpoint
from src.core.config import save_settings
from src.core.errors import TrainingDiverged
from src.core.progress import count, progress
from src.core.runtime import (
    Placement,
    all_sum,
    amp_dtype,
    any_rank,
    autocast,
    barrier,
    precision_name,
    seed_everything,
    setup_distributed,
    tune_cuda,
)
from src.core.settings import Settings
from src.models.batchnorm import Estimate, batchnorm_layers, has_batchnorm
from src.models.flair_model import build_model
from src.models.weights import apply_init_from
from src.scoring.domains import format_lines, write_run_domains
from src.scoring.metrics import IOU_COLS, format_table
from src.training.data import Data, as_setting_error, build_data, epoch_loader
from src.training.records import Tracker, mark_latest, set_aside_previous_run, write_metrics
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


@dataclass
class Loop:
    """One training run as the loop steps it: its settings, where it runs, what it reads and steps, how far
    it is, and where it writes."""

    cfg: Settings
    fold: str
    place: Placement
    dtype: torch.dtype | None         # autocast dtype (None: fp32)
    data: Data
    nets: Nets
    sched: Schedule
    run: Progress
    guard: NonFiniteGuard
    tracker: Tracker
    run_dir: Path
    bad_log: Path | None              # skip_bad: id <tab> error, one line per skipped patch
    log: Callable[[str], None]


def better(new: float, best: float) -> bool:
    """Is a validation mIoU an improvement? (the first finite value always is; NaN never beats a number)"""
    return not math.isnan(new) and (math.isnan(best) or new > best)


# ----------------------------------------------------------------------------- one epoch
def optimizer_step(loop: Loop, epoch: int, batch: int) -> None:
    """Clip and step (or skip a non-finite gradient), then update the EMA."""
    nets, cfg = loop.nets, loop.cfg
    set_lr(nets.optimizer, loop.sched.lr(loop.run.step))
    nets.scaler.unscale_(nets.optimizer)
    clip = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    gnorm = torch.nn.utils.clip_grad_norm_(nets.model.parameters(), clip)
    if not nets.scaler.is_enabled() and not torch.isfinite(gnorm):  # (fp16: the scaler skips those itself)
        loop.guard.skip("gradient", epoch + 1, batch)
        return
    nets.scaler.step(nets.optimizer)
    nets.scaler.update()
    nets.optimizer.zero_grad(set_to_none=True)
    loop.guard.ok()
    if nets.ema is not None:
        nets.ema.update(nets.model)


def train_step(loop: Loop, batch: dict[str, Any], last: bool) -> tuple[torch.Tensor, float, int] | None:
    """Forward and backward of one batch: (loss, s2 loss, patches), or None when the loss is not finite on
    some rank (the step is skipped everywhere: ranks must stay in lockstep). `last`: its gradients are
    reduced now (the last micro-batch of an optimizer step)."""
    nets, device = loop.nets, loop.place.device
    image, extra, mask, s2_valid = to_device(batch, loop.cfg, device, loop.dtype, loop.cfg.channels_last,
                                             augment=True)
    weight = extra.pop("weight", None)  # per-sample loss weights: pseudo-labels (src.data.pseudo_labels)
    loop.guard.snapshot()
    with autocast(device, loop.dtype):
        out = nets.train_model(image, **extra)
    loss, parts = nets.criterion(out, mask, s2_valid=s2_valid, weight=weight)
    if any_rank(not bool(torch.isfinite(loss)), device):
        return None
    sync = contextlib.nullcontext() if nets.ddp is None or last else nets.ddp.no_sync()
    with sync:
        nets.scaler.scale(loss / loop.cfg.accum_steps).backward()
    return loss, float(torch.as_tensor(parts.get("s2", 0.0)).detach()), len(mask)


def train_epoch(loop: Loop, epoch: int, loader: DataLoader) -> tuple[torch.Tensor, float]:
    """One pass over the training loader: ([loss * n, s2 loss * n, n] summed over ranks, seconds)."""
    cfg, nets, n_batches = loop.cfg, loop.nets, loop.data.n_batches
    nets.train_model.train()
    nets.optimizer.zero_grad(set_to_none=True)
    loop.guard.new_epoch()
    sums = torch.zeros(3, dtype=torch.float64, device=loop.place.device)  # loss * n, s2 loss * n, n
    micro, t0 = 0, time.time()
    bar = progress(total=n_batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                   disable=not loop.place.main, leave=False, file=sys.stderr)
    try:  # the bar is closed even when a data error ends the epoch, so its message stands alone
        for i, batch in enumerate(loader):
            if i >= n_batches:
                break
            last_micro = micro + 1 == cfg.accum_steps or i + 1 == n_batches
            done = train_step(loop, batch, last_micro)
            bar.update(1)
            if done is None:
                loop.guard.skip("loss", epoch + 1, i)
                micro = 0
                continue
            micro += 1
            n, step_loss = done[2], float(done[0].detach())
            sums += torch.tensor([step_loss * n, done[1] * n, n], dtype=torch.float64,
                                 device=loop.place.device)
            if last_micro:
                micro = 0
                optimizer_step(loop, epoch, i)
                loop.run.step += 1
            if loop.place.main and (i % max(1, cfg.log_every) == 0 or i + 1 == n_batches):
                log_step(loop, bar, sums, step_loss, time.time() - t0)
    finally:
        bar.close()
    all_sum(sums)
    return sums, time.time() - t0


def log_step(loop: Loop, bar: Any, sums: torch.Tensor, step_loss: float, seconds: float) -> None:
    """The bar's running loss, images/s and lr; the step's scalars to the tracker."""
    seen, lr = float(sums[2]), loop.nets.optimizer.param_groups[0]["lr"]
    img_s = seen * loop.place.world / seconds
    bar.set_postfix(loss=f"{float(sums[0]) / max(seen, 1):.4f}", img_s=f"{img_s:.1f}", lr=f"{lr:.2e}")
    loop.tracker.step(loop.run.step, loss=step_loss, lr=lr, img_s=img_s)


def epoch_row(loop: Loop, epoch: int, sums: torch.Tensor, epoch_s: float) -> dict[str, Any]:
    """The epoch's history row (metrics.csv columns); the validation columns stay NaN until validated."""
    return {"epoch": epoch + 1, "step": loop.run.step, "lr": loop.nets.optimizer.param_groups[0]["lr"],
            "train_loss": float(sums[0] / sums[2].clamp_min(1)),
            "train_s2_loss": float(sums[1] / sums[2].clamp_min(1)) if loop.cfg.fusion != "none" else math.nan,
            "val_loss": math.nan, "miou": math.nan, **{c: math.nan for c in IOU_COLS},
            "img_s": float(sums[2]) / epoch_s, "epoch_s": epoch_s, "nan_steps": loop.guard.epoch,
            "val_skipped": math.nan}


def record_validation(loop: Loop, row: dict[str, Any], res: dict[str, Any]) -> None:
    """Validation results into the history row (the confusion matrix is kept in the checkpoint's history,
    not the CSV) and the log: the per-class table, each domain's mIoU and weakest class, unreadable patches
    left out; rank 0 also writes the run's domains.csv / domains.png."""
    row.update(val_loss=res["loss"], miou=res["miou"], **dict(zip(IOU_COLS, res["ious"].tolist())),
               confusion=res["confusion"].tolist(), val_skipped=res["skipped"])
    loop.log(format_table(res["ious"], support=res["confusion"].sum(1)))
    if loop.place.main:
        domains = loop.data.domains
        rows = write_run_domains(loop.run_dir, row["epoch"], res["per_domain"], domains.names, domains.index)
        for line in format_lines(rows[:-1]):  # (the last row is the whole fold: the table above)
            loop.log(line)
    if res["skipped"]:
        loop.log(f"validation: {res['skipped']} unreadable patches skipped (listed in {loop.bad_log})")


def save_epoch(loop: Loop, improved: bool, plot: bool = True) -> None:
    """Rank 0's outputs at an epoch end: best.pt (when improved), last.pt, metrics.csv, curves.png (redrawn
    when `plot`: epochs that add a validation point, src.training.records.write_metrics) and avg.pt after
    the last epoch with avg_last."""
    cfg, nets, run = loop.cfg, loop.nets, loop.run
    averaged = average_epoch(cfg, nets, run)  # avg_last: the epoch's weights into last.pt's sum
    state = checkpoint_state(cfg, loop.fold, nets, run, loop.sched)
    if averaged:  # avg.pt before last.pt: a resume from the final last.pt has no epoch left to write it
        save_average(cfg, loop.run_dir, nets, state, loop.log)
    if improved:  # best first: a kill between the two writes must not lose the best model
        save_checkpoint(loop.run_dir / "best.pt", state)
    save_checkpoint(loop.run_dir / "last.pt", state)
    write_metrics(run.history, loop.run_dir, plot=plot)
    if loop.bad_log is not None and loop.bad_log.exists():
        ids = {line.split("\t", 1)[0] for line in loop.bad_log.read_text().splitlines() if line}
        loop.log(f"skip_bad: {len(ids)} unreadable patches skipped so far, listed in {loop.bad_log}")


@torch.no_grad()
def recalibrate(loop: Loop, epoch: int) -> None:
    """The weights about to be validated and saved get BatchNorm statistics re-estimated on the first
    `bn_recalibrate` training batches of this epoch (the same order: a function of (seed, epoch)): running
    statistics lag weights that change fast, and eval-mode outputs can then be far off (src.models.batchnorm).
    Averaged over the DDP ranks. The training model's own statistics are not used by training steps."""
    cfg, model = loop.cfg, loop.nets.eval_model
    if not cfg.bn_recalibrate or not has_batchnorm(model):
        return
    loader = epoch_loader(cfg, loop.data, epoch, loop.place.rank)
    n = min(cfg.bn_recalibrate, loop.data.n_batches)
    with Estimate(model) as est:
        for i, batch in enumerate(loader):
            if i >= n:
                break
            image, extra, _, _ = to_device(batch, cfg, loop.place.device, loop.dtype, cfg.channels_last,
                                           augment=True)
            extra.pop("weight", None)
            with autocast(loop.place.device, loop.dtype):
                est.feed(model, image, **extra)
    if est.left_out:
        left = count(est.left_out, "batch", "batches")
        loop.log(f"BatchNorm re-estimation: {left} of {n} left out (non-finite statistics)")
    for bn in batchnorm_layers(model):
        for stat in (bn.running_mean, bn.running_var):
            stat.copy_(all_sum(stat.clone()) / loop.place.world)


def run_epoch(loop: Loop, epoch: int) -> None:
    """Train one epoch, validate when due, record and save."""
    cfg, data, run = loop.cfg, loop.data, loop.run
    sums, epoch_s = train_epoch(loop, epoch, epoch_loader(cfg, data, epoch, loop.place.rank))
    row = epoch_row(loop, epoch, sums, epoch_s)
    validating = data.val_loader is not None and ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs)
    if validating or data.val_loader is None or epoch + 1 == cfg.epochs:  # weights that are scored or kept
        recalibrate(loop, epoch)
    res: dict[str, Any] = {}
    if validating:
        res = validate(loop.nets.eval_model, data.val_loader, loop.nets.criterion, cfg, loop.place.device,
                       data.domains, samples=cfg.tb_images if loop.place.main else 0, show=loop.place.main)
        record_validation(loop, row, res)
    # fold "all" has no validation: every epoch's weights are the "best" ones
    improved = data.val_loader is None or (validating and better(row["miou"], run.best_miou))
    if validating and improved:
        run.best_miou = row["miou"]
    run.epoch, run.nan_steps = epoch + 1, run.nan_steps + loop.guard.epoch
    run.history.append(row)
    loop.log(f"epoch {epoch + 1}/{cfg.epochs}: train loss {row['train_loss']:.4f}"
             + (f", val loss {row['val_loss']:.4f}, mIoU {row['miou']:.4f} (best {run.best_miou:.4f})"
                if validating else "")
             + f", {row['img_s']:.1f} img/s, {epoch_s:.0f} s"
             + (f", {loop.guard.epoch} steps skipped" if loop.guard.epoch else ""))
    if loop.place.main:
        save_epoch(loop, improved, plot=validating or data.val_loader is None)
    loop.tracker.epoch(row, data.domains.names, res.get("per_domain"), res.get("samples"))
    barrier()


# ----------------------------------------------------------------------------- the run
def setup(cfg: Settings) -> tuple[Placement, torch.dtype | None]:
    """(where this process runs, autocast dtype): processes, determinism and the initial seed."""
    place = setup_distributed()
    # determinism: CPU kernels are deterministic; on GPU it is opt-in (slower)
    if place.device.type == "cpu" or cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    tune_cuda(place.device, cfg.deterministic)
    seed_everything(cfg.seed)  # model init is identical on every rank
    return place, amp_dtype(cfg.precision, place.device)


def start(cfg: Settings, fold: str, train_df: pd.DataFrame, val_df: pd.DataFrame | None,
          resume_state: dict[str, Any] | None) -> Loop:
    """Data, model (warm-started or resumed), optimizer, run folder and tracker, in the order that keeps
    every random draw where a resumed or repeated run expects it."""
    place, dtype = setup(cfg)
    log: Callable[[str], None] = print if place.main else (lambda *a, **k: None)
    run_dir = cfg.run_dir(fold)
    bad_log = run_dir / "skipped.tsv" if cfg.skip_bad else None
    data = build_data(cfg, train_df, val_df, place, bad_log)  # the order: a function of (seed, epoch)
    sched = Schedule.of(cfg, data.n_batches)
    with as_setting_error():
        model = build_model(cfg).to(place.device)
    if resume_state is None:  # init_from warm start; prints what weights files loaded (src.models.weights)
        apply_init_from(model, cfg, fold, log)
    if place.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        mark_latest(cfg)
        if resume_state is None:
            set_aside_previous_run(run_dir, log)
        save_settings(cfg, run_dir / "config.yaml")
    nets = build_nets(cfg, model, place.device)
    run = Progress() if resume_state is None else resume(nets, resume_state)
    if resume_state is not None:
        log(f"resumed from {run_dir / 'last.pt'}: epoch {run.epoch} done, step {run.step}, "
            f"best mIoU {run.best_miou:.4f}")
    guard = NonFiniteGuard(nets.model, nets.optimizer, cfg.max_nan_steps, run_dir / "last.pt", log)
    return Loop(cfg, fold, place, dtype, data, nets, sched, run, guard, Tracker(), run_dir, bad_log, log)


def describe(loop: Loop, val_df: pd.DataFrame | None) -> str:
    """The run in one line: model, device, precision, data and steps."""
    cfg, data = loop.cfg, loop.data
    n_params = sum(p.numel() for p in loop.nets.model.parameters())
    return (f"{cfg.arch}/{cfg.encoder} fusion={cfg.fusion} ({n_params / 1e6:.1f} M params) on "
            f"{loop.place.device} x{loop.place.world}, precision {precision_name(loop.dtype)}; train "
            f"{len(data.train_ds)} patches"
            + (f", validate on fold {loop.fold}: {count(len(val_df), 'patch', 'patches')}, "
               f"{count(len(data.domains.names), 'domain')}"
               if val_df is not None else " (all folds, no validation)")
            + f"; {data.n_batches} batches x {cfg.batch_size} per process per epoch, "
              f"{loop.sched.total_steps} optimizer steps")


def train(cfg: Settings, fold: str, train_df: pd.DataFrame, val_df: pd.DataFrame | None,
          resume_state: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train one fold; returns {"best_miou", "last_miou", "run_dir", "history", "model" (the validated and
    saved weights: the EMA when on), "place"}."""
    loop = start(cfg, fold, train_df, val_df, resume_state)
    loop.log(describe(loop, val_df))
    wrap(loop.nets, cfg, loop.place.world, loop.place.device)
    loop.tracker = Tracker.open(loop.run_dir, cfg, enabled=loop.place.main, device=loop.place.device,
                                resume_step=None if resume_state is None else loop.run.step)
    for epoch in range(loop.run.epoch, cfg.epochs):
        run_epoch(loop, epoch)
    loop.tracker.close()
    run = loop.run
    last = run.history[-1]["miou"] if run.history else math.nan
    if loop.data.val_loader is None:
        loop.log(f"done: trained on all folds (no validation); weights in {loop.run_dir}")
    else:
        loop.log(f"done: best mIoU {run.best_miou:.4f}, last {last:.4f}; outputs in {loop.run_dir}")
    return {"best_miou": run.best_miou, "last_miou": last, "run_dir": loop.run_dir, "history": run.history,
            "model": loop.nets.eval_model, "place": loop.place}


# ----------------------------------------------------------------------------- non-finite steps
class NonFiniteGuard:
    """Call `snapshot()` before each forward pass, `skip(what, ...)` instead of a non-finite step and
    `ok()` after a step taken. Counts: `run` (in a row, across epochs) and `epoch` (this epoch)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, limit: int,
                 last_good: Path, log: Callable[[str], None] = print):
        self.model, self.optimizer, self.limit = model, optimizer, limit
        self.last_good, self.log = last_good, log
        self.run, self.epoch = 0, 0
        self._buffers: list[torch.Tensor] = []

    def new_epoch(self) -> None:
        self.epoch = 0

    def snapshot(self) -> None:
        """Copies of the buffers (BatchNorm running statistics) before a forward pass updates them."""
        self._buffers = [b.detach().clone() for b in self.model.buffers()]

    def ok(self) -> None:
        self.run = 0

    def skip(self, what: str, epoch: int, batch: int) -> None:
        """Drop the step (gradients and the buffers' update), count it, warn; stop the run past the limit."""
        self.run, self.epoch = self.run + 1, self.epoch + 1
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for buf, old in zip(self.model.buffers(), self._buffers):
                buf.copy_(old)
        self.log(f"\nwarning: non-finite {what} at epoch {epoch} batch {batch}: step skipped "
                 f"({self.run} in a row, limit {self.limit})")
        if self.run > self.limit:
            raise TrainingDiverged(
                f"{self.run} consecutive non-finite steps at epoch {epoch} (last: non-finite {what}): run "
                f"stopped; the last good checkpoint is {self.last_good} "
                f"(try a lower lr, precision=fp32 or grad_clip, then --resume 1)")
