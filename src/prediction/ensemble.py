"""Ensemble maths of prediction: the checkpoints and per-model weights, one batch through every model
with its TTA views, the uint8 quantisation of saved probabilities, and the TTA level a time budget allows.
Shared by `src.predict` (test patches) and `src.infer` (whole orthophotos).

- Batches arrive on the device already normalised (src.data.device_augment.device_batch: uint8 travels to the
  device, normalisation happens there); TTA views of a batch are stacked (V*B rows) on the device and go
  through the network in one call; the S2 crop is flipped/rotated with the aerial image (src/prediction/tta.py),
  and outputs are mapped back before averaging.
- `ensemble=probs` (default) averages softmax probabilities over views and models with the weights;
  `ensemble=logits` averages logits and takes one softmax at the end."""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from src.core.checkpoint import find_checkpoints
from src.core.errors import PredictError
from src.core.progress import fmt_duration as fmt_s
from src.core.runtime import amp_dtype, autocast
from src.prediction import tta as T

# Per-sample inputs a model takes besides the image (moved to its device with the image).
INPUT_KEYS = ("s2", "s2_days", "s2_pad", "meta")


def normalise_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """Per-model weights summing to 1 (equal when None)."""
    if weights is None:
        return [1.0 / n] * n
    w = [float(x) for x in weights]
    if len(w) != n:
        raise PredictError(f"{len(w)} weights given for {n} models")
    if any(x < 0 or not np.isfinite(x) for x in w) or sum(w) <= 0:
        raise PredictError(f"weights must be >= 0 with a positive sum, got {w}")
    s = sum(w)
    return [x / s for x in w]


