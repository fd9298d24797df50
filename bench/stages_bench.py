"""What the winning stages buy on the kit's synthetic data (issue 18, "Measure"): out-of-fold ensembling,
one pseudo-label round, and the two-stage warm start, every step through the kit's own command lines.

    OMP_NUM_THREADS=1 .venv/bin/python bench/stages_bench.py [--work data/stagesbench]

The data: scripts/demo.sh's synthetic set (8 training + 2 test domains x 2 zones x 2 patches, seed 0; every
domain has its own radiometry, so the test domains are unseen), K=4 stratified folds, seed 0
(bench/s2_reference.make_data), written once under WORK/data. Every training is `python -m src.train
--config configs/demo.yaml` with one torch thread, one at a time; it is skipped when its run folder already
holds the expected checkpoint (and, for the OOF runs, a complete OOF store), so a second run of this script
re-reads the cache and prints the same figures. Predictions: `python -m src.predict ... --tta none
batch_size=2`, scored with `python -m src.evaluate` (official mIoU over classes 0..11).

1. OOF ensembling: A = configs/demo.yaml (U-T&T + s2_early=ndvi), B = the aerial-only U-Net (fusion=none
   use_s2=false), each on the 4 folds with oof=true (8 trainings); `python -m src.blend` on both runs ->
   WORK/recipe.json (OOF mIoU of each run, of the plain mean and of the recipe; the held-out-halves check).
   Test mIoU of A (4 fold models), B (4), the plain mean of the 8 (`--runs A B`) and the recipe (`--recipe`).
2. Pseudo-labels, one round: the recipe predicts the test split with --save-probs, `python -m src.pseudo`
   labels it; A's fold-0 and fold-1 models are fine-tuned 2 epochs with init_from + pseudo_dir
   (configs/pseudo_finetune.yaml's threshold 0.7 and weight 1, a sixth of the lr, warmup 0.1 epoch), and the
   same without pseudo_dir (control: 2 more labelled epochs only); also with pseudo_threshold=0 (every pixel
   with its hard label, as the 2nd place did), and `pseudo_only=true` (the pseudo-labelled test patches
   alone, the 2nd place's fine-tune; 2 and 6 epochs). Test mIoU before / after / control (one
   model each, and the two folds' models together), and each fold's validation mIoU.
3. Warm start: U-T&T (A's settings) on folds 0 and 1 from B's best.pt of the same fold (stage 1: the aerial
   U-Net) vs the same from scratch (A's own fold runs: encoder_weights none, the same epochs and seed; oof
   only adds a pass after training): the fold's validation mIoU and test mIoU.

Writes WORK/stages_bench.json and WORK/stages_bench.md (the printed tables, markdown); logs of every
command under WORK/logs. Cost measured on a 2-core VM, one thread: 10 full trainings of ~1.5 min (8 + 2), 10
fine-tunes of ~0.5 min, ~10 min of test predictions (cached by their inputs' size and mtime): ~30 min.
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

from src.core.flair import CLASS_NAMES  # noqa: E402

K = 4
CONFIG = "configs/demo.yaml"
RUNS = {  # item 1: name -> settings on top of configs/demo.yaml
    "A": ["oof=true"],                                       # U-T&T + s2_early=ndvi, as the preset
    "B": ["oof=true", "fusion=none", "use_s2=false"],        # aerial-only U-Net
}
PSEUDO = {"pseudo_threshold": "0.7", "pseudo_weight": "1.0"}  # configs/pseudo_finetune.yaml's
# the fine-tunes of item 2: run name -> (label in the tables, settings beyond init_from and FT)
FINETUNES = {
    "A_pl": ("pseudo, threshold 0.7", [f"{a}={b}" for a, b in PSEUDO.items()]),
    # every pixel with its hard label, as the 2nd place did: the demo teacher is rarely >= 0.7 confident
    "A_pl0": ("pseudo, threshold 0", ["pseudo_threshold=0", "pseudo_weight=1.0"]),
    "A_more": ("control: no pseudo_dir", []),
    # the 2nd place's fine-tune: the pseudo-labelled test patches alone (8 here: 4 steps in 2 epochs), and
    # the same for 6 epochs (12 steps, the control's 2 epochs of 24 labelled patches)
    "A_plo": ("pseudo only, threshold 0", ["pseudo_only=true", "pseudo_threshold=0", "pseudo_weight=1.0"]),
    "A_plo6": ("pseudo only, threshold 0, 6 epochs",
               ["pseudo_only=true", "pseudo_threshold=0", "pseudo_weight=1.0", "epochs=6"]),
}
FT_LR = "3.3e-4"   # the fine-tunes' lr: a sixth of the preset's 2e-3, as pseudo_finetune.yaml to unet_r34
FT_EPOCHS = "2"
S2_ONLY = (9, 10)  # herbaceous vegetation, agricultural land: identical in the aerial bands of the synth set


def python() -> str:
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def run(cmd: list[str], log: Path) -> float:
    """Run a kit command with its output into `log`; seconds taken (exits with the log's tail on failure)."""
    t0 = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        done = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=False)
    if done.returncode:
        print(log.read_text()[-3000:])
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}  (log: {log})")
    return time.perf_counter() - t0


