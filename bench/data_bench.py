"""Data pipeline throughput of ONE worker: samples/s per augmentation preset, with and without S2.

Single process, no DataLoader, one thread for torch and OpenCV, so the figure is what one DataLoader
worker delivers (N workers deliver about N times as much until the disk or the GPU is the limit).
CPU time of the thread is the headline (robust on a shared machine); wall time is printed beside it.
Files are read once before timing, so the page cache holds them: this measures decoding and compute,
not the disk. The time split is read (image + label TIFFs, label check), s2 (window, cloud filter,
composites), augment (joint geometric + photometric), finalize (normalisation, tensors, metadata).

    python bench/data_bench.py [--root DATA_ROOT] [--n 60] [--crop-size 512] [--split train] [--uncompressed]

Without --root a small synthetic tree (512x512 files, src.synth_write.make_dataset) is written to a temp
dir.
Target (issue 6): a heavy-augmented sample in under 40 ms on one core.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import tifffile  # noqa: E402
import torch  # noqa: E402

from src.config import load_config  # noqa: E402
from src.dataset import FlairDataset  # noqa: E402
from src.index_scan import build_index  # noqa: E402
from src.rasters import read_image, write_tif  # noqa: E402
from src.synth_write import make_dataset  # noqa: E402
from src.workers import single_thread_opencv  # noqa: E402

STAGES = ("read", "s2", "augment", "finalize")


def bench(df, preset: str, use_s2: bool, n: int, crop_size: int) -> dict:
    """Per-sample CPU time of this thread (what one dedicated core spends) and wall time, by stage."""
    cfg = load_config(None, {"augment": preset, "use_s2": use_s2, "use_metadata": True,
                             "crop_size": crop_size, "seed": 0})
    ds = FlairDataset(df, cfg, train=True)
    for i in range(min(len(ds), 4)):  # warm-up: imports, memmaps, first-call caches
        ds[i]
    ds.clock, ds.timings = time.thread_time, {}
    wall, cpu = time.perf_counter(), time.thread_time()
    for k in range(n):
        ds[k % len(ds)]
    cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
    row = {"preset": preset, "use_s2": use_s2, "cpu_ms": 1000 * cpu / n, "wall_ms": 1000 * wall / n}
    row.update({s: 1000 * ds.timings.get(s, 0.0) / n for s in STAGES})
    return row


def rewrite_uncompressed(df) -> None:
    """Rewrite the (temporary) aerial TIFFs without compression, to time decoding-free reads."""
    for path in df["img_path"]:
        write_tif(path, read_image(path), compression=None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", help="data root (official or synthetic layout); default: a temp synth tree")
    parser.add_argument("--split", default="train", choices=["train", "test"])
    parser.add_argument("--n", type=int, default=60, help="samples timed per configuration")
    parser.add_argument("--crop-size", type=int, default=512)
    parser.add_argument("--uncompressed", action="store_true",
                        help="rewrite the temp synthetic aerial TIFFs uncompressed first (not with --root)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    single_thread_opencv()  # what build_loader does for its workers
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or make_dataset(Path(tmp) / "synth", train_domains=2, test_domains=1, zones=2,
                                         patches=4, seed=0)
        df = build_index(root)[args.split]
        if df.empty:
            print(f"no {args.split} rows under {root}", file=sys.stderr)
            return 1
        if args.uncompressed and not args.root:
            rewrite_uncompressed(df)
        for i in range(len(df)):  # page cache
            for col in ("img_path", "msk_path", "s2_data", "s2_masks"):
                if df[col].iloc[i]:
                    Path(df[col].iloc[i]).read_bytes()
        with tifffile.TiffFile(df["img_path"].iloc[0]) as tif:
            compression = tif.pages[0].compression.name
        print(f"{len(df)} {args.split} patches from {root} (aerial TIFF compression {compression}); "
              f"crop_size={args.crop_size}; n={args.n}; 1 thread (torch {torch.__version__}, "
              f"OpenCV {cv2.__version__}, albumentations {A.__version__})\n")
        print("| preset | S2 | CPU ms/sample | samples/s/core | wall ms/sample | read | S2 | augment "
              "| finalize |")
        print("|---|---|---|---|---|---|---|---|---|")
        for use_s2 in (False, True):
            for preset in ("none", "light", "heavy"):
                r = bench(df, preset, use_s2, args.n, args.crop_size)
                print(f"| {r['preset']} | {'yes' if r['use_s2'] else 'no'} | {r['cpu_ms']:.1f} | "
                      f"{1000 / r['cpu_ms']:.0f} | {r['wall_ms']:.1f} | {r['read']:.1f} | {r['s2']:.1f} | "
                      f"{r['augment']:.1f} | {r['finalize']:.1f} |")
        print("\n(stage columns: CPU ms per sample)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
