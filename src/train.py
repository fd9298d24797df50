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
  the last good checkpoint untouched.
- Errors in settings or data surface as one line before any model is built.
- Multi-GPU / multi-node: run under torchrun; batch_size is per process, logging and checkpoints
  are rank 0's, the validation matrix is all-reduced.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import math
import os
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from src.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from src.classes import CLASS_NAMES
from src.config import (
    DEFAULTS,
    ConfigError,
    exit_on_config_error,
    load_config,
    parse_overrides,
    resolve,
    save_config,
)
from src.losses import Criterion
from src.metrics import confusion_torch, format_table, ious_from_confusion, miou_from_confusion
from src.rasters import DataError, atomic_write, save_figure

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
IOU_COLS = [f"iou_{k}_{name.replace(' ', '_')}" for k, name in enumerate(CLASS_NAMES)]
CSV_COLS = ["epoch", "step", "lr", "train_loss", "train_s2_loss", "val_loss", "miou", *IOU_COLS,
            "img_s", "epoch_s", "nan_steps"]


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite losses; the last checkpoint on disk is the last good one."""


# ----------------------------------------------------------------------------- small helpers
def derive_seed(*parts: int) -> int:
    """A 32-bit seed from a tuple such as (seed, epoch, rank), well mixed by numpy's SeedSequence."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def seed_everything(*parts: int) -> int:
    """Seed python, numpy and torch from a tuple (e.g. seed, epoch, rank); returns the derived seed."""
    seed = derive_seed(*parts)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return seed


def seed_worker(worker_id: int) -> None:
    """DataLoader workers: torch gives each a distinct seed; numpy and python follow it."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def lr_at(step: int, total: int, warmup: int, base: float, min_ratio: float) -> float:
    """Linear warmup to `base`, then cosine down to base * min_ratio; a pure function of the step."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def snapshot_buffers(model: torch.nn.Module) -> list[torch.Tensor]:
    """Copies of the buffers (BatchNorm running statistics) before a forward pass: the forward updates
    them, so a step skipped for a non-finite loss or gradient must put them back or they turn NaN too."""
    return [b.detach().clone() for b in model.buffers()]