def prepare_data(work: Path) -> Path:
    data = work / "data"
    if not (data / "folds.csv").is_file():
        import s2_reference
        s2_reference.make_data(work)
    return data


def oof_complete(fold_dir: Path) -> bool:
    f = fold_dir / "oof" / "oof.json"
    return f.is_file() and bool(json.loads(f.read_text()).get("complete"))


def train(work: Path, data: Path, name: str, fold: int, settings: list[str], need_oof: bool = False) -> Path:
    """`python -m src.train` for one fold (skipped when the run folder has best.pt [and a complete OOF
    store]); the fold folder."""
    fold_dir = work / "runs" / name / f"fold{fold}"
    if (fold_dir / "best.pt").is_file() and (not need_oof or oof_complete(fold_dir)):
        return fold_dir
    cmd = [python(), "-m", "src.train", "--config", CONFIG, "--fold", str(fold), "--resume", "0",
           f"data_dir={data}", f"runs_dir={work / 'runs'}", f"name={name}", *settings]
    dt = run(cmd, work / "logs" / f"train_{name}_fold{fold}.log")
    print(f"trained {name} fold {fold} in {dt:.0f} s", flush=True)
    return fold_dir



def stamp(paths: list[Path]) -> list[list]:
    """What a cached prediction or blend was made from: every checkpoint / file given (a folder: its *.pt
    and oof.json files), with size and modification time."""
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.name.endswith(".pt") or f.name == "oof.json"
                            or f.name == "pseudo.json")
        elif p.exists():
            files.append(p)
    return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def predict_score(work: Path, data: Path, tag: str, source: list[str], inputs: list[Path],
                  extra: list[str] | None = None) -> dict:
    """`python -m src.predict` on the test split (TTA none, batch 2) into WORK/pred/<tag>, then
    `python -m src.evaluate`; the scores JSON (reused while its inputs and command are unchanged)."""
    pred, scores = work / "pred" / tag, work / "pred" / f"{tag}_scores.json"
    cmd = [python(), "-m", "src.predict", *source, "--split", "test", "--out", str(pred), "--tta", "none",
           "--overwrite", *(extra or []), f"data_dir={data}", "batch_size=2"]
    key = {"cmd": cmd, "inputs": stamp(inputs)}
    if scores.is_file():
        cached = json.loads(scores.read_text())
        if cached.get("stamp") == key:
            return cached
    dt = run(cmd, work / "logs" / f"predict_{tag}.log")
    run([python(), "-m", "src.evaluate", "--pred", str(pred), "--index", str(data / "index_test.csv"),
         "--json", str(scores), "--workers", "1"], work / "logs" / f"evaluate_{tag}.log")
    result = json.loads(scores.read_text())
    result.update(stamp=key, predict_s=dt)
    scores.write_text(json.dumps(result))
    print(f"test {tag}: mIoU {result['miou']:.4f} (predict {dt:.0f} s)", flush=True)
    return result


