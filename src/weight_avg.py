"""Average of the model's weights at the ends of the last N epochs (`avg_last=N`, SWA-style), an
alternative to the EMA: a flat average over epochs that each ended near a different point of the late,
low-lr part of the schedule often generalises better than any one of them.

The sum is kept in float64 on the CPU (no GPU memory; summing a few float32 tensors in float64 is exact),
so the average of N epochs is the exact mean rounded once, and a resumed run that reloads the sum from
last.pt ends with the very same bits.

BatchNorm running statistics are averaged like the weights. That is an approximation: the statistics of
the averaged weights are not the average of the statistics, and SWA proper re-estimates them with one
pass over the training data (torch.optim.swa_utils.update_bn). Integer buffers (num_batches_tracked)
take the latest epoch's value.
"""
from __future__ import annotations

from typing import Any

import torch


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
