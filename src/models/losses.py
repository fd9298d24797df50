"""Training losses: one `Criterion` that turns a model output dict and a mask into a scalar.

Kept apart from the loop so that train.py reads top to bottom and the loss can be tested alone.
Class weights follow the challenge: by default "other" (12) weighs 0 because it is not scored, and the
auxiliary Sentinel-2 head also gives plowed land (11) weight 0, as IGN's U-T&T baseline does.

The auxiliary S2 head is trained on the whole S2 pixels under the aerial image (`s2_label_window`,
docs/data-format.md, "Geometry") against the majority label of each (`downsample_mask`). S2 pixels
whose window left the super-area (or, after augmentation, came from outside the window) reach the
model as zero-filled inputs; the batch's "s2_valid" marks them, and they are excluded from the
auxiliary loss (ignored targets) so the head is never taught to map zeros to the labels below.

Pseudo-labels (src.data.pseudo_labels): pixels below the confidence threshold arrive as IGNORE_U8 (255) in the
mask and take no part in any term; `weight` (B,) scales each sample's terms (pseudo_weight for pseudo
rows, 1 for labelled ones): CE sums weight x pixel terms over the usual (class-weighted) pixel count, so a
batch of pseudo rows alone weighs pseudo_weight x its loss; focal, a mean over pixels, weighs each pixel by
its sample's weight (what taking it per group of equal weight, scaled by the weight and the group's share
of the valid pixels, comes to); Dice, a ratio over the batch, is taken per such group and summed.

Without `weight` no term reads a value back to the host (no boolean indexing, no .item()), so the loss
never stalls the step's kernel queue; only Dice with weights reads the (B,) weights to form its groups."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.losses import DiceLoss, FocalLoss

from src.core.errors import ConfigError
from src.core.flair import NUM_CLASSES, OTHER, centred_s2_box
from src.core.settings import Settings
from src.data.pseudo_labels import IGNORE_U8

PLOWED = 11  # plowed land: weight 0 in the S2 head by default (IGN baseline)
IGNORE = -100  # target value of pixels that take no part in a loss


def class_weights(cfg: Settings, s2_head: bool = False) -> torch.Tensor:
    """cfg.class_weights -> (13,) float tensor; "default" zeroes "other" (and plowed land for S2).

    A list (also what inverse | inverse_sqrt resolve to, src.training.data) weighs both heads the same.
    """
    spec = cfg.class_weights
    n = cfg.num_classes
    if spec == "default":
        w = torch.ones(n)
        if n > OTHER:
            w[OTHER] = 0.0
        if s2_head and n > PLOWED:
            w[PLOWED] = 0.0
        return w
    if spec == "none":
        return torch.ones(n)
    if cfg.class_weights_from_data:  # the numbers depend on the training split: train.prepare resolves them
        raise ConfigError(f"class_weights={spec} is computed from the training split's class histograms "
                          "before training (src.training.prepare.resolve_knobs); elsewhere pass the 13 "
                          "numbers")
    return torch.tensor(spec)  # numbers, checked by src.core.settings


def s2_label_window(s2_map: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
    """The integer centre crop of an S2-grid map (..., S, S) that lies under the aerial image: the S2
    pixels that have labels.

    The S2 crop (e.g. 40x40 px, 400 m) is centred on the patch but much larger than it (102.4 m), so only
    its centre ~10x10 pixels (rounded, `geometry.centred_s2_box`) have labels.
    """
    top, left, h, w = centred_s2_box(tuple(s2_map.shape[-2:]), image_hw)
    return s2_map[..., top:top + h, left:left + w]


def downsample_mask(mask: torch.Tensor, size: tuple[int, int], ignore: int = IGNORE) -> torch.Tensor:
    """(B,H,W) 0..12 mask -> (B,h,w): the most frequent class of each block (any size ratio).

    Each 10 m pixel covers ~50x50 labels: the majority class is a fairer target than the single
    pixel nearest sampling would pick. Blocks without a valid label get `ignore`.
    """
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    valid = (mask >= 0) & (mask < NUM_CLASSES)
    onehot = F.one_hot(torch.where(valid, mask, 0), NUM_CLASSES).permute(0, 3, 1, 2).float()
    counts = F.adaptive_avg_pool2d(onehot * valid[:, None], size)
    out = counts.argmax(1)
    return torch.where(counts.sum(1) > 0, out, torch.full_like(out, ignore))


def s2_target(mask: torch.Tensor, s2_hw: tuple[int, int], s2_valid: torch.Tensor | None = None
              ) -> torch.Tensor:
    """(B,h,w) target of the auxiliary S2 head for a (B,H,W) mask, on the `s2_label_window` of an S2 map
    of `s2_hw` pixels: the majority label of each S2 pixel, IGNORE where `s2_valid` (B,*s2_hw) is False.
    """
    image_hw = tuple(mask.shape[-2:])
    _, _, h, w = centred_s2_box(s2_hw, image_hw)
    target = downsample_mask(mask, (h, w))
    if s2_valid is None:
        return target
    if s2_valid.shape != (mask.shape[0], *s2_hw):
        raise ValueError(f"s2_valid: expected shape {(mask.shape[0], *s2_hw)} (batch, S2 map), "
                         f"got {tuple(s2_valid.shape)}")
    valid = s2_label_window(s2_valid.to(device=target.device, dtype=torch.bool), image_hw)
    return torch.where(valid, target, torch.full_like(target, IGNORE))


class SmoothedFocal(FocalLoss):
    """smp's multiclass focal loss (a sigmoid focal term per class, one class against the rest, weighted by
    class) with label smoothing, as the 1st place trained: class c's binary target is
    (1 - s) [y == c] + s / C, the smoothing cross-entropy applies. s = 0 is smp's loss (up to rounding).

    Ignored pixels are masked out of sums rather than indexed away (boolean indexing waits for the device
    to count them); `sample_weight` (B,) weighs each sample's pixels in the mean over the valid pixels. No
    valid pixel gives 0, not 0/0."""

    def __init__(self, smoothing: float, **kw):
        super().__init__("multiclass", **kw)
        self.smoothing = float(smoothing)

    def forward(self, y_pred: torch.Tensor, y_true: torch.Tensor, sample_weight: torch.Tensor | None = None
                ) -> torch.Tensor:
        keep = (y_true != self.ignore_index).to(y_pred.dtype)
        count, n = keep.sum().clamp_min(1), y_pred.shape[1]
        if sample_weight is not None:
            keep = keep * sample_weight.to(keep).view(-1, *[1] * (keep.ndim - 1))
        losses = torch.stack([(self.focal_loss_fn(y_pred[:, c], (y_true == c).to(y_pred.dtype)
                                                  * (1 - self.smoothing) + self.smoothing / n,
                                                  reduction="none") * keep).sum() / count
                              for c in range(n)])
        weights = self.class_weights.to(losses.device)
        return (losses * weights).sum() / weights.sum()


class Criterion(torch.nn.Module):
    """loss(out, mask, s2_valid=None) -> (total, {"seg": ..., "s2": ...}); CE is weighted-mean over pixels.

    `s2_valid` is the batch's (B,S,S) bool map of real S2 pixels (None: all real): the auxiliary S2 loss
    ignores the others (see the module docstring).

    Cross-entropy is reduced by hand (sum / sum of target weights, clamped) so that a batch made only
    of weight-0 pixels ("other") gives 0 instead of PyTorch's 0/0 = NaN, which would count as a
    diverged step.
    """

    def __init__(self, cfg: Settings):
        super().__init__()
        kind = self.kind = cfg.loss
        self.smoothing = cfg.label_smoothing
        self.s2_weight = cfg.s2_aux_weight
        self.register_buffer("w", class_weights(cfg))
        self.register_buffer("w_s2", class_weights(cfg, s2_head=True))
        scored = [k for k in range(len(self.w)) if self.w[k] > 0]
        self.dice = (DiceLoss("multiclass", classes=scored, from_logits=True, ignore_index=IGNORE)
                     if kind == "ce_dice" else None)
        self.focal = (SmoothedFocal(self.smoothing, class_weights=self.w.tolist(), ignore_index=IGNORE)
                      if kind == "focal" else None)

    def ce(self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
           sample_weight: torch.Tensor | None = None) -> torch.Tensor:
        valid = target >= 0
        safe = torch.where(valid, target, 0)
        per_pixel = F.cross_entropy(logits, safe, weight=weight, reduction="none",
                                    label_smoothing=self.smoothing)
        denom = (weight[safe] * valid).sum()
        terms = per_pixel * valid
        if sample_weight is not None:
            terms = terms * sample_weight.to(terms.dtype).view(-1, *[1] * (terms.ndim - 1))
        return terms.sum() / denom.clamp_min(1e-6)

    @staticmethod
    def grouped(fn: torch.nn.Module, logits: torch.Tensor, target: torch.Tensor,
                sample_weight: torch.Tensor | None) -> torch.Tensor:
        """A batch-level loss (Dice) per group of samples of equal weight, each scaled by its weight and its
        share of the batch's valid pixels; groups without a valid pixel add 0 (never NaN).

        Without weights it is one call and no host sync: smp's Dice already gives 0 for a batch without a
        valid pixel (classes without a true pixel add 0). With weights the groups are formed on the host."""
        if sample_weight is None:
            return fn(logits, target)
        counts = (target >= 0).flatten(1).sum(1)
        total = int(counts.sum())
        if total == 0 or bool((sample_weight == sample_weight[0]).all()):
            return fn(logits, target) * float(sample_weight[0]) if total else logits.sum() * 0.0
        loss = logits.sum() * 0.0
        for w in sorted(set(sample_weight.tolist())):
            sel = sample_weight == w
            n = int(counts[sel].sum())
            if n:
                loss = loss + fn(logits[sel], target[sel]) * (w * n / total)
        return loss

    def forward(self, out: dict, mask: torch.Tensor, s2_valid: torch.Tensor | None = None,
                weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = out["logits"].float()
        mask = mask.masked_fill(mask == IGNORE_U8, IGNORE)  # pseudo-label pixels below the threshold
        if self.kind == "focal":
            seg = self.focal(logits, mask, weight)
        else:
            seg = self.ce(logits, mask, self.w, weight)
            if self.dice is not None:
                seg = seg + self.grouped(self.dice, logits, mask, weight)
        total, parts = seg, {"seg": seg.detach()}
        s2_logits = out.get("s2_logits")
        if s2_logits is not None:
            target = s2_target(mask, tuple(s2_logits.shape[-2:]), s2_valid)
            s2 = self.ce(s2_label_window(s2_logits.float(), tuple(mask.shape[-2:])), target, self.w_s2,
                         weight)
            # weight 0 still keeps the head in the graph, so DDP sees a gradient for every parameter
            total = total + self.s2_weight * s2
            parts["s2"] = s2.detach()
        return total, parts
