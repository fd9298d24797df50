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
  src.prediction.ensemble.predict_batch with its TTA views. Under DDP each rank writes its own ids (rows r,
  r+W, ...)."""
from __future__ import annotations

import json
import re
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from torch import nn

from src.core.files import write_json
from src.core.progress import progress
from src.core.runtime import Placement, barrier
from src.core.settings import TTA_LEVELS, Settings
from src.data.loader import prediction_loader
from src.prediction.ensemble import Ensemble, quantise
from src.prediction.stores import PROBS_FORMAT, prob_ok, prob_path, save_prob

STORE_MANIFEST = "oof.json"
_STORE = re.compile(rf"^oof(?:_({'|'.join(TTA_LEVELS)}))?(_best)?$")
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


@dataclass(frozen=True)
class Store:
    """One OOF store: its folder and what fills it (which fold, at which TTA level, with which weights)."""

    path: Path
    fold: str
    tta: str = "none"
    checkpoint: str = "last"          # last.pt or best.pt (the store's name says which)
    weights_file: Path | None = None  # the checkpoint holding the model's weights


def _predict_rows(ens: Ensemble, rows: pd.DataFrame, store: Store, show: bool) -> list[tuple[str, str]]:
    """Predict `rows` with predict's loader and engine, saving each patch's uint8 probabilities in
    background threads; returns the unreadable patches (skip_bad) as (id, error)."""
    loader, _ = prediction_loader(rows, ens.settings, ens.cfg)
    bad: list[tuple[str, str]] = []
    pending: deque = deque()
    for m in ens.models:
        m.eval()
    desc = f"oof {store.path.parent.name}/{store.path.name}"  # e.g. "oof fold0/oof_flip"
    with ThreadPoolExecutor(2) as pool, progress(total=len(rows), desc=desc, unit="patch",
                                                 disable=not show) as bar:
        for item in loader:
            bad += item["bad"]
            bar.update(len(item["bad"]))
            if item["batches"] is None:
                continue
            q = quantise(ens.predict(ens.feed(item["batches"]), store.tta)).cpu().numpy()
            ids = item["batches"][0]["id"]
            for j, pid in enumerate(ids):
                pending.append(pool.submit(save_prob, prob_path(store.path, str(pid)), q[j]))
            while len(pending) > 64:
                pending.popleft().result()
            bar.update(len(ids))
        for fut in pending:
            fut.result()
    return bad


def write_fold_oof(cfg: Settings, fold: str, val_df: pd.DataFrame | None, model: nn.Module, run_dir: Path,
                   place: Placement, log: Callable[[str], None]) -> dict[str, Any] | None:
    """The end of a fold run (src.train): its held-out fold's probabilities with the final weights (the
    EMA when on, as saved in last.pt) into fold<k>/oof/; nothing for fold "all" or with oof=false."""
    if not cfg.oof or val_df is None:
        return None
    store = Store(Path(run_dir) / store_name(), fold, weights_file=Path(run_dir) / "last.pt")
    return write_oof(Ensemble([model], [cfg], [1.0]), val_df, store, place, log)


def write_oof(ens: Ensemble, val_df: pd.DataFrame, store: Store, place: Placement,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Save the probabilities of every held-out patch (`val_df`) that the store lacks; returns the manifest.

    Called by every rank: rank r predicts rows r, r+world, ...; rank 0 empties a stale store first and
    writes `oof.json` at the end (run, fold, tta, checkpoint, weights, ids, missing, complete)."""
    cfg, path, rank, weights_file = ens.cfg, store.path, place.rank, store.weights_file
    identity = {"run": Path(cfg.runs_dir, cfg.name).name, "fold": str(store.fold), "tta": store.tta,
                "checkpoint": store.checkpoint,
                "weights": weights_identity(weights_file) if weights_file and rank == 0 else None}
    about = {"weights_path": str(weights_file.resolve()) if weights_file else None,
             "data_dir": cfg.data_dir, "ids": len(val_df)}
    if rank == 0:
        path.mkdir(parents=True, exist_ok=True)
        _clean_if_stale(path, identity, log)
        write_json(path / STORE_MANIFEST, {"format": PROBS_FORMAT, **identity, **about, "complete": False})
    barrier()
    rows = val_df.iloc[rank::place.world].reset_index(drop=True)
    todo = rows[[not prob_ok(prob_path(path, str(i))) for i in rows["id"]]].reset_index(drop=True)
    if rank == 0:
        kept = len(rows) - len(todo)
        log(f"oof: fold {store.fold}: {len(val_df)} held-out patches -> {path} (tta {store.tta}, "
            f"{store.checkpoint} weights)" + (f"; {kept} already there" if kept else ""))
    bad = _predict_rows(ens, todo, store, rank == 0) if len(todo) else []
    for pid, err in bad:
        log(f"oof: skipped unreadable patch {pid}: {err}")
    barrier()
    manifest: dict[str, Any] = {}
    if rank == 0:
        missing = sorted(str(i) for i in val_df["id"] if not prob_ok(prob_path(path, str(i))))
        manifest = {"format": PROBS_FORMAT, **identity, **about, "missing": missing, "complete": True}
        write_json(path / STORE_MANIFEST, manifest)
        log(f"oof: {len(val_df) - len(missing)} PROB files in {path}"
            + (f"; {len(missing)} unreadable patches have none (in {STORE_MANIFEST})" if missing else ""))
    barrier()
    return manifest
