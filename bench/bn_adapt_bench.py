"""Does re-estimating BatchNorm statistics per test domain (`bn_adapt=domain`) help? Measured on the demo set.

Why: test-time BatchNorm re-estimation is a cheap answer to domains never seen in training, but it can as
well hurt (small domains, statistics of a batch of 2 patches, classes absent from a domain); the kit keeps it
an option and this bench says what it does, not what it should do.

  OMP_NUM_THREADS=1 python bench/bn_adapt_bench.py                 # ~6 min on one core (two trainings)
  python bench/bn_adapt_bench.py --work /tmp/bnb --tta flip --views-check

What it does: scripts/demo.sh's synthetic set (8 training domains, 2 test domains, 2 zones x 2 patches each;
every domain has its own radiometry: per-band gain 0.85..1.15 and offset -12..12 grey levels, elevation gain
0.9..1.1, src/prep/synth_scene.py), folds as the demo, then trains configs/demo.yaml on fold 0 twice (aerial
only: fusion=none use_s2=false; and the U-T&T fusion model), skipped when the work folder already holds them.
Each model predicts, through the `python -m src.predict` command, the test split and fold 0's held-out
validation domains (also unseen in training) with bn_adapt=none and bn_adapt=domain; the official scores
(src.scoring.score.evaluate) are printed as tables: mIoU, per class, per domain, and written to
WORK/bn_adapt_bench.json. `--views-check` also measures how much the estimate would change if every TTA view
took part (the kit estimates on the identity view only).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from src.core.flair import CLASS_NAMES, NUM_SCORED  # noqa: E402
from src.core.tables import fold_rows, load_index  # noqa: E402
from src.scoring.score import evaluate  # noqa: E402

MODELS = {"aerial": ["fusion=none", "use_s2=false"], "fusion": []}


def prepare_data(work: Path) -> Path:
    """The demo's synthetic set, index and folds (kept when already there)."""
    from src.core.tables import write_index
    from src.prep.folds import make_folds
    from src.prep.index_scan import build_index
    from src.prep.synth_write import SynthSpec, make_dataset

    data = work / "data"
    if not (data / "folds.csv").is_file():
        root = make_dataset(work / "raw", SynthSpec(train_domains=8, test_domains=2, zones=2, patches=2,
                                                    seed=0))
        data.mkdir(parents=True, exist_ok=True)
        write_index(build_index(root), data)
        make_folds(data, k=4, seed=0, plot=False)
    return data


def _env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
            "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONUNBUFFERED": "1"}


def train(work: Path, data: Path, name: str, threads: int) -> Path:
    ckpt = work / "runs" / name / "fold0" / "best.pt"
    if not ckpt.is_file():
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "src.train", "--config", "configs/demo.yaml", "--fold", "0",
                        "--resume", "0", f"data_dir={data}", f"runs_dir={work / 'runs'}", f"name={name}",
                        *MODELS[name]], cwd=ROOT, env=_env(threads), check=True, stdout=subprocess.DEVNULL)
        print(f"trained {name} in {time.perf_counter() - t0:.0f} s")
    return ckpt


def predict(ckpt: Path, index_csv: Path, out: Path, mode: str, args: argparse.Namespace) -> dict:
    """One `python -m src.predict` run; its wall time and the bn_adapt lines of its log."""
    cmd = [sys.executable, "-m", "src.predict", "--runs", str(ckpt), "--index", str(index_csv), "--out",
           str(out), "--tta", args.tta, "--overwrite", "--bn-adapt-patches", str(args.patches),
           f"data_dir={index_csv.parent}", "batch_size=2", f"bn_adapt={mode}"]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, env=_env(args.threads), check=True, capture_output=True, text=True)
    notes = [ln for ln in res.stdout.splitlines() if "bn_adapt:" in ln]
    return {"wall_s": time.perf_counter() - t0, "notes": notes}


def score(pred: Path, index_csv: Path) -> dict:
    r = evaluate(pred, index_csv, workers=1)
    pd_ = r["per_domain"]
    return {"miou": r["miou"], "ious": r["ious"], "domains": dict(zip(pd_["domains"], pd_["miou"]))}


def _f(v: float | None) -> str:
    return "  n/a" if v is None else f"{v:.3f}"


