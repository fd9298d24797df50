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
per channel (a pooled 1x1 branch with batch 1) cannot estimate: it uses the current statistics. A batch that
makes any statistic non-finite (inf/NaN inputs, an fp16 overflow) is left out, as training skips such a step:
one bad patch would otherwise poison every layer's average. On exit the momenta are restored and the model is
in eval mode; when every batch was left out the statistics are the ones the model came with.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
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


def _statistics(layers: list[_BatchNorm]) -> list[torch.Tensor]:
    return [t for bn in layers for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked)]


class Estimate:
    """`with Estimate(model) as est: est.feed(model, x) ...`: the forward passes fed re-estimate the
    running statistics of `model`'s BatchNorm layers, in place (see the module docstring)."""

    def __init__(self, model: nn.Module):
        self.model, self.layers = model, batchnorm_layers(model)
        self.left_out = 0

    def feed(self, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> bool:
        """`forward(*args, **kwargs)`: the model's forward pass on one batch. False when the batch was left
        out because a statistic came out non-finite (the statistics are then those before it)."""
        before = [t.clone() for t in _statistics(self.layers)]
        forward(*args, **kwargs)
        now = _statistics(self.layers)
        if bool(torch.cat([t.flatten() for t in now if t.is_floating_point()]).isfinite().all()):
            return True
        for t, old in zip(now, before):
            t.copy_(old)
        self.left_out += 1
        return False

    def __enter__(self) -> Estimate:
        self.model.eval()
        self.momenta = [bn.momentum for bn in self.layers]
        self.hooks = []
        for bn in self.layers:
            bn.momentum = None
            bn.num_batches_tracked.zero_()
            bn.train()
            self.hooks.append(bn.register_forward_pre_hook(_one_value_guard))
        return self

    def __exit__(self, *exc: Any) -> None:
        for bn, momentum, hook in zip(self.layers, self.momenta, self.hooks):
            hook.remove()
            bn.momentum = momentum
        self.model.eval()
