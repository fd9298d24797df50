"""Skipping a non-finite training step without poisoning the run.

A NaN/inf loss or gradient (a bad batch, an lr spike, fp16 overflow) must not reach the weights, the
optimizer moments or the BatchNorm running statistics (the forward pass already updated those, so they
are put back). A few such steps are skipped and counted; more than `limit` in a row stop the run with
TrainingDiverged, leaving the last checkpoint on disk as the last good one."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from src.core.errors import TrainingDiverged


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
