"""Criterion: class weights, the auxiliary S2 head's label window and target, and s2_valid (real files for
the edge-of-super-area case)."""
from __future__ import annotations

import pytest
import torch

from src.core.config import load_settings
from src.core.errors import ConfigError
from src.core.flair import OTHER
from src.data.dataset import FlairDataset
from src.data.loader import collate
from src.models.losses import IGNORE, Criterion, downsample_mask, s2_label_window, s2_target


def test_criterion_weights_aux_head_and_errors():
    cfg = load_settings(None, {"loss": "ce"})
    crit = Criterion(cfg)
    logits = torch.randn(2, 13, 64, 64, requires_grad=True)
    only_other = torch.full((2, 64, 64), OTHER)
    loss, _ = crit({"logits": logits}, only_other)
    assert loss.item() == 0.0  # weight-0 pixels only: 0, not PyTorch's 0/0 = NaN
    loss.backward()
    assert crit.w[OTHER] == 0 and crit.w[11] == 1 and crit.w_s2[11] == 0 and crit.w_s2[OTHER] == 0
    mask = torch.randint(0, 13, (2, 64, 64))
    for kind in ("ce", "ce_dice", "focal"):
        out = {"logits": logits, "s2_logits": torch.randn(2, 13, 40, 40)}
        value, parts = Criterion(cfg.with_values(loss=kind))(out, mask)
        assert torch.isfinite(value) and "s2" in parts
    for bad in ({"loss": "dice"}, {"class_weights": [1, 2]}, {"label_smoothing": 1.5}):
        with pytest.raises(ConfigError):
            cfg.with_values(**bad)
    with pytest.raises(ConfigError, match="computed from the training split"):
        Criterion(cfg.with_values(class_weights="inverse"))  # numbers only once the masks are counted


def test_s2_target_is_majority_of_the_label_window():
    mask = torch.zeros(1, 100, 100, dtype=torch.long)
    mask[0, :50, :50] = 3
    mask[0, :20, 50:] = 7  # 40 % of the top-right block: the block stays class 0
    assert downsample_mask(mask, (2, 2)).tolist() == [[[3, 0], [0, 0]]]
    s2 = torch.arange(40 * 40, dtype=torch.float).view(1, 1, 40, 40)
    assert s2_label_window(s2, (512, 512)).shape[-2:] == (10, 10)   # 512 px x 0.2 m = 10.24 S2 pixels
    assert s2_label_window(s2, (512, 512))[0, 0, 0, 0] == 15 * 40 + 15  # centred in the 40x40 crop
    assert s2_label_window(s2, (128, 128)).shape[-2:] == (3, 3)


def test_aux_loss_ignores_s2_pixels_outside_the_super_area():
    """Labels under invalid S2 pixels (zero-filled inputs) take no part in the auxiliary loss: it equals
    the loss over the valid pixels alone, whatever those labels are."""
    torch.manual_seed(0)
    crit = Criterion(load_settings(None, {"loss": "ce"}))
    mask = torch.randint(0, 11, (2, 256, 256))          # classes 0..10: weighted in both heads
    out = {"logits": torch.randn(2, 13, 256, 256), "s2_logits": torch.randn(2, 13, 40, 40)}
    valid = torch.ones(2, 40, 40, dtype=torch.bool)
    valid[:, :19] = False                  # the 256 px image sits on S2 rows/cols 17..21: 2 rows invalid
    wrong = mask.clone()
    wrong[:, :102] = 5                     # the labels under those two S2 rows (majority blocks 0 and 1)
    _, parts = crit(out, mask, s2_valid=valid)
    _, parts_wrong = crit(out, wrong, s2_valid=valid)
    assert torch.equal(parts["s2"], parts_wrong["s2"])
    kept = crit.ce(out["s2_logits"][:, :, 19:22, 17:22], downsample_mask(mask, (5, 5))[:, 2:], crit.w_s2)
    torch.testing.assert_close(parts["s2"], kept)
    # without s2_valid every pixel counts (as before), so the wrong labels change the loss
    assert not torch.equal(crit(out, mask)[1]["s2"], crit(out, wrong)[1]["s2"])
    target = s2_target(mask, (40, 40), valid)
    assert (target[:, :2] == IGNORE).all() and (target[:, 2:] >= 0).all()
    with pytest.raises(ValueError, match="s2_valid: expected shape"):
        crit(out, mask, s2_valid=valid[:, :20])


