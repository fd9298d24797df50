"""Whole-orthophoto inference: one georeferenced land-cover GeoTIFF per input raster, of any size.

    python -m src.infer --runs RUNS... --src ortho.tif --out landcover.tif [--tta none|flip|d4]
        [--weights w1,w2,...] [--bands R,G,B,NIR,E] [--window 512] [--overlap 128] [--probs]
        [--overwrite] [--device auto] [key=value ...]
    --src may be a folder of rasters or a text file listing them (one path a line, relative to the
    file's folder); --out is then a folder receiving <input stem>.tif per input.
    torchrun --nproc-per-node N -m src.infer ...   shares the rasters over N processes (one device each)

How it works (windows, blending, resuming, which models): src.deploy.infer.
"""
from __future__ import annotations

import argparse
import sys

from src.core.config import exit_on_config_error, parse_overrides, split_overrides
from src.core.errors import (
    ConfigError,
    MachineLimitError,
    PredictError,
    exit_interrupted,
    exit_on_machine_limit,
    one_line,
)
from src.core.settings import TTA_CHOICES


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m src.infer", description=__doc__.split("\n")[0])
    ap.add_argument("--runs", nargs="+", required=True, help="run folders (best.pt under them), checkpoints")
    ap.add_argument("--src", required=True, help="a raster, a folder of rasters, or a text file of rasters")
    ap.add_argument("--out", required=True, help="output .tif for one raster, else a folder")
    ap.add_argument("--weights", help="comma-separated: one per --runs item or per checkpoint")
    ap.add_argument("--tta", choices=TTA_CHOICES,
                    help="auto (d4 on a GPU, none on a CPU) | none | flip | d4 (default: the checkpoint's)")
    ap.add_argument("--bands", help="names of input bands 1, 2, ... e.g. R,G,B,NIR,E (- skips a band); "
                    "default: R,G,B,NIR,E up to the raster's band count")
    ap.add_argument("--window", type=int, help="window side (px, multiple of 32; setting infer_window)")
    ap.add_argument("--overlap", type=int,
                    help="overlap of windows (px, multiple of 32; setting infer_overlap)")
    ap.add_argument("--probs", action="store_true", help="also write <out>_probs.tif: 13 bands, round(p*255)")
    ap.add_argument("--overwrite", action="store_true", help="redo rasters whose output exists")
    ap.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK under torchrun) | cpu | cuda:1")
    ap.add_argument("overrides", nargs="*", help="key=value settings (batch_size, precision, ensemble, ...)")
    args = ap.parse_args(argv)
    runs, overrides = split_overrides(args.runs, args.overrides)  # nargs="+" swallows key=value
    try:
        weights = [float(x) for x in args.weights.split(",")] if args.weights else None
        ov = parse_overrides(overrides)  # checked before torch loads
        flags = {"tta": args.tta, "infer_window": args.window, "infer_overlap": args.overlap}
        ov.update({k: v for k, v in flags.items() if v is not None})
        run(args, runs, weights, ov)
    except KeyboardInterrupt:
        exit_interrupted("infer", "finished rasters are kept (the one in progress is not written)",
                         "re-run the same command to do the others")
    except ConfigError as err:
        exit_on_config_error(err)
    except ValueError as err:  # PredictError, DataError (CheckpointError), bad --weights
        print(f"infer: error: {one_line(err)}", file=sys.stderr)
        raise SystemExit(1) from None
    except (MachineLimitError, OSError, MemoryError) as err:
        exit_on_machine_limit("infer", err)


def run(args: argparse.Namespace, runs: list[str], weights: list[float] | None, overrides: dict) -> None:
    from src.deploy.infer import RasterOptions, infer
    from src.deploy.orthophoto import parse_bands

    options = RasterOptions(parse_bands(args.bands) if args.bands else None, args.probs, args.overwrite)
    reports = infer(runs, args.src, args.out, weights=weights, overrides=overrides, options=options,
                    device=args.device)
    failed = [r for r in reports if "error" in r]
    if failed:  # each error was said once, as it happened
        raise PredictError(f"{len(failed)} of {len(reports)} rasters failed (said above)")


if __name__ == "__main__":
    main()
