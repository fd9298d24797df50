"""Predict a split with one or many checkpoints: batched TTA, weighted ensembles, resumable PRED files.

    python -m src.predict --runs RUNS_DIR_OR_CKPTS... --split test --out PRED_DIR [--tta none|flip|d4]
        [--weights w1,w2,...] [--save-probs DIR] [--submit NAME [--baseline-time S]] [key=value ...]
    python -m src.predict --combine PROBS_DIR1 PROBS_DIR2 ... --out PRED_DIR [--weights ...] [--submit NAME]

Why it is built this way:
- Every model is rebuilt from its own checkpoint config (`checkpoint.load_for_inference`); `key=value`
  overrides apply on top of every checkpoint's config (use them for data_dir, batch_size, workers, tta...).
- Models whose input settings differ (bands, norm, S2 on/off and S2 options, metadata) each get their own
  sample of the same patch: the dataset below yields one sample per distinct input setting, so one loader
  feeds the whole ensemble (a patch is read once per distinct setting, not once per model).
- TTA views of a batch are stacked (V*B rows) and go through the network in one call; the S2 crop is
  flipped/rotated with the aerial image (src/tta.py), and outputs are mapped back before averaging.
- `ensemble=probs` (default) averages softmax probabilities over views and models with the weights;
  `ensemble=logits` averages logits and takes one softmax at the end.
- PRED files are written only by `src.submit.write_pred` (atomic), in background threads, so a killed
  run never leaves a partial file. Re-running with the same --out writes only the missing ones; a
  `predict.json` manifest in the folder records which checkpoints/weights/TTA made them, and a different
  setup is refused (use --overwrite) rather than silently mixing two ensembles in one submission.
- `--save-probs DIR` keeps the ensemble's softmax per patch as `PROB_<id>.npz` (key "probs", uint8
  (13,H,W) = round(p*255), deflate level 1: at most ~1.4 MB per 512x512 patch, measured on an
  untrained, near-uniform model; confident models compress better; plan up to ~23 GB for the test set)
  so separately predicted models can be combined later with `--combine` without re-running them.
"""
from __future__ import annotations

import argparse
import errno
import io
import json
import os
import sys
import time
import zipfile
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tifffile
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from src import tta as T
from src.classes import NUM_CLASSES, OTHER
from src.config import ConfigError, exit_on_config_error, parse_overrides, resolve
from src.rasters import DataError

N_TEST = 16050  # patches in the official FLAIR #2 test set (spec section 2)
MANIFEST = "predict.json"
PROBS_MANIFEST = "probs.json"
PROBS_FORMAT = "PROB_<id>.npz, key 'probs', uint8 (13,H,W) = round(softmax*255)"
# Settings that change what a model is fed: models differing in any of them get separate inputs.
DATA_KEYS = ("bands", "norm", "use_s2", "s2_size", "s2_filter_clouds", "s2_cover_max", "s2_prob_min",
             "s2_monthly", "use_metadata")
INPUT_KEYS = ("s2", "s2_days", "s2_pad", "meta")
FALLBACK_CLASS = OTHER  # written for unreadable test patches with skip_bad=1: "other" costs no false positive


class PredictError(ValueError):
    """A user-facing problem (bad arguments, missing files, mismatching folders); one line."""


class DiskFullError(OSError):
    """Writing predictions or probabilities ran out of space; the message says how much to free."""

    def __str__(self) -> str:
        return str(self.strerror)


# ----------------------------------------------------------------------------------------- batch level
def normalise_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """Per-model weights summing to 1 (equal when None)."""
    if weights is None:
        return [1.0 / n] * n
    w = [float(x) for x in weights]
    if len(w) != n:
        raise PredictError(f"{len(w)} weights given for {n} models")
    if any(x < 0 or not np.isfinite(x) for x in w) or sum(w) <= 0:
        raise PredictError(f"weights must be >= 0 with a positive sum, got {w}")
    s = sum(w)
    return [x / s for x in w]


