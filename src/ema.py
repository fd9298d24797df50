"""Exponential moving average of a model's weights: the weights that are validated and shipped.

Averaging the last few thousand steps smooths the noise of the final steps at no training cost; the
checkpoint's "model" holds these averaged weights (docs/data-format.md, "Checkpoints").
"""
from __future__ import annotations

import copy
from typing import Any

import torch


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
