"""BatchNorm running statistics re-estimated from batches: the cumulative average of the batch statistics.

Why: a BatchNorm layer normalises with its running statistics in eval mode, a momentum average of the batch
statistics of past training steps. When the weights change fast (from-scratch models, high learning rates,
the first epochs; the EMA's averaged weights) those statistics describe older weights, and the eval-mode
network can be far off: early in a demo run, validation loss 3,900 against a training loss of 7 and logits
up to 12,500, where the same weights with re-estimated statistics score 6.7. Training re-estimates them for
the weights it validates and saves (`bn_recalibrate`); prediction does it per test domain (`bn_adapt`).

How (`Estimate`): every BatchNorm layer that tracks running statistics gets momentum=None (cumulative
average: after n batches the running mean is the mean of the n batch means and the running variance the mean
of the n unbiased batch variances) and num_batches_tracked=0, so the first batch replaces the old statistics;
BatchNorm layers are in train mode, every other layer in eval mode (dropout off). A call that sees one value
per channel (a pooled 1x1 branch with batch 1) cannot estimate: it uses the current statistics. On exit the
momenta are restored and the model is in eval mode.
"""
from __future__ import annotations

from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def batchnorm_layers(model: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers (1d/2d/3d, SyncBatchNorm) that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def has_batchnorm(model: nn.Module) -> bool:
    return bool(batchnorm_layers(model))


def _one_value_guard(module: _BatchNorm, args: tuple[Any, ...]) -> None:
    """Train-mode BatchNorm fails on one value per channel: such a call uses the current statistics."""
    x = args[0]
    module.training = x.numel() > x.shape[1]


class Estimate:
    """`with Estimate(model): model(x) ...`: the forward passes inside re-estimate the running statistics of
    `model`'s BatchNorm layers, in place (see the module docstring)."""

    def __init__(self, model: nn.Module):
        self.model, self.layers = model, batchnorm_layers(model)

    def __enter__(self) -> nn.Module:
        self.model.eval()
        self.momenta = [bn.momentum for bn in self.layers]
        self.hooks = []
        for bn in self.layers:
            bn.momentum = None
            bn.num_batches_tracked.zero_()
            bn.train()
            self.hooks.append(bn.register_forward_pre_hook(_one_value_guard))
        return self.model

    def __exit__(self, *exc: Any) -> None:
        for bn, momentum, hook in zip(self.layers, self.momenta, self.hooks):
            hook.remove()
            bn.momentum = momentum
        self.model.eval()