def autocast_for(device: torch.device, precision: str):
    """bf16 autocast on CUDA (auto/bf16), fp16 when asked; plain fp32 on CPU (CPU autocast is slower)."""
    if device.type != "cuda" or precision == "fp32":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.float16 if precision == "fp16" else torch.bfloat16)


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.inference_mode()
def predict_batch(models: Sequence[nn.Module], weights: Sequence[float] | None,
                  batch: dict[str, Any] | Sequence[dict[str, Any]], tta: str = "none",
                  ensemble: str = "probs", *, precision: str = "auto",
                  channels_last: bool = False) -> torch.Tensor:
    """Class probabilities (B, 13, H, W) float32 of a weighted ensemble with TTA, on the models' device.

    `batch` is one collated batch shared by all models, or a list with one batch per model (models
    fed different inputs). Each model sees the V views of its batch stacked as V*B rows in one call,
    with the S2 crop transformed like the image; outputs are inverted to the original frame and averaged
    (probabilities, or logits when `ensemble="logits"`), then combined across models with the weights.
    """
    if ensemble not in ("probs", "logits"):
        raise PredictError(f"ensemble must be probs or logits, got {ensemble!r}")
    batches = [batch] * len(models) if isinstance(batch, dict) else list(batch)
    if len(batches) != len(models):
        raise PredictError(f"{len(batches)} batches for {len(models)} models")
    w = normalise_weights(weights, len(models))
    vs = T.views(tta)
    total: torch.Tensor | None = None
    for model, wi, b in zip(models, w, batches):
        dev = _model_device(model)
        nb = dev.type == "cuda"
        image = b["image"].to(dev, non_blocking=nb)
        inputs = {"image": image}
        inputs.update({k: b[k].to(dev, non_blocking=nb) for k in INPUT_KEYS
                       if isinstance(b.get(k), torch.Tensor)})
        acc: torch.Tensor | None = None
        for group in T.view_groups(vs, square=image.shape[-1] == image.shape[-2]):
            stacked = T.stack_views(inputs, group)
            x = stacked.pop("image")
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast_for(dev, precision):
                out = model(x, **stacked)
            logits = (out["logits"] if isinstance(out, dict) else out).float()
            for y in T.unstack_views(logits, group):
                y = y.softmax(1) if ensemble == "probs" else y
                acc = y if acc is None else acc + y
        acc = acc / len(vs)
        total = acc * wi if total is None else total + acc.to(total.device) * wi
    return total if ensemble == "probs" else total.softmax(1)


def quantise(probs: torch.Tensor) -> torch.Tensor:
    """float probabilities -> uint8 round(p*255) (what --save-probs stores)."""
    return (probs.clamp(0, 1) * 255).round_().to(torch.uint8)


# ------------------------------------------------------------------------------------------ data level
def input_signature(cfg: dict[str, Any]) -> str:
    return json.dumps({k: cfg.get(k) for k in DATA_KEYS}, sort_keys=True, default=str)


class MultiInput(Dataset):
    """The same patch as seen by each distinct input setting: item i -> [sample of dataset g, ...].

    With skip_bad, an unreadable patch becomes {"bad": id, "error": message} instead of raising (the
    datasets themselves never substitute another patch: every id must get its own prediction)."""

    def __init__(self, datasets: list[Dataset], ids: Sequence[str], skip_bad: bool = False):
        self.datasets = datasets
        self.ids = np.asarray([str(i) for i in ids], dtype=str)
        self.skip_bad = skip_bad

    def __len__(self) -> int:
        return len(self.datasets[0])

    def __getitem__(self, i: int) -> list[Any] | dict[str, str]:
        try:
            return [ds[i] for ds in self.datasets]
        except DataError as err:
            if not self.skip_bad:
                raise
            return {"bad": str(self.ids[i]), "error": str(err).replace("\n", " ")}


def collate_multi(samples: list[Any]) -> dict[str, Any]:
    """{"batches": one collated batch per input setting (None if every sample was bad),
    "bad": [(id, error), ...]}."""
    from src.dataset import collate

    bad = [(s["bad"], s["error"]) for s in samples if isinstance(s, dict)]
    good = [s for s in samples if not isinstance(s, dict)]
    batches = [collate([s[g] for s in good]) for g in range(len(good[0]))] if good else None
    return {"batches": batches, "bad": bad}


def build_loader(index_df: pd.DataFrame, model_cfgs: Sequence[dict[str, Any]], cfg: dict[str, Any],
                 device: torch.device) -> tuple[DataLoader, list[int]]:
    """(loader of collate_multi dicts, input index of each model). One dataset per distinct input setting."""
    from src.dataset import FlairDataset

    sigs: list[str] = []
    group_of: list[int] = []
    datasets: list[Dataset] = []
    df = index_df.reset_index(drop=True)
    for mcfg in model_cfgs:
        sig = input_signature(mcfg)
        if sig not in sigs:
            sigs.append(sig)
            datasets.append(FlairDataset(df, {**mcfg, "skip_bad": False}, train=False, labels=False))
        group_of.append(sigs.index(sig))
    workers = int(cfg.get("workers", 0))
    loader = DataLoader(MultiInput(datasets, df["id"].tolist(), bool(cfg.get("skip_bad"))),
                        batch_size=int(cfg["batch_size"]), shuffle=False, num_workers=workers,
                        collate_fn=collate_multi, drop_last=False, pin_memory=device.type == "cuda",
                        persistent_workers=False, prefetch_factor=4 if workers > 0 else None)
    return loader, group_of


# ------------------------------------------------------------------------------------------ files level
def pred_path(out_dir: Path, pid: str) -> Path:
    return Path(out_dir) / f"PRED_{pid}.tif"


def prob_path(probs_dir: Path, pid: str) -> Path:
    return Path(probs_dir) / f"PROB_{pid}.npz"


def _image_hw(path: str) -> tuple[int, int] | None:
    try:
        with tifffile.TiffFile(path) as tif:
            shape = tif.series[0].shape
    except Exception:
        return None
    if len(shape) == 3 and shape[-1] <= 16 < shape[0]:  # pixel-interleaved (H, W, C)
        return int(shape[0]), int(shape[1])
    return int(shape[-2]), int(shape[-1])


