"""The one prediction engine of predict, oof, pseudo, infer and bn_adapt: where a prediction process runs,
checkpoints loaded into an `Ensemble` (each model with its own settings, checked once, and its weight),
one batch through every model with its TTA views, the uint8 quantisation of saved probabilities, and the
TTA level a time budget allows.

- Batches arrive on the device already normalised (src.data.device_augment.device_batch: uint8 travels to the
  device, normalisation happens there); TTA views of a batch are stacked (V*B rows) on the device and go
  through the network in one call; the S2 crop is flipped/rotated with the aerial image
  (src/prediction/tta.py),
  and outputs are mapped back before averaging.
- `ensemble=probs` (default) averages softmax probabilities over views and models with the weights;
  `ensemble=logits` averages logits and takes one softmax at the end."""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from src.core.checkpoint import find_checkpoints, load_checkpoint
from src.core.config import from_saved
from src.core.errors import PredictError
from src.core.progress import count
from src.core.progress import fmt_duration as fmt_s
from src.core.runtime import (
    Placement,
    amp_dtype,
    autocast,
    precision_name,
    setup_distributed,
    share_cores,
    tune_cuda,
)
from src.core.settings import TTA_LEVELS, Settings
from src.data.device_augment import device_batch
from src.data.loader import group_configs, input_groups
from src.models.flair_model import load_for_inference
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


def device_tta(level: str, device: torch.device) -> str:
    """The TTA level to run: `auto` is d4 on a GPU (8 views in one stacked forward cost little there) and none
    on a CPU (each view costs a whole forward pass: d4 would take 8 times as long); a level is itself."""
    if level != "auto":
        return level
    return "d4" if device.type == "cuda" else "none"


