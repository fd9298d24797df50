"""How fast a job fails on a bad setting or a missing config file: whole-process wall time, median of N runs.

    python bench/fail_fast_bench.py [--runs 5] [--python .venv/bin/python]

Every job checks its settings before torch is imported (src.core.settings, src.core.config), so these
should cost the Python start-up plus the settings module, not a torch import. Prints one row per case:
the median and range of the wall time, the exit code and the one line the job printed.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "train: setting typo": ["-m", "src.train", "--config", "configs/demo.yaml", "lr_typo=1"],
    "train: value out of range": ["-m", "src.train", "--config", "configs/demo.yaml", "ema=1.5"],
    "train: missing config file": ["-m", "src.train", "--config", "configs/nope.yaml"],
    "predict: unknown TTA level": ["-m", "src.predict", "--runs", "runs", "--out", "/tmp/p", "tta=d8"],
    "infer: setting typo": ["-m", "src.infer", "--runs", "runs", "--src", "x.tif", "--out", "y.tif",
                            "batchsize=2"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--python", default=sys.executable)
    args = ap.parse_args()
    print(f"{'case':<30} {'median s':>9} {'min..max s':>13}  exit  message")
    for name, argv in CASES.items():
        times, run = [], None
        for _ in range(args.runs + 1):  # the first run warms the file cache and is not counted
            t0 = time.perf_counter()
            run = subprocess.run([args.python, *argv], cwd=ROOT, capture_output=True, text=True)
            times.append(time.perf_counter() - t0)
        times = times[1:]
        line = run.stderr.strip().splitlines()[-1] if run.stderr.strip() else ""
        print(f"{name:<30} {statistics.median(times):>9.2f} {min(times):>6.2f}..{max(times):<6.2f} "
              f"{run.returncode:>4}  {line[:80]}")


if __name__ == "__main__":
    main()
