"""(Re)write out-of-fold probability stores from existing fold checkpoints, at any TTA level.

    python -m src.oof --runs runs/<name> [runs/<other> ...] --tta none|flip|d4 [--checkpoint last|best]
        [--device auto] [key=value ...]
    torchrun --nproc-per-node 8 -m src.oof --runs runs/<name> --tta d4     # each rank writes its own ids

Every `fold<k>` folder under a run (fold "all" has no held-out patches) gets the store
`store_name(tta, checkpoint)`: `oof` (none, last), `oof_flip`, `oof_d4`, and `_best` appended for best.pt
(src.ensembling.oof). Training writes `oof` itself; this job adds the other TTA levels, so that
`python -m src.blend` can choose the level among the stored ones, or completes a store after a crash
(valid files are kept). `key=value` overrides apply on top of each checkpoint's config (data_dir,
batch_size, workers, precision, skip_bad). Docs: docs/recipes.md, "Out-of-fold ensembling".
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from src.core.config import exit_on_config_error, parse_overrides, resolve, split_overrides
from src.core.errors import CheckpointError, ConfigError, DataError, PredictError, one_line
from src.core.runtime import cleanup, pick_device, setup_distributed
from src.core.tables import fold_rows
from src.ensembling.oof import CHECKPOINTS, TTA_LEVELS, fold_dirs, store_name, write_oof


def fold_checkpoints(runs: Sequence[str | Path], checkpoint: str) -> list[tuple[int, Path]]:
    """(fold, checkpoint file) of every fold<k> of every run; a run without folds or a fold without the
    checkpoint is an error naming the folder (before any model is loaded)."""
    out: list[tuple[int, Path]] = []
    for run in map(Path, runs):
        folds = fold_dirs(run)
        if not folds:
            raise PredictError(f"{run}: no fold<k> folders (a run folder of `make train FOLD=k` is expected)")
        for k, d in folds.items():
            ckpt = d / f"{checkpoint}.pt"
            if not ckpt.is_file():
                raise CheckpointError(f"{d}: no {checkpoint}.pt (train this fold first, or use "
                                      f"--checkpoint {'best' if checkpoint == 'last' else 'last'})")
            out.append((k, ckpt))
    return out


def write_stores(runs: Sequence[str | Path], tta: str = "none", checkpoint: str = "last",
                 overrides: dict[str, Any] | list[str] | None = None, device: str = "auto",
                 log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Write (or complete) the OOF store of every fold under `runs`; returns rank 0's manifests."""
    from src.models.flair_model import load_for_inference

    if tta not in TTA_LEVELS:
        raise ConfigError(f"--tta: expected one of {', '.join(TTA_LEVELS)}, got {tta!r}")
    if checkpoint not in CHECKPOINTS:
        raise ConfigError(f"--checkpoint: expected last or best, got {checkpoint!r}")
    ov = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    todo = fold_checkpoints(runs, checkpoint)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        rank, world, dev = setup_distributed()
    else:
        rank, world, dev = 0, 1, pick_device(device)
    quiet: Callable[[str], None] = lambda *a, **k: None  # noqa: E731
    manifests = []
    for k, ckpt in todo:
        model, mcfg = load_for_inference(ckpt, dev)
        cfg = resolve(ov, mcfg, "command line")
        _, val_df = fold_rows(cfg["data_dir"], str(k))
        cfg["name"], cfg["runs_dir"] = ckpt.parent.parent.name, str(ckpt.parent.parent.parent)
        manifests.append(write_oof(model, cfg, val_df, ckpt.parent / store_name(tta, checkpoint), fold=k,
                                   tta=tta, checkpoint=checkpoint, weights_file=ckpt, rank=rank, world=world,
                                   device=dev, log=log if rank == 0 else quiet))
    return manifests


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m src.oof", description=__doc__.split("\n")[0])
    ap.add_argument("--runs", nargs="+", required=True, help="run folders holding fold<k>/ subfolders")
    ap.add_argument("--tta", default="none", choices=TTA_LEVELS, help="TTA level of the store")
    ap.add_argument("--checkpoint", default="last", choices=CHECKPOINTS,
                    help="last.pt (the final weights, as training writes) or best.pt")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1")
    ap.add_argument("overrides", nargs="*", help="key=value overrides (data_dir=..., batch_size=...)")
    args = ap.parse_args(argv)
    runs, overrides = split_overrides(args.runs, args.overrides)
    try:
        write_stores(runs, args.tta, args.checkpoint, overrides, args.device)
    except ConfigError as err:
        exit_on_config_error(err)
    except (PredictError, DataError) as err:
        print(f"oof: error: {one_line(err)}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        cleanup()


if __name__ == "__main__":
    main()
