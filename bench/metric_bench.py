"""Evaluation and submission throughput on synthetic 512x512 label/prediction files.

Compares `src.scoring.score.evaluate` (threads, tifffile, one bincount per patch) with the straightforward
scorer (PIL read + sklearn confusion_matrix per patch, one thread), and `src.scoring.submission.write_pred` /
`make_zip` (validated) with PIL's LZW writer. Both scorers must produce the same matrix.

    .venv/bin/python bench/metric_bench.py --n 2000 [--workers 8] [--baseline-n 2000] [--keep DIR]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.core.files import write_tif  # noqa: E402
from src.core.flair import N_TEST_PATCHES  # noqa: E402
from src.core.workers import default_workers  # noqa: E402
from src.scoring.score import evaluate  # noqa: E402
from src.scoring.submission import make_zip, write_pred  # noqa: E402


def fake_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(raw label 1..19, prediction 0..12): blocky regions with ragged edges, like real maps."""
    blocks = rng.integers(1, 20, (32, 32), dtype=np.uint8)
    raw = np.kron(blocks, np.ones((16, 16), dtype=np.uint8))
    edge = rng.random(raw.shape) < 0.03
    raw[edge] = rng.integers(1, 20, int(edge.sum()), dtype=np.uint8)
    pred = np.minimum(raw, 13) - 1
    wrong = np.kron(rng.random((64, 64)) < 0.25, np.ones((8, 8), dtype=bool))
    pred[wrong] = rng.integers(0, 13, int(wrong.sum()), dtype=np.uint8)
    return raw, pred


def straightforward_score(pairs: list[tuple[Path, Path]]) -> np.ndarray:
    """The obvious implementation of the rule in docs/data-format.md, "Metric": PIL + sklearn, per patch."""
    from PIL import Image
    from sklearn.metrics import confusion_matrix

    total = np.zeros((13, 13), dtype=np.int64)
    for pred_path, msk_path in pairs:
        pred = np.array(Image.open(pred_path))
        target = np.array(Image.open(msk_path)) - 1
        target[target > 12] = 12
        total += confusion_matrix(target.ravel(), pred.ravel(), labels=list(range(13)))
    return total


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="number of 512x512 patches")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="threads for evaluate/validate")
    parser.add_argument("--baseline-n", type=int, default=None,
                        help="patches scored by the slow baseline (default: all; fewer = per-patch rate)")
    parser.add_argument("--keep", help="write the files here and keep them (default: a temp folder)")
    args = parser.parse_args(argv)
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="metric_bench_"))
    labels, preds, pil_preds = root / "labels" / "D000_2021" / "Z1_UA" / "msk", root / "pred", root / "pil"
    for d in (labels, preds, pil_preds):
        d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    n = args.n
    ids = [f"{i:06d}" for i in range(n)]
    print(f"N={n} patches, {args.workers} workers, {os.cpu_count()} CPUs, files in {root}")

    from PIL import Image

    t_write = t_pil = 0.0
    for pid in ids:
        raw, pred = fake_pair(rng)
        write_tif(labels / f"MSK_{pid}.tif", raw)
        _, dt = timed(write_pred, preds, pid, pred)
        t_write += dt
        start = time.perf_counter()
        Image.fromarray(pred).save(pil_preds / f"PRED_{pid}.tif", compression="tiff_lzw")
        t_pil += time.perf_counter() - start
    size = sum(p.stat().st_size for p in preds.iterdir())
    print(f"write_pred (LZW, atomic, checked): {n / t_write:8.0f} files/s  "
          f"(PIL LZW save: {n / t_pil:.0f} files/s); {size / n / 1e3:.1f} kB per file")

    out = root / "subs"
    shutil.rmtree(out, ignore_errors=True)
    z, t_zip = timed(make_zip, preds, "bench", out, ids=ids, workers=args.workers)
    zd, t_zipd = timed(make_zip, preds, "bench_deflate", out, ids=ids, workers=args.workers,
                       compression=zipfile.ZIP_DEFLATED)
    print(f"make_zip (validate folder, zip, validate zip): {n / t_zip:8.0f} files/s, {t_zip:.1f} s, "
          f"{z.stat().st_size / 1e6:.1f} MB stored; "
          f"deflated {zd.stat().st_size / 1e6:.1f} MB in {t_zipd:.1f} s")

    ours, t_ours = timed(evaluate, preds, labels.parents[2], workers=args.workers)
    ours_zip, t_ours_zip = timed(evaluate, z, labels.parents[2], workers=args.workers)
    one, t_one = timed(evaluate, preds, labels.parents[2], workers=1)
    procs, t_procs = timed(evaluate, preds, labels.parents[2], workers=args.workers, backend="process")
    assert procs["confusion"] == ours["confusion"] == one["confusion"]
    base_n = min(n, args.baseline_n or n)
    pairs = [(preds / f"PRED_{i}.tif", labels / f"MSK_{i}.tif") for i in ids[:base_n]]
    base, t_base = timed(straightforward_score, pairs)
    if base_n == n:
        assert np.array_equal(base, np.array(ours["confusion"])), "scorers disagree"
        assert np.array_equal(base, np.array(ours_zip["confusion"])), "zip scorer disagrees"
    rate_base = base_n / t_base
    print(f"evaluate folder, {args.workers} threads: {n / t_ours:8.0f} patches/s ({t_ours:.1f} s)")
    print(f"evaluate zip,    {args.workers} threads: {n / t_ours_zip:8.0f} patches/s ({t_ours_zip:.1f} s)")
    print(f"evaluate folder, {args.workers} procs:   {n / t_procs:8.0f} patches/s ({t_procs:.1f} s)")
    print(f"evaluate folder, 1 thread:  {n / t_one:8.0f} patches/s ({t_one:.1f} s)")
    print(f"PIL + sklearn per patch:    {rate_base:8.0f} patches/s ({t_base:.1f} s for {base_n})")
    print(f"speed-up: {n / t_ours / rate_base:.1f}x ({args.workers} threads), {n / t_one / rate_base:.1f}x "
          f"(1 thread); projected {N_TEST_PATCHES:,} test patches: {N_TEST_PATCHES / (n / t_ours):.0f} s "
          f"vs {N_TEST_PATCHES / rate_base:.0f} s")
    print(f"mIoU {ours['miou']:.4f} (identical matrices: {base_n == n})")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
