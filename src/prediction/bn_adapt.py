"""Test-time BatchNorm re-estimation per test domain (`bn_adapt=domain`), without labels.

Why: the test domains are never seen in training; a domain's radiometry (camera, season, sun) shifts the
activations, while the BatchNorm layers normalise with statistics pooled over the training domains.
Re-estimating those statistics on the domain's own patches is the cheapest test-time adaptation there is
(AdaBN, Li et al. 2016; Schneider et al. 2020): forward passes only, no labels, no gradients.

How (`adapt_ensemble`, `adapt_batchnorm`):
- the model is copied (the original is never touched: the next domain starts from the trained weights);
- in the copy every BatchNorm layer that tracks running statistics gets momentum=None (cumulative
  average: after n batches the running mean is the mean of the n batch means and the running variance the
  mean of the n unbiased batch variances, the estimate training's momentum approximates) and
  num_batches_tracked=0, so the first batch replaces the training statistics: a reset. BatchNorm layers
  are in train mode, every other layer in eval mode (dropout off);
- the inputs are the ones prediction feeds (normalised on the device by src.data.device_augment.device_batch,
  autocast dtype, channels_last), identity view only: the first layer's statistics are exactly invariant
  under the D4 views (a permutation of pixels), training already averaged its statistics over D4-augmented
  crops, and the estimate then costs 1/V of a TTA prediction of the same patches;
- a BatchNorm call that sees one value per channel (a pooled 1x1 branch with batch 1) cannot estimate: that
  call uses the layer's current statistics instead of failing;
- models without BatchNorm (SegFormer: LayerNorm; GroupNorm) are returned as they are (`has_batchnorm`).

Which patches (`estimate_rows`): the domain's rows of the whole index, evenly spaced when over the cap, so
the result does not depend on which patches are still to write (a resumed run, or work split between
processes, estimates the same statistics from the same patches in the same batches)."""
from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from src.core.runtime import amp_dtype, autocast
from src.prediction.ensemble import Ensemble, model_device, model_inputs


def batchnorm_layers(model: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers (1d/2d/3d, SyncBatchNorm) that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def has_batchnorm(model: nn.Module) -> bool:
    return bool(batchnorm_layers(model))


def estimate_rows(rows: pd.DataFrame, cap: int) -> pd.DataFrame:
    """The rows the statistics are estimated on: all of them, or `cap` evenly spaced ones (every zone of the
    domain, not only the first ones in index order)."""
    if cap <= 0 or len(rows) <= cap:
        return rows
    return rows.iloc[np.linspace(0, len(rows) - 1, cap).round().astype(int)]


def _one_value_guard(module: _BatchNorm, args: tuple[Any, ...]) -> None:
    """Train-mode BatchNorm fails on one value per channel: such a call uses the current statistics."""
    x = args[0]
    module.training = x.numel() > x.shape[1]


def _prepare(model: nn.Module) -> tuple[nn.Module, list[Any]]:
    twin = copy.deepcopy(model).eval()
    hooks = []
    for bn in batchnorm_layers(twin):
        bn.momentum = None
        bn.num_batches_tracked.zero_()
        bn.train()
        hooks.append(bn.register_forward_pre_hook(_one_value_guard))
    return twin, hooks


def _forward(model: nn.Module, batch: dict[str, Any], precision: str, channels_last: bool) -> None:
    """The identity view of prediction's forward pass (src.prediction.ensemble.predict_batch)."""
    dev = model_device(model)
    extra = model_inputs(batch, dev)
    x = extra.pop("image")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(dev, amp_dtype(precision, dev)):
        model(x, **extra)


@torch.no_grad()
def adapt_ensemble(models: Sequence[nn.Module], batches: Iterable[Sequence[dict[str, Any]]], *,
                   precision: str = "auto", channels_last: bool = False) -> list[nn.Module]:
    """Copies of `models` (eval mode) whose BatchNorm statistics are re-estimated on `batches`.

    Each item of `batches` holds one batch per model (its inputs, normalised), so the patches are read
    once for the whole ensemble. Models without BatchNorm come back as they are (not copied)."""
    prepared = [_prepare(m) if has_batchnorm(m) else None for m in models]
    try:
        for item in batches:
            for p, batch in zip(prepared, item):
                if p is not None:
                    _forward(p[0], batch, precision, channels_last)
    finally:
        for p in prepared:
            for h in p[1] if p is not None else ():
                h.remove()
    return [m if p is None else p[0].eval() for m, p in zip(models, prepared)]


def adapt(ens: Ensemble, batches: Iterable[Sequence[dict[str, Any]]]) -> Ensemble:
    """The ensemble with its BatchNorm statistics re-estimated on `batches` (one fed batch per model, as
    `Ensemble.feed` makes them), in its own precision and memory format."""
    return ens.with_models(adapt_ensemble(ens.models, batches, precision=ens.cfg.precision,
                                          channels_last=ens.cfg.channels_last))


def adapt_batchnorm(model: nn.Module, batches: Iterable[dict[str, Any]], *, precision: str = "auto",
                    channels_last: bool = False) -> nn.Module:
    """One model: a copy with its BatchNorm statistics re-estimated on `batches` (see adapt_ensemble)."""
    return adapt_ensemble([model], ([b] for b in batches), precision=precision,
                          channels_last=channels_last)[0]
