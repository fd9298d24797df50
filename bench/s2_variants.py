"""Which S2 fusion clears the random-forest reference (issue 18, item 7): train the demo preset's variants
on the demo's synthetic set and print their test-set IoU per class beside the forest's.

Every variant is `configs/demo.yaml` trained on fold 0 (the demo's training rows: 3/4 of the 8 training
domains), then predicted on the 2 unseen test domains (no TTA) and scored with the official metric. The
forest (bench/s2_reference.py) is trained on the same rows (`--fold 0`). Trainings run one at a time, one
torch thread each, as the demo's do (deterministic on a given CPU).

    OMP_NUM_THREADS=1 .venv/bin/python bench/s2_variants.py [--out data/s2bench] [--only utt,ndvi,...]

A name may end in @N to train that variant with seed=N instead of the preset's (demo.yaml: 42), e.g.
`--only utt@1,utt+ndvi@1`: one run this short moves like a change of seed, so a decision needs two.

Writes the data set once under OUT/data (reused), runs under OUT/runs, predictions under OUT/pred, the
forest's figures in OUT/forest_fold0.json; a variant already scored (OUT/pred/<name>_scores.json) is not
trained again (delete the file to redo it). Prints the table for every scored variant.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from src.classes import CLASS_NAMES, NUM_SCORED  # noqa: E402

PLOWED_TOO = "class_weights=1,1,1,1,1,1,1,1,1,1,1,1,0"  # both heads weigh plowed land (S2 head default: 0)
VARIANTS = {  # name: settings on top of configs/demo.yaml (explicit, so they outlive a change of the preset)
    "utt": ["s2_early=none"],                            # the demo's fusion model before issue 18
    "utt+ndvi": ["s2_early=ndvi"],                       # U-T&T + early NDVI channels (demo now)
    "ndvi": ["fusion=none", "s2_early=ndvi"],            # aerial U-Net + early NDVI only
    "aerial": ["fusion=none", "use_s2=false"],           # no S2 at all
    "utt+plowed": ["s2_early=none", PLOWED_TOO],         # U-T&T, S2 head taught plowed land
    "bands": ["fusion=none", "s2_early=bands"],          # early monthly bands (120 channels)
    "utt+ndvi+plowed": ["s2_early=ndvi", PLOWED_TOO],
    "utt+ndvi-x3": ["s2_early=ndvi", "epochs=42", "val_every=42"],  # the demo's budget x3 (~4 min)
}
FOCUS = (3, 8, 9, 10, 11)  # bare soil, vineyard, herbaceous, agricultural, plowed: what S2 should help


def python() -> str:
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def run(cmd: list[str], log: Path) -> float:
    """Run a kit command with its output into `log`; seconds taken (exits with the log's tail on failure)."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=False)
    if done.returncode:
        print(log.read_text()[-3000:])
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}")
    return time.perf_counter() - t0


def score_variant(name: str, out: Path, data: Path) -> dict:
    """Train `name` on fold 0, predict the test split, score it; the scores JSON (cached on disk)."""
    scores = out / "pred" / f"{name}_scores.json"
    if scores.exists():
        return json.loads(scores.read_text())
    runs, pred = out / "runs", out / "pred" / name
    pred.parent.mkdir(parents=True, exist_ok=True)
    tag = name.replace("+", "_").replace("@", "_seed")
    base, _, seed = name.partition("@")
    settings = VARIANTS[base] + ([f"seed={seed}"] if seed else [])
    t_train = run([python(), "-m", "src.train", "--config", "configs/demo.yaml", "--fold", "0",
                   "--resume", "0", f"data_dir={data}", f"name={tag}", f"runs_dir={runs}", *settings],
                  out / f"train_{tag}.log")
    run([python(), "-m", "src.predict", "--runs", str(runs / tag / "fold0" / "best.pt"), "--split", "test",
         "--out", str(pred), "--tta", "none", "--overwrite", f"data_dir={data}", "batch_size=2"],
        out / f"predict_{tag}.log")
    run([python(), "-m", "src.evaluate", "--pred", str(pred), "--index", str(data / "index_test.csv"),
         "--json", str(scores)], out / f"evaluate_{tag}.log")
    result = json.loads(scores.read_text())
    result["train_s"] = t_train
    scores.write_text(json.dumps(result))
    print(f"{name}: test mIoU {result['miou']:.3f} (training {t_train:.0f} s)", flush=True)
    return result


def table(results: dict[str, dict], forest: dict[str, dict]) -> str:
    """Per-class test IoU, variants then forest columns; S2-sensitive classes marked with *."""
    cols = {**{n: r["ious"] for n, r in results.items()}, **{f"RF {n}": r["ious"] for n, r in forest.items()}}
    miou = {**{n: r["miou"] for n, r in results.items()}, **{f"RF {n}": r["miou"] for n, r in forest.items()}}
    width = max(10, *(len(c) + 1 for c in cols))
    fmt = lambda v: f"{'n/a' if v is None else f'{v:.3f}':>{width}}"  # noqa: E731
    lines = [f"{'test-set IoU (fold 0 training rows)':<34}" + "".join(f"{c:>{width}}" for c in cols)]
    for k in range(NUM_SCORED):
        mark = "*" if k in FOCUS else " "
        lines.append(f"{mark}{k:>2} {CLASS_NAMES[k]:<30}" + "".join(fmt(v[k]) for v in cols.values()))
    lines.append(f"{'mIoU (classes 0..11)':<34}" + "".join(fmt(v) for v in miou.values()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "s2bench")
    parser.add_argument("--only", default=",".join(list(VARIANTS)[:4]),
                        help=f"comma-separated variants among {', '.join(VARIANTS)}")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.update(HF_HUB_OFFLINE="1", NO_ALBUMENTATIONS_UPDATE="1")
    out, data = args.out.resolve(), args.out.resolve() / "data"
    if not (data / "folds.csv").exists():
        import s2_reference
        s2_reference.make_data(out)
    forest_json = out / "forest_fold0.json"
    if not forest_json.exists():
        run([python(), "bench/s2_reference.py", "--data", str(data), "--fold", "0",
             "--json", str(forest_json)], out / "forest_fold0.log")
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n.partition("@")[0] not in VARIANTS
               or ("@" in n and not n.partition("@")[2].isdigit())]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    results = {n: score_variant(n, out, data) for n in names}
    print()
    print(table(results, json.loads(forest_json.read_text())))


if __name__ == "__main__":
    main()
