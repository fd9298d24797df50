"""The official metric: agreement with a slow reimplementation written straight from the rule in
docs/data-format.md, "Metric"."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import confusion_matrix as sk_confusion

from src.core.files import write_tif
from src.core.flair import CLASS_NAMES
from src.scoring.metrics import (
    ConfusionMatrix,
    confusion_from_raw,
    confusion_matrix,
    confusion_torch,
    format_table,
    ious_from_confusion,
    miou_from_confusion,
)
from src.scoring.score import evaluate
from src.scoring.submission import write_pred

LABELS = list(range(13))


def official_from_files(pairs: list[tuple[str, str]]) -> tuple[np.ndarray, np.ndarray, float]:
    """IGN's procedure, spelled out: PIL read, t = MSK - 1, t[t > 12] = 12, sklearn per patch, summed."""
    total = np.zeros((13, 13), dtype=np.int64)
    for pred_path, msk_path in pairs:
        pred = np.array(Image.open(pred_path))
        target = np.array(Image.open(msk_path)) - 1
        target[target > 12] = 12
        total += sk_confusion(target.ravel(), pred.ravel(), labels=LABELS)
    ious = official_ious(total)
    return total, ious, float(np.nanmean(ious[:12]))


def official_ious(total: np.ndarray) -> np.ndarray:
    ious = np.full(13, np.nan)
    for k in range(13):
        union = total[k, :].sum() + total[:, k].sum() - total[k, k]
        if union:
            ious[k] = total[k, k] / union
    return ious