def pred_ok(path: Path, img_path: str | None = None) -> bool:
    """A PRED file counts as done when its TIFF header reads as a 2-D uint8 image of the image's size.
    (Files are written atomically, so a killed run leaves no partial file under the final name.)"""
    if not path.is_file():
        return False
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            shape, dtype = tuple(page.shape), page.dtype
    except Exception:
        return False
    if len(shape) != 2 or dtype != np.uint8:
        return False
    want = _image_hw(img_path) if img_path else None
    return want is None or shape == want


def scan_done(index_df: pd.DataFrame, out_dir: Path, probs_dir: Path | None = None,
              threads: int = 8) -> set[str]:
    """Ids whose PRED file (and PROB file when probabilities are saved) already exist and are valid."""
    rows = list(zip(index_df["id"].astype(str), index_df.get("img_path", [None] * len(index_df))))

    def ok(row: tuple[str, str | None]) -> bool:
        pid, img = row
        if probs_dir is not None and not _prob_ok(prob_path(probs_dir, pid)):
            return False
        return pred_ok(pred_path(out_dir, pid), img)

    with ThreadPoolExecutor(threads) as pool:
        flags = list(pool.map(ok, rows))
    return {pid for (pid, _), f in zip(rows, flags) if f}


def _prob_ok(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0 and zipfile.is_zipfile(path)


def save_prob(path: Path, q: np.ndarray) -> None:
    """uint8 (13,H,W) -> PROB_<id>.npz (np.load-able; deflate level 1: fast, these compress well), atomic."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(q), allow_pickle=False)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
            zf.writestr("probs.npy", buf.getvalue())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_prob(path: Path) -> np.ndarray:
    """PROB_<id>.npz -> uint8 (13,H,W), naming the file when it is unreadable."""
    try:
        with np.load(path) as z:
            q = z["probs"]
    except FileNotFoundError:
        raise DataError(f"{path}: probability file not found") from None
    except Exception as err:
        raise DataError(f"{path}: unreadable probability file ({type(err).__name__}: {err})") from None
    if q.dtype != np.uint8 or q.ndim != 3 or q.shape[0] != NUM_CLASSES:
        raise DataError(f"{path}: expected uint8 (13,H,W) probabilities, got {q.dtype} {q.shape}")
    return q


def _is_disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)


class Writer:
    """Background writing of PRED (+PROB) files so encoding overlaps the next batch's compute.

    At most `max_pending` writes are in flight; the first failure is re-raised in the caller's thread
    (disk full as DiskFullError with what to free)."""

    def __init__(self, out_dir: Path, probs_dir: Path | None, threads: int = 4, max_pending: int = 64):
        from src.submit import write_pred

        self.write_pred = write_pred
        self.out_dir, self.probs_dir = Path(out_dir), probs_dir
        self.pool = ThreadPoolExecutor(threads)
        self.pending: deque[Future] = deque()
        self.max_pending = max_pending
        self.written: list[str] = []
        self.n_left = 0
        self.bytes_per_file = 64e3

    def _write(self, pid: str, pred: np.ndarray, q: np.ndarray | None) -> str:
        if q is not None:  # probabilities first: a PRED file then implies its PROB file exists
            save_prob(prob_path(self.probs_dir, pid), q)
        self.write_pred(self.out_dir, pid, pred)
        return pid

    def submit(self, pid: str, pred: np.ndarray, q: np.ndarray | None = None) -> None:
        self.pending.append(self.pool.submit(self._write, pid, pred, q))
        while len(self.pending) > self.max_pending:
            self._collect(self.pending.popleft())

    def _collect(self, fut: Future) -> None:
        try:
            self.written.append(fut.result())
        except OSError as err:
            if _is_disk_full(err):
                self.abort()
                est = self.bytes_per_file
                if self.written:
                    p = pred_path(self.out_dir, self.written[-1])
                    est = p.stat().st_size if p.exists() else est
                    if self.probs_dir is not None:
                        pp = prob_path(self.probs_dir, self.written[-1])
                        est += pp.stat().st_size if pp.exists() else 0
                left = self.n_left - len(self.written)
                raise DiskFullError(errno.ENOSPC, f"{err} -- {left} files still to write, about "
                                    f"{left * est / 1e6:.0f} MB more; free that much, then re-run the same "
                                    "command: it writes only the missing files") from None
            raise

    def close(self) -> list[str]:
        while self.pending:
            self._collect(self.pending.popleft())
        self.pool.shutdown(wait=True)
        return self.written

    def abort(self) -> None:
        """Drop queued writes, wait for the running ones (each is atomic anyway)."""
        for fut in self.pending:
            fut.cancel()
        self.pool.shutdown(wait=True, cancel_futures=True)
        for fut in self.pending:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.written.append(fut.result())
        self.pending.clear()


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise PredictError(f"{path}: unreadable manifest ({err}); delete it and use --overwrite") from None


def prepare_out(out_dir: Path, identity: dict[str, Any], index_df: pd.DataFrame, overwrite: bool,
                probs_dir: Path | None, log: Callable[[str], None]) -> dict[str, Any] | None:
    """Create the folder and check that what is already there was made by the same setup.

    Returns the previous manifest (None when starting fresh). With --overwrite the split's PRED (and
    PROB) files are deleted first, so an interrupted overwrite can never mix two setups.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    if probs_dir is not None:
        probs_dir.mkdir(parents=True, exist_ok=True)
    prev = _read_json(out_dir / MANIFEST)
    existing = any(out_dir.glob("PRED_*.tif"))
    if overwrite:
        for pid in index_df["id"].astype(str):
            pred_path(out_dir, pid).unlink(missing_ok=True)
            if probs_dir is not None:
                prob_path(probs_dir, pid).unlink(missing_ok=True)
        (out_dir / MANIFEST).unlink(missing_ok=True)
        return None
    if prev is None:
        if existing:
            raise PredictError(f"{out_dir} already holds PRED files but no {MANIFEST}: use another --out, "
                               "or --overwrite to replace them")
        return None
    for key, value in identity.items():
        if json.dumps(prev.get(key), sort_keys=True, default=str) != json.dumps(value, sort_keys=True,
                                                                                   default=str):
            raise PredictError(f"{out_dir} holds predictions from another setup ({key} differs: "
                               f"{prev.get(key)} vs {value}); use another --out, or --overwrite")
    return prev