def model_inputs(batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    """A normalised batch's model inputs on `device`: "image" and those of INPUT_KEYS it holds."""
    if batch["image"].dtype == torch.uint8:
        raise PredictError("the image is raw uint8: normalise it first "
                           "(src.data.device_augment.device_batch)")
    nb = device.type == "cuda"
    return {k: batch[k].to(device, non_blocking=nb) for k in ("image", *INPUT_KEYS)
            if isinstance(batch.get(k), torch.Tensor)}


@dataclass(frozen=True)
class Mix:
    """A blend recipe's combination (src.ensembling.recipe; docs/recipes.md, "Out-of-fold ensembling"),
    replacing the per-model weights: class c's probability is sum_m class_weights[m][c] * p_m[c] (one model
    alone where the recipe chose one for c), times exp(biases[c]), renormalised over the classes. Its numpy
    twin, which the search and its OOF figures use, is src.ensembling.search.mix_predict (tests/test_blend.py:
    same
    argmax)."""

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
        inputs = model_inputs(b, dev)
        image = inputs["image"]
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
        if len(vs) > 1:
            acc = acc / len(vs)
        wk = wi if mix is None else mix.column(k, acc)
        if len(models) > 1 or mix is not None:  # a lone model's weight is 1: no pass over its output
            acc = acc * wk
        total = acc if total is None else total + acc.to(total.device)
    if mix is not None:
        return mix.finish(total)
    return total if ensemble == "probs" else total.softmax(1)


def quantise(probs: torch.Tensor) -> torch.Tensor:
    """float probabilities -> uint8 round(p*255) (what --save-probs stores)."""
    return (probs.clamp(0, 1) * 255).round_().to(torch.uint8)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def choose_tta(ens: Ensemble, batches: list[dict[str, Any]], n_total: int, budget_s: float,
               log: Callable[[str], None]) -> str:
    """Largest TTA level whose projected time for `n_total` patches fits `budget_s`.

    Each level runs the first batch once untimed (warm-up) and once timed; the projection is
    network time only (data loading runs in parallel workers). Larger levels are skipped once one
    does not fit; if even `none` does not fit it is used anyway, with a warning."""
    n, device = len(batches[0]["image"]), ens.device
    choice = "none"
    for level in TTA_LEVELS:
        ens.predict(batches, level)
        _sync(device)
        t0 = time.perf_counter()
        ens.predict(batches, level)
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


# ------------------------------------------------------------------------------------------ the engine
@dataclass
class Ensemble:
    """The one prediction engine of predict, oof, infer and bn_adapt: models rebuilt from their checkpoints,
    each with its own settings (its checkpoint's, with the command line's overrides), their weights, and
    the call that sends a batch through every model and its TTA views.

    The first model's settings are the prediction settings (tta, ensemble, precision, channels_last,
    batch_size, workers, ...): overrides apply to every model alike, so they agree wherever it matters."""

    models: list[nn.Module]
    settings: list[Settings]
    weights: list[float]              # one per model, summing to 1
    paths: list[Path] = field(default_factory=list)
    mix: Mix | None = None            # a blend recipe's per-class weights and biases (replaces `weights`)

    def __post_init__(self) -> None:
        # models fed the same input settings share one batch (src.data.loader.input_groups)
        self.group_of = input_groups(self.settings)
        self.group_settings = group_configs(self.settings, self.group_of)

    @property
    def cfg(self) -> Settings:
        return self.settings[0]

    @property
    def device(self) -> torch.device:
        return model_device(self.models[0])

    def with_models(self, models: list[nn.Module]) -> Ensemble:
        """The same ensemble with other networks (bn_adapt's re-estimated copies)."""
        return dataclasses.replace(self, models=models)

    def with_settings(self, cfg: Settings) -> Ensemble:
        """The same ensemble with other prediction settings (the first model's)."""
        return dataclasses.replace(self, settings=[cfg, *self.settings[1:]])

    def feed(self, raw: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """The batch each model is fed, from one raw batch per input group
        (src.data.loader.prediction_loader):
        copied to the device and normalised there in the autocast dtype, once per group (models that take raw
        band values get the group's batch unnormalised, in float32)."""
        dtype = amp_dtype(self.cfg.precision, self.device)
        keys = list(zip(self.group_of, self.takes_raw))
        ready = {(g, r): device_batch(raw[g], self.group_settings[g], self.device, dtype=dtype,
                                      normalise=not r) for g, r in dict.fromkeys(keys)}
        return [ready[key] for key in keys]

    @property
    def takes_raw(self) -> list[bool]:
        """Per model: fed raw band values (an ONNX file normalises inside, src.prediction.onnx_engine)."""
        return [bool(getattr(m, "takes_raw", False)) for m in self.models]

    def describe(self, tta: str) -> str:
        """The ensemble as one log line: models, weights (or the recipe's), TTA views, ensembling, device."""
        n = len(T.views(tta))
        weights = ("a recipe's per-class weights" if self.mix is not None
                   else "weights " + ", ".join(f"{x:.3g}" for x in self.weights))
        engines = "+".join(dict.fromkeys("onnx" if r else "torch" for r in self.takes_raw))
        return (f"{count(len(self.models), 'model')}, {weights}, tta={tta} ({count(n, 'view')}, up to "
                f"{n * self.cfg.batch_size} images per forward), ensemble={self.cfg.ensemble}, device "
                f"{self.device}, precision {precision_name(amp_dtype(self.cfg.precision, self.device))}, "
                f"engine {engines}")

    def predict(self, batches: dict[str, Any] | Sequence[dict[str, Any]], tta: str) -> torch.Tensor:
        """Class probabilities (B, 13, H, W) of one batch (or one batch per model) at TTA level `tta`."""
        c = self.cfg
        return predict_batch(self.models, self.weights, batches, tta, c.ensemble, precision=c.precision,
                             channels_last=c.channels_last, mix=self.mix)

    def identity(self) -> dict[str, Any]:
        """Which files made a prediction (the resume check of predict.json)."""
        return {"models": [{"path": str(p.resolve()), "size": p.stat().st_size,
                            "mtime_ns": p.stat().st_mtime_ns}
                           for p in self.paths]}


def load_ensemble(runs: Sequence[str | Path], device: torch.device, *, weights: Sequence[float] | None = None,
                  overrides: dict[str, Any] | None = None, job: str = "predict", mix: Mix | None = None,
                  on_first: Callable[[Settings], None] | None = None,
                  log: Callable[[str], None] = print) -> Ensemble:
    """Every checkpoint under `runs` (best.pt of each run folder, or the files given) as one Ensemble on
    `device`. Each model's settings are its checkpoint's with `overrides` on top, checked against what `job`
    needs before the model is built (src.models.flair_model.load_for_inference); `on_first` gets the first
    model's settings before any model is built (a job's own checks, such as its index)."""
    paths, w = resolve_checkpoints(runs, weights)
    if on_first is not None:
        on_first(from_saved(load_checkpoint(paths[0], map_location="cpu", mmap=True)["config"], str(paths[0]),
                            overrides))
    models, settings = [], []
    for p in paths:
        model, s = load_for_inference(p, device, overrides, job)
        if (settings[0] if settings else s).channels_last:  # faster on GPU, and on CPU too (oneDNN, ~1.3x)
            model = model.to(memory_format=torch.channels_last)
        models.append(model)
        settings.append(s)
        log(f"{job}: loaded {p} (arch {s.arch}, encoder {s.encoder}, bands {','.join(s.bands)}, "
            f"s2 {s.use_s2})")
    return Ensemble(models, settings, normalise_weights(w, len(models)), paths, mix)


def place_prediction(device: str = "auto") -> Placement:
    """Where this prediction process runs: its local GPU under torchrun (or the device asked for), the
    machine's cores shared between CPU processes, cuDNN tuned for the fixed input sizes."""
    place = setup_distributed(device)
    share_cores(place)
    tune_cuda(place.device)
    return place