def restore_buffers(model: torch.nn.Module, saved: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for buf, old in zip(model.buffers(), saved):
            buf.copy_(old)


def better(new: float, best: float) -> bool:
    """Is a validation mIoU an improvement? (the first finite value always is; NaN never beats a number)"""
    return not math.isnan(new) and (math.isnan(best) or new > best)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and norm weights (1-D tensors), as timm and nanoGPT do."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class EMA:
    """Exponential moving average of a model's state (parameters and buffers).

    The decay warms up as min(decay, (1 + n) / (10 + n)) so that short runs (demos, few epochs) are
    not dominated by the random initial weights.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema_sd, model_sd = self.module.state_dict(), model.state_dict()
        floats = [k for k, v in ema_sd.items() if v.dtype.is_floating_point]
        torch._foreach_lerp_([ema_sd[k] for k in floats], [model_sd[k].detach() for k in floats], 1.0 - d)
        for k, v in ema_sd.items():
            if not v.dtype.is_floating_point:
                v.copy_(model_sd[k])

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device); initialises the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world, device


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (no-op on a single process)."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def amp_setup(cfg: dict, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None for fp32, whether fp16 needs a GradScaler)."""
    p = cfg["precision"]
    if p == "auto":
        p = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[p], p == "fp16"


def to_device(batch: dict, device: torch.device, channels_last: bool) -> tuple[torch.Tensor, dict]:
    """Image (channels_last if asked) and the optional model inputs present in the batch."""
    image = batch["image"].to(device, non_blocking=True)
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    extra = {k: batch[k].to(device, non_blocking=True) for k in ("s2", "s2_days", "s2_pad", "meta")
             if k in batch}
    return image, extra


# ----------------------------------------------------------------------------- setup checks (cheap)
def check_settings(cfg: dict) -> None:
    """Values the config types cannot catch; raise ConfigError before anything heavy."""
    if cfg["precision"] not in PRECISIONS:
        raise ConfigError(f"precision: expected one of {', '.join(PRECISIONS)}, got {cfg['precision']!r}")
    if cfg["epochs"] < 1 or cfg["batch_size"] < 1 or cfg["accum_steps"] < 1:
        raise ConfigError("epochs, batch_size and accum_steps must be >= 1")
    if cfg["lr"] <= 0 or not 0 <= cfg["min_lr_ratio"] <= 1 or not 0 <= cfg["ema"] < 1:
        raise ConfigError("need lr > 0, 0 <= min_lr_ratio <= 1 and 0 <= ema < 1")
    if cfg["workers"] < 0 or cfg["max_nan_steps"] < 0 or cfg["val_every"] < 1:
        raise ConfigError("need workers >= 0, max_nan_steps >= 0 and val_every >= 1")
    Criterion(cfg)  # validates loss, class_weights, label_smoothing


@contextlib.contextmanager
def as_setting_error() -> Iterator[None]:
    """ValueErrors raised while building the dataset or model are bad settings (DataErrors stay data)."""
    try:
        yield
    except DataError:
        raise
    except ValueError as err:
        raise ConfigError(str(err).strip().splitlines()[0]) from None


def missing_files(df: pd.DataFrame, use_s2: bool) -> list[str]:
    """Files listed in the index that are not on disk (labels and S2 included)."""
    cols = ["img_path", "msk_path"] + (["s2_data", "s2_masks", "s2_products"] if use_s2 else [])
    paths = pd.unique(pd.concat([df[c].astype(str) for c in cols if c in df.columns]))
    return [p for p in paths if not p or not os.path.exists(p)]


def split_rows(cfg: dict, fold: str) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Training and validation rows of data_dir/index_train.csv for `fold` (validation None for all)."""
    from src.folds import load_folds
    from src.index import load_index

    data_dir = Path(cfg["data_dir"])
    index_path = data_dir / "index_train.csv"
    if not index_path.is_file():
        raise DataError(f"{index_path}: not found; run `make index` (data_dir={data_dir})")
    index = load_index(index_path)
    if index.empty:
        raise DataError(f"{index_path}: no training rows")
    unlabeled = index["msk_path"].astype(str).eq("")
    if unlabeled.any():
        raise DataError(f"{index_path}: {int(unlabeled.sum())} training rows have no label, "
                        f"e.g. id {index.loc[unlabeled, 'id'].iloc[0]}")
    if fold == "all":
        return index.reset_index(drop=True), None
    folds = load_folds(data_dir)
    rows = index.merge(folds[["id", "fold"]], on="id", how="inner")
    present = sorted(rows["fold"].unique().tolist())
    if int(fold) not in present:
        raise ConfigError(f"fold {fold} not in {data_dir / 'folds.csv'} (folds: {present})")
    train_df = rows[rows["fold"] != int(fold)].reset_index(drop=True)
    val_df = rows[rows["fold"] == int(fold)].reset_index(drop=True)
    if train_df.empty:
        raise ConfigError(f"fold {fold} is the only fold: nothing left to train on (use --fold all)")
    return train_df, val_df


def run_dir_of(cfg: dict, fold: str) -> Path:
    return Path(cfg["runs_dir"]) / cfg["name"] / f"fold{fold}"


RUN_FILES = ("config.yaml", "metrics.csv", "curves.png", "best.pt", "last.pt", "skipped.tsv")


def set_aside_previous_run(run_dir: Path, log=print) -> None:
    """A fresh start (--resume 0) in a used folder moves the old outputs to previous/ (replacing
    what was there), so an old best.pt is never mistaken for the new run's, nor silently lost."""
    old = [run_dir / name for name in RUN_FILES if (run_dir / name).exists()]
    if not any(p.suffix == ".pt" for p in old):
        return
    keep = run_dir / "previous"
    keep.mkdir(exist_ok=True)
    for p in keep.iterdir():
        p.unlink()
    for p in old:
        os.replace(p, keep / p.name)
    log(f"note: {run_dir} held an earlier run: moved to {keep}/ (use --resume 1 to continue a run)")


# ----------------------------------------------------------------------------- validation
@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, criterion: Criterion, device: torch.device,
             amp_dtype: torch.dtype | None, channels_last: bool, domain_of: dict[str, int],
             n_domains: int, max_batches: int = 0) -> dict[str, Any]:
    """Dataset-level confusion per domain (summed over ranks), mean loss; on this rank's shard."""
    model.eval()
    conf = torch.zeros(max(n_domains, 1), 13, 13, dtype=torch.int64, device=device)
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)  # loss * n, n
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        image, extra = to_device(batch, device, channels_last)
        mask = batch["mask"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out = model(image, **extra)
        loss, _ = criterion(out, mask)
        loss_sum += torch.stack([loss.double() * len(mask), torch.tensor(len(mask), device=device).double()])
        pred = out["logits"].argmax(1)
        dom = torch.tensor([domain_of.get(i, 0) for i in batch["id"]], device=device)
        for d in torch.unique(dom).tolist():
            sel = dom == d
            conf[d] += confusion_torch(pred[sel], mask[sel])
    all_sum(conf)
    all_sum(loss_sum)
    total = conf.sum(0).cpu().numpy()
    return {"confusion": total, "per_domain": conf.cpu().numpy(),
            "loss": float(loss_sum[0] / loss_sum[1].clamp_min(1)),
            "miou": miou_from_confusion(total), "ious": ious_from_confusion(total)}


# ----------------------------------------------------------------------------- outputs
def _blank_nan(v: Any) -> Any:
    return "" if isinstance(v, float) and math.isnan(v) else v


def write_metrics(history: list[dict[str, Any]], run_dir: Path) -> None:
    """metrics.csv (one row per epoch, rewritten whole so a resumed run stays consistent) + curves.png."""
    with atomic_write(run_dir / "metrics.csv") as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLS, extrasaction="ignore")
            writer.writeheader()
            for row in history:
                writer.writerow({k: _blank_nan(v) for k, v in row.items()})
    plot_curves(history, run_dir / "curves.png")


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key: str) -> tuple[list[int], list[float]]:  # validated epochs only (val_every)
        rows = [r for r in history if isinstance(r[key], float) and math.isfinite(r[key])]
        return [r["epoch"] for r in rows], [r[key] for r in rows]

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot(*series("train_loss"), "o-", label="train")
    ax1.plot(*series("val_loss"), "o-", label="validation")
    ax1.set_yscale("log")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.legend()
    ax2.plot(*series("miou"), "o-", color="C2")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("validation mIoU (classes 0..11)")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


