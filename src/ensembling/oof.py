"""Out-of-fold (OOF) probabilities: the held-out patches of a fold run, predicted by its final weights and
kept as PROB_<id>.npz (src.prediction.stores) in `runs/<name>/fold<k>/<store>/` beside an `oof.json` manifest.

Why: K fold runs of one config then predict every training patch exactly once, each by a model that never
saw it, which is what an ensemble search needs to choose weights without touching the test set (the 1st
and 2nd places of FLAIR #2 ensembled this way; `python -m src.blend`). Docs: docs/recipes.md,
"Out-of-fold ensembling".

- Store names say how they were made: `oof` = TTA none with last.pt's weights (what training writes at
  its end: the EMA when it is on), `oof_<tta>` another TTA level of those weights, and a `_best` suffix for
  best.pt's weights (`python -m src.oof` writes any of them later).
- Atomic per file (probstore.save_prob) and resumable: a valid PROB file is kept, unless the manifest says
  other weights made it (a fresh run in the same folder), in which case the store is emptied first.
- The prediction path is predict's: the same loader (src.data.loader), device_batch normalisation and
  src.prediction.ensemble.predict_batch with its TTA views. Under DDP each rank writes its own ids (rows r, r+W, ...)."""
from __future__ import annotations

import json
import re
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from src.core.files import write_json
from src.core.progress import progress
from src.core.runtime import amp_dtype, barrier
from src.data.device_augment import device_batch
from src.data.loader import prediction_loader
from src.prediction import tta as T
from src.prediction.ensemble import predict_batch, quantise
from src.prediction.stores import PROBS_FORMAT, prob_ok, prob_path, save_prob

STORE_MANIFEST = "oof.json"
CHECKPOINTS = ("last", "best")
TTA_LEVELS = T.LEVELS
_STORE = re.compile(r"^oof(?:_(flip|d4|none))?(_best)?$")
FOLD_DIR = re.compile(r"^fold(\d+)$")


def store_name(tta: str = "none", checkpoint: str = "last") -> str:
    """`oof` (tta none, last.pt), `oof_flip`, `oof_d4`, and `_best` appended for best.pt."""
    name = "oof" if tta == "none" else f"oof_{tta}"
    return name if checkpoint == "last" else f"{name}_best"


def parse_store_name(name: str) -> tuple[str, str] | None:
    """(tta, checkpoint) of a store folder name, None for any other name."""
    m = _STORE.match(name)
    if not m:
        return None
    return m.group(1) or "none", "best" if m.group(2) else "last"


def fold_dirs(run: Path) -> dict[int, Path]:
    """fold number -> runs/<name>/fold<k> (fold "all" and anything else left out)."""
    if not run.is_dir():
        return {}
    return {int(m.group(1)): p for p in sorted(run.iterdir()) if p.is_dir() and (m := FOLD_DIR.match(p.name))}


