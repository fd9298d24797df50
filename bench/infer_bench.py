"""Whole-orthophoto inference speed and memory (src.infer) on a synthetic raster, and ONNX vs PyTorch.

Why: `make infer` must keep memory flat on rasters of tens of thousands of pixels, and a deployment choice
between the ONNX file and PyTorch needs real figures per machine.

  python bench/infer_bench.py                    # 10,000 x 10,000 px, window 512 / overlap 128, CPU
  python bench/infer_bench.py --size 3000        # quick run python bench/infer_bench.py --size 3000 --onnx
  --device cuda --tta d4

The model is the demo's U-Net ResNet18 with random weights (aerial only; timing does not depend on the
weights). The raster (5 bands, uint8, deflate, Lambert-93 at 0.2 m) is written strip by strip and the
inference runs in a child process (`python -m src.infer`), so the peak resident memory reported (the
child's getrusage maxrss) is the inference's own. `--onnx` also times the exported ONNX model
(onnxruntime, CPU) against PyTorch on the same 512 x 512 windows.
"""
from __future__ import annotations

import argparse
import os
import resource
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
from src.models.flair_model import build_model  # noqa: E402


def tiny_checkpoint(path: Path, **over) -> Path:
    cfg = load_settings(ROOT / "configs/demo.yaml", {"use_s2": False, "fusion": "none", **over})
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


def run_infer(ckpt: Path, raster: Path, out: Path, args: argparse.Namespace) -> tuple[float, float]:
    """(seconds, peak RSS GB) of `python -m src.infer` in a child process."""
    cmd = [sys.executable, "-m", "src.infer", "--runs", str(ckpt), "--src", str(raster), "--out", str(out),
           "--window", str(args.window), "--overlap", str(args.overlap), "--tta", args.tta,
           "--device", args.device, "--overwrite", f"batch_size={args.batch_size}"] + (
        ["--probs"] if args.probs else [])
    env = {**os.environ, "FLAIR_PROGRESS": "lines", "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    seconds = time.perf_counter() - t0
    return seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6  # KB -> GB


def onnx_vs_torch(ckpt: Path, window: int, batch: int, reps: int = 3) -> list[tuple[str, float]]:
    """Windows/s of the exported ONNX model (onnxruntime CPU) and of PyTorch fp32 CPU on raw windows."""
    import onnxruntime as ort

    from src.export import OnnxModel, export_checkpoint
    from src.models.flair_model import load_for_inference

    report = export_checkpoint(ckpt, onnx=True, size=window, log=lambda _: None)
    model, cfg = load_for_inference(ckpt)
    wrapper = OnnxModel(model, cfg).eval()
    session = ort.InferenceSession(report["onnx"], providers=["CPUExecutionProvider"])
    image = torch.randint(0, 256, (batch, len(cfg.bands), window, window)).float()
    rows = []
    feed = {"image": image.numpy()}
    runners = {"pytorch": lambda: wrapper(image), "onnxruntime": lambda: session.run(None, feed)}
    for name, fn in runners.items():
        with torch.inference_mode():
            fn()  # warm-up
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
        rows.append((name, batch * reps / (time.perf_counter() - t0)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=10_000, help="raster side in pixels (default 10000)")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--overlap", type=int, default=128)
    ap.add_argument("--tta", default="none", choices=["none", "flip", "d4"])
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--probs", action="store_true", help="also write the 13-band probabilities")
    ap.add_argument("--onnx", action="store_true", help="also time ONNX (onnxruntime) vs PyTorch on CPU")
    ap.add_argument("--dir", help="working folder (default: a temporary one, deleted)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        ckpt = tiny_checkpoint(tmp / "best.pt")
        t0 = time.perf_counter()
        raster = synthetic_raster(tmp / "ortho.tif", args.size)
        print(f"raster {args.size}x{args.size} x5 written in {time.perf_counter() - t0:.0f} s "
              f"({raster.stat().st_size / 1e6:.0f} MB)", flush=True)
        seconds, rss = run_infer(ckpt, raster, tmp / "landcover.tif", args)
        out_mb = (tmp / "landcover.tif").stat().st_size / 1e6
        pixels = args.size ** 2
        print("\n| raster | window/overlap | tta | device | threads | time | pixels/s | peak RSS | output |\n"
              "|---|---|---|---|---|---|---|---|---|")
        print(f"| {args.size}x{args.size} | {args.window}/{args.overlap} | {args.tta} | {args.device} | "
              f"{torch.get_num_threads()} | {seconds:.0f} s | {pixels / seconds / 1e6:.3f} M | "
              f"{rss:.2f} GB | {out_mb:.1f} MB |")
        if args.onnx:
            rows = onnx_vs_torch(ckpt, args.window, args.batch_size)
            print("\n| runtime (CPU fp32) | windows/s |\n|---|---|")
            for name, rate in rows:
                print(f"| {name} | {rate:.2f} |")


if __name__ == "__main__":
    main()
