"""The chain at the real dataset's scale (916 zones, 61,712 + 16,050 patches) under `ulimit -n 1024`: what
each step costs in time, memory and open files, and what it projects to on the real data.

Why: everything else runs on a dozen zones. What grows with zones or patches (descriptors held per zone, an
index held in memory, a quadratic scan, a file per patch read twice) only shows at this size, and it shows
on a rented GPU hours into a run. The input is the full-size tree of bench/scale_tree.py (hard links to a few
real-size files: the counts and the file layout are the real ones, the pixels repeat).

Each step runs as its own process (the user's command where there is one) with the limit of open files set
to 1024 (soft and hard, as `ulimit -n 1024` does); a watcher samples its process tree every 0.1 s: peak
memory (anonymous and file-backed proportional set sizes, summed over the processes), peak open
descriptors (of the one process holding most: the limit is per process), wall and CPU time.

Steps: `index` and `check` (`make index`, `--check`); `folds` (`make folds K=5`: class histograms of 61,712
masks, the domain search); `train` (the start of a demo-config run on the full index up to 4 batches: what
the index's size costs before the first step); `loader` (one epoch's worth of batches that visits every
training zone: PER_ZONE rows per zone through the real build_loader, 4 persistent workers, no model);
`predict` (the tiny `train` model over one test patch per zone, with --save-probs); `submit` and
`evaluate` on a full 16,050-file PRED folder (hard links to the sample's files); `pseudo` (pseudo-labels of
16,050 PROB files); `ensemble` (`make ensemble` on two runs' OOF stores covering all 61,712 training
patches, hard links to the sample's PROB files).

    python bench/scale_bench.py --tree /tmp/flair_scale [--work /tmp/flair_scale_work] [--steps a,b,...]
        [--json results.json]          (make scale-bench)

Projection to the real data: steps run at full size are their own projection (on this CPU, with the files
in the page cache); `loader` and `predict` run on a sample and are scaled by patches (a GPU changes
`predict` entirely: bench/gpu_check.sh measures that).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

N_TRAIN, N_TEST = 61_712, 16_050
LIMIT = 1024  # open files per process, soft and hard
PER_ZONE = 2  # loader step: rows per training zone
STEPS = ("index", "check", "folds", "train", "loader", "predict", "submit", "evaluate", "pseudo", "ensemble")
TINY = ["--config", "configs/demo.yaml", "--fold", "0", "name=scale", "epochs=1", "max_train_batches=4",
        "max_val_batches=2", "oof=false", "workers=2"]


@dataclass
class Figures:
    """What one step cost: wall and CPU seconds, peaks over its process tree."""

    step: str
    wall_s: float = 0.0
    cpu_s: float = 0.0
    pss_anon_mb: float = 0.0
    pss_file_mb: float = 0.0
    fds: int = 0
    processes: int = 0
    rc: int = 0
    scale: float = 1.0  # real-data patches / patches this step handled
    note: str = ""


# ----------------------------------------------------------------------------------------------- watching
def _children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def _tree(pid: int) -> list[int]:
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo += _children(p)
    return seen


def _sample(pids: list[int]) -> tuple[float, float, int]:
    """(anonymous MB, file-backed MB, most descriptors held by one process) of `pids`.

    Proportional set sizes (/proc/PID/smaps_rollup): a page shared by N processes counts 1/N in each, so
    the sum over a forked tree is the memory it really takes (RSS would count the parent's pages, which
    forked workers share copy-on-write, once per worker)."""
    anon = file = 0.0
    fds = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith(("Pss_Anon:", "Pss_File:")):
                        mb = float(line.split()[1]) / 1024
                        anon, file = (anon + mb, file) if line.startswith("Pss_Anon") else (anon, file + mb)
            fds = max(fds, len(os.listdir(f"/proc/{p}/fd")))
        except OSError:
            continue
    return anon, file, fds


def _limit_open_files() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, LIMIT))


def watch(step: str, cmd: list[str], log: Path) -> Figures:
    """Run `cmd` under the open-files limit, output into `log`, sampling its process tree."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONUNBUFFERED": "1"}
    fig = Figures(step)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=_limit_open_files)
        while proc.poll() is None:
            pids = _tree(proc.pid)
            anon, file, fds = _sample(pids)
            fig.pss_anon_mb, fig.pss_file_mb = max(fig.pss_anon_mb, anon), max(fig.pss_file_mb, file)
            fig.fds, fig.processes = max(fig.fds, fds), max(fig.processes, len(pids))
            time.sleep(0.1)
    fig.wall_s = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    fig.cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    fig.rc = proc.returncode
    return fig


