"""The state a training run steps and saves: networks, EMA, optimizer and schedule, the average of the last
epochs, progress, the checkpoint dict and resume.

The state of a training run: the networks and optimizer it steps, how far it is, and the checkpoint
dict that saves both (docs/data-format.md, "Checkpoints") and that `resume` restores; also the knobs that
act on that state: SyncBatchNorm under DDP (`wrap`) and the average of the last epochs' weights
(`average_epoch`, `save_average`, src.training.state: its running sum is part of last.pt, so a resumed run
ends with the same avg.pt).

Exponential moving average of a model's weights: the weights that are validated and shipped.

Averaging the last few thousand steps smooths the noise of the final steps at no training cost; the
checkpoint's "model" holds these averaged weights (docs/data-format.md, "Checkpoints").

Average of the model's weights at the ends of the last N epochs (`avg_last=N`, SWA-style), an
alternative to the EMA: a flat average over epochs that each ended near a different point of the late,
low-lr part of the schedule often generalises better than any one of them.

The sum is kept in float64 on the CPU (no GPU memory; summing a few float32 tensors in float64 is exact),
so the average of N epochs is the exact mean rounded once, and a resumed run that reloads the sum from
last.pt ends with the very same bits.

BatchNorm running statistics are averaged like the weights. That is an approximation: the statistics of
the averaged weights are not the average of the statistics, and SWA proper re-estimates them with one
pass over the training data (torch.optim.swa_utils.update_bn). Integer buffers (num_batches_tracked)
take the latest epoch's value.

The optimiser's schedule and parameter groups: linear warmup then cosine decay, no weight decay on
biases and norms, and optionally a smaller learning rate for the pretrained aerial encoder
(`encoder_lr_ratio`). The learning rate is a pure function of the step, so a resumed run needs no scheduler
state beyond the step count (the checkpoint's "scheduler" records the two lengths for reference).

Each parameter group carries its own multiplier ("lr_scale", the key timm uses too): `set_lr` gives a
group lr * lr_scale at every step, so warmup and cosine keep the encoder / rest ratio exactly, and the
multiplier is saved with the optimizer's state (resume sees the same groups)."""
from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from src.core.checkpoint import save_checkpoint
from src.core.errors import ConfigError
from src.core.runtime import needs_grad_scaler, rng_state, set_rng_state
from src.core.settings import Settings
from src.models.losses import Criterion


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


def build_nets(cfg: Settings, model: torch.nn.Module, device: torch.device) -> Nets:
    """EMA, loss, AdamW (+ GradScaler for fp16) and the epoch average around a built model; `wrap` adds
    SyncBatchNorm and DDP after resuming. The encoder's groups get lr * encoder_lr_ratio
    (src.training.state)."""
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = EMA(model, cfg.ema) if cfg.ema > 0 else None
    criterion = Criterion(cfg).to(device)
    groups = param_groups(model, cfg.weight_decay, cfg.encoder_lr_ratio)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=needs_grad_scaler(cfg.precision, device))
    avg = WeightAverage(cfg.epochs, cfg.avg_last) if cfg.avg_last > 0 else None
    return Nets(model, ema, criterion, optimizer, scaler, train_model=model, avg=avg)


def sync_batchnorm(nets: Nets, cfg: Settings, world: int, device: torch.device) -> bool:
    """sync_bn=true: BatchNorm -> SyncBatchNorm (statistics over the global batch), only with several
    processes on CUDA: SyncBatchNorm has no CPU (gloo) kernels, so elsewhere the setting is ignored with a
    one-line note and BatchNorm stays per process. True when converted.

    The conversion keeps the same parameter and buffer tensors, so the optimizer, the EMA and the
    checkpoints (same state_dict keys, plain BatchNorm at inference) are unaffected.
    """
    if not cfg.sync_bn:
        return False
    if world > 1 and device.type == "cuda":
        nets.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(nets.model)
        nets.train_model = nets.model
        return True
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"note: sync_bn=true ignored: SyncBatchNorm needs CUDA and several processes "
              f"(this run: {device.type} x{world}); BatchNorm statistics stay per process")
    return False


