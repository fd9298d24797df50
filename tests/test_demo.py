"""`make demo` end to end (scripts/demo.sh) on a tiny synthetic set: every step runs, the zip validates."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from src.submission import validate
from src.tables import load_index

ROOT = Path(__file__).resolve().parents[1]


def test_demo_script_end_to_end(tmp_path):
    env = {
        **os.environ,
        "PY": sys.executable,
        "DEMO_TRAIN_DOMAINS": "3", "DEMO_TEST_DOMAINS": "1", "DEMO_ZONES": "1", "DEMO_PATCHES": "1",
        "DEMO_K": "3",
        "DEMO_RUNS_DIR": str(tmp_path / "runs"),
        "DEMO_PRED": str(tmp_path / "pred" / "demo"),
        "DEMO_SUBMISSIONS": str(tmp_path / "subs"),
        "DEMO_TRAIN_ARGS": "epochs=1 max_train_batches=1 max_val_batches=1 crop_size=64 batch_size=2 "
                           "workers=0",
        "DEMO_PREDICT_ARGS": "workers=0 batch_size=1",
    }
    proc = subprocess.run(["bash", "scripts/demo.sh", str(tmp_path / "data")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for step in ("synth", "index", "folds", "train0", "train1", "predict", "evaluate", "pictures"):
        assert f"<== [{step}]" in out, step
    assert "tta=d4" in out and "2 model(s)" in out
    zips = list((tmp_path / "subs").glob("demo-*.zip"))
    assert len(zips) == 1 and f"submission zip:   {zips[0]}" in out
    test_ids = load_index(tmp_path / "data" / "index_test.csv")["id"].tolist()
    assert validate(zips[0], test_ids)["files"] == len(test_ids) >= 1
    scores = json.loads((tmp_path / "pred" / "demo_scores.json").read_text())
    assert f"synthetic test set mIoU: {scores['miou']:.4f}" in out
    for png in ("demo_confusion.png", "demo_grid.png"):
        assert (tmp_path / "pred" / png).read_bytes()[:4] == b"\x89PNG"
    for fold in (0, 1):  # the runs went where they were told (nothing written into the repository)
        assert (tmp_path / "runs" / "demo" / f"fold{fold}" / "best.pt").is_file()