# ----------------------------------------------------------------------------------------------- inputs
def link_many(sources: list[Path], names: list[str], folder: Path) -> None:
    """Hard-link `sources` in turn under each of `names` in `folder` (emptied first)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for k, name in enumerate(names):
        os.link(sources[k % len(sources)], folder / name)


def sample_index(data: Path, split: str, per_zone: int, out: Path) -> int:
    """index_<split>.csv's first `per_zone` rows of every zone, written to `out`; returns the row count."""
    import pandas as pd

    index = pd.read_csv(data / f"index_{split}.csv", dtype=str, keep_default_na=False)
    sample = index.groupby("s2_data", sort=False).head(per_zone)
    sample.to_csv(out, index=False)
    return len(sample)


def oof_stores(work: Path, data: Path, probs: list[Path]) -> list[Path]:
    """Two runs whose fold<k>/oof stores cover every training patch (PROB hard links to `probs`), each
    fold with the tiny run's last.pt and the manifest src.ensembling.oof writes."""
    import pandas as pd

    from src.core.files import write_json
    from src.ensembling.oof import STORE_MANIFEST, store_name, weights_identity
    from src.prediction.stores import PROBS_FORMAT

    folds = pd.read_csv(data / "folds.csv", dtype={"id": str})
    runs = []
    for run in ("oof_a", "oof_b"):
        for k, ids in folds.groupby("fold")["id"]:
            fold = work / "runs" / run / f"fold{k}"
            store = fold / store_name()
            link_many(probs, [f"PROB_{i}.npz" for i in ids], store)
            (fold / "last.pt").unlink(missing_ok=True)
            os.link(work / "runs" / "scale" / "fold0" / "last.pt", fold / "last.pt")
            write_json(store / STORE_MANIFEST, {
                "format": PROBS_FORMAT, "run": run, "fold": str(k), "tta": "none", "checkpoint": "last",
                "weights": weights_identity(fold / "last.pt"), "weights_path": str(fold / "last.pt"),
                "data_dir": str(data), "ids": len(ids), "missing": [], "complete": True})
        runs.append(work / "runs" / run)
    return runs


def loader_epoch(data: str, per_zone: int, workers: int) -> None:
    """Internal step (--loader-run): one pass of the real loader over PER_ZONE rows of every training zone,
    demo-config inputs (S2 + metadata, light augmentation, full 512 px patches); prints samples/s."""
    import pandas as pd

    from src.core.config import load_settings
    from src.core.tables import train_index
    from src.data.dataset import FlairDataset
    from src.data.loader import build_loader

    index = train_index(data)
    rows = index.groupby("s2_data", sort=False).head(per_zone).reset_index(drop=True)
    cfg = load_settings(ROOT / "configs" / "demo.yaml", {"workers": workers, "batch_size": 16,
                                                          "crop_size": 512, "use_metadata": True})
    ds = FlairDataset(rows, cfg, train=True)
    loader = build_loader(ds, cfg, train=True, persistent=True)
    t0, seen = time.perf_counter(), 0
    for batch in loader:
        seen += len(batch["id"])
    rate = seen / (time.perf_counter() - t0)
    print(json.dumps({"rows": len(rows), "zones": int(pd.unique(rows["s2_data"]).size), "seen": seen,
                      "samples_s": rate}))


# ----------------------------------------------------------------------------------------------- steps
def commands(step: str, tree: Path, work: Path) -> tuple[list[str], float]:
    """The command of `step` and the factor from what it handles to the real data."""
    py, data = sys.executable, work / "data"
    if step == "index":
        return [py, "-m", "src.index", "--root", str(tree), "--out", str(data)], 1.0
    if step == "check":
        return [py, "-m", "src.index", "--root", str(tree), "--out", str(work / "data_check"), "--check"], 1.0
    if step == "folds":
        return [py, "-m", "src.folds", "--data", str(data), "--k", "5"], 1.0
    if step == "train":
        return [py, "-m", "src.train", *TINY, f"data_dir={data}", f"runs_dir={work / 'runs'}"], 1.0
    if step == "loader":
        n = sample_index(data, "train", PER_ZONE, work / "loader_rows.csv")  # the rows loader_epoch reads
        return [py, __file__, "--loader-run", str(data), "--workers", "4"], N_TRAIN / n
    if step == "predict":
        n = sample_index(data, "test", 1, work / "test_sample.csv")
        for d in ("pred_sample", "probs_sample"):
            shutil.rmtree(work / d, ignore_errors=True)
        return [py, "-m", "src.predict", "--runs", str(work / "runs" / "scale"), "--index",
                str(work / "test_sample.csv"), "--out", str(work / "pred_sample"), "--save-probs",
                str(work / "probs_sample"), "--tta", "none", f"data_dir={data}"], N_TEST / n
    return full_size_command(step, work)


