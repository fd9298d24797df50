"""What a DataLoader worker costs per sample, next to the read floor, and what N workers deliver.

1. Per-sample CPU time on ONE core (torch and OpenCV single-threaded, per-thread CPU time, files in the
   page cache) of what a worker does -- `FlairDataset.__getitems__` and its share of `collate` -- for
   augment none/light/heavy, without S2 and with S2 + metadata, on LZW tiles (the synthetic default) and
   on uncompressed copies (what the real FLAIR tiles are believed to be). Beside it, measured in the same
   run on the same files, the read floor: reading IMG + MSK (+ the S2 data and cloud-mask windows of every
   date), nothing else, each array freed at once (so the allocator hands the same warm memory back), and
   the same reads holding a batch's arrays until the batch is complete, as any loader must (fresh memory:
   page faults and cache misses). The ratio column is cost / floor; goals (issue 17): light + S2 +
   metadata within 2x the floor on uncompressed tiles, heavy + S2 within 4x. The device half (heavy's
   zoom/rotation warp, D4, photometric, normalisation) is not a worker's job: bench/gpu_check.py times it
   on a GPU, and 3. below on this CPU.
2. End-to-end DataLoader throughput (samples/s, wall time) through src.data.loader.build_loader (persistent
   workers, the kit's collate) for 1, 2, 4, ... workers up to the cores, uncompressed tiles.
3. The device half on this CPU (what training without a GPU pays in the main process): wall ms per batch
   of --batch-size for light and heavy (S2 + meta, as drawn), all cores, and heavy's warp alone.

    python bench/loader_bench.py [--root DATA_ROOT] [--n 48] [--batch-size 16] [--workers 1,2]
        [--json results.json]

Without --root a small synthetic tree (512x512 tiles, src.prep.synth_write.make_dataset) is written to a temp
dir. With --root, the uncompressed copies are written to a temp dir too (the originals are not touched).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import tifffile  # noqa: E402
import torch  # noqa: E402

from src.core.config import load_settings  # noqa: E402
from src.core.files import read_image, read_label, write_tif  # noqa: E402
from src.core.workers import cpu_count  # noqa: E402
from src.data.dataset import FlairDataset  # noqa: E402
from src.data.device_augment import device_batch, warp_batch  # noqa: E402
from src.data.loader import EpochSampler, build_loader, collate  # noqa: E402
from src.data.sentinel import window_in_bounds  # noqa: E402
from src.prep.index_scan import build_index  # noqa: E402
from src.prep.synth_write import SynthSpec, make_dataset  # noqa: E402

STAGES = ("read", "s2", "augment", "finalize")


def uncompressed_copy(df: pd.DataFrame, out: Path) -> pd.DataFrame:
    """The index with IMG/MSK paths pointing to uncompressed copies of the same tiles under `out`."""
    df = df.copy()
    out.mkdir(parents=True, exist_ok=True)
    for col, reader in (("img_path", read_image), ("msk_path", read_label)):
        paths = []
        for p in df[col]:
            dst = out / Path(p).name
            if not dst.exists():
                write_tif(dst, reader(p), compression=None)
            paths.append(str(dst))
        df[col] = paths
    return df


def warm(df: pd.DataFrame) -> None:
    """Read every file once so the page cache holds it: the benchmark measures CPU, not the disk."""
    for col in ("img_path", "msk_path", "s2_data", "s2_masks"):
        for p in pd.unique(df[col].astype(str)):
            if p and os.path.exists(p):
                Path(p).read_bytes()


def read_floor(df: pd.DataFrame, n: int, s2: bool, hold: int = 0, size: int = 40) -> float:
    """CPU ms per sample of reading IMG + MSK (+ both S2 windows of every date), nothing else; the arrays
    of `hold` samples are kept alive together (0: each is freed at once)."""
    zones, held = {}, []
    t0 = time.thread_time()
    for k in range(n):
        row = df.iloc[k % len(df)]
        arrays = [read_image(row["img_path"], bands=5), read_label(row["msk_path"])]
        if s2:
            key = row["s2_data"]
            if key not in zones:
                zones[key] = (np.load(row["s2_data"], mmap_mode="r"), np.load(row["s2_masks"], mmap_mode="r"))
            data, masks = zones[key]
            centre = (int(row["s2_row"]), int(row["s2_col"]))
            arrays += [np.array(window_in_bounds(data, centre, size)),
                       np.array(window_in_bounds(masks, centre, size))]
        held = held + [arrays] if len(held) + 1 < hold else []
    return 1000 * (time.thread_time() - t0) / n


def fetch(ds: FlairDataset, items: list) -> list:
    """What a DataLoader worker's fetcher hands to the collate_fn (torch.utils.data._utils.fetch): the
    dataset's __getitems__ when it has one, else [ds[item] for item in items]."""
    batched = getattr(ds, "__getitems__", None)
    return batched(items) if batched else [ds[item] for item in items]