def blend(work: Path, data: Path, tag: str, extra: list[str]) -> dict:
    """`python -m src.blend --runs A B` -> WORK/<tag>.json (reused while the OOF stores are unchanged)."""
    out, key_file = work / f"{tag}.json", work / "logs" / f"blend_{tag}.stamp.json"
    runs = [work / "runs" / n for n in RUNS]
    cmd = [python(), "-m", "src.blend", "--runs", *map(str, runs), "--out", str(out), "--data", str(data),
           "--threads", "1", *extra]
    key = {"cmd": cmd, "inputs": stamp([r / f"fold{k}" / "oof" for r in runs for k in range(K)])}
    if not (out.is_file() and key_file.is_file() and json.loads(key_file.read_text()) == key):
        dt = run(cmd, work / "logs" / f"blend_{tag}.log")
        key_file.write_text(json.dumps(key))
        print(f"blend {tag}: {dt:.0f} s", flush=True)
    return json.loads(out.read_text())


def val_scores(fold_dir: Path) -> dict:
    """The run's last validation (metrics.csv): fold mIoU and IoU per class."""
    import csv

    rows = [r for r in csv.DictReader(open(fold_dir / "metrics.csv")) if r.get("miou")]
    last = rows[-1]
    ious = [k for k in last if k.startswith("iou_")]
    return {"epoch": int(last["epoch"]), "miou": float(last["miou"]),
            "ious": [None if last[k] in ("", "nan") else float(last[k]) for k in ious]}


def log_lines(log: Path, start: str, indented: bool = True) -> list[str]:
    """Lines of a training log starting with `start` (and the indented lines after each)."""
    if not log.is_file():
        return []
    out, inside = [], False
    for line in log.read_text().splitlines():
        if line.startswith(start):
            out.append(line)
            inside = indented
        elif inside and line.startswith("  "):
            out.append(line)
        else:
            inside = False
    return out


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def row(name: str, n: str, s: dict, *val: dict | None) -> str:
    """A table row: name, checkpoints, [validation mIoU,] test mIoU, test IoU of classes 9 and 10."""
    v = "".join(f" {_f(x['miou'] if x else None)} |" for x in val)
    return f"| {name} | {n} |{v} {_f(s['miou'])} | {_f(s['ious'][9])} | {_f(s['ious'][10])} |"


HEAD_VAL = ["| model | checkpoints | fold val mIoU | test mIoU | IoU 9 | IoU 10 |",
            "|---|---|---|---|---|---|"]


def get(fig: dict, col: str, key: int | None) -> float | None:
    return fig["oof_miou"][col] if key is None else fig["ious"][col][key]


def item1(work: Path, data: Path, res: dict) -> list[str]:
    out = ["## 1. OOF ensembling (A = demo.yaml U-T&T + NDVI, B = aerial-only U-Net; 4 folds each)", ""]
    rec = res["recipes"]
    out += ["OOF (every training pixel, each patch predicted by the fold model that did not train on it):",
            "",
            "| | " + " | ".join(["A", "B", "mean A+B"] + list(rec)) + " |",
            "|---|" + "---|" * (3 + len(rec))]
    first = next(iter(rec.values()))["figures"]
    for label, key in (("OOF mIoU", None), (f"IoU 9 {CLASS_NAMES[9]}", 9), (f"IoU 10 {CLASS_NAMES[10]}", 10)):
        cells = [get(first, c, key) for c in ("A", "B", "mean")]
        cells += [get(r["figures"], "recipe", key) for r in rec.values()]
        out.append(f"| {label} | " + " | ".join(_f(c) for c in cells) + " |")
    out += ["", "Held-out halves (fit the search on half of the 8 training domains, score the other half):",
            "", "| recipe | fit on | scored on | recipe | plain mean | best single run |",
            "|---|---|---|---|---|---|"]
    for tag, r in rec.items():
        for h in r["figures"]["halves"]:
            out.append(f"| {tag} | {' '.join(h['fit'])} | {' '.join(h['scored'])} | {_f(h['recipe'])} | "
                       f"{_f(h['mean'])} | {_f(h['best_single'])} |")
    out += ["", "The recipes (weights A, B; per-class choice: class -> run; biases != 0):", ""]
    for tag, r in rec.items():
        names = [Path(p).name for p in r["runs"]]
        choice = {k: names[c] for k, c in enumerate(r["class_choice"]) if c is not None}
        biases = {k: b for k, b in enumerate(r["biases"]) if b}
        out.append(f"- {tag} ({' '.join(r['args'])}): runs {names}, weights "
                   f"{[round(w, 3) for w in r['weights']]}, choice {choice}, biases {biases}, "
                   f"sample {r['figures']['sample']['pixels']} px")
    out += ["", "Test set (2 unseen domains, 8 patches; TTA none):", "",
            "| model | checkpoints | test mIoU | IoU 9 | IoU 10 |", "|---|---|---|---|---|"]
    for tag, (n, s) in res["test"].items():
        out.append(row(tag, n, s))
    return out


