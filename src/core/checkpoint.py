"""Checkpoints: atomic writes, clear errors on bad files, and finding them in run folders.

A checkpoint is a dict saved with torch.save (keys in docs/data-format.md, "Checkpoints"): "model" holds
the inference weights (the EMA when EMA is on) and "config" the resolved settings, so a checkpoint alone
rebuilds its model (`src.models.flair_model.load_for_inference`; this module knows nothing of models)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from src.core.errors import CheckpointError
from src.core.files import atomic_write, remove_stale_temps
from src.core.settings import Settings


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """torch.save to a temporary name in the same folder, fsync, then os.replace.

    A process killed mid-write leaves the previous checkpoint untouched (plus a hidden `.NAME.*.tmp`
    that the next save removes), never a truncated file under the final name.
    """
    path = Path(path)
    if isinstance(state.get("config"), Settings):  # plain values only: a checkpoint must not need this class
        state = {**state, "config": state["config"].to_dict()}
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)  # left by an earlier killed write
    with atomic_write(path) as tmp:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu", mmap: bool = False
                    ) -> dict[str, Any]:
    """Load a checkpoint dict, naming the file when it is missing or corrupt. `mmap`: tensors are mapped, not
    read (cheap when only the settings are wanted)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        # our checkpoints hold numpy RNG state and python objects, so the full unpickler is needed;
        # only load checkpoints you trust (the ones this kit wrote).
        state = torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    except Exception as err:  # truncated zip, bad pickle, ...
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{path}: not a flair2-kit checkpoint (no 'model'/'config' keys)")
    return state


def find_checkpoints(runs: str | os.PathLike | list[str | os.PathLike], which: str = "best") -> list[Path]:
    """Checkpoint files from run folders and/or files: each folder is searched for `<which>.pt`.

    `runs/unet_r34` finds runs/unet_r34/fold0/best.pt, fold1/best.pt, ... (not those under a
    `previous/` folder); a file is taken as given.
    Raises CheckpointError naming the path when a file is missing or a folder holds none.
    """
    items = runs if isinstance(runs, (list, tuple)) else [runs]
    found: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_file():
            found.append(p)
        elif p.is_dir():
            # previous/ holds an older run set aside by a fresh start (src.training.records): never picked up
            hits = sorted(h for h in p.rglob(f"{which}.pt") if "previous" not in h.relative_to(p).parts)
            if not hits:
                raise CheckpointError(f"{p}: no {which}.pt found under this folder")
            found.extend(hits)
        else:
            raise CheckpointError(f"{p}: no such checkpoint file or run folder")
    seen: set[Path] = set()
    return [p for p in found if not (p.resolve() in seen or seen.add(p.resolve()))]
