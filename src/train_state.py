"""The state of a training run: the networks and optimizer it steps, how far it is, and the checkpoint
dict that saves both (docs/data-format.md, "Checkpoints") and that `resume` restores; also the knobs that
act on that state: SyncBatchNorm under DDP (`wrap`) and the average of the last epochs' weights
(`average_epoch`, `save_average`, src.weight_avg: its running sum is part of last.pt, so a resumed run
ends with the same avg.pt)."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from src.checkpoint import save_checkpoint
from src.ema import EMA
from src.errors import ConfigError
from src.losses import Criterion
from src.runtime import needs_grad_scaler
from src.schedule import Schedule, param_groups
from src.seeding import rng_state, set_rng_state
from src.weight_avg import WeightAverage, averaged_epochs


@dataclass
class Nets:
    """The model being optimised, what the loop calls (DDP / compiled wrapper), the EMA and the optimizer."""

    model: torch.nn.Module
    ema: EMA | None
    criterion: Criterion
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    train_model: torch.nn.Module
    ddp: torch.nn.parallel.DistributedDataParallel | None = None
    avg: WeightAverage | None = None  # avg_last > 0: the sum of the last epochs' weights

    @property
    def eval_model(self) -> torch.nn.Module:
        """The validated and saved weights: the EMA when it is on."""
        return self.ema.module if self.ema is not None else self.model


@dataclass
class Progress:
    """How far the run is: epochs done, optimizer steps, best validation mIoU, one history row per epoch,
    non-finite steps skipped."""

    epoch: int = 0
    step: int = 0
    best_miou: float = -math.inf
    history: list[dict[str, Any]] = field(default_factory=list)
    nan_steps: int = 0


def build_nets(cfg: dict, model: torch.nn.Module, device: torch.device) -> Nets:
    """EMA, loss, AdamW (+ GradScaler for fp16) and the epoch average around a built model; `wrap` adds
    SyncBatchNorm and DDP after resuming. The encoder's groups get lr * encoder_lr_ratio (src.schedule)."""
    if cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    ema = EMA(model, cfg["ema"]) if cfg["ema"] > 0 else None
    criterion = Criterion(cfg).to(device)
    groups = param_groups(model, cfg["weight_decay"], cfg.get("encoder_lr_ratio", 1.0))
    optimizer = torch.optim.AdamW(groups, lr=cfg["lr"])
    scaler = torch.amp.GradScaler(device.type, enabled=needs_grad_scaler(cfg["precision"], device))
    avg = WeightAverage(cfg["epochs"], cfg["avg_last"]) if cfg.get("avg_last", 0) > 0 else None
    return Nets(model, ema, criterion, optimizer, scaler, train_model=model, avg=avg)


def sync_batchnorm(nets: Nets, cfg: dict, world: int, device: torch.device) -> bool:
    """sync_bn=true: BatchNorm -> SyncBatchNorm (statistics over the global batch), only with several
    processes on CUDA: SyncBatchNorm has no CPU (gloo) kernels, so elsewhere the setting is ignored with a
    one-line note and BatchNorm stays per process. True when converted.

    The conversion keeps the same parameter and buffer tensors, so the optimizer, the EMA and the
    checkpoints (same state_dict keys, plain BatchNorm at inference) are unaffected.
    """
    if not cfg.get("sync_bn", False):
        return False
    if world > 1 and device.type == "cuda":
        nets.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(nets.model)
        nets.train_model = nets.model
        return True
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"note: sync_bn=true ignored: SyncBatchNorm needs CUDA and several processes "
              f"(this run: {device.type} x{world}); BatchNorm statistics stay per process")
    return False


def wrap(nets: Nets, cfg: dict, world: int, device: torch.device) -> None:
    """SyncBatchNorm (sync_bn), DDP (after resuming: it broadcasts rank 0's weights) and torch.compile
    around the model."""
    sync_batchnorm(nets, cfg, world, device)
    if world > 1:
        nets.ddp = torch.nn.parallel.DistributedDataParallel(
            nets.model, device_ids=[device.index] if device.type == "cuda" else None)
        nets.train_model = nets.ddp
    if cfg["compile"]:
        nets.train_model = torch.compile(nets.train_model)


