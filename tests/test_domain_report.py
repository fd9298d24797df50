"""src.scoring.domains: per-domain tables (official metric per domain, the "all" row = the dataset-level
score),
their CSV and figure, and a training run's domains.csv across validated epochs and a resume."""
from __future__ import annotations

import math

import numpy as np
import pytest

from src.scoring.domains import (
    ALL,
    COLUMNS,
    domain_rows,
    format_lines,
    read_csv,
    write_report,
    write_run_domains,
)
from src.scoring.metrics import IOU_COLS, ConfusionMatrix, ious_from_confusion, miou_from_confusion


def stack(seed: int = 0, domains: int = 3) -> np.ndarray:
    """(D, 13, 13) confusion matrices of noisy predictions; domain 0 never holds class 11 (plowed land)."""
    rng = np.random.default_rng(seed)
    out = []
    for d in range(domains):
        classes = 11 if d == 0 else 13
        truth = rng.integers(0, classes, 4000)
        pred = np.where(rng.random(truth.size) < 0.3, rng.integers(0, classes, truth.size), truth)
        out.append(ConfusionMatrix().update(pred, truth).matrix)
    return np.stack(out)


def test_rows_are_the_official_metric_per_domain_and_overall():
    s = stack()
    rows = domain_rows(s, ["D1", "D2", "D3"], patches=[2, 1, 4])
    assert [r["domain"] for r in rows] == ["D1", "D2", "D3", ALL] and rows[-1]["patches"] == 7
    for r, m in zip(rows, [*s, s.sum(0)]):
        assert r["miou"] == miou_from_confusion(m) and r["pixels"] == m.sum()
        np.testing.assert_array_equal([r[c] for c in IOU_COLS], ious_from_confusion(m))
    assert math.isnan(rows[0][IOU_COLS[11]])  # absent from D1's truth and predictions
    assert rows[-1]["miou"] != np.mean([r["miou"] for r in rows[:-1]])  # dataset level, not a mean
    with pytest.raises(ValueError, match="2 confusion matrices for 3 domains"):
        domain_rows(s[:2], ["D1", "D2", "D3"])


def test_report_csv_and_figure(tmp_path):
    rows = write_report(stack(), ["D1", "D2", "D3"], tmp_path / "x_domains", patches=[2, 1, 4], title="x:")
    table = read_csv(tmp_path / "x_domains.csv")
    assert list(table[0]) == COLUMNS and [r["domain"] for r in table] == ["D1", "D2", "D3", ALL]
    assert table[0][IOU_COLS[11]] == ""  # NaN: an empty cell
    assert float(table[1]["miou"]) == pytest.approx(rows[1]["miou"], abs=1e-6)
    assert (tmp_path / "x_domains.png").read_bytes()[:4] == b"\x89PNG"
    lines = format_lines(rows[:-1])
    assert len(lines) == 3 and lines[0].startswith(f"    D1: mIoU {rows[0]['miou']:.4f}, weakest class")


def test_run_domains_keeps_every_validated_epoch_and_replays_after_resume(tmp_path):
    domain_of = {"a": 0, "b": 1, "c": 1}
    write_run_domains(tmp_path, 2, stack(1, 2), ["D1", "D2"], domain_of)
    write_run_domains(tmp_path, 4, stack(2, 2), ["D1", "D2"], domain_of)
    rows = write_run_domains(tmp_path, 4, stack(3, 2), ["D1", "D2"], domain_of)  # epoch 4 replayed
    table = read_csv(tmp_path / "domains.csv")
    assert list(table[0])[:2] == ["epoch", "domain"]
    assert [(r["epoch"], r["domain"], r["patches"]) for r in table] == [
        ("2", "D1", "1"), ("2", "D2", "2"), ("2", ALL, "3"),
        ("4", "D1", "1"), ("4", "D2", "2"), ("4", ALL, "3")]
    assert float(table[-1]["miou"]) == pytest.approx(rows[-1]["miou"], abs=1e-6)
    assert rows[-1]["miou"] == miou_from_confusion(stack(3, 2).sum(0))
    assert (tmp_path / "domains.png").read_bytes()[:4] == b"\x89PNG"