def sample_cost(df: pd.DataFrame, preset: str, s2: bool, n: int, batch: int, first: int = 0) -> dict:
    """CPU ms per sample of a worker's job: fetching a batch (`fetch`) then collate, in batches of `batch`,
    from row `first` on (the warm-up reads rows 0..3)."""
    cfg = load_settings(None, {"augment": preset, "use_s2": s2, "use_metadata": s2, "crop_size": 512})
    ds = FlairDataset(df, cfg, train=True)
    collate([ds[(i % len(ds), 0)] for i in range(min(len(ds), 4))])  # warm-up: memmaps, caches
    ds.clock, ds.timings = time.thread_time, {}
    t_collate, t0 = 0.0, time.thread_time()
    for start in range(0, n, batch):
        samples = fetch(ds, [((first + k) % len(ds), 1) for k in range(start, min(start + batch, n))])
        t1 = time.thread_time()
        collate(samples)
        t_collate += time.thread_time() - t1
    total = time.thread_time() - t0
    row = {"preset": preset, "s2": s2, "ms": 1000 * total / n, "collate": 1000 * t_collate / n}
    row.update({s: 1000 * ds.timings.get(s, 0.0) / n for s in STAGES})
    return row


def throughput(df: pd.DataFrame, preset: str, workers: int, batch: int, batches: int) -> float:
    """Samples/s (wall) delivered by build_loader with `workers` persistent workers, after one warm batch
    per worker."""
    cfg = load_settings(None, {"augment": preset, "use_s2": True, "use_metadata": True, "crop_size": 512,
                             "workers": workers, "batch_size": batch})
    ds = FlairDataset(df, cfg, train=True)
    sampler = EpochSampler(torch.utils.data.DistributedSampler(ds, num_replicas=1, rank=0, seed=0))
    loader = build_loader(ds, cfg, train=True, sampler=sampler, persistent=True)
    per_epoch = len(loader)
    got, epoch, t0 = 0, 0, None
    while True:
        sampler.set_epoch(epoch)
        for k, b in enumerate(loader):
            if t0 is None and epoch * per_epoch + k + 1 >= workers:
                t0, got = time.perf_counter(), 0
                continue
            got += len(b["id"])
            if t0 is not None and got >= batches * batch:
                return got / (time.perf_counter() - t0)
        epoch += 1