def item2(res: dict) -> list[str]:
    out = ["## 2. Pseudo-labels, one round (teacher: the recipe; fine-tunes of A's fold models "
           f"{', '.join(map(str, res['folds']))}: {FT_EPOCHS} epochs, lr {FT_LR}, warmup 0.1 epoch, "
           "pseudo weight 1)", ""]
    out += [f"Teacher (the recipe) test mIoU {_f(res['teacher']['miou'])}, IoU 9 "
            f"{_f(res['teacher']['ious'][9])}, IoU 10 {_f(res['teacher']['ious'][10])}. Training logs:", "",
            *(f"    {ln}" for ln in res["pseudo_log"]), "", *HEAD_VAL]
    for tag, (n, s, v) in res["test"].items():
        out.append(row(tag, n, s, v))
    return out


def item3(res: dict) -> list[str]:
    out = ["## 3. Warm start: U-T&T (A's settings) from B's fold model (stage 1) vs from scratch", "",
           *HEAD_VAL]
    for tag, (n, s, v) in res["test"].items():
        out.append(row(tag, n, s, v))
    out += [""] + [f"    {ln}" for ln in res["init_from_log"]]
    return out


def single(work: Path, data: Path, name: str, k: int) -> tuple:
    """One fold model: ("1", its test scores, its validation scores)."""
    fd = work / "runs" / name / f"fold{k}"
    ck = fd / "best.pt"
    return "1", predict_score(work, data, f"{name}_fold{k}", ["--runs", str(ck)], [ck]), val_scores(fd)


