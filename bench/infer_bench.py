"""The CPU inference engines side by side: `make infer` on a synthetic orthophoto and `make predict` on
synthetic FLAIR #2 test patches, each with engine=torch and engine=onnx in the same run, plus the raster's
memory.

Why: the default engine on a CPU (engine=auto -> onnxruntime, src.prediction.onnx_engine) must earn its place
with figures from one run on one machine (these machines are shared and noisy: compare ratios), and `make
infer` must keep memory flat on rasters of tens of thousands of pixels.

  python bench/infer_bench.py                          # 3000 x 3000 raster, 24 test patches, both engines
  python bench/infer_bench.py --rounds 3               # each engine 3 times, alternated (shared machines)
  python bench/infer_bench.py --size 10000 --patches 0 # the memory figure on a big raster, no predict part
  python bench/infer_bench.py --engines torch --device cuda --tta d4

Models: the demo's U-Net R18 with random weights (aerial only: what infer takes) for the raster, and for the
patches also the demo's U-T&T fusion model (aerial + Sentinel-2); timing does not depend on the weights. Each
checkpoint is exported once first (`make export`: slim + checked ONNX, its time reported), so the engine
figures are prediction only. Every job runs in a child process (`python -m src.infer` / `src.predict`) that
reports its own peak resident memory; the time is the job's own measure (the raster's seconds in the infer
log, the PRED folder's measured inference time), with the child's wall time beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from src.core.checkpoint import save_checkpoint  # noqa: E402
from src.core.config import load_settings  # noqa: E402
from src.deploy.export import export_checkpoint  # noqa: E402
from src.deploy.orthophoto import grid  # noqa: E402
from src.models.flair_model import build_model  # noqa: E402

ENV = {**os.environ, "FLAIR_PROGRESS": "lines", "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
AERIAL = {"use_s2": False, "fusion": "none"}


def row(*cells: str) -> str:
    return "| " + " | ".join(cells) + " |"


def job_options(args: argparse.Namespace, engine: str) -> list[str]:
    return ["--tta", args.tta, "--device", args.device, "--overwrite", f"batch_size={args.batch_size}",
            f"engine={engine}"]


def demo_checkpoint(path: Path, **over) -> Path:
    """The demo config's model (random weights) saved as a run's best.pt."""
    cfg = load_settings(ROOT / "configs/demo.yaml", over)
    torch.manual_seed(0)
    return save_checkpoint(path, {"model": build_model(cfg).state_dict(), "config": cfg.to_dict()})


def synthetic_raster(path: Path, size: int, strip: int = 512) -> Path:
    """A size x size 5-band uint8 GeoTIFF written strip by strip (the bench's own memory stays small)."""
    import rasterio
    from rasterio.crs import CRS
    from rasterio.windows import Window

    profile = {"driver": "GTiff", "width": size, "height": size, "count": 5, "dtype": "uint8", "tiled": True,
               "blockxsize": 256, "blockysize": 256, "compress": "deflate", "zlevel": 1,
               "crs": CRS.from_epsg(2154), "transform": rasterio.Affine(0.2, 0, 651000.0, 0, -0.2, 6862000.0)}
    x = np.arange(size, dtype=np.float32)
    rng = np.random.default_rng(0)
    with rasterio.open(path, "w", **profile) as ds:
        for y0 in range(0, size, strip):
            y = np.arange(y0, min(size, y0 + strip), dtype=np.float32)[:, None]
            bands = [128 + 80 * np.sin(x / (40 + 9 * b)) * np.cos(y / (55 - 5 * b))
                     + rng.integers(-10, 10, (len(y), size)) for b in range(5)]
            ds.write(np.clip(bands, 0, 255).astype(np.uint8), window=Window(0, y0, size, len(y)))
    return path


# Runs a job module and reports its own peak RSS (getrusage of the children would give the largest so far).
RUN_AND_MEASURE = ("import resource, runpy, sys\nsys.argv = sys.argv[1:]\ntry:\n"
                   "    runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\nfinally:\n"
                   "    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
                   "    print(f'PEAK_RSS_KB={kb}', file=sys.stderr)")


def child(cmd: list[str]) -> tuple[float, float, str]:
    """(wall seconds, the job's own peak RSS GB, stdout) of `python -m <cmd>` in a child process."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", RUN_AND_MEASURE, *cmd], cwd=ROOT, env=ENV, check=True,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    return seconds, int(re.search(r"PEAK_RSS_KB=(\d+)", done.stderr).group(1)) / 1e6, done.stdout


def exported(ckpt: Path, size: int) -> float:
    """Seconds of `make export` (slim + ONNX, both checked) for windows of `size`."""
    t0 = time.perf_counter()
    export_checkpoint(ckpt, onnx=True, size=size, log=lambda _: None)
    return time.perf_counter() - t0


def raster_rows(tmp: Path, args: argparse.Namespace) -> list[str]:
    """Markdown rows: `make infer` over one synthetic raster with each engine."""
    ckpt = demo_checkpoint(tmp / "aerial" / "best.pt", **AERIAL)
    export_s = exported(ckpt, args.window)
    raster = synthetic_raster(tmp / "ortho.tif", args.size)
    n = len(grid(args.size, args.window, args.overlap)[0]) ** 2
    rows = []
    for engine in args.engines * args.rounds:  # alternated: a neighbour's load hits both engines
        out_tif = str(tmp / f"landcover_{engine}.tif")
        wall, rss, out = child(["src.infer", "--runs", str(ckpt), "--src", str(raster), "--out", out_tif,
                                "--window", str(args.window), "--overlap", str(args.overlap),
                                *job_options(args, engine)])
        seconds = float(re.search(r"windows, ([0-9.]+) s,", out).group(1))  # the raster's own time
        rows.append(row(f"infer {args.size}x{args.size} px, U-Net R18", engine, f"{n} windows",
                        f"{seconds:.1f} s ({wall:.0f} s wall)", f"**{n / seconds:.2f} windows/s**",
                        f"{args.size ** 2 / seconds / 1e6:.3f} Mpx/s", f"{rss:.2f} GB"))
    return [*rows, row("(export of that model: slim + ONNX, both checked)", "", "", f"{export_s:.0f} s",
                       "", "", "")]


def patch_rows(tmp: Path, args: argparse.Namespace) -> list[str]:
    """Markdown rows: `make predict` over synthetic test patches, aerial and fusion models, each engine."""
    from src.prep.synth_write import SynthSpec, make_dataset

    zones = max(1, args.patches // 8)
    root = make_dataset(tmp / "synth", SynthSpec(1, 1, zones, 8, seed=0))
    subprocess.run([sys.executable, "-m", "src.index", "--root", str(root), "--out", str(tmp / "data")],
                   cwd=ROOT, env=ENV, check=True, stdout=subprocess.DEVNULL)
    rows = []
    for name, over in (("U-Net R18", AERIAL), ("U-T&T (demo fusion)", {})):
        ckpt = demo_checkpoint(tmp / name.split()[0] / "best.pt", data_dir=str(tmp / "data"), **over)
        export_s = exported(ckpt, 512)
        for engine in args.engines * args.rounds:
            out = tmp / f"pred_{engine}"
            wall, rss, _ = child(["src.predict", "--runs", str(ckpt), "--split", "test", "--out", str(out),
                                  *job_options(args, engine), f"data_dir={tmp / 'data'}"])
            seconds = json.loads((out / "predict.json").read_text())["infer_s"]  # loading, networks, writing
            n = zones * 8
            rows.append(row(f"predict, {name}", engine, f"{n} patches",
                            f"{seconds:.1f} s ({wall:.0f} s wall)", f"**{n / seconds:.2f} patches/s**",
                            f"export {export_s:.0f} s", f"{rss:.2f} GB"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=3000, help="raster side in pixels (default 3000; 0: none)")
    ap.add_argument("--patches", type=int, default=24, help="synthetic test patches to predict (0: none)")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--overlap", type=int, default=128)
    ap.add_argument("--tta", default="none", choices=["none", "flip", "d4"])
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--engines", default="torch,onnx", help="comma list of engines to time (torch, onnx)")
    ap.add_argument("--rounds", type=int, default=1, help="times each engine runs, alternated (default 1)")
    ap.add_argument("--dir", help="working folder (default: a temporary one, deleted)")
    args = ap.parse_args()
    args.engines = args.engines.split(",")
    print(f"{torch.get_num_threads()} threads, tta {args.tta}, batch {args.batch_size}, device "
          f"{args.device}; time = the job's own measure (model loading excluded)", flush=True)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        rows = raster_rows(Path(tmp), args) if args.size else []
        rows += patch_rows(Path(tmp), args) if args.patches else []
    header = row("job", "engine", "work", "time", "speed", "", "peak RSS")
    print("\n".join([header, "|---" * 7 + "|", *rows]))


if __name__ == "__main__":
    main()