def per_sample_table(trees: dict[str, pd.DataFrame], n: int, batch: int) -> list[dict]:
    rows = []
    print("| tiles | preset | S2 + meta | worker CPU ms/sample | read floor ms | ratio | floor, batch held "
          "| ratio | samples/s/core | read | S2 | augment | finalize | collate |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for tiles, df in trees.items():
        for s2 in (False, True):
            floor, held = read_floor(df, n, s2), read_floor(df, n, s2, hold=batch)
            for preset in ("none", "light", "heavy"):
                r = {"tiles": tiles, **sample_cost(df, preset, s2, n, batch)}
                r.update(floor=floor, floor_held=held)
                r["ratio"], r["ratio_held"] = r["ms"] / floor, r["ms"] / held
                rows.append(r)
                print(f"| {tiles} | {preset} | {'yes' if s2 else 'no'} | {r['ms']:.2f} | {floor:.2f} | "
                      f"{r['ratio']:.2f} | {held:.2f} | {r['ratio_held']:.2f} | {1000 / r['ms']:.0f} | "
                      f"{r['read']:.2f} | {r['s2']:.2f} | {r['augment']:.2f} | {r['finalize']:.2f} | "
                      f"{r['collate']:.2f} |")
    return rows


def zone_per_row(df: pd.DataFrame, copies: int, out: Path) -> pd.DataFrame:
    """`copies` times the rows, each row with its own S2 triple (hard links): every sample opens a zone."""
    rows = []
    for k in range(copies):
        for row in df.to_dict("records"):
            folder = out / f"{k}_{row['id']}"
            folder.mkdir(parents=True, exist_ok=True)
            for col in ("s2_data", "s2_masks", "s2_products"):
                link = folder / Path(row[col]).name
                if not link.exists():
                    os.link(row[col], link)
                row = {**row, col: str(link)}
            rows.append(row)
    return pd.DataFrame(rows)


def zones_table(df: pd.DataFrame, n: int, batch: int, tmp: Path) -> list[dict]:
    """Per-sample cost (light, S2 + meta) when the sample's zone is open (rows sharing few zones) and when
    every sample opens its own zone (a ZoneCache that never hits): shuffled training
    rows over the real 727 zones are mostly the second case."""
    reopen = zone_per_row(df, -(-(n + 4) // len(df)), tmp / "zone_links")
    print("\n| zones (light, S2 + meta, uncompressed) | worker CPU ms/sample | vs open |\n|---|---|---|")
    rows = []
    for name, tree in (("open", df), ("each sample opens its zone", reopen)):
        r = sample_cost(tree, "light", True, n, batch, first=4)
        rows.append({"zones": name, "ms": r["ms"], "s2": r["s2"]})
        print(f"| {name} | {r['ms']:.2f} | {r['ms'] / rows[0]['ms']:.3f} |")
    return rows


def median_ms(fn, *args, repeats: int = 5, **kw) -> float:
    """Median wall ms of fn(*args, **kw) over `repeats` calls, after one warm-up call."""
    fn(*args, **kw)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args, **kw)
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def device_table(df: pd.DataFrame, batch: int, cores: int) -> list[dict]:
    """Wall ms per batch of the device half on this CPU with `cores` threads: device_batch(augment=True)
    on a collated batch (S2 + meta, crop 512), and for heavy its warp (warp_batch) alone."""
    torch.set_num_threads(cores)
    print(f"\n| device half on this CPU ({cores} threads), batch {batch} | ms/batch | of which heavy's warp |"
          "\n|---|---|---|")
    rows, cpu = [], torch.device("cpu")
    for preset in ("light", "heavy"):
        cfg = load_settings(None, {"augment": preset, "use_s2": True, "use_metadata": True, "crop_size": 512})
        ds = FlairDataset(df, cfg, train=True)
        b = collate([ds[(i % len(ds), 1)] for i in range(batch)])
        ms = median_ms(device_batch, b, cfg, cpu, augment=True)
        warp = median_ms(warp_batch, b, b["aug"]) if preset == "heavy" else 0.0
        rows.append({"preset": preset, "batch": batch, "threads": cores, "ms": ms, "warp_ms": warp})
        print(f"| {preset} | {ms:.1f} | {warp:.1f} |")
    torch.set_num_threads(1)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", help="data root (official or synthetic layout); default: a temp synth tree")
    parser.add_argument("--n", type=int, default=48, help="samples timed per configuration")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", default="", help="comma-separated worker counts (default 1,2,4,..)")
    parser.add_argument("--batches", type=int, default=12, help="batches timed per throughput figure")
    parser.add_argument("--json", help="write every figure to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cv2.setNumThreads(1)  # what build_loader does before its workers fork
    cores = cpu_count()
    counts = [int(w) for w in args.workers.split(",") if w] or sorted(
        {w for w in (1, 2, 4, 8, 16, 32, 64) if w <= cores} | {cores})
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or make_dataset(Path(tmp) / "synth", SynthSpec(train_domains=2, test_domains=1,
                                                                        zones=2, patches=6, seed=0))
        df = build_index(root)["train"].reset_index(drop=True)
        with tifffile.TiffFile(df["img_path"].iloc[0]) as tif:
            compression = tif.pages[0].compression.name.lower()
        trees = {compression: df, "uncompressed": uncompressed_copy(df, Path(tmp) / "raw_tiles")}
        for tree in trees.values():
            warm(tree)
        print(f"{len(df)} train patches from {root}; n={args.n} per row; batch {args.batch_size}; 1 thread "
              f"(torch {torch.__version__}, OpenCV {cv2.__version__}); {cores} cores\n")
        rows = per_sample_table(trees, args.n, args.batch_size)
        zone_rows = zones_table(trees["uncompressed"], args.n, args.batch_size, Path(tmp))
        device_rows = device_table(trees["uncompressed"], args.batch_size, cores)
        print("\n| preset (S2 + meta, uncompressed) | workers | samples/s | per worker |\n|---|---|---|---|")
        loader_rows = []
        for preset in ("light", "heavy"):
            for w in counts:
                rate = throughput(trees["uncompressed"], preset, w, args.batch_size, args.batches)
                loader_rows.append({"preset": preset, "workers": w, "samples_s": rate})
                print(f"| {preset} | {w} | {rate:.0f} | {rate / w:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"per_sample": rows, "zones": zone_rows, "device": device_rows,
                                               "loader": loader_rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