# checkpoint keys that only `resume` reads (an averaged-weights file leaves them out: `save_average`)
RESUME_ONLY = ("raw_model", "ema", "optimizer", "scaler", "scheduler", "rng", "avg")


def checkpoint_state(cfg: dict, fold: str, nets: Nets, run: Progress, sched: Schedule) -> dict[str, Any]:
    """The checkpoint dict; "model" and "config" alone rebuild the model for prediction."""
    return {"model": nets.eval_model.state_dict(), "raw_model": nets.model.state_dict(),
            "ema": nets.ema.state_dict() if nets.ema is not None else None, "config": cfg, "fold": fold,
            "epoch": run.epoch, "step": run.step, "best_miou": run.best_miou, "history": run.history,
            "optimizer": nets.optimizer.state_dict(), "scaler": nets.scaler.state_dict(),
            "scheduler": sched.state_dict(), "rng": rng_state(), "nan_steps": run.nan_steps,
            "avg": nets.avg.state_dict() if nets.avg is not None else None}


def resume(nets: Nets, state: dict[str, Any]) -> Progress:
    """Weights, optimizer, scaler, EMA, epoch average and RNG states of last.pt; the run goes on from its
    epoch. The groups' lr multipliers stay this run's (an encoder_lr_ratio override applies)."""
    nets.model.load_state_dict(state["raw_model"])
    scales = [g.get("lr_scale") for g in nets.optimizer.param_groups]
    try:
        nets.optimizer.load_state_dict(state["optimizer"])
    except ValueError as err:  # another number or size of parameter groups
        raise ConfigError(f"the optimizer state in last.pt does not fit this run's parameter groups ({err}); "
                          "encoder_lr_ratio cannot change between 1 and another value on resume") from None
    for group, scale in zip(nets.optimizer.param_groups, scales):
        group.pop("lr_scale", None)
        if scale is not None:
            group["lr_scale"] = scale
    nets.scaler.load_state_dict(state["scaler"])
    if nets.ema is not None and state.get("ema"):
        nets.ema.load_state_dict(state["ema"])
    if nets.avg is not None and state.get("avg"):
        nets.avg.load_state_dict(state["avg"])
    set_rng_state(state["rng"])
    return Progress(epoch=state["epoch"], step=state["step"], best_miou=state["best_miou"],
                    history=list(state["history"]), nan_steps=int(state.get("nan_steps", 0)))


def average_epoch(cfg: dict, nets: Nets, run: Progress) -> bool:
    """avg_last=N, rank 0 at the end of epoch `run.epoch`, before the epoch's checkpoint state is built (so
    last.pt holds the sum): add the model's weights when the epoch is one of the last N (under DDP every
    rank holds the same weights). True after the last epoch: avg.pt is due (`save_average`)."""
    if nets.avg is None or not nets.avg.wants(run.epoch):
        return False
    nets.avg.update(nets.model)
    return run.epoch == cfg["epochs"]


def save_average(cfg: dict, run_dir: Path, nets: Nets, state: dict[str, Any],
                 log: Callable[[str], None] = print) -> None:
    """avg.pt from the last epoch's checkpoint `state`: its "model" is the average, and what only `resume`
    reads (optimizer, the float64 sums, ...: RESUME_ONLY) is left out; the rest (config, progress, history)
    is kept, so src.models.load_for_inference, prediction and init_from read it like best.pt."""
    span = averaged_epochs(cfg["epochs"], cfg["avg_last"])
    averaged = {k: v for k, v in state.items() if k not in RESUME_ONLY}
    averaged.update(model=nets.avg.average(state["raw_model"]), averaged_epochs=list(span))
    save_checkpoint(run_dir / "avg.pt", averaged)
    log(f"avg_last={cfg['avg_last']}: weights averaged over epochs {span[0]}..{span[-1]} saved in "
        f"{run_dir / 'avg.pt'}")