PL_FOLDS = (0, 1)   # item 2: fold models fine-tuned (with pseudo-labels, and the control without)
WS_FOLDS = (0, 1)   # item 3: stage-2 runs warm-started from B's fold model
RECIPES = {"recipe": ["--pixels", "128"], "recipe_px4096": ["--pixels", "4096"],
           "recipe_weights_only": ["--pixels", "128", "--no-choice", "--no-biases"],
           "recipe_auto": []}  # (the default: --pixels auto, 125,000 px per patch on these 32 patches)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=ROOT / "data" / "stagesbench")
    ap.add_argument("--train-only", action="store_true", help="only item 1's trainings")
    args = ap.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.update(HF_HUB_OFFLINE="1", NO_ALBUMENTATIONS_UPDATE="1", PYTHONUNBUFFERED="1")
    work = args.work.resolve()
    data = prepare_data(work)
    runs = work / "runs"
    for name, settings in RUNS.items():
        for k in range(K):
            train(work, data, name, k, settings, need_oof=True)
    if args.train_only:
        return
    report: dict = {"work": str(work), "K": K, "config": CONFIG, "runs": RUNS}

    # --- 1. OOF ensembling -------------------------------------------------------------------------
    recipes = {tag: {**blend(work, data, tag, extra), "args": extra} for tag, extra in RECIPES.items()}
    probs = work / "teacher_probs"
    test1 = {
        "A (4 fold models)": ("4", predict_score(work, data, "A", ["--runs", str(runs / "A")], [runs / "A"])),
        "B (4 fold models)": ("4", predict_score(work, data, "B", ["--runs", str(runs / "B")], [runs / "B"])),
        "mean A+B": ("8", predict_score(work, data, "mean_AB", ["--runs", str(runs / "A"), str(runs / "B")],
                                        [runs / "A", runs / "B"])),
    }
    for tag in RECIPES:
        r = work / f"{tag}.json"
        n = str(sum(K for _ in recipes[tag]["runs"]))
        test1[tag] = (n, predict_score(work, data, tag, ["--recipe", str(r)], [r, runs / "A", runs / "B"],
                                       ["--save-probs", str(probs)] if tag == "recipe" else None))
    report["item1"] = {"recipes": recipes, "test": test1}

    # --- 2. pseudo-labels ---------------------------------------------------------------------------
    teacher = test1["recipe"][1]
    pseudo = work / "pseudo"
    key_file = work / "logs" / "pseudo.stamp.json"
    fresh = not (key_file.is_file() and json.loads(key_file.read_text()) == teacher["stamp"])
    if fresh or not (pseudo / "pseudo.json").is_file():
        run([python(), "-m", "src.pseudo", "--probs", str(probs), "--index", str(data / "index_test.csv"),
             "--out", str(pseudo), "--skipped", str(work / "pred" / "recipe" / "skipped.txt"),
             "--workers", "1", *(["--overwrite"] if (pseudo / "pseudo.json").is_file() else [])],
            work / "logs" / "pseudo.log")
        key_file.write_text(json.dumps(teacher["stamp"]))
    test2: dict = {}
    ft = ["oof=false", f"epochs={FT_EPOCHS}", f"lr={FT_LR}", "warmup_epochs=0.1"]
    for k in PL_FOLDS:
        init = f"init_from={runs / 'A' / f'fold{k}' / 'best.pt'}"
        for name, (_, extra) in FINETUNES.items():
            train(work, data, name, k, [init, *ft, *([f"pseudo_dir={pseudo}"] if extra else []), *extra])
        for name, tag in (("A", "before"), *((n, t) for n, (t, _) in FINETUNES.items())):
            test2[f"fold {k}: {tag} ({name})"] = single(work, data, name, k)
    if len(PL_FOLDS) > 1:
        for name, tag in (("A", "before"), *((n, t) for n, (t, _) in FINETUNES.items())):
            cks = [runs / name / f"fold{k}" / "best.pt" for k in PL_FOLDS]
            test2[f"folds {'+'.join(map(str, PL_FOLDS))}: {tag} ({name})"] = (str(len(cks)), predict_score(
                work, data, f"{name}_folds", ["--runs", *map(str, cks)], cks), None)
    pj = json.loads((pseudo / "pseudo.json").read_text())
    report["item2"] = {"folds": list(PL_FOLDS), "teacher": {"miou": teacher["miou"], "ious": teacher["ious"]},
                       "pseudo_json": {k: v for k, v in pj.items() if k not in ("ids", "counts")},
                       "pseudo_log": [ln for n in ("A_pl", "A_pl0") for ln in log_lines(
                           work / "logs" / f"train_{n}_fold{PL_FOLDS[0]}.log", "pseudo:", indented=False)],
                       "test": test2}

    # --- 3. warm start -------------------------------------------------------------------------------
    test3: dict = {}
    init_log: list[str] = []
    for k in WS_FOLDS:
        train(work, data, "A_ws", k, ["oof=false", f"init_from={runs / 'B' / f'fold{k}' / 'best.pt'}"])
        for name, tag in (("A", "from scratch"), ("A_ws", "from stage 1 (B)")):
            test3[f"fold {k}: {tag} ({name})"] = single(work, data, name, k)
        init_log += log_lines(work / "logs" / f"train_A_ws_fold{k}.log", "init_from")
    report["item3"] = {"folds": list(WS_FOLDS), "test": test3, "init_from_log": init_log}

    lines = item1(work, data, report["item1"]) + [""] + item2(report["item2"]) + [""] + item3(report["item3"])
    print("\n".join(lines))
    for item in ("item1", "item2", "item3"):  # the stamps and confusion matrices stay in the scores JSONs
        for key, val in report[item]["test"].items():
            report[item]["test"][key] = [val[0], {k: val[1][k] for k in ("miou", "ious", "per_domain")},
                                         *val[2:]]
    (work / "stages_bench.json").write_text(json.dumps(report, indent=1))
    (work / "stages_bench.md").write_text("\n".join(lines) + "\n")
    print(f"\nfigures: {work / 'stages_bench.json'}, {work / 'stages_bench.md'}")


if __name__ == "__main__":
    main()