def resolve_checkpoints(items: Sequence[str | Path], weights: Sequence[float] | None
                        ) -> tuple[list[Path], list[float] | None]:
    """Checkpoint files from files and run folders (every best.pt under a folder), with per-model weights.

    Weights may be given per checkpoint, or per --runs item (an item's weight is split evenly between
    the checkpoints found under it, so a 5-fold run and a single model at 1,1 weigh the same)."""
    found: list[Path] = []
    item_of: list[int] = []
    seen: set[Path] = set()
    for k, item in enumerate(items):
        for p in find_checkpoints(item):
            if p.resolve() not in seen:
                seen.add(p.resolve())
                found.append(p)
                item_of.append(k)
    if weights is None:
        return found, None
    weights = [float(x) for x in weights]
    if len(weights) == len(found):
        return found, weights
    if len(weights) == len(items):
        count = [item_of.count(k) for k in range(len(items))]
        return found, [weights[k] / count[k] for k in item_of]
    raise PredictError(f"{len(weights)} weights for {len(items)} --runs items / {len(found)} checkpoints: "
                       "give one weight per item or per checkpoint")


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@dataclass(frozen=True)
class Mix:
    """A blend recipe's combination (src.ensembling.recipe; docs/recipes.md, "Out-of-fold ensembling"), replacing the
    per-model weights: class c's probability is sum_m class_weights[m][c] * p_m[c] (one model alone where
    the recipe chose one for c), times exp(biases[c]), renormalised over the classes. Its numpy twin, which
    the search and its OOF figures use, is src.ensembling.search.mix_predict (tests/test_blend.py: same argmax)."""

    class_weights: tuple[tuple[float, ...], ...]  # (models, 13)
    biases: tuple[float, ...]                     # (13,)

    def column(self, k: int, like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(self.class_weights[k], dtype=like.dtype, device=like.device).view(1, -1, 1, 1)

    def finish(self, total: torch.Tensor) -> torch.Tensor:
        scale = torch.tensor(self.biases, dtype=torch.float64).exp().to(total.device, total.dtype)
        q = total * scale.view(1, -1, 1, 1)
        return q / q.sum(1, keepdim=True).clamp_min(1e-30)


@torch.inference_mode()
def predict_batch(models: Sequence[nn.Module], weights: Sequence[float] | None,
                  batch: dict[str, Any] | Sequence[dict[str, Any]], tta: str = "none",
                  ensemble: str = "probs", *, precision: str = "auto",
                  channels_last: bool = False, mix: Mix | None = None) -> torch.Tensor:
    """Class probabilities (B, 13, H, W) float32 of a weighted ensemble with TTA, on the models' device.

    `batch` is one batch of model inputs ("image" normalised, e.g. by src.data.device_augment.device_batch)
    shared by all models, or a list with one batch per model (models fed different inputs). Each model
    sees the V views of its batch stacked as V*B rows in one call, with the S2 crop transformed like the
    image; outputs are inverted to the original frame and averaged
    (probabilities, or logits when `ensemble="logits"`), then combined across models with the weights.
    Precision follows the kit's policy (src.core.runtime.amp_dtype: `auto` is plain fp32 on CPU).
    A `mix` (a blend recipe) replaces the weights by per-class weights and biases (probabilities only).
    """
    if ensemble not in ("probs", "logits"):
        raise PredictError(f"ensemble must be probs or logits, got {ensemble!r}")
    if mix is not None and (ensemble != "probs" or len(mix.class_weights) != len(models)):
        raise PredictError(f"a recipe mixes probabilities of {len(mix.class_weights)} models: got "
                           f"{len(models)} models, ensemble={ensemble}")
    batches = [batch] * len(models) if isinstance(batch, dict) else list(batch)
    if len(batches) != len(models):
        raise PredictError(f"{len(batches)} batches for {len(models)} models")
    w = normalise_weights(weights, len(models))
    vs = T.views(tta)
    total: torch.Tensor | None = None
    for k, (model, wi, b) in enumerate(zip(models, w, batches)):
        dev = model_device(model)
        dtype = amp_dtype(precision, dev)
        nb = dev.type == "cuda"
        if b["image"].dtype == torch.uint8:
            raise PredictError("predict_batch: the image is raw uint8: normalise it first "
                               "(src.data.device_augment.device_batch)")
        image = b["image"].to(dev, non_blocking=nb)
        inputs = {"image": image}
        inputs.update({k: b[k].to(dev, non_blocking=nb) for k in INPUT_KEYS
                       if isinstance(b.get(k), torch.Tensor)})
        acc: torch.Tensor | None = None
        for group in T.view_groups(vs, square=image.shape[-1] == image.shape[-2]):
            stacked = T.stack_views(inputs, group)
            x = stacked.pop("image")
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(dev, dtype):
                out = model(x, **stacked)
            logits = (out["logits"] if isinstance(out, dict) else out).float()
            for y in T.unstack_views(logits, group):
                y = y.softmax(1) if ensemble == "probs" else y
                acc = y if acc is None else acc + y
        acc = acc / len(vs)
        wk = wi if mix is None else mix.column(k, acc)
        total = acc * wk if total is None else total + (acc * wk).to(total.device)
    if mix is not None:
        return mix.finish(total)
    return total if ensemble == "probs" else total.softmax(1)


def quantise(probs: torch.Tensor) -> torch.Tensor:
    """float probabilities -> uint8 round(p*255) (what --save-probs stores)."""
    return (probs.clamp(0, 1) * 255).round_().to(torch.uint8)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def choose_tta(models: Sequence[nn.Module], weights: Sequence[float], batches: list[dict[str, Any]],
               cfg: dict[str, Any], n_total: int, budget_s: float, device: torch.device,
               log: Callable[[str], None]) -> str:
    """Largest TTA level whose projected time for `n_total` patches fits `budget_s`.

    Each level runs the first batch once untimed (warm-up) and once timed; the projection is
    network time only (data loading runs in parallel workers). Larger levels are skipped once one
    does not fit; if even `none` does not fit it is used anyway, with a warning."""
    n = len(batches[0]["image"])
    choice = "none"
    for level in T.LEVELS:
        kw = dict(tta=level, ensemble=cfg["ensemble"], precision=cfg["precision"],
                  channels_last=cfg["channels_last"])
        predict_batch(models, weights, batches, **kw)
        _sync(device)
        t0 = time.perf_counter()
        predict_batch(models, weights, batches, **kw)
        _sync(device)
        per = (time.perf_counter() - t0) / n
        proj = per * n_total
        fits = proj <= budget_s
        log(f"predict: time budget {budget_s:.0f} s: tta={level} ({len(T.views(level))} views) "
            f"{per:.3f} s/patch -> {fmt_s(proj)} for {n_total} patches {'fits' if fits else 'does NOT fit'}")
        if not fits:
            if level == "none":
                log("predict: warning: even tta=none does not fit the time budget; using it anyway")
            break
        choice = level
    log(f"predict: time budget picks tta={choice}")
    return choice