# ------------------------------------------------------------------------------------------- run level
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def choose_tta(models: Sequence[nn.Module], weights: Sequence[float], batches: list[dict[str, Any]],
               cfg: dict[str, Any], n_total: int, budget_s: float, device: torch.device,
               log: Callable[[str], None]) -> str:
    """Largest TTA level whose projected time for `n_total` patches fits `budget_s`.

    Each level runs the first batch once untimed (warm-up) and once timed; the projection is
    network time only (data loading runs in parallel workers). Larger levels are skipped once one
    does not fit; if even `none` does not fit it is used anyway, with a warning."""
    n = len(batches[0]["id"])
    choice = "none"
    for level in T.LEVELS:
        kw = dict(tta=level, ensemble=cfg["ensemble"], precision=cfg["precision"],
                  channels_last=cfg["channels_last"])
        predict_batch(models, weights, batches, **kw)
        _sync(device)
        t0 = time.perf_counter()
        predict_batch(models, weights, batches, **kw)
        _sync(device)
        per = (time.perf_counter() - t0) / n
        proj = per * n_total
        fits = proj <= budget_s
        log(f"predict: time budget {budget_s:.0f} s: tta={level} ({len(T.views(level))} views) "
            f"{per:.3f} s/patch -> {fmt_s(proj)} for {n_total} patches {'fits' if fits else 'does NOT fit'}")
        if not fits:
            if level == "none":
                log("predict: warning: even tta=none does not fit the time budget; using it anyway")
            break
        choice = level
    log(f"predict: time budget picks tta={choice}")
    return choice


