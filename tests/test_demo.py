"""`make demo` end to end (scripts/demo.sh) on a tiny synthetic set: every step runs, the zip validates, the
fusion model and the aerial-only one are both scored and compared on the S2-only classes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from src.core.flair import CLASS_NAMES
from src.core.tables import load_index
from src.scoring.submission import validate

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
    for step in ("synth", "index", "folds", "train", "train-aerial", "predict", "predict-aerial",
                 "evaluate-aerial", "pictures"):
        assert f"<== [{step}]" in out, step
    assert "<== [evaluate]" not in out  # predict --submit scored the zip: not scored a second time
    assert "tta=none" in out and "1 model," in out
    zips = list((tmp_path / "subs").glob("demo-*.zip"))
    assert len(zips) == 1 and f"submission zip:   {zips[0]}" in out
    test_ids = load_index(tmp_path / "data" / "index_test.csv")["id"].tolist()
    assert validate(zips[0], test_ids)["files"] == len(test_ids) >= 1
    pred = tmp_path / "pred"
    fusion, aerial = (json.loads((pred / f"demo{s}_scores.json").read_text()) for s in ("", "_aerial"))
    assert fusion["per_domain"]["domains"] and aerial["n_patches"] == len(test_ids)

    def cell(v):
        return "   n/a" if v is None else f"{v:6.3f}"

    assert "Sentinel-2 fusion (U-T&T) vs the same U-Net on the aerial bands only" in out
    for k in (9, 10):  # the S2-only classes, side by side
        assert f"{k:>2} {CLASS_NAMES[k]:<29} {cell(fusion['ious'][k])} {cell(aerial['ious'][k])}" in out
    assert f"{'mIoU (classes 0..11)':<32} {cell(fusion['miou'])} {cell(aerial['miou'])}" in out
    for png in ("demo_confusion.png", "demo_grid.png", "demo_domains.png"):
        assert (pred / png).read_bytes()[:4] == b"\x89PNG"
    assert (pred / "demo_domains.csv").read_text().startswith("domain,patches,pixels,miou,")
    for run in ("demo", "demo_aerial"):  # the runs went where they were told (none into the repository)
        folder = tmp_path / "runs" / run / "fold0"
        assert (folder / "best.pt").is_file()
        assert (folder / "domains.csv").read_text().startswith("epoch,domain,patches,pixels,miou,")
        assert list(folder.glob("events.out.tfevents.*"))  # TensorBoard curves
    # the whole-orthophoto command it prints runs as printed (the aerial-only model, on a test patch)
    line = next(ln.split() for ln in out.splitlines() if ln.strip().startswith("make infer RUNS="))
    knobs = dict(word.split("=", 1) for word in line[2:])
    infer = subprocess.run([sys.executable, "-m", "src.infer", "--runs", knobs["RUNS"], "--src", knobs["SRC"],
                            "--out", knobs["OUT"], "--tta", "none"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300)
    assert infer.returncode == 0 and Path(knobs["OUT"]).is_file(), infer.stderr[-2000:]
