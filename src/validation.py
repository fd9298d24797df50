"""The validation pass of training: the official metric on the held-out fold, on the model's device.

One dataset-level confusion matrix per domain (summed over DDP ranks, each rank scoring its own shard;
docs/data-format.md, "Metric"), the mean loss, and the number of unreadable patches left out. With
skip_bad an unreadable validation patch arrives as a `batch["bad"]` entry (docs/data-format.md, "Samples
and batches"): it is counted and skipped, never replaced by another patch that would be scored twice.
"""
from __future__ import annotations

from typing import Any

import pandas as pd
import torch

from src.distributed import all_sum
from src.losses import Criterion
from src.metrics import confusion_torch, ious_from_confusion, miou_from_confusion
from src.runtime import autocast


def to_device(batch: dict, device: torch.device, channels_last: bool) -> tuple[torch.Tensor, dict]:
    """The model's inputs from a batch: the image (channels_last if asked) and the optional inputs present."""
    image = batch["image"].to(device, non_blocking=True)
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    extra = {k: batch[k].to(device, non_blocking=True) for k in ("s2", "s2_days", "s2_pad", "meta")
             if k in batch}
    return image, extra


def targets_to_device(batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(mask, s2_valid or None) of a batch on the device: what the criterion compares the output with."""
    mask = batch["mask"].to(device, non_blocking=True)
    valid = batch["s2_valid"].to(device, non_blocking=True) if "s2_valid" in batch else None
    return mask, valid


def domain_codes(val_df: pd.DataFrame) -> tuple[list[str], dict[str, int]]:
    """(sorted domain names, patch id -> index into them): the per-domain mIoU of the log."""
    domains = sorted(val_df["domain"].unique().tolist())
    code = {d: k for k, d in enumerate(domains)}
    return domains, {str(i): code[d] for i, d in zip(val_df["id"], val_df["domain"])}


@torch.no_grad()
def validate(model: torch.nn.Module, loader: Any, criterion: Criterion, device: torch.device,
             amp_dtype: torch.dtype | None, channels_last: bool, domain_of: dict[str, int],
             n_domains: int, max_batches: int = 0) -> dict[str, Any]:
    """{"confusion" (13,13), "per_domain" (D,13,13), "loss", "miou", "ious", "skipped"} over every rank's
    shard; `max_batches` > 0 caps the batches per rank (smoke tests)."""
    model.eval()
    conf = torch.zeros(max(n_domains, 1), 13, 13, dtype=torch.int64, device=device)
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)  # loss * n, n
    skipped = torch.zeros(1, dtype=torch.int64, device=device)
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        skipped += len(batch.get("bad", ()))
        if not batch["id"]:  # every patch of the batch was unreadable
            continue
        image, extra = to_device(batch, device, channels_last)
        mask, s2_valid = targets_to_device(batch, device)
        with autocast(device, amp_dtype):
            out = model(image, **extra)
        loss, _ = criterion(out, mask, s2_valid=s2_valid)
        loss_sum += torch.stack([loss.double() * len(mask), torch.tensor(len(mask), device=device).double()])
        pred = out["logits"].argmax(1)
        dom = torch.tensor([domain_of.get(pid, 0) for pid in batch["id"]], device=device)
        for d in torch.unique(dom).tolist():
            sel = dom == d
            conf[d] += confusion_torch(pred[sel], mask[sel])
    all_sum(conf)
    all_sum(loss_sum)
    all_sum(skipped)
    total = conf.sum(0).cpu().numpy()
    return {"confusion": total, "per_domain": conf.cpu().numpy(),
            "loss": float(loss_sum[0] / loss_sum[1].clamp_min(1)),
            "miou": miou_from_confusion(total), "ious": ious_from_confusion(total), "skipped": int(skipped)}