# ----------------------------------------------------------------------------- the loop
def train(cfg: dict, fold: str, train_df: pd.DataFrame, val_df: pd.DataFrame | None,
          resume_state: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train one fold; returns {"best_miou", "last_miou", "run_dir", "history"}."""
    from src.dataset import FlairDataset, collate
    from src.models import build_model

    rank, world, device = setup_distributed()
    main_proc = rank == 0
    log = print if main_proc else (lambda *a, **k: None)
    run_dir = run_dir_of(cfg, fold)

    # determinism: CPU kernels are deterministic; on GPU it is opt-in (slower)
    if device.type == "cpu" or cfg["deterministic"]:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not cfg["deterministic"]
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    seed_everything(cfg["seed"])  # model init is identical on every rank
    amp_dtype, use_scaler = amp_setup(cfg, device)

    # data: the training order is a function of (seed, epoch) through the sampler
    bad_log = run_dir / "skipped.tsv" if cfg["skip_bad"] else None  # id <tab> error, one line per skip
    with as_setting_error():
        train_ds = FlairDataset(train_df, cfg, train=True, bad_log=bad_log)
    sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=cfg["seed"])
    bs = cfg["batch_size"]
    drop_last = len(sampler) > bs  # never drop the only batch of a tiny set
    n_batches = len(sampler) // bs if drop_last else math.ceil(len(sampler) / bs)
    if cfg["max_train_batches"]:
        n_batches = min(n_batches, cfg["max_train_batches"])
    steps_per_epoch = math.ceil(n_batches / cfg["accum_steps"])
    total_steps = cfg["epochs"] * steps_per_epoch
    warmup_steps = int(round(cfg["warmup_epochs"] * steps_per_epoch))

    val_loader, domains = None, []
    if val_df is not None:
        val_ds = FlairDataset(val_df, cfg, train=False, bad_log=bad_log)
        shard = list(range(rank, len(val_ds), world))  # no padding: every patch counted once
        val_loader = DataLoader(val_ds, batch_size=bs, sampler=shard, num_workers=cfg["workers"],
                                collate_fn=collate, pin_memory=device.type == "cuda",
                                worker_init_fn=seed_worker)
        domains = sorted(val_df["domain"].unique().tolist())
        dom_index = {d: k for k, d in enumerate(domains)}
        domain_of = {str(i): dom_index[d] for i, d in zip(val_df["id"], val_df["domain"])}

    # model, EMA, loss, optimizer
    with as_setting_error():
        model = build_model(cfg).to(device)
    if main_proc:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_state is None:
            set_aside_previous_run(run_dir, log)
        save_config(cfg, run_dir / "config.yaml")
    if cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    ema = EMA(model, cfg["ema"]) if cfg["ema"] > 0 else None
    criterion = Criterion(cfg).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg["weight_decay"]), lr=cfg["lr"])
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    start_epoch, step, best_miou, history, nan_total = 0, 0, -math.inf, [], 0
    if resume_state is not None:
        model.load_state_dict(resume_state["raw_model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        scaler.load_state_dict(resume_state["scaler"])
        if ema is not None and resume_state.get("ema"):
            ema.load_state_dict(resume_state["ema"])
        set_rng_state(resume_state["rng"])
        start_epoch, step = resume_state["epoch"], resume_state["step"]
        best_miou, history = resume_state["best_miou"], list(resume_state["history"])
        nan_total = int(resume_state.get("nan_steps", 0))
        log(f"resumed from {run_dir / 'last.pt'}: epoch {start_epoch} done, step {step}, "
            f"best mIoU {best_miou:.4f}")
    n_params = sum(p.numel() for p in model.parameters())
    precision = str(amp_dtype or "fp32").replace("torch.", "")
    log(f"{cfg['arch']}/{cfg['encoder']} fusion={cfg['fusion']} ({n_params / 1e6:.1f} M params) on {device}"
        f" x{world}, precision {precision}; train {len(train_ds)} patches"
        + (f", validate on fold {fold}: {len(val_df)} patches, {len(domains)} domains" if val_df is not None
           else " (all folds, no validation)")
        + f"; {n_batches} batches x {bs} per process per epoch, {total_steps} optimizer steps")

    ddp = None
    train_model: torch.nn.Module = model
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
        train_model = ddp
    if cfg["compile"]:
        train_model = torch.compile(train_model)
    eval_model = ema.module if ema is not None else model

    def checkpoint_state(epoch: int) -> dict[str, Any]:
        return {"model": eval_model.state_dict(), "raw_model": model.state_dict(),
                "ema": ema.state_dict() if ema is not None else None, "config": cfg, "fold": fold,
                "epoch": epoch, "step": step, "best_miou": best_miou, "history": history,
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "scheduler": {"total_steps": total_steps, "warmup_steps": warmup_steps},
                "rng": rng_state(), "nan_steps": nan_total}

    nan_run = 0  # consecutive non-finite steps
    s2_head = cfg["use_s2"] and cfg["fusion"] != "none"  # the fusion model's auxiliary S2 head
    for epoch in range(start_epoch, cfg["epochs"]):
        # everything random in an epoch is a function of (seed, epoch, rank): exact replay after resume
        seed_everything(cfg["seed"], epoch, rank)  # dropout, modality dropout
        train_ds.augment.reseed(derive_seed(cfg["seed"], epoch, rank, 2))  # workers=0 (workers reseed)
        sampler.set_epoch(epoch)  # data order
        gen = torch.Generator()
        gen.manual_seed(derive_seed(cfg["seed"], epoch, rank, 1))  # worker seeds
        loader = DataLoader(train_ds, batch_size=bs, sampler=sampler, num_workers=cfg["workers"],
                            collate_fn=collate, drop_last=drop_last, pin_memory=device.type == "cuda",
                            worker_init_fn=seed_worker, generator=gen)
        train_model.train()
        optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss * n, s2 loss * n, n
        nan_epoch, micro, t0 = 0, 0, time.time()
        bar = tqdm(total=n_batches, desc=f"epoch {epoch + 1}/{cfg['epochs']}", disable=not main_proc,
                   dynamic_ncols=True, leave=False, file=sys.stderr)
        try:  # the bar is cleared even when a data error ends the epoch, so its message stands alone
            for i, batch in enumerate(loader):
                if i >= n_batches:
                    break
                image, extra = to_device(batch, device, cfg["channels_last"])
                mask = batch["mask"].to(device, non_blocking=True)
                saved = snapshot_buffers(model)
                with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                    enabled=amp_dtype is not None):
                    out = train_model(image, **extra)
                loss, parts = criterion(out, mask)

                # a non-finite loss on any rank skips the step everywhere (ranks must stay in lockstep)
                bad = torch.tensor(0.0 if torch.isfinite(loss) else 1.0, device=device)
                if all_sum(bad).item() > 0:
                    nan_run, nan_epoch, nan_total, micro = nan_run + 1, nan_epoch + 1, nan_total + 1, 0
                    optimizer.zero_grad(set_to_none=True)
                    restore_buffers(model, saved)
                    log(f"\nwarning: non-finite loss at epoch {epoch + 1} batch {i}: step skipped "
                        f"({nan_run} in a row, limit {cfg['max_nan_steps']})")
                    if nan_run > cfg["max_nan_steps"]:
                        raise TrainingDiverged(
                            f"{nan_run} consecutive non-finite losses at epoch {epoch + 1}: run stopped; "
                            f"the last good checkpoint is {run_dir / 'last.pt'} "
                            f"(try a lower lr, precision=fp32 or grad_clip, then --resume 1)")
                    bar.update(1)
                    continue

                last_micro = micro + 1 == cfg["accum_steps"] or i + 1 == n_batches
                sync = contextlib.nullcontext() if ddp is None or last_micro else ddp.no_sync()
                with sync:
                    scaler.scale(loss / cfg["accum_steps"]).backward()
                micro += 1
                n = len(mask)
                s2_loss = float(torch.as_tensor(parts.get("s2", 0.0)).detach())
                sums += torch.tensor([float(loss.detach()) * n, s2_loss * n, n], dtype=torch.float64,
                                     device=device)
                if last_micro:
                    micro = 0
                    lr = lr_at(step, total_steps, warmup_steps, cfg["lr"], cfg["min_lr_ratio"])
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    scaler.unscale_(optimizer)
                    clip = cfg["grad_clip"] if cfg["grad_clip"] > 0 else math.inf
                    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                    # (fp16: the scaler skips non-finite steps itself)
                    if not use_scaler and not torch.isfinite(gnorm):
                        nan_run, nan_epoch, nan_total = nan_run + 1, nan_epoch + 1, nan_total + 1
                        optimizer.zero_grad(set_to_none=True)
                        restore_buffers(model, saved)
                        log(f"\nwarning: non-finite gradient at epoch {epoch + 1} batch {i}: step skipped")
                        if nan_run > cfg["max_nan_steps"]:
                            raise TrainingDiverged(
                                f"{nan_run} consecutive non-finite steps at epoch {epoch + 1}: run "
                                f"stopped; the last good checkpoint is {run_dir / 'last.pt'}")
                    else:
                        scaler.step(optimizer)
                        scaler.update()
                        optimizer.zero_grad(set_to_none=True)
                        nan_run = 0
                        if ema is not None:
                            ema.update(model)
                    step += 1
                bar.update(1)
                if main_proc and (i % max(1, cfg["log_every"]) == 0 or i + 1 == n_batches):
                    seen = float(sums[2])
                    bar.set_postfix(loss=f"{float(sums[0]) / max(seen, 1):.4f}",
                                    img_s=f"{seen * world / (time.time() - t0):.1f}",
                                    lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        finally:
            bar.close()
        all_sum(sums)
        epoch_s = time.time() - t0
        row: dict[str, Any] = {
            "epoch": epoch + 1, "step": step, "lr": optimizer.param_groups[0]["lr"],
            "train_loss": float(sums[0] / sums[2].clamp_min(1)),
            "train_s2_loss": float(sums[1] / sums[2].clamp_min(1)) if s2_head else math.nan,
            "val_loss": math.nan, "miou": math.nan, **{c: math.nan for c in IOU_COLS},
            "img_s": float(sums[2]) / epoch_s, "epoch_s": epoch_s, "nan_steps": nan_epoch}

        last_epoch = epoch + 1 == cfg["epochs"]
        validate = val_loader is not None and ((epoch + 1) % cfg["val_every"] == 0 or last_epoch)
        if validate:
            res = evaluate(eval_model, val_loader, criterion, device, amp_dtype, cfg["channels_last"],
                           domain_of, len(domains), cfg["max_val_batches"])
            row.update(val_loss=res["loss"], miou=res["miou"], **dict(zip(IOU_COLS, res["ious"].tolist())),
                       confusion=res["confusion"].tolist())  # kept in the checkpoint's history, not the CSV
            log(format_table(res["ious"], support=res["confusion"].sum(1)))
            for d, name in enumerate(domains):
                log(f"    {name}: mIoU {miou_from_confusion(res['per_domain'][d]):.4f}")
        # fold "all" has no validation: every epoch's weights are the "best" ones
        improved = val_loader is None or (validate and better(res["miou"], best_miou))
        if validate and improved:
            best_miou = res["miou"]
        history.append(row)
        log(f"epoch {epoch + 1}/{cfg['epochs']}: train loss {row['train_loss']:.4f}"
            + (f", val loss {row['val_loss']:.4f}, mIoU {row['miou']:.4f} (best {best_miou:.4f})"
               if validate else "")
            + f", {row['img_s']:.1f} img/s, {epoch_s:.0f} s"
            + (f", {nan_epoch} steps skipped" if nan_epoch else ""))
        if main_proc:
            state = checkpoint_state(epoch + 1)
            if improved:  # best first: a kill between the two writes must not lose the best model
                save_checkpoint(run_dir / "best.pt", state)
            save_checkpoint(run_dir / "last.pt", state)
            write_metrics(history, run_dir)
            if bad_log is not None and bad_log.exists():
                ids = {line.split("\t", 1)[0] for line in bad_log.read_text().splitlines() if line}
                log(f"skip_bad: {len(ids)} unreadable patches skipped so far, listed in {bad_log}")
        if dist.is_initialized():
            dist.barrier()

    last = history[-1]["miou"] if history else math.nan
    log(f"done: best mIoU {best_miou:.4f}, last {last:.4f}; outputs in {run_dir}")
    return {"best_miou": best_miou, "last_miou": last, "run_dir": run_dir, "history": history}


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
    check_settings(cfg)
    train_df, val_df = split_rows(cfg, fold)
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
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
