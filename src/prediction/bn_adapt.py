"""Test-time BatchNorm re-estimation per test domain (`bn_adapt=domain`), without labels.

Why: the test domains are never seen in training; a domain's radiometry (camera, season, sun) shifts the
activations, while the BatchNorm layers normalise with statistics pooled over the training domains.
Re-estimating those statistics on the domain's own patches is the cheapest test-time adaptation there is
(AdaBN, Li et al. 2016; Schneider et al. 2020): forward passes only, no labels, no gradients.

How (`adapt_ensemble`, `adapt_batchnorm`):
- the model is copied (the original is never touched: the next domain starts from the trained weights);
- the copy's statistics are re-estimated as src.models.batchnorm does it (the cumulative average of the
  batch statistics; the first batch replaces the training statistics: a reset);
- the inputs are the ones prediction feeds (normalised on the device by src.data.device_augment.device_batch,
  autocast dtype, channels_last), identity view only: the first layer's statistics are exactly invariant
  under the D4 views (a permutation of pixels), training already averaged its statistics over D4-augmented
  crops, and the estimate then costs 1/V of a TTA prediction of the same patches;
- models without BatchNorm (SegFormer: LayerNorm; GroupNorm) are returned as they are (`has_batchnorm`).

Which patches (`estimate_rows`): the domain's rows of the whole index, evenly spaced when over the cap, so
the result does not depend on which patches are still to write (a resumed run, or work split between
processes, estimates the same statistics from the same patches in the same batches)."""
from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from contextlib import ExitStack
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from src.core.runtime import amp_dtype, autocast
from src.models.batchnorm import Estimate, has_batchnorm
from src.prediction.ensemble import Ensemble, model_device, model_inputs


def estimate_rows(rows: pd.DataFrame, cap: int) -> pd.DataFrame:
    """The rows the statistics are estimated on: all of them, or `cap` evenly spaced ones (every zone of the
    domain, not only the first ones in index order)."""
    if cap <= 0 or len(rows) <= cap:
        return rows
    return rows.iloc[np.linspace(0, len(rows) - 1, cap).round().astype(int)]


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
    """Copies of `models` (eval mode) whose BatchNorm statistics are re-estimated on `batches`
    (src.models.batchnorm.Estimate).

    Each item of `batches` holds one batch per model (its inputs, normalised), so the patches are read
    once for the whole ensemble. Models without BatchNorm come back as they are (not copied)."""
    twins = [copy.deepcopy(m) if has_batchnorm(m) else None for m in models]
    with ExitStack() as stack:
        estimates = [None if twin is None else stack.enter_context(Estimate(twin)) for twin in twins]
        for item in batches:
            for twin, est, batch in zip(twins, estimates, item):
                if est is not None:
                    est.feed(_forward, twin, batch, precision, channels_last)
    return [m if twin is None else twin for m, twin in zip(models, twins)]


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