def fmt_s(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def run_prediction(models: Sequence[nn.Module], model_cfgs: Sequence[dict[str, Any]],
                   weights: Sequence[float] | None, index_df: pd.DataFrame, out_dir: str | Path,
                   cfg: dict[str, Any], *, tta: str | None = None, probs_dir: str | Path | None = None,
                   identity: dict[str, Any] | None = None, overwrite: bool = False,
                   n_total: int | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write PRED_<id>.tif for every row of `index_df` that lacks one; returns a report dict.

    `models` are ready nn.Modules (on their device, eval mode), `model_cfgs` their configs (input
    settings), `cfg` the prediction settings (batch_size, workers, ensemble, precision, channels_last,
    tta, time_budget_s, skip_bad). `tta` given explicitly wins over `cfg`; otherwise a positive
    time_budget_s picks the level. `identity` describes the setup for the resume check.
    """
    out_dir = Path(out_dir)
    probs_dir = Path(probs_dir) if probs_dir else None
    w = normalise_weights(weights, len(models))
    n_total = n_total or len(index_df)
    identity = dict(identity or {"models": [type(m).__name__ for m in models]})
    identity.update(weights=[round(x, 6) for x in w], ensemble=cfg["ensemble"])
    budget = float(cfg.get("time_budget_s") or 0) if tta is None else 0.0
    if tta is None and budget <= 0:
        tta = cfg["tta"]
    if tta is not None:
        T.views(tta)  # validates the level before any work
        identity["tta"] = tta
    prev = prepare_out(out_dir, identity, index_df, overwrite, probs_dir, log)
    if tta is None and prev is not None and prev.get("tta"):
        tta = prev["tta"]
        log(f"predict: resuming with tta={tta} (chosen by the time budget on the first run)")
    ids = index_df["id"].astype(str).tolist()
    done = set() if overwrite else scan_done(index_df, out_dir, probs_dir)
    todo = index_df[~index_df["id"].astype(str).isin(done)].reset_index(drop=True)
    prev = prev or {}
    report: dict[str, Any] = {"out": str(out_dir), "n_ids": len(ids), "n_skipped_existing": len(done),
                              "n_written": 0, "tta": tta, "infer_s": float(prev.get("infer_s", 0.0)),
                              "n_timed": int(prev.get("n_timed", 0)), "fallback": []}
    if done:
        log(f"predict: {len(done)}/{len(ids)} PRED files already in {out_dir}: writing only the missing ones")
    if todo.empty:
        report["s_per_patch"] = report["infer_s"] / report["n_timed"] if report["n_timed"] else None
        log(f"predict: all {len(ids)} predictions already present in {out_dir}")
        return report

    device = _model_device(models[0])
    loader, group_of = build_loader(todo, model_cfgs, cfg, device)
    t0 = time.perf_counter()  # the measured inference time: data loading, networks, writing
    batches = iter(loader)
    first = next(batches)
    bad: list[tuple[str, str]] = list(first["bad"])
    while first["batches"] is None:  # skip_bad: a batch of only unreadable patches
        first = next(batches, None)
        if first is None:
            break
        bad += first["bad"]
    if tta is None:
        if first is not None:
            t_sel = time.perf_counter()
            tta = choose_tta(models, w, [first["batches"][g] for g in group_of], cfg, n_total, budget,
                             device, log)
            t0 += time.perf_counter() - t_sel  # the trial runs are not inference of the split
        else:
            tta = "none"
    identity["tta"] = tta
    report["tta"] = tta
    manifest = {**identity, "split_ids": len(ids), "infer_s": report["infer_s"],
                "n_timed": report["n_timed"], "complete": False,
                "probs_dir": str(probs_dir) if probs_dir else None}
    _write_json(out_dir / MANIFEST, manifest)
    if probs_dir is not None:
        _write_json(probs_dir / PROBS_MANIFEST, {"format": PROBS_FORMAT, **identity})

    n_views = len(T.views(tta))
    log(f"predict: {len(models)} model(s), weights {', '.join(f'{x:.3g}' for x in w)}, tta={tta} "
        f"({n_views} views, up to {n_views * int(cfg['batch_size'])} images per forward), "
        f"ensemble={cfg['ensemble']}, device {device}, precision "
        f"{'fp32' if device.type != 'cuda' else cfg['precision']}, {len(todo)} patches to write")
    writer = Writer(out_dir, probs_dir, threads=min(8, max(2, os.cpu_count() or 2)))
    writer.n_left = len(todo)
    kw = dict(tta=tta, ensemble=cfg["ensemble"], precision=cfg["precision"],
              channels_last=cfg["channels_last"])
    n_batches = len(loader)
    every = max(1, n_batches // 10)
    ok = False
    try:
        for i, item in enumerate(chain([first] if first is not None else [], batches)):
            if i > 0:
                bad += item["bad"]
            if item["batches"] is not None:
                batch = item["batches"]
                probs = predict_batch(models, w, [batch[g] for g in group_of], **kw)
                pred = probs.max(1).indices.to(torch.uint8).cpu().numpy()  # max: 5x faster than argmax on CPU
                q = quantise(probs).cpu().numpy() if probs_dir is not None else None
                for j, pid in enumerate(batch[0]["id"]):
                    writer.submit(str(pid), pred[j], None if q is None else q[j])
            if (i + 1) % every == 0 or i + 1 == n_batches:
                el = time.perf_counter() - t0
                k = len(writer.written) + len(writer.pending) + len(bad)
                log(f"predict: {k}/{len(todo)} patches, {el / max(k, 1):.3f} s/patch, "
                    f"ETA {fmt_s(el / max(k, 1) * (len(todo) - k))}")
        writer.close()
        if bad:
            report["fallback"] = _write_fallback(out_dir, todo, bad, log)
        ok = True
    except BaseException:
        writer.abort()
        raise
    finally:
        elapsed = time.perf_counter() - t0
        report["n_written"] = len(writer.written)
        report["infer_s"] += elapsed
        report["n_timed"] += len(writer.written)
        manifest.update(infer_s=report["infer_s"], n_timed=report["n_timed"])
        _write_json(out_dir / MANIFEST, manifest)
        if not ok:
            log(f"predict: stopped after {len(writer.written)} new files; re-run the same command to resume")

    written = set(writer.written) | set(report["fallback"])
    missing = [pid for pid in todo["id"].astype(str) if pid not in written]
    if missing:  # cannot happen unless a dataset dropped rows silently: never hand out an incomplete set
        raise PredictError(f"{len(missing)} patches got no prediction (first: {missing[:5]})")
    per = elapsed / max(len(writer.written), 1)
    report.update(elapsed_s=elapsed, s_per_patch=per, projected_test_s=per * N_TEST)
    manifest.update(complete=True)
    _write_json(out_dir / MANIFEST, manifest)
    log(f"predict: wrote {len(writer.written)} PRED files to {out_dir} in {fmt_s(elapsed)} "
        f"({per:.3f} s/patch); projected for the {N_TEST} test patches: {fmt_s(per * N_TEST)}")
    return report


def _write_fallback(out_dir: Path, todo: pd.DataFrame, bad: list[tuple[str, str]],
                    log: Callable[[str], None]) -> list[str]:
    """skip_bad=1: an unreadable test patch still needs a file: constant "other" (it adds no false
    positive to any scored class), and the id and error are appended to OUT/skipped.txt."""
    from src.submit import write_pred

    for pid, _ in bad:
        write_pred(out_dir, pid, np.full((512, 512), FALLBACK_CLASS, dtype=np.uint8))
    with open(out_dir / "skipped.txt", "a") as f:
        f.writelines(f"{pid}\t{err}\n" for pid, err in bad)
    log(f"predict: warning: {len(bad)} unreadable patches got the fallback class {FALLBACK_CLASS} "
        f"(listed with their errors in {out_dir / 'skipped.txt'})")
    return [pid for pid, _ in bad]


# ------------------------------------------------------------------------------------ combine level
def combine(dirs: Sequence[str | Path], out_dir: str | Path, ids: Sequence[str] | None = None,
            weights: Sequence[float] | None = None, *, probs_dir: str | Path | None = None,
            overwrite: bool = False, threads: int = 4, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Weighted average of saved probabilities (PROB_<id>.npz folders) -> PRED files, resumable.

    `ids` defaults to the ids of the first folder; every folder must hold every id."""
    dirs = [Path(d) for d in dirs]
    for d in dirs:
        if not d.is_dir():
            raise PredictError(f"{d}: no such probabilities folder")
    if ids is None:
        ids = sorted(p.name[5:-4] for p in dirs[0].glob("PROB_*.npz"))
        if not ids:
            raise PredictError(f"{dirs[0]}: no PROB_<id>.npz files")
    ids = [str(i) for i in ids]
    for d in dirs:
        lacking = [i for i in ids if not prob_path(d, i).is_file()]
        if lacking:
            raise PredictError(f"{d}: {len(lacking)} of {len(ids)} PROB files missing (first: {lacking[:3]})")
    w = normalise_weights(weights, len(dirs))
    out_dir = Path(out_dir)
    probs_dir = Path(probs_dir) if probs_dir else None
    index_df = pd.DataFrame({"id": ids})
    identity = {"combine": [str(d.resolve()) for d in dirs], "weights": [round(x, 6) for x in w]}
    prev = prepare_out(out_dir, identity, index_df, overwrite, probs_dir, log)
    done = set() if overwrite else scan_done(index_df, out_dir, probs_dir)
    todo = [i for i in ids if i not in done]
    manifest = {**identity, "split_ids": len(ids), "complete": False,
                "infer_s": float(prev.get("infer_s", 0)) if prev else 0.0,
                "n_timed": int(prev.get("n_timed", 0)) if prev else 0}
    _write_json(out_dir / MANIFEST, manifest)
    if probs_dir is not None:
        _write_json(probs_dir / PROBS_MANIFEST, {"format": PROBS_FORMAT, **identity})
    writer = Writer(out_dir, probs_dir, threads=threads)
    writer.n_left = len(todo)

    def one(pid: str) -> tuple[str, np.ndarray, np.ndarray | None]:
        acc = None
        for d, wi in zip(dirs, w):
            q = load_prob(prob_path(d, pid)).astype(np.float32)
            if acc is not None and q.shape != acc.shape:
                raise DataError(f"{prob_path(d, pid)}: shape {q.shape} differs from the other "
                                f"folders' {acc.shape}")
            acc = q * wi if acc is None else acc + q * wi
        pred = acc.argmax(0).astype(np.uint8)
        return pid, pred, (np.rint(acc).astype(np.uint8) if probs_dir is not None else None)

    t0 = time.perf_counter()
    try:
        with ThreadPoolExecutor(threads) as pool:
            for pid, pred, q in pool.map(one, todo):
                writer.submit(pid, pred, q)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    elapsed = time.perf_counter() - t0
    manifest.update(complete=True)
    _write_json(out_dir / MANIFEST, manifest)
    log(f"predict: combined {len(dirs)} probability folders (weights {', '.join(f'{x:.3g}' for x in w)}) "
        f"into {len(writer.written)} PRED files in {out_dir} ({fmt_s(elapsed)}); {len(done)} already present")
    return {"out": str(out_dir), "n_ids": len(ids), "n_written": len(writer.written),
            "n_skipped_existing": len(done), "infer_s": manifest["infer_s"], "n_timed": manifest["n_timed"]}


# --------------------------------------------------------------------------------------- top level
def resolve_checkpoints(items: Sequence[str | Path], weights: Sequence[float] | None
                        ) -> tuple[list[Path], list[float] | None]:
    """Checkpoint files from files and run folders (every best.pt under a folder), with per-model weights.

    Weights may be given per checkpoint, or per --runs item (an item's weight is split evenly between
    the checkpoints found under it, so a 5-fold run and a single model at 1,1 weigh the same)."""
    from src.checkpoint import find_checkpoints

    found: list[Path] = []
    item_of: list[int] = []
    seen: set[Path] = set()
    for k, item in enumerate(items):
        for p in find_checkpoints(item):
            if p.resolve() not in seen:
                seen.add(p.resolve())
                found.append(p)
                item_of.append(k)
    if weights is None:
        return found, None
    weights = [float(x) for x in weights]
    if len(weights) == len(found):
        return found, weights
    if len(weights) == len(items):
        count = [item_of.count(k) for k in range(len(items))]
        return found, [weights[k] / count[k] for k in item_of]
    raise PredictError(f"{len(weights)} weights for {len(items)} --runs items / {len(found)} checkpoints: "
                       "give one weight per item or per checkpoint")


def load_split_index(cfg: dict[str, Any], split: str, index: str | Path | None = None) -> pd.DataFrame:
    from src.index import load_index

    path = Path(index) if index else Path(cfg["data_dir"]) / f"index_{split}.csv"
    if not path.is_file():
        raise PredictError(f"{path}: index not found (run `make index`, or pass data_dir=... / --index)")
    df = load_index(path)
    if df.empty:
        raise PredictError(f"{path}: the index has no rows")
    return df


def has_labels(index_df: pd.DataFrame) -> bool:
    return "msk_path" in index_df.columns and bool((index_df["msk_path"].astype(str) != "").all())


def check_settings(cfg: dict[str, Any]) -> None:
    """Prediction settings the config types cannot check; one-line errors before any model is loaded."""
    if cfg["tta"] not in T.LEVELS:
        raise ConfigError(f"tta: expected one of {', '.join(T.LEVELS)}, got {cfg['tta']!r}")
    if cfg["ensemble"] not in ("probs", "logits"):
        raise ConfigError(f"ensemble: expected probs or logits, got {cfg['ensemble']!r}")
    if cfg["precision"] not in ("auto", "bf16", "fp16", "fp32"):
        raise ConfigError(f"precision: expected auto, bf16, fp16 or fp32, got {cfg['precision']!r}")
    if cfg["batch_size"] < 1 or cfg["workers"] < 0 or cfg["time_budget_s"] < 0:
        raise ConfigError("need batch_size >= 1, workers >= 0 and time_budget_s >= 0")


def one_line(err: BaseException) -> str:
    """A DataError re-raised by a DataLoader worker carries the worker's traceback: keep its last line."""
    msg = str(err)
    if "Original Traceback" in msg:
        last = [ln for ln in msg.strip().splitlines() if ln.strip()][-1]
        msg = last.split(": ", 1)[1] if last.split(": ", 1)[0].endswith("Error") else last
    return msg


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def predict(runs: Sequence[str | Path], out_dir: str | Path, *, split: str = "test",
            weights: Sequence[float] | None = None, tta: str | None = None,
            overrides: dict[str, Any] | list[str] | None = None, probs_dir: str | Path | None = None,
            index: str | Path | None = None, overwrite: bool = False, device: str = "auto",
            log: Callable[[str], None] = print) -> dict[str, Any]:
    """Load the checkpoints under `runs`, predict the split's index into `out_dir`; report dict."""
    from src.checkpoint import load_checkpoint, load_for_inference

    ov = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    paths, w = resolve_checkpoints(runs, weights)
    dev = pick_device(device)
    # settings are checked (one-line errors) before any model is built
    first_cfg = resolve(ov, dict(load_checkpoint(paths[0])["config"]), "command line")
    check_settings({**first_cfg, **({"tta": tta} if tta else {})})
    index_df = load_split_index(first_cfg, split, index)
    models, cfgs = [], []
    for p in paths:
        model, mcfg = load_for_inference(p, dev)
        if first_cfg.get("channels_last"):  # faster on GPU, and on CPU too (oneDNN, ~1.3x measured)
            model = model.to(memory_format=torch.channels_last)
        models.append(model)
        cfgs.append(resolve(ov, mcfg, "command line"))
        log(f"predict: loaded {p} (arch {mcfg.get('arch')}, encoder {mcfg.get('encoder')}, "
            f"bands {','.join(map(str, mcfg.get('bands', [])))}, s2 {mcfg.get('use_s2')})")
    if dev.type == "cuda":  # fixed 512x512 inputs: let cuDNN pick its fastest kernels; TF32 for fp32 runs
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    identity = {"models": [{"path": str(p.resolve()), "size": p.stat().st_size,
                            "mtime_ns": p.stat().st_mtime_ns} for p in paths]}
    report = run_prediction(models, cfgs, w, index_df, out_dir, first_cfg, tta=tta, probs_dir=probs_dir,
                            identity=identity, overwrite=overwrite, log=log)
    report["index_df"] = index_df
    return report


def submit_and_score(out_dir: Path, index_df: pd.DataFrame, name: str, infer_s: float | None,
                     baseline_s: float | None, submissions: str | Path = "submissions",
                     log: Callable[[str], None] = print) -> dict[str, Any]:
    """Zip the PRED folder into submissions/ (make_zip validates it against the split's ids first), then
    score the zip when the split has labels: mIoU printed, `<out>_scores.json` and `<out>_confusion.png`
    written beside the folder (the names `make evaluate` uses). Times go in the zip name only when the
    baseline time is known (make_zip wants both or neither)."""
    from src import submit

    ids = index_df["id"].astype(str).tolist()
    your = infer_s if baseline_s is not None else None
    try:
        zip_path = submit.make_zip(out_dir, name, submissions, baseline_time=baseline_s, your_time=your,
                                   ids=ids)
    except submit.SubmissionError as err:
        raise PredictError(str(err)) from None
    except FileExistsError as err:
        raise PredictError(str(err)) from None
    log(f"predict: submission {zip_path} ({len(ids)} predictions, validated)")
    out: dict[str, Any] = {"zip": str(zip_path)}
    if has_labels(index_df):
        from src.evaluate import evaluate, save_confusion_png, save_json
        from src.metrics import format_table, ious_from_confusion

        res = evaluate(zip_path, index_df)
        matrix = np.asarray(res["confusion"], dtype=np.int64)
        log(format_table(ious_from_confusion(matrix), support=matrix.sum(axis=1)))
        base = Path(out_dir)
        out["scores"] = str(base.with_name(base.name + "_scores.json"))
        out["confusion_png"] = str(base.with_name(base.name + "_confusion.png"))
        save_json(res, out["scores"])
        save_confusion_png(matrix, out["confusion_png"], title=f"{zip_path.name}: mIoU {res['miou']:.4f}")
        out["miou"] = res["miou"]
        log(f"predict: mIoU {res['miou']:.4f} on {len(ids)} labelled patches; "
            f"scores {out['scores']}, confusion {out['confusion_png']}")
    return out


def _split_runs_and_overrides(items: list[str], overrides: list[str]) -> tuple[list[str], list[str]]:
    """argparse's nargs='+' swallows key=value tokens placed after --runs/--combine: move them back."""
    keep = [x for x in items if not ("=" in x and not Path(x).exists())]
    return keep, overrides + [x for x in items if x not in keep]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m src.predict", description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--runs", nargs="+", help="run folders (every best.pt under them), checkpoint files")
    src.add_argument("--combine", nargs="+", help="folders of saved probabilities (--save-probs) to ensemble")
    ap.add_argument("--split", default="test", help="index split to predict: DATA/index_<split>.csv")
    ap.add_argument("--index", help="explicit index CSV (default: data_dir/index_<split>.csv)")
    ap.add_argument("--out", required=True, help="folder for PRED_<id>.tif (re-running resumes)")
    ap.add_argument("--tta", choices=T.LEVELS, help="none | flip (3 views) | d4 (8 views); default: cfg tta")
    ap.add_argument("--weights", help="comma-separated weights: one per --runs item, per checkpoint, "
                    "or per --combine folder")
    ap.add_argument("--save-probs", help="also save uint8 softmax per patch here (PROB_<id>.npz)")
    ap.add_argument("--submit", metavar="NAME", help="validate and zip into submissions/ (approach name)")
    ap.add_argument("--baseline-time", type=float, help="baseline inference seconds, for the zip name")
    ap.add_argument("--submit-dir", default="submissions", help="where --submit puts the zip")
    ap.add_argument("--overwrite", action="store_true", help="delete this split's PRED files in --out first")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides (data_dir=..., batch_size=...)")
    args = ap.parse_args(argv)
    try:
        weights = [float(x) for x in args.weights.split(",")] if args.weights else None
    except ValueError:
        print(f"predict: error: --weights must be numbers separated by commas, got {args.weights!r}",
              file=sys.stderr)
        raise SystemExit(2) from None
    try:
        if args.runs:
            runs, overrides = _split_runs_and_overrides(args.runs, args.overrides)
            report = predict(runs, args.out, split=args.split, weights=weights, tta=args.tta,
                             overrides=overrides, probs_dir=args.save_probs, index=args.index,
                             overwrite=args.overwrite, device=args.device)
            index_df = report["index_df"]
        else:
            dirs, overrides = _split_runs_and_overrides(args.combine, args.overrides)
            cfg = resolve(parse_overrides(overrides))
            index_df = None
            if args.index or (Path(cfg["data_dir"]) / f"index_{args.split}.csv").is_file():
                index_df = load_split_index(cfg, args.split, args.index)
            report = combine(dirs, args.out, None if index_df is None else index_df["id"].tolist(), weights,
                             probs_dir=args.save_probs, overwrite=args.overwrite)
        if args.submit:
            if index_df is None:
                raise PredictError("--submit needs the split's index (data_dir=... or --index)")
            infer_s = None
            if report.get("n_timed"):
                infer_s = report["infer_s"] / report["n_timed"] * report["n_ids"]
            submit_and_score(Path(args.out), index_df, args.submit, infer_s, args.baseline_time,
                             args.submit_dir)
    except ConfigError as err:
        exit_on_config_error(err)
    except (PredictError, DataError) as err:
        print(f"predict: error: {one_line(err)}", file=sys.stderr)
        raise SystemExit(1) from None
    except OSError as err:
        if not _is_disk_full(err):
            raise
        print(f"predict: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
