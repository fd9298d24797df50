"""Train one fold: `python -m src.train --config C --fold K|all --resume 0|1 key=value ...`.

Settings are read and checked first (src.core.config: YAML + key=value), then the fold's rows and their
files, all before torch is imported, so a typo or a missing file costs a fraction of a second. The loop
itself is src.training.loop; at the end a fold run writes its held-out fold's probabilities
(src.ensembling.oof) for `make ensemble`. `--settings` prints every setting, its default and who reads it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from src.core.config import exit_on_config_error, from_saved, load_settings, parse_overrides, settings_table
from src.core.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    MachineLimitError,
    TrainingDiverged,
    caused_by_interrupt,
    exit_interrupted,
    exit_on_machine_limit,
)
from src.core.settings import Settings, check_job


def resume_settings(cfg: Settings, last: Path, args: argparse.Namespace) -> tuple[Settings, dict[str, Any]]:
    """(the settings last.pt was trained with, command-line overrides on top; last.pt's state): a resumed
    run continues with the settings it started with."""
    from src.core.checkpoint import load_checkpoint

    if not last.is_file():
        raise ConfigError(f"nothing to resume: {last} not found (start with --resume 0)")
    state = load_checkpoint(last, map_location="cpu")
    overrides = parse_overrides(args.overrides)
    saved = from_saved(state["config"], str(last), overrides)
    changed = sorted(k for k, v in cfg.to_dict().items() if k not in overrides and saved.to_dict()[k] != v)
    if changed:
        print(f"note: resuming with the settings saved in {last}; {args.config} differs on "
              f"{', '.join(changed)} (pass key=value to change a setting)")
    return saved, state


def prepare(args: argparse.Namespace) -> tuple[Settings, str, Any, Any, dict | None]:
    """Everything that can fail on settings or files, before torch is imported: (settings, fold, training
    rows, validation rows or None, last.pt's state when resuming)."""
    cfg = load_settings(args.config, args.overrides)
    fold = str(args.fold)
    if fold != "all" and not fold.isdigit():
        raise ConfigError(f"--fold: expected a fold number or 'all', got {fold!r}")
    state = None
    if args.resume:
        cfg, state = resume_settings(cfg, cfg.run_dir(fold) / "last.pt", args)
    check_job(cfg, "train")
    from src.training.prepare import fold_inputs  # (pandas: after the settings are known to be good)

    cfg, train_df, val_df = fold_inputs(cfg, fold)
    return cfg, fold, train_df, val_df, state


def run(cfg: Settings, fold: str, train_df: Any, val_df: Any, state: dict | None) -> dict[str, Any]:
    """Train, then write the held-out fold's out-of-fold probabilities (rank 0 logs)."""
    from src.core.runtime import cleanup
    from src.ensembling.oof import write_fold_oof
    from src.training.loop import train

    try:
        result = train(cfg, fold, train_df, val_df, state)
        place = result["place"]
        log = print if place.main else (lambda *a, **k: None)
        write_fold_oof(cfg, fold, val_df, result["model"], result["run_dir"], place, log)
        return result
    finally:
        cleanup()


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=None, help="YAML settings (configs/*.yaml)")
    parser.add_argument("--fold", default="0", help="validation fold (trains on the others) or 'all'")
    parser.add_argument("--resume", type=int, choices=[0, 1], default=0, help="1: continue from last.pt")
    parser.add_argument("--settings", nargs="?", const="text", choices=["text", "md"],
                        help="print every setting (default, allowed values, jobs that read it) and exit")
    parser.add_argument("overrides", nargs="*", help="key=value settings overriding the config")
    args = parser.parse_args(argv)
    if args.settings:
        print(settings_table(markdown=args.settings == "md"))
        return None
    try:
        cfg, fold, train_df, val_df, state = prepare(args)
    except ConfigError as err:
        exit_on_config_error(err)
    except (DataError, CheckpointError) as err:
        print(f"data error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        return run(cfg, fold, train_df, val_df, state)
    except KeyboardInterrupt:
        interrupted(cfg, fold, args.config)
    except ConfigError as err:
        exit_on_config_error(err)
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(3) from None
    except DataError as err:
        print(f"data error: {err} (skip_bad=1 skips unreadable samples)", file=sys.stderr)
        raise SystemExit(1) from None
    except (MachineLimitError, OSError, MemoryError) as err:
        if caused_by_interrupt(err):
            interrupted(cfg, fold, args.config)
        exit_on_machine_limit("train", err)
    except Exception as err:
        if not caused_by_interrupt(err):
            raise
        interrupted(cfg, fold, args.config)


def interrupted(cfg: Settings, fold: str, config: str | None) -> None:
    """Ctrl-C: one line saying what is kept and the command that resumes."""
    last = cfg.run_dir(fold) / "last.pt"
    kept = f"{last} (the last finished epoch) is kept" if last.is_file() else "no epoch had finished"
    resume = (f"resume with: make train CONFIG={config} FOLD={fold} RESUME=1" if last.is_file()
              else "start again with the same command")
    exit_interrupted("train", kept, resume)


if __name__ == "__main__":
    main()