def _patches(rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """(raw label 1..19, prediction 0..12) pairs covering the edge cases of the rule."""
    shape = (512, 512)
    blocks = rng.integers(1, 20, (16, 16), dtype=np.uint8)
    raw = np.kron(blocks, np.ones((32, 32), dtype=np.uint8))
    out = []
    # 1. mostly right, some noise
    pred = np.minimum(raw, 13) - 1
    noise = rng.random(shape) < 0.2
    pred[noise] = rng.integers(0, 13, noise.sum())
    out.append((raw, pred.astype(np.uint8)))
    # 2. classes 3 and 7 absent from all truth; 3 predicted here (IoU 0), 7 never predicted (NaN)
    raw2 = raw.copy()
    pred2 = rng.integers(0, 13, shape).astype(np.uint8)
    pred2[pred2 == 7] = 0
    out.append((raw2, pred2))
    # 3. everything predicted "other" (12) on a patch with raw 13..19
    raw3 = rng.integers(13, 20, shape, dtype=np.uint8)
    raw3[:100] = 2
    out.append((raw3, np.full(shape, 12, dtype=np.uint8)))
    # 4. uniform truth, uniform wrong prediction
    out.append((np.full(shape, 5, dtype=np.uint8), np.full(shape, 12, dtype=np.uint8)))
    for r, p in out:
        p[p == 7] = 6
        r[r == 8] = 9
        r[r == 4] = 1
    return out


def test_hand_computed_example():
    truth = np.array([[0, 0], [1, 12]])
    pred = np.array([[0, 1], [1, 0]])
    cm = ConfusionMatrix().update(pred, truth)
    assert cm.matrix[0, 0] == 1 and cm.matrix[0, 1] == 1 and cm.matrix[1, 1] == 1 and cm.matrix[12, 0] == 1
    ious = cm.ious()
    assert ious[0] == pytest.approx(1 / 3)  # tp 1, truth row 2, predicted col 2 (one is "other")
    assert ious[1] == pytest.approx(1 / 2)
    assert ious[12] == 0.0
    assert np.isnan(ious[2:12]).all()
    assert cm.miou() == pytest.approx((1 / 3 + 1 / 2) / 2)


def test_other_is_in_the_matrix_but_not_in_the_mean():
    truth = np.zeros((4, 4), dtype=np.uint8)
    truth[:2] = 12
    perfect = ConfusionMatrix().update(truth.copy(), truth)
    assert perfect.miou() == 1.0
    # predicting building on "other" pixels is a building false positive
    fp = ConfusionMatrix().update(np.zeros_like(truth), truth)
    assert fp.ious()[0] == pytest.approx(0.5) and fp.miou() == pytest.approx(0.5)
    # predicting "other" on building pixels costs building
    fn = ConfusionMatrix().update(np.full_like(truth, 12), truth)
    assert fn.ious()[0] == 0.0 and fn.miou() == 0.0


def test_agrees_with_official_on_files(tmp_path):
    rng = np.random.default_rng(3)
    pairs, cm = [], ConfusionMatrix()
    for i, (raw, pred) in enumerate(_patches(rng)):
        pid = f"{i:06d}"
        msk = tmp_path / "labels" / "D1" / "Z1" / "msk" / f"MSK_{pid}.tif"
        msk.parent.mkdir(parents=True, exist_ok=True)
        write_tif(msk, raw)
        pred_path = write_pred(tmp_path / "pred", pid, pred)
        pairs.append((str(pred_path), str(msk)))
        cm.update(pred, np.minimum(raw, 13) - 1)
    total, ious, miou = official_from_files(pairs)
    assert np.isnan(ious[7]) and ious[3] == 0.0  # the edge cases are really exercised
    np.testing.assert_array_equal(cm.matrix, total)
    np.testing.assert_allclose(cm.ious(), ious, rtol=0, atol=1e-9)
    assert abs(cm.miou() - miou) < 1e-9
    result = evaluate(tmp_path / "pred", tmp_path / "labels", workers=2)
    np.testing.assert_array_equal(np.array(result["confusion"]), total)
    assert abs(result["miou"] - miou) < 1e-9
    assert result["ious"][7] is None
    np.testing.assert_allclose([np.nan if v is None else v for v in result["ious"]], ious[:12], atol=1e-9)


def test_random_fuzz_against_sklearn():
    rng = np.random.default_rng(0)
    cm, parts, total = ConfusionMatrix(), [ConfusionMatrix(), ConfusionMatrix()], np.zeros((13, 13), np.int64)
    for k in range(300):
        shape = tuple(rng.integers(1, 40, rng.integers(1, 4)))
        present = rng.choice(13, rng.integers(1, 14), replace=False)
        raw = rng.integers(1, 256, shape).astype(np.uint8)  # raw > 19 also follows min(v, 13) - 1
        truth = raw - 1
        truth[truth > 12] = 12
        pred = rng.choice(present, shape).astype(rng.choice([np.uint8, np.int64, np.int32]))
        expected = sk_confusion(truth.ravel(), pred.ravel(), labels=LABELS)
        np.testing.assert_array_equal(confusion_matrix(pred, truth), expected)
        np.testing.assert_array_equal(confusion_from_raw(pred, raw), expected)
        np.testing.assert_array_equal(confusion_from_raw(pred, raw.astype(np.int32)), expected)
        cm.update(pred, truth)
        parts[k % 2].update(pred, truth)
        total += expected
    np.testing.assert_array_equal(cm.matrix, total)
    np.testing.assert_array_equal(parts[0].merge(parts[1]).matrix, total)
    np.testing.assert_allclose(cm.ious(), official_ious(total), rtol=0, atol=1e-9)
    assert abs(cm.miou() - float(np.nanmean(official_ious(total)[:12]))) < 1e-9


def test_random_matrices_miou():
    rng = np.random.default_rng(1)
    for _ in range(200):
        m = rng.integers(0, 1000, (13, 13)) * (rng.random((13, 13)) < 0.3)
        ious = official_ious(m)
        np.testing.assert_allclose(ious_from_confusion(m), ious, rtol=0, atol=1e-12)
        expected = float(np.nanmean(ious[:12])) if not np.isnan(ious[:12]).all() else np.nan
        np.testing.assert_allclose(miou_from_confusion(m), expected, rtol=0, atol=1e-12)


def test_all_absent_is_nan():
    assert np.isnan(ConfusionMatrix().miou())
    only_other = ConfusionMatrix().update(np.full((3, 3), 12), np.full((3, 3), 12))
    assert np.isnan(only_other.miou()) and only_other.ious()[12] == 1.0


@pytest.mark.parametrize("bad", [13, 255])
def test_out_of_range_prediction_raises(bad):
    pred = np.zeros((8, 8), dtype=np.uint8)
    pred[3, 3] = bad
    with pytest.raises(ValueError, match=rf"prediction values outside 0..12: \[{bad}\]"):
        ConfusionMatrix().update(pred, np.zeros((8, 8), dtype=np.uint8))


def test_bad_inputs_raise():
    cm = ConfusionMatrix()
    with pytest.raises(ValueError, match="prediction values outside"):
        cm.update(np.full((2, 2), -1, dtype=np.int16), np.zeros((2, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match="target values outside"):
        cm.update(np.zeros((2, 2), dtype=np.uint8), np.full((2, 2), 255, dtype=np.uint8))
    with pytest.raises(ValueError, match="integer"):
        cm.update(np.zeros((2, 2), dtype=np.float32), np.zeros((2, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match="shape"):
        cm.update(np.zeros((2, 2), dtype=np.uint8), np.zeros((2, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="shape"):
        cm.add(np.zeros((5, 5)))
    with pytest.raises(ValueError, match="merge"):
        cm.merge(ConfusionMatrix(num_classes=5))
    assert cm.total == 0


def test_raw_label_errors_name_the_file():
    raw = np.full((4, 4), 3, dtype=np.uint8)
    pred = np.zeros((4, 4), dtype=np.uint8)
    raw[0, :2] = 0
    with pytest.raises(ValueError, match=r"MSK_1\.tif: 2 pixels have value 0"):
        confusion_from_raw(pred, raw, "PRED_1.tif", "MSK_1.tif")
    pred[1, 1] = 40
    with pytest.raises(ValueError, match=r"PRED_1\.tif: values outside 0..12: \[40\]"):
        confusion_from_raw(pred, raw + 1, "PRED_1.tif", "MSK_1.tif")
    with pytest.raises(ValueError, match=r"PRED_1\.tif: shape \(4, 4\) != MSK_1\.tif shape \(2, 8\)"):
        confusion_from_raw(pred, raw.reshape(2, 8), "PRED_1.tif", "MSK_1.tif")


def test_ignore_index_drops_pixels():
    rng = np.random.default_rng(2)
    truth = rng.integers(0, 13, (4, 64, 64)).astype(np.uint8)
    pred = rng.integers(0, 13, (4, 64, 64)).astype(np.uint8)
    ignored = rng.random(truth.shape) < 0.3
    masked = truth.copy()
    masked[ignored] = 255
    cm = ConfusionMatrix(ignore_index=255).update(pred, masked)
    np.testing.assert_array_equal(cm.matrix, sk_confusion(truth[~ignored], pred[~ignored], labels=LABELS))
    assert cm.total == (~ignored).sum()


def test_torch_matches_numpy():
    rng = np.random.default_rng(4)
    cm_np, cm_t = ConfusionMatrix(ignore_index=255), ConfusionMatrix(ignore_index=255)
    for _ in range(20):
        truth = rng.integers(0, 13, (2, 32, 32)).astype(np.uint8)
        truth[rng.random(truth.shape) < 0.1] = 255
        pred = rng.integers(0, 13, (2, 32, 32))
        cm_np.update(pred, truth)
        cm_t.update(torch.from_numpy(pred), torch.from_numpy(truth))
        direct = confusion_torch(torch.from_numpy(pred), torch.from_numpy(truth).long(), ignore_index=255)
        assert direct.dtype == torch.int64 and direct.shape == (13, 13)
        np.testing.assert_array_equal(direct.numpy(), confusion_matrix(pred, truth, ignore_index=255))
    np.testing.assert_array_equal(cm_np.matrix, cm_t.matrix)
    with pytest.raises(ValueError, match=r"prediction \[13\]"):
        confusion_torch(torch.tensor([[13, 0]]), torch.tensor([[0, 0]]))
    with pytest.raises(ValueError, match=r"target \[255\]"):
        confusion_torch(torch.tensor([[1, 0]]), torch.tensor([[255, 0]]))


def test_format_table():
    cm = ConfusionMatrix().update(np.array([[0, 1], [1, 12]]), np.array([[0, 0], [1, 12]]))
    text = format_table(cm.ious(), CLASS_NAMES, support=cm.matrix.sum(axis=1))
    lines = text.splitlines()
    assert len(lines) == 15  # header, 13 classes, mIoU
    assert "building" in lines[1] and "0.5000" in lines[1]
    assert "(not in mIoU)" in lines[13] and "other" in lines[13]
    assert "mIoU" in lines[-1] and f"{cm.miou():.4f}" in lines[-1]
    assert "nan" in lines[3]