def print_tables(results: dict) -> None:
    for split, per_model in results.items():
        print(f"\n### {split}: mIoU (classes 0..11) and per domain")
        domains = sorted(next(iter(per_model.values()))["none"]["domains"])
        print("| model | bn_adapt | mIoU | " + " | ".join(domains) + " | predict s |")
        print("|---|---|---|" + "---|" * len(domains) + "---|")
        for name, modes in per_model.items():
            for mode, r in modes.items():
                cells = " | ".join(_f(r["domains"][d]) for d in domains)
                print(f"| {name} | {mode} | {_f(r['miou'])} | {cells} | {r['wall_s']:.1f} |")
        print(f"\n{split}: IoU per class")
        print("| class | " + " | ".join(f"{n} {m}" for n in per_model for m in per_model[n]) + " |")
        print("|---|" + "---|" * sum(len(m) for m in per_model.values()))
        for c in range(NUM_SCORED):
            cells = " | ".join(_f(per_model[n][m]["ious"][c]) for n in per_model for m in per_model[n])
            print(f"| {c} {CLASS_NAMES[c]} | {cells} |")


def _classes(model: torch.nn.Module, b: dict) -> torch.Tensor:
    from src.prediction.ensemble import INPUT_KEYS

    with torch.no_grad():
        return model(b["image"], **{k: b[k] for k in INPUT_KEYS if k in b})["logits"].argmax(1)


def views_check(ckpt: Path, index_csv: Path) -> dict:
    """Statistics estimated on the identity view vs on every D4 view, per domain: the largest change of a
    running mean (in running standard deviations) and of a running variance (relative), over all layers,
    and the share of pixels whose predicted class stays the same."""
    from src.data.dataset import FlairDataset
    from src.data.device_augment import device_batch
    from src.data.loader import collate
    from src.models.batchnorm import batchnorm_layers
    from src.models.flair_model import load_for_inference
    from src.prediction import tta as T
    from src.prediction.bn_adapt import adapt_batchnorm
    from src.prediction.ensemble import INPUT_KEYS

    model, cfg = load_for_inference(ckpt, "cpu")
    out = {}
    for domain, rows in load_index(index_csv).groupby("domain"):
        ds = FlairDataset(rows.reset_index(drop=True), cfg, train=False, labels=False)
        batches = [device_batch(collate([ds[j] for j in range(i, min(i + 2, len(ds)))]), cfg,
                                torch.device("cpu")) for i in range(0, len(ds), 2)]
        plain = adapt_batchnorm(model, batches)
        keep = ("image", *INPUT_KEYS)
        d4 = T.views("d4")
        every = adapt_batchnorm(model, [T.stack_views({k: v for k, v in b.items() if k in keep}, d4)
                                        for b in batches])
        pairs = list(zip(batchnorm_layers(plain), batchnorm_layers(every)))
        dm = max(float(((a.running_mean - b.running_mean).abs() / a.running_var.sqrt()).max())
                 for a, b in pairs)
        dv = max(float(((a.running_var - b.running_var).abs() / a.running_var).max()) for a, b in pairs)
        same = float(np.mean([(_classes(plain, b) == _classes(every, b)).float().mean() for b in batches]))
        out[str(domain)] = {"max_mean_shift_sd": dm, "max_var_rel": dv, "pixels_same_class": same}
        print(f"views check {ckpt.parent.parent.name} {domain}: running means move by up to {dm:.3f} sd, "
              f"variances by up to {100 * dv:.1f}%, {100 * same:.2f}% of pixels keep their class")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/bn_adapt_bench", help="data, runs and predictions go here")
    ap.add_argument("--tta", default="none", choices=["none", "flip", "d4"])
    ap.add_argument("--patches", type=int, default=256, help="bn_adapt_patches (0: all)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each training/prediction")
    ap.add_argument("--views-check", action="store_true", help="also: identity view vs every D4 view")
    args = ap.parse_args(argv)
    work = Path(args.work).resolve()
    data = prepare_data(work)
    ckpts = {name: train(work, data, name, args.threads) for name in MODELS}
    val_csv = work / "val" / "index_test.csv"  # fold 0's held-out domains, as a split of its own
    val_csv.parent.mkdir(parents=True, exist_ok=True)
    fold_rows(data, "0")[1].to_csv(val_csv, index=False)
    splits = {"test": data / "index_test.csv", "val fold 0": val_csv}
    results: dict = {}
    for split, index_csv in splits.items():
        for name, ckpt in ckpts.items():
            for mode in ("none", "domain"):
                out = work / "pred" / f"{split.replace(' ', '_')}_{name}_{mode}"
                run = predict(ckpt, index_csv, out, mode, args)
                results.setdefault(split, {}).setdefault(name, {})[mode] = {**run, **score(out, index_csv)}
                for note in run["notes"]:
                    print(f"  {split} {name}: {note}")
    print_tables(results)
    if args.views_check:
        results["views_check"] = {name: views_check(ckpt, splits["test"]) for name, ckpt in ckpts.items()}
    (work / "bn_adapt_bench.json").write_text(json.dumps(results, indent=1))
    print(f"\nfigures: {work / 'bn_adapt_bench.json'}")


if __name__ == "__main__":
    main()