def wrap(nets: Nets, cfg: Settings, world: int, device: torch.device) -> None:
    """SyncBatchNorm (sync_bn), DDP (after resuming: it broadcasts rank 0's weights) and torch.compile
    around the model."""
    sync_batchnorm(nets, cfg, world, device)
    if world > 1:
        nets.ddp = torch.nn.parallel.DistributedDataParallel(
            nets.model, device_ids=[device.index] if device.type == "cuda" else None)
        nets.train_model = nets.ddp
    if cfg.compile:
        nets.train_model = torch.compile(nets.train_model)


# checkpoint keys that only `resume` reads (an averaged-weights file leaves them out: `save_average`)
RESUME_ONLY = ("raw_model", "ema", "optimizer", "scaler", "scheduler", "rng", "avg")


def checkpoint_state(cfg: Settings, fold: str, nets: Nets, run: Progress, sched: Schedule) -> dict[str, Any]:
    """The checkpoint dict; "model" and "config" alone rebuild the model for prediction."""
    return {"model": nets.eval_model.state_dict(), "raw_model": nets.model.state_dict(),
            "ema": nets.ema.state_dict() if nets.ema is not None else None, "config": cfg.to_dict(),
            "fold": fold,
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


def average_epoch(cfg: Settings, nets: Nets, run: Progress) -> bool:
    """avg_last=N, rank 0 at the end of epoch `run.epoch`, before the epoch's checkpoint state is built (so
    last.pt holds the sum): add the model's weights when the epoch is one of the last N (under DDP every
    rank holds the same weights). True after the last epoch: avg.pt is due (`save_average`)."""
    if nets.avg is None or not nets.avg.wants(run.epoch):
        return False
    nets.avg.update(nets.model)
    return run.epoch == cfg.epochs


def save_average(cfg: Settings, run_dir: Path, nets: Nets, state: dict[str, Any],
                 log: Callable[[str], None] = print) -> None:
    """avg.pt from the last epoch's checkpoint `state`: its "model" is the average, and what only `resume`
    reads (optimizer, the float64 sums, ...: RESUME_ONLY) is left out; the rest (config, progress, history)
    is kept, so src.models.flair_model.load_for_inference, prediction and init_from read it like best.pt."""
    span = averaged_epochs(cfg.epochs, cfg.avg_last)
    averaged = {k: v for k, v in state.items() if k not in RESUME_ONLY}
    averaged.update(model=nets.avg.average(state["raw_model"]), averaged_epochs=list(span))
    save_checkpoint(run_dir / "avg.pt", averaged)
    log(f"avg_last={cfg.avg_last}: weights averaged over epochs {span[0]}..{span[-1]} saved in "
        f"{run_dir / 'avg.pt'}")


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


def averaged_epochs(epochs: int, last: int) -> range:
    """The 1-based epochs whose end weights are averaged: the last `last` of `epochs` (all if fewer)."""
    return range(max(1, epochs - last + 1), epochs + 1)


class WeightAverage:
    """Running sum of a model's state_dict at chosen epoch ends; `average()` is their mean."""

    def __init__(self, epochs: int, last: int):
        self.epochs, self.last = epochs, last
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def wants(self, epoch: int) -> bool:
        """Is the end of (1-based) `epoch` one of the averaged ones?"""
        return epoch in averaged_epochs(self.epochs, self.last)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """Add the model's current weights and buffers to the sum."""
        for key, value in model.state_dict().items():
            value = value.detach().to("cpu")
            if not value.dtype.is_floating_point:
                self.sums[key] = value.clone()  # counters: the latest value
            elif key in self.sums:
                self.sums[key] += value.double()
            else:
                self.sums[key] = value.double().clone()
        self.count += 1

    def average(self, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The mean weights as a state_dict with the dtypes of `like` (the model's own state_dict)."""
        if self.count == 0:
            raise RuntimeError("no epoch averaged yet")
        return {k: (self.sums[k] / self.count if v.dtype.is_floating_point else self.sums[k]).to(v.dtype)
                for k, v in like.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"sums": self.sums, "count": self.count, "epochs": self.epochs, "last": self.last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums = {k: v.to("cpu") for k, v in state["sums"].items()}
        self.count = int(state["count"])


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
    def of(cls, cfg: Settings, batches_per_epoch: int) -> Schedule:
        per_epoch = math.ceil(batches_per_epoch / cfg.accum_steps)
        return cls(total_steps=cfg.epochs * per_epoch,
                   warmup_steps=int(round(cfg.warmup_epochs * per_epoch)),
                   base=cfg.lr, min_ratio=cfg.min_lr_ratio)

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
