"""The optimiser's schedule and parameter groups: linear warmup then cosine decay, no weight decay on
biases and norms. The learning rate is a pure function of the step, so a resumed run needs no scheduler
state beyond the step count (the checkpoint's "scheduler" records the two lengths for reference)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch


def lr_at(step: int, total: int, warmup: int, base: float, min_ratio: float) -> float:
    """Linear warmup to `base`, then cosine down to base * min_ratio; a pure function of the step."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


@dataclass(frozen=True)
class Schedule:
    """Optimizer steps of a run (`accum_steps` batches each) and its learning rate at each step."""

    total_steps: int
    warmup_steps: int
    base: float
    min_ratio: float

    @classmethod
    def of(cls, cfg: dict[str, Any], batches_per_epoch: int) -> Schedule:
        per_epoch = math.ceil(batches_per_epoch / cfg["accum_steps"])
        return cls(total_steps=cfg["epochs"] * per_epoch,
                   warmup_steps=int(round(cfg["warmup_epochs"] * per_epoch)),
                   base=cfg["lr"], min_ratio=cfg["min_lr_ratio"])

    def lr(self, step: int) -> float:
        return lr_at(step, self.total_steps, self.warmup_steps, self.base, self.min_ratio)

    def state_dict(self) -> dict[str, int]:
        return {"total_steps": self.total_steps, "warmup_steps": self.warmup_steps}


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and norm weights (1-D tensors), as timm and nanoGPT do."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