def full_size_command(step: str, work: Path) -> tuple[list[str], float]:
    """submit, evaluate, pseudo, ensemble: on 16,050 (61,712) hard links to the sample's outputs."""
    import pandas as pd

    py, data = sys.executable, work / "data"
    test_ids = pd.read_csv(data / "index_test.csv", dtype={"id": str})["id"]
    if step in ("submit", "evaluate"):
        if not (work / "pred_full").is_dir():
            link_many(sorted((work / "pred_sample").glob("PRED_*.tif")), [f"PRED_{i}.tif" for i in test_ids],
                      work / "pred_full")
        if step == "submit":
            shutil.rmtree(work / "submissions", ignore_errors=True)
            return [py, "-m", "src.submit", "--pred", str(work / "pred_full"), "--index",
                    str(data / "index_test.csv"), "--name", "scale", "--out", str(work / "submissions")], 1.0
        return [py, "-m", "src.evaluate", "--pred", str(work / "pred_full"), "--index",
                str(data / "index_test.csv"), "--json", str(work / "scores.json")], 1.0
    probs = sorted((work / "probs_sample").glob("PROB_*.npz"))
    if step == "pseudo":
        link_many(probs, [f"PROB_{i}.npz" for i in test_ids], work / "probs_full")
        shutil.rmtree(work / "pseudo", ignore_errors=True)
        return [py, "-m", "src.pseudo", "--probs", str(work / "probs_full"), "--index",
                str(data / "index_test.csv"), "--out", str(work / "pseudo")], 1.0
    runs = oof_stores(work, data, probs)
    return [py, "-m", "src.blend", "--runs", *map(str, runs), "--data", str(data), "--out",
            str(work / "recipes" / "scale.json")], 1.0


def bound(fig: Figures) -> str:
    """What limits a step, from its CPU time over its wall time (2 cores here)."""
    busy = fig.cpu_s / max(fig.wall_s, 1e-9)
    return f"CPU ({busy:.1f} cores busy)" if busy >= 0.7 else f"waiting ({busy:.1f} cores busy)"


def row(fig: Figures) -> str:
    projected = fig.wall_s * fig.scale
    proj = f"{projected / 60:.1f} min" if projected >= 60 else f"{projected:.0f} s"
    return (f"| {fig.step} | {fig.wall_s:.1f} | {proj} | {fig.pss_anon_mb:.0f} | {fig.pss_file_mb:.0f} | "
            f"{fig.fds} | {fig.processes} | {bound(fig)} | {fig.note} |")


def run_step(step: str, tree: Path, work: Path) -> Figures:
    cmd, scale = commands(step, tree, work)
    fig = watch(step, cmd, work / f"{step}.log")
    fig.scale = scale
    tail = (work / f"{step}.log").read_text().strip().splitlines()[-1:] or [""]
    fig.note = tail[0][:120].replace("|", "/")
    if fig.rc != 0:
        fig.note = f"FAILED rc={fig.rc}: {fig.note}"
    return fig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tree", help="a full-size tree written by bench/scale_tree.py")
    p.add_argument("--work", default="/tmp/flair_scale_work", help="outputs (emptied first)")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, in order: {','.join(STEPS)}")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--loader-run", metavar="DATA", help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=4, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.loader_run:
        loader_epoch(a.loader_run, PER_ZONE, a.workers)
        return 0
    if not a.tree or not (Path(a.tree) / ".scale_tree.json").is_file():
        p.error("--tree: a folder written by bench/scale_tree.py (python bench/scale_tree.py --out DIR)")
    steps = [s for s in a.steps.split(",") if s]
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        p.error(f"unknown steps {unknown}; choose from {','.join(STEPS)}")
    work = Path(a.work)
    if steps and steps[0] == "index":
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    print(f"scale bench on {a.tree} (work {work}), open files limited to {LIMIT} per process\n")
    print("| step | wall s | projected, real data | peak PSS anon MB | peak PSS file MB | peak fds/process |"
          " processes | bound | last line |\n|---|---|---|---|---|---|---|---|---|")
    figures = []
    for step in steps:
        fig = run_step(step, Path(a.tree), work)
        figures.append(fig)
        print(row(fig), flush=True)
        if fig.rc != 0:
            print(f"{step} failed: see {work / (step + '.log')}")
            break
    if a.json:
        Path(a.json).write_text(json.dumps([asdict(f) for f in figures], indent=1))
    return 0 if all(f.rc == 0 for f in figures) else 1


if __name__ == "__main__":
    sys.exit(main())
