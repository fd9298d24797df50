"""The state of a training run: the networks and optimizer it steps, how far it is, and the checkpoint
dict that saves both (docs/data-format.md, "Checkpoints") and that `resume` restores."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from src.ema import EMA
from src.losses import Criterion
from src.runtime import needs_grad_scaler
from src.schedule import Schedule, param_groups
from src.seeding import rng_state, set_rng_state


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
    """EMA, loss and AdamW (+ GradScaler for fp16) around a built model; `wrap` adds DDP after resuming."""
    if cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    ema = EMA(model, cfg["ema"]) if cfg["ema"] > 0 else None
    criterion = Criterion(cfg).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg["weight_decay"]), lr=cfg["lr"])
    scaler = torch.amp.GradScaler(device.type, enabled=needs_grad_scaler(cfg["precision"], device))
    return Nets(model, ema, criterion, optimizer, scaler, train_model=model)


def wrap(nets: Nets, cfg: dict, world: int, device: torch.device) -> None:
    """DDP (after resuming: it broadcasts rank 0's weights) and torch.compile around the model."""
    if world > 1:
        nets.ddp = torch.nn.parallel.DistributedDataParallel(
            nets.model, device_ids=[device.index] if device.type == "cuda" else None)
        nets.train_model = nets.ddp
    if cfg["compile"]:
        nets.train_model = torch.compile(nets.train_model)


def checkpoint_state(cfg: dict, fold: str, nets: Nets, run: Progress, sched: Schedule) -> dict[str, Any]:
    """The checkpoint dict; "model" and "config" alone rebuild the model for prediction."""
    return {"model": nets.eval_model.state_dict(), "raw_model": nets.model.state_dict(),
            "ema": nets.ema.state_dict() if nets.ema is not None else None, "config": cfg, "fold": fold,
            "epoch": run.epoch, "step": run.step, "best_miou": run.best_miou, "history": run.history,
            "optimizer": nets.optimizer.state_dict(), "scaler": nets.scaler.state_dict(),
            "scheduler": sched.state_dict(), "rng": rng_state(), "nan_steps": run.nan_steps}


def resume(nets: Nets, state: dict[str, Any]) -> Progress:
    """Weights, optimizer, scaler, EMA and RNG states of last.pt; the run goes on from its epoch."""
    nets.model.load_state_dict(state["raw_model"])
    nets.optimizer.load_state_dict(state["optimizer"])
    nets.scaler.load_state_dict(state["scaler"])
    if nets.ema is not None and state.get("ema"):
        nets.ema.load_state_dict(state["ema"])
    set_rng_state(state["rng"])
    return Progress(epoch=state["epoch"], step=state["step"], best_miou=state["best_miou"],
                    history=list(state["history"]), nan_steps=int(state.get("nan_steps", 0)))