def weights_identity(path: Path) -> dict[str, Any]:
    """Which weights made a store: the checkpoint file's name, size and mtime (a new run rewrites it; a
    run folder moved or copied with its times keeps them, so its stores stay valid)."""
    st = path.stat()
    return {"file": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def read_store_manifest(store: Path) -> dict[str, Any] | None:
    try:
        return json.loads((store / STORE_MANIFEST).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable: treated as another setup (the store is rewritten)


def store_ids(store: Path) -> set[str]:
    return {p.name[5:-4] for p in store.glob("PROB_*.npz")}


def _clean_if_stale(store: Path, identity: dict[str, Any], log: Callable[[str], None]) -> None:
    """Empty a store made by other weights or another TTA level (its files must not be mixed in)."""
    prev = read_store_manifest(store)
    stale = prev is not None and any(prev.get(k) != v for k, v in identity.items())
    if prev is None and any(store.glob("PROB_*.npz")):
        stale = True
    if stale:
        for p in store.glob("PROB_*.npz"):
            p.unlink()
        log(f"oof: {store} held probabilities of other weights or settings: removed")


def _predict_rows(model: nn.Module, cfg: dict[str, Any], rows: pd.DataFrame, store: Path, tta: str,
                  device: torch.device, show: bool) -> list[tuple[str, str]]:
    """Predict `rows` with predict's loader and batch maths, saving each patch's uint8 probabilities
    in background threads; returns the unreadable patches (skip_bad) as (id, error)."""
    loader, _ = prediction_loader(rows, [cfg], cfg)
    dtype = amp_dtype(cfg["precision"], device)
    bad: list[tuple[str, str]] = []
    pending: deque = deque()
    model.eval()
    with ThreadPoolExecutor(2) as pool, progress(total=len(rows), desc=f"oof {store.name}", unit="patch",
                                                 disable=not show) as bar:
        for item in loader:
            bad += item["bad"]
            bar.update(len(item["bad"]))
            if item["batches"] is None:
                continue
            raw = item["batches"][0]
            x = device_batch(raw, cfg, device, dtype=dtype)
            probs = predict_batch([model], None, x, tta=tta, precision=cfg["precision"],
                                  channels_last=bool(cfg.get("channels_last")))
            q = quantise(probs).cpu().numpy()
            for j, pid in enumerate(raw["id"]):
                pending.append(pool.submit(save_prob, prob_path(store, str(pid)), q[j]))
            while len(pending) > 64:
                pending.popleft().result()
            bar.update(len(raw["id"]))
        for fut in pending:
            fut.result()
    return bad


def write_fold_oof(cfg: dict[str, Any], fold: str, val_df: pd.DataFrame | None, model: nn.Module,
                   run_dir: Path, rank: int, world: int, device: torch.device,
                   log: Callable[[str], None]) -> dict[str, Any] | None:
    """The end of a fold run (src.train): its held-out fold's probabilities with the final weights (the
    EMA when on, as saved in last.pt) into fold<k>/oof/; nothing for fold "all" or with oof=false."""
    if not cfg.get("oof", True) or val_df is None:
        return None
    return write_oof(model, cfg, val_df, Path(run_dir) / store_name(), fold=fold,
                     weights_file=Path(run_dir) / "last.pt", rank=rank, world=world, device=device, log=log)


def write_oof(model: nn.Module, cfg: dict[str, Any], val_df: pd.DataFrame, store: str | Path, *,
              fold: str | int, tta: str = "none", checkpoint: str = "last", weights_file: Path | None = None,
              rank: int = 0, world: int = 1, device: torch.device | None = None,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Save the probabilities of every held-out patch (`val_df`) that the store lacks; returns the manifest.

    Called by every rank: rank r predicts rows r, r+world, ...; rank 0 empties a stale store first and
    writes `oof.json` at the end (run, fold, tta, checkpoint, weights, ids, missing, complete).
    `weights_file` is the checkpoint holding `model`'s weights (last.pt at the end of training)."""
    store = Path(store)
    device = device or next(model.parameters()).device
    identity = {"run": Path(cfg["runs_dir"], cfg["name"]).name, "fold": str(fold), "tta": tta,
                "checkpoint": checkpoint,
                "weights": weights_identity(weights_file) if weights_file and rank == 0 else None}
    about = {"weights_path": str(weights_file.resolve()) if weights_file else None,
             "data_dir": str(cfg["data_dir"]), "ids": len(val_df)}
    if rank == 0:
        store.mkdir(parents=True, exist_ok=True)
        _clean_if_stale(store, identity, log)
        write_json(store / STORE_MANIFEST, {"format": PROBS_FORMAT, **identity, **about, "complete": False})
    barrier()
    rows = val_df.iloc[rank::world].reset_index(drop=True)
    todo = rows[[not prob_ok(prob_path(store, str(i))) for i in rows["id"]]].reset_index(drop=True)
    if rank == 0:
        kept = len(rows) - len(todo)
        log(f"oof: fold {fold}: {len(val_df)} held-out patches -> {store} (tta {tta}, {checkpoint} weights)"
            + (f"; {kept} already there" if kept else ""))
    bad = _predict_rows(model, cfg, todo, store, tta, device, rank == 0) if len(todo) else []
    for pid, err in bad:
        log(f"oof: skipped unreadable patch {pid}: {err}")
    barrier()
    manifest: dict[str, Any] = {}
    if rank == 0:
        missing = sorted(str(i) for i in val_df["id"] if not prob_ok(prob_path(store, str(i))))
        manifest = {"format": PROBS_FORMAT, **identity, **about, "missing": missing, "complete": True}
        write_json(store / STORE_MANIFEST, manifest)
        log(f"oof: {len(val_df) - len(missing)} PROB files in {store}"
            + (f"; {len(missing)} unreadable patches have none (in {STORE_MANIFEST})" if missing else ""))
    barrier()
    return manifest
