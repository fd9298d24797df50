"""bench/gpu_check.sh --smoke: the prepared GPU check runs end to end on the CPU with tiny sizes (so the
script is ready for the first machine with a GPU) and writes every section of its report."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_writes_every_section(tmp_path):
    env = {**os.environ, "PY": sys.executable, "OMP_NUM_THREADS": "2"}
    cmd = ["bash", "bench/gpu_check.sh", "--smoke", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (report,) = tmp_path.glob("gpu-*-smoke.json")
    res = json.loads(report.read_text())
    assert res["environment"]["smoke"] and not res.get("errors"), res.get("errors")
    presets = {"unet_r34", "utt_r34", "segformer_b5", "maxvit_unet"}
    assert {r["preset"] for r in res["model_only"] if not r["compile"]} == presets
    assert all(r["img_s"] > 0 and r["params_m"] > 0 for r in res["model_only"])
    assert res["compile_works"] is True and any(r["compile"] for r in res["model_only"])
    assert [r["preset"] for r in res["device_transforms"]] == ["light", "heavy", "heavy (all transforms)"]
    assert [(r["preset"], r["models"]) for r in res["prediction"]] == [("unet_r34", 1), ("unet_r34", 5),
                                                                       ("utt_r34", 1)]
    assert all(r["projected_test_s"] > 0 for r in res["prediction"])
    assert {(r["preset"], r["workers"]) for r in res["loader_fed"]} == {
        (p, w) for p in ("unet_r34", "utt_r34") for w in (1, 2)}
    assert all(0 <= r["wait_share"] <= 1 and isinstance(r["data_bound"], bool) for r in res["loader_fed"])
    table = report.with_suffix(".md").read_text()
    assert "Model-only training" in table and "projected 16,050 patches s" in table
