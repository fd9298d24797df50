"""Which S2 fusion clears the random-forest reference (issue 18, item 7): train the demo preset's variants
on the demo's synthetic set and print their test-set IoU per class beside the forest's.

Every variant is `configs/demo.yaml` trained on fold 0 (the demo's training rows: 3/4 of the 8 training
domains), then predicted on the 2 unseen test domains (no TTA) and scored with the official metric. The
forest (bench/s2_reference.py) is trained on the same rows (`--fold 0`). Trainings run one at a time, one
torch thread each, as the demo's do (deterministic on a given CPU).

    OMP_NUM_THREADS=1 .venv/bin/python bench/s2_variants.py [--out data/s2bench] [--only utt,ndvi,...]

A name may end in @N to train that variant with seed=N instead of the preset's (demo.yaml: 42), e.g.
`--only utt@1,utt+ndvi@1`: one run this short moves like a change of seed, so a decision needs several;
`--mean` prints one column per variant, the mean over the seeds listed.

`--phenology events` (issue 28): the same on the events set (src.synth --phenology events, 4 patches per
zone: short spring peaks and harvests, a late green-up of plowed land, hidden cloudy months; 48 training
patches in fold 0) at the research budget (RESEARCH: crop 256, 30 epochs, S2 head weight 0.5), ~15 min per
training on one core; its forest columns are 3 seeds of 50 trees (monthly NDVI and NDVI statistics), and
any OUT/forest_fold0_<reading>.json (a forest on another S2 reading, `s2_reference.py --set ... --json`)
is shown beside them.

The last row, herbaceous/agricultural separation, isolates what S2 decides: among the pixels that are one
of the two classes (identical in the synthetic aerial bands) and predicted as one of the two, the share
told apart rightly.

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

from src.core.flair import CLASS_NAMES, NUM_SCORED  # noqa: E402

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
    "utt+ndvi+isqrt": ["s2_early=ndvi", "class_weights=inverse_sqrt"],  # rare classes weigh more
    "utt+ndvi+inv": ["s2_early=ndvi", "class_weights=inverse"],
    "utt+ndvi+dice": ["s2_early=ndvi", "loss=ce_dice"],
    "utt+ndvi+isqrt+dice": ["s2_early=ndvi", "class_weights=inverse_sqrt", "loss=ce_dice"],
    "utt+ndvi+isqrt-x3": ["s2_early=ndvi", "class_weights=inverse_sqrt", "epochs=42", "val_every=42"],
    # the budget x10 (840 steps, ~13 min on one core): what the architecture reaches once trained longer
    "utt+ndvi-x10": ["s2_early=ndvi", "epochs=140", "val_every=140"],
    "utt+ndvi+inv-x10": ["s2_early=ndvi", "class_weights=inverse", "epochs=140", "val_every=140"],
    "utt-x10": ["s2_early=none", "epochs=140", "val_every=140"],
}
# Issue 28: the events set (phenology=events, 4 patches per zone) at the research budget: crop 256, 30 epochs,
# validation once at the end, S2 head weight 0.5 (the demo's 2.0 is for 84 steps).
RESEARCH = ["crop_size=256", "epochs=30", "val_every=30", "s2_aux_weight=0.5"]
FILL20 = ["s2_cloud_pixels=fill", "s2_prob_min=20"]
EVENT_VARIANTS = {name: RESEARCH + extra for name, extra in {
    "aerial": ["fusion=none", "use_s2=false"],
    "utt+ndvi": ["s2_early=ndvi"],                                    # the demo's model, official S2 reading
    # FILL20: cloudy pixels (probability >= 20, which also counts for the date filter) filled per pixel
    "utt+ndvi+fill20": ["s2_early=ndvi", *FILL20],
    "utt+ndvi+fill20+isqrt": ["s2_early=ndvi", *FILL20, "class_weights=inverse_sqrt"],  # both heads
    "utt+ndvi+fill20+rare": ["s2_early=ndvi", *FILL20, "sample_rare=0.5"],  # patches drawn by rarity
    "utt+ndvi+strict": ["s2_early=ndvi", "s2_cover_max=0.05"],        # only dates with < 5% of cover
    "utt+ndvi+fill20+plowed": ["s2_early=ndvi", *FILL20, PLOWED_TOO],
    "utt+fill20+dates": ["s2_early=none", *FILL20, "s2_monthly=false"],
}.items()}
S2_ONLY = (9, 10)  # herbaceous vegetation, agricultural land: identical in the synthetic aerial bands
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


def score_variant(name: str, out: Path, data: Path, variants: dict[str, list[str]]) -> dict:
    """Train `name` on fold 0, predict the test split, score it; the scores JSON (cached on disk)."""
    scores = out / "pred" / f"{name}_scores.json"
    if scores.exists():
        return json.loads(scores.read_text())
    runs, pred = out / "runs", out / "pred" / name
    pred.parent.mkdir(parents=True, exist_ok=True)
    tag = name.replace("+", "_").replace("@", "_seed")
    base, _, seed = name.partition("@")
    settings = variants[base] + ([f"seed={seed}"] if seed else [])
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


def separation(confusion: list[list[int]]) -> float | None:
    """Share of right answers between herbaceous vegetation and agricultural land among the pixels that are
    one of the two and predicted as one of the two: what the S2 series decides, whatever the aerial
    confusions around them (0.5 is a coin toss; the aerial bands alone cannot beat it by much)."""
    pair = [[confusion[t][p] for p in S2_ONLY] for t in S2_ONLY]
    total = sum(map(sum, pair))
    return (pair[0][0] + pair[1][1]) / total if total else None


def seed_means(results: dict[str, dict]) -> dict[str, dict]:
    """Variants listed with several seeds (name, name@1, ...) -> one entry "name (xN)" with the mean IoU of
    each class (over the seeds where it is defined), the mean mIoU and the summed confusion matrix."""
    groups: dict[str, list[dict]] = {}
    for name, r in results.items():
        groups.setdefault(name.partition("@")[0], []).append(r)
    out = {}
    for base, rs in groups.items():
        ious = [[r["ious"][k] for r in rs if r["ious"][k] is not None] for k in range(len(rs[0]["ious"]))]
        out[f"{base} (x{len(rs)})" if len(rs) > 1 else base] = {
            "ious": [sum(v) / len(v) if v else None for v in ious],
            "miou": sum(r["miou"] for r in rs) / len(rs),
            "confusion": [[sum(r["confusion"][t][p] for r in rs) for p in range(len(rs[0]["confusion"]))]
                          for t in range(len(rs[0]["confusion"]))]}
    return out


def table(results: dict[str, dict], forest: dict[str, dict]) -> str:
    """Per-class test IoU, variants then forest columns; S2-sensitive classes marked with *; the
    herbaceous / agricultural separation last."""
    both = {**results, **{f"RF {n}": r for n, r in forest.items()}}
    cols = {n: r["ious"] for n, r in both.items()}
    miou = {n: r["miou"] for n, r in both.items()}
    sep = {n: separation(r["confusion"]) if "confusion" in r else None for n, r in both.items()}
    width = max(10, *(len(c) + 1 for c in cols))
    fmt = lambda v: f"{'n/a' if v is None else f'{v:.3f}':>{width}}"  # noqa: E731
    lines = [f"{'test-set IoU (fold 0 training rows)':<34}" + "".join(f"{c:>{width}}" for c in cols)]
    for k in range(NUM_SCORED):
        mark = "*" if k in FOCUS else " "
        lines.append(f"{mark}{k:>2} {CLASS_NAMES[k]:<30}" + "".join(fmt(v[k]) for v in cols.values()))
    lines.append(f"{'mIoU (classes 0..11)':<34}" + "".join(fmt(v) for v in miou.values()))
    lines.append(f"{'herbaceous/agricultural separation':<34}" + "".join(fmt(v) for v in sep.values()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="default: data/s2bench (smooth), data/s2events_bench")
    parser.add_argument("--phenology", choices=("smooth", "events"), default="smooth",
                        help="smooth: the demo's set and budget; events: issue 28's set and research budget")
    parser.add_argument("--only", help=f"comma-separated variants; smooth: {', '.join(VARIANTS)}; "
                                       f"events: {', '.join(EVENT_VARIANTS)}")
    parser.add_argument("--mean", action="store_true",
                        help="one column per variant: the mean over the seeds listed (name@N) of each figure")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.update(HF_HUB_OFFLINE="1", NO_ALBUMENTATIONS_UPDATE="1")
    events = args.phenology == "events"
    variants = EVENT_VARIANTS if events else VARIANTS
    out = (args.out or ROOT / "data" / ("s2events_bench" if events else "s2bench")).resolve()
    data = out / "data"
    if not (data / "folds.csv").exists():
        import s2_reference
        s2_reference.make_data(out, *((4, "events") if events else ()))
    forest_json = out / "forest_fold0.json"
    if not forest_json.exists():  # events: 3 seeds of 50 trees, monthly NDVI and NDVI statistics
        more = ["--features", "monthly", "stats", "--seed", "0", "1", "2", "--trees", "50"] if events else []
        run([python(), "bench/s2_reference.py", "--data", str(data), "--fold", "0", *more,
             "--json", str(forest_json)], out / "forest_fold0.log")
    names = [n.strip() for n in (args.only or ",".join(list(variants)[:4])).split(",") if n.strip()]
    unknown = [n for n in names if n.partition("@")[0] not in variants
               or ("@" in n and not n.partition("@")[2].isdigit())]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {', '.join(variants)}")
    results = {n: score_variant(n, out, data, variants) for n in names}
    forests = {}  # forest_fold0.json, then forest_fold0_<reading>.json (the forest on another S2 reading)
    for path in sorted(out.glob("forest_fold0*.json")):
        tag = path.stem.removeprefix("forest_fold0").lstrip("_")
        forests.update({f"{n} {tag}".strip(): r for n, r in json.loads(path.read_text()).items()})
    print()
    print(table(seed_means(results) if args.mean else results, forests))


if __name__ == "__main__":
    main()
