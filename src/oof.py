"""(Re)write out-of-fold probability stores from existing fold checkpoints, at any TTA level.

    python -m src.oof --runs runs/<name> [runs/<other> ...] --tta none|flip|d4 [--checkpoint last|best]
    [--device auto] [key=value ...] torchrun --nproc-per-node 8 -m src.oof --runs runs/<name> --tta d4     #
    each rank writes its own ids

Every `fold<k>` folder under a run (fold "all" has no held-out patches) gets the store
`store_name(tta, checkpoint)`: `oof` (none, last), `oof_flip`, `oof_d4`, and `_best` appended for best.pt
(src.ensembling.oof). Training writes `oof` itself; this job adds the other TTA levels, so that
`python -m src.blend` can choose the level among the stored ones, or completes a store after a crash
(valid files are kept). `key=value` overrides apply on top of each checkpoint's config (data_dir,
batch_size, workers, precision, skip_bad). Docs: docs/recipes.md, "Out-of-fold ensembling".
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from src.core.config import exit_on_config_error, parse_overrides, split_overrides
from src.core.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    MachineLimitError,
    PredictError,
    exit_interrupted,
    exit_on_machine_limit,
    one_line,
)
from src.core.settings import OOF_CHECKPOINTS, TTA_LEVELS


def fold_checkpoints(runs: Sequence[str | Path], checkpoint: str) -> list[tuple[int, Path]]:
    """(fold, checkpoint file) of every fold<k> of every run; a run without folds or a fold without the
    checkpoint is an error naming the folder (before any model is loaded)."""
    from src.ensembling.oof import fold_dirs

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
                 overrides: dict[str, Any] | None = None, device: str = "auto",
                 log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Write (or complete) the OOF store of every fold under `runs`; returns rank 0's manifests."""
    from src.core.tables import fold_rows
    from src.ensembling.oof import Store, store_name, write_oof
    from src.prediction.ensemble import load_ensemble, place_prediction

    todo = fold_checkpoints(runs, checkpoint)
    place = place_prediction(device)
    quiet: Callable[[str], None] = lambda *a, **k: None  # noqa: E731
    manifests = []
    for k, ckpt in todo:
        run_dir = ckpt.parent.parent
        where = {"name": run_dir.name, "runs_dir": str(run_dir.parent)}  # the run the store belongs to
        ens = load_ensemble([ckpt], place.device, job="oof", overrides={**(overrides or {}), **where},
                            log=quiet)
        _, val_df = fold_rows(ens.cfg.data_dir, str(k))
        store = Store(ckpt.parent / store_name(tta, checkpoint), str(k), tta, checkpoint, ckpt)
        manifests.append(write_oof(ens, val_df, store, place, log if place.main else quiet))
    return manifests


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m src.oof", description=__doc__.split("\n")[0])
    ap.add_argument("--runs", nargs="+", required=True, help="run folders holding fold<k>/ subfolders")
    ap.add_argument("--tta", default="none", choices=TTA_LEVELS, help="TTA level of the store")
    ap.add_argument("--checkpoint", default="last", choices=OOF_CHECKPOINTS,
                    help="last.pt (the final weights, as training writes) or best.pt")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1")
    ap.add_argument("overrides", nargs="*", help="key=value overrides (data_dir=..., batch_size=...)")
    args = ap.parse_args(argv)
    runs, overrides = split_overrides(args.runs, args.overrides)
    try:
        write_stores(runs, args.tta, args.checkpoint, parse_overrides(overrides), args.device)
    except KeyboardInterrupt:
        exit_interrupted("oof", "the PROB files written so far are kept",
                         "re-run the same command to complete the stores")
    except ConfigError as err:
        exit_on_config_error(err)
    except (PredictError, DataError) as err:
        print(f"oof: error: {one_line(err)}", file=sys.stderr)
        raise SystemExit(1) from None
    except (MachineLimitError, OSError, MemoryError) as err:
        exit_on_machine_limit("oof", err)
    finally:
        if "torch" in sys.modules:
            from src.core.runtime import cleanup

            cleanup()


if __name__ == "__main__":
    main()