def test_window_at_the_super_area_edge_is_left_out_of_the_aux_loss(synth_index):
    """A patch whose S2 window leaves the super-area: s2_valid is False there, and a batch's s2_valid
    keeps those pixels out of the auxiliary loss."""
    df = synth_index["train"].iloc[:2].copy()
    df["s2_row"], df["s2_col"] = 3, 5         # window rows 0..16 and cols 0..14 lie outside
    cfg = load_settings(None, {"use_s2": True, "loss": "ce"})
    ds = FlairDataset(df, cfg, train=False)
    batch = collate([ds[0], ds[1]])
    batch["mask"] = batch["mask"].long()  # (uint8 until the device: src.data.device_augment casts it there)
    valid = batch["s2_valid"]
    assert not valid[:, :17].any() and not valid[:, :, :15].any() and valid[:, 17:, 15:].all()
    under = s2_label_window(valid, (512, 512))  # S2 rows/cols 15..24 lie under the patch
    assert not under[:, :2].any() and under[:, 2:].all()
    torch.manual_seed(0)
    out = {"logits": torch.randn(2, 13, 512, 512), "s2_logits": torch.randn(2, 13, 40, 40)}
    crit = Criterion(cfg)
    _, parts = crit(out, batch["mask"], s2_valid=valid)
    target = downsample_mask(batch["mask"], (10, 10))
    kept = crit.ce(out["s2_logits"][:, :, 17:25, 15:25], target[:, 2:], crit.w_s2)
    torch.testing.assert_close(parts["s2"], kept)
    assert not torch.equal(parts["s2"], crit(out, batch["mask"])[1]["s2"])


def test_focal_label_smoothing_is_smps_focal_at_zero_and_smooths_the_targets():
    """loss=focal with label_smoothing (the 1st place's loss): s = 0 equals smp's FocalLoss exactly (ignored
    pixels left out); s > 0 equals smp's per-class sigmoid focal term on targets (1 - s) [y == c] + s / C."""
    from segmentation_models_pytorch.losses import FocalLoss
    from segmentation_models_pytorch.losses._functional import focal_loss_with_logits

    from src.models.losses import IGNORE, SmoothedFocal

    torch.manual_seed(0)
    logits = torch.randn(2, 13, 8, 8)
    mask = torch.randint(0, 13, (2, 8, 8))
    mask[0, :2] = IGNORE
    weights = [1.0] * 12 + [0.0]
    plain = FocalLoss("multiclass", class_weights=weights, ignore_index=IGNORE)(logits, mask)
    unsmoothed = SmoothedFocal(0.0, class_weights=weights, ignore_index=IGNORE)(logits, mask)
    torch.testing.assert_close(unsmoothed, plain)
    keep = mask != IGNORE
    soft = [(mask[keep] == c).float() * 0.9 + 0.1 / 13 for c in range(13)]
    by_hand = torch.stack([focal_loss_with_logits(logits[:, c][keep], soft[c], alpha=None)
                           for c in range(13)])
    smoothed = SmoothedFocal(0.1, class_weights=weights, ignore_index=IGNORE)(logits, mask)
    torch.testing.assert_close(smoothed, (by_hand * torch.tensor(weights)).sum() / 12)
    assert not torch.allclose(smoothed, plain)
    crit = Criterion(load_settings(None, {"loss": "focal", "label_smoothing": 0.1}))
    torch.testing.assert_close(crit({"logits": logits}, mask)[0], smoothed)


@pytest.mark.parametrize("loss", ["ce", "ce_dice", "focal"])
def test_unweighted_loss_never_reads_the_device(loss):
    """Without per-sample weights no term syncs to the host (a GPU step is never stalled mid-loss): the loss
    runs on meta tensors, which cannot be read back (.item(), bool(), boolean indexing all raise)."""
    crit = Criterion(load_settings(None, {"loss": loss, "label_smoothing": 0.1, "s2_aux_weight": 0.5}))
    out = {"logits": torch.randn(2, 13, 32, 32, device="meta"),
           "s2_logits": torch.randn(2, 13, 40, 40, device="meta")}
    total, parts = crit.to("meta")(out, torch.randint(0, 13, (2, 32, 32), device="meta"))
    assert total.is_meta and set(parts) == {"seg", "s2"}


@pytest.mark.parametrize("loss", ["ce_dice", "focal"])
def test_batch_losses_equal_smps_and_scale_with_equal_weights(loss):
    """Unweighted: exactly smp's Dice (+ CE) or the focal term; equal weights w: exactly w x that; a batch
    without a valid pixel: 0 with a finite (zero) gradient."""
    from segmentation_models_pytorch.losses import DiceLoss

    torch.manual_seed(0)
    crit = Criterion(load_settings(None, {"loss": loss}))
    logits = torch.randn(3, 13, 16, 16)
    mask = torch.randint(0, 13, (3, 16, 16))
    mask[1, :4] = IGNORE
    value, _ = crit({"logits": logits}, mask)
    if loss == "ce_dice":
        dice = DiceLoss("multiclass", classes=list(range(OTHER)), from_logits=True, ignore_index=IGNORE)
        assert torch.equal(value, crit.ce(logits, mask, crit.w) + dice(logits, mask))
    else:
        assert torch.equal(value, crit.focal(logits, mask))
    for w in (1.0, 0.5):
        assert torch.equal(crit({"logits": logits}, mask, weight=torch.full((3,), w))[0], value * w)
    empty = torch.randn(2, 13, 8, 8, requires_grad=True)
    zero, _ = crit({"logits": empty}, torch.full((2, 8, 8), IGNORE))
    zero.backward()
    assert zero.item() == 0.0 and torch.equal(empty.grad, torch.zeros_like(empty))
