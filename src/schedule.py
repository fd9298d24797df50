"""The optimiser's schedule and parameter groups: linear warmup then cosine decay, no weight decay on
biases and norms, and optionally a smaller learning rate for the pretrained aerial encoder
(`encoder_lr_ratio`). The learning rate is a pure function of the step, so a resumed run needs no scheduler
state beyond the step count (the checkpoint's "scheduler" records the two lengths for reference).

Each parameter group carries its own multiplier ("lr_scale", the key timm uses too): `set_lr` gives a
group lr * lr_scale at every step, so warmup and cosine keep the encoder / rest ratio exactly, and the
multiplier is saved with the optimizer's state (resume sees the same groups)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from src.errors import ConfigError


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
    """The schedule's lr into every group, times the group's "lr_scale" (1 when absent)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def encoder_of(model: torch.nn.Module) -> torch.nn.Module | None:
    """The pretrained aerial encoder: the smp model's `encoder` (FlairModel.net.encoder), else None."""
    net = getattr(model, "net", model)
    encoder = getattr(net, "encoder", None)
    return encoder if isinstance(encoder, torch.nn.Module) else None


def param_groups(model: torch.nn.Module, weight_decay: float, encoder_lr_ratio: float = 1.0
                 ) -> list[dict[str, Any]]:
    """No weight decay on biases and norm weights (1-D tensors), as timm and nanoGPT do; with
    encoder_lr_ratio != 1 the encoder's tensors get their own groups with lr_scale = encoder_lr_ratio.

    The rest comes first, so param_groups[0]["lr"] (what the logs show) is the schedule's lr. At ratio 1
    the two groups of earlier versions are kept, so their checkpoints still resume.
    """
    encoder = encoder_of(model) if encoder_lr_ratio != 1.0 else None
    if encoder_lr_ratio != 1.0 and encoder is None:
        raise ConfigError(f"encoder_lr_ratio={encoder_lr_ratio}: model {type(model).__name__} has no "
                          "`encoder` (smp) to give its own learning rate")
    in_encoder = {id(p) for p in encoder.parameters()} if encoder is not None else set()
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {
        (enc, decay): [] for enc in (False, True) for decay in (True, False)}
    for p in model.parameters():
        if p.requires_grad:
            groups[(id(p) in in_encoder, p.ndim > 1)].append(p)
    out = []
    for (enc, decay), params in groups.items():
        if params or not enc:  # the rest's two groups always exist (the layout of earlier checkpoints)
            group: dict[str, Any] = {"params": params, "weight_decay": weight_decay if decay else 0.0}
            if encoder is not None:
                group["lr_scale"] = encoder_lr_ratio if enc else 1.0
            out.append(group)
    return out
