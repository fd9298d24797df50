"""The validation pass of training: the official metric on the held-out fold, on the model's device.

One dataset-level confusion matrix per domain (summed over DDP ranks, each rank scoring its own shard;
docs/data-format.md, "Metric"), the mean loss, and the number of unreadable patches left out. With
skip_bad an unreadable validation patch arrives as a `batch["bad"]` entry (docs/data-format.md, "Samples
and batches"): it is counted and skipped, never replaced by another patch that would be scored twice."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from src.core.progress import progress
from src.core.runtime import all_sum, amp_dtype, autocast
from src.core.settings import Settings
from src.data.device_augment import device_batch
from src.models.losses import Criterion
from src.scoring.metrics import confusion_torch, ious_from_confusion, miou_from_confusion


def to_device(batch: dict, cfg: Settings, device: torch.device, dtype: torch.dtype | None,
              channels_last: bool,
              augment: bool = False) -> tuple[torch.Tensor, dict, torch.Tensor | None, torch.Tensor | None]:
    """(image, the other model inputs present, mask or None, s2_valid or None) of a raw batch on the device:
    the training and the validation step take this one path (src.data.device_augment.device_batch: the batch's
    augmentation when `augment`, normalisation in the autocast `dtype`)."""
    t = device_batch(batch, cfg, device, dtype=dtype, channels_last=channels_last, augment=augment)
    mask, valid = t.pop("mask", None), t.pop("s2_valid", None)
    return t.pop("image"), t, mask, valid


@dataclass(frozen=True)
class Domains:
    """The validation patches' domains: their sorted names and each patch id's index into them (the
    per-domain mIoU of the log)."""

    names: list[str] = field(default_factory=list)
    index: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of_rows(cls, val_df: pd.DataFrame) -> Domains:
        names = sorted(val_df["domain"].unique().tolist())
        code = {d: k for k, d in enumerate(names)}
        return cls(names, {str(i): code[d] for i, d in zip(val_df["id"], val_df["domain"])})


@torch.no_grad()
def validate(model: torch.nn.Module, loader: Any, criterion: Criterion, cfg: Settings, device: torch.device,
             domains: Domains, *, samples: int = 0, show: bool = True) -> dict[str, Any]:
    """{"confusion" (13,13), "per_domain" (D,13,13), "loss", "miou", "ious", "skipped", "samples"} over
    every rank's shard, in cfg's precision and memory format; max_val_batches > 0 caps the batches per rank
    (smoke tests); "samples" holds this rank's first `samples` patches as raw uint8 "image", "mask" and
    "pred" (CPU tensors) for the tracker's pictures; `show`: a progress bar (rank 0)."""
    model.eval()
    dtype, channels_last, max_batches = amp_dtype(cfg.precision,
                                                  device), cfg.channels_last, cfg.max_val_batches
    conf = torch.zeros(max(len(domains.names), 1), 13, 13, dtype=torch.int64, device=device)
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)  # loss * n, n
    skipped = torch.zeros(1, dtype=torch.int64, device=device)
    kept: dict[str, list[torch.Tensor]] = {"image": [], "mask": [], "pred": []}
    n_batches = len(loader) if hasattr(loader, "__len__") else None
    n_batches = min(n_batches, max_batches) if max_batches and n_batches is not None else n_batches
    bar = progress(total=n_batches, desc="validation", unit="batch", disable=not show, leave=False,
                   file=sys.stderr)
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        bar.update(1)
        skipped += len(batch.get("bad", ()))
        if not batch["id"]:  # every patch of the batch was unreadable
            continue
        image, extra, mask, s2_valid = to_device(batch, cfg, device, dtype, channels_last)
        with autocast(device, dtype):
            out = model(image, **extra)
        loss, _ = criterion(out, mask, s2_valid=s2_valid)
        loss_sum += torch.stack([loss.double() * len(mask), torch.tensor(len(mask), device=device).double()])
        pred = out["logits"].argmax(1)
        take = min(samples - len(kept["pred"]), len(pred))
        if take > 0:  # the raw batch: uint8 bands as read, no device round trip for the picture
            kept["image"].extend(batch["image"][:take])
            kept["mask"].extend(mask[:take].cpu())
            kept["pred"].extend(pred[:take].cpu())
        dom = torch.tensor([domains.index.get(pid, 0) for pid in batch["id"]], device=device)
        for d in torch.unique(dom).tolist():
            sel = dom == d
            conf[d] += confusion_torch(pred[sel], mask[sel])
    bar.close()
    all_sum(conf)
    all_sum(loss_sum)
    all_sum(skipped)
    total = conf.sum(0).cpu().numpy()
    return {"confusion": total, "per_domain": conf.cpu().numpy(),
            "loss": float(loss_sum[0] / loss_sum[1].clamp_min(1)),
            "miou": miou_from_confusion(total), "ious": ious_from_confusion(total), "skipped": int(skipped),
            "samples": kept}
