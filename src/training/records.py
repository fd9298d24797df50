"""What a training run leaves behind: its folder, metrics.csv, curves.png and live tracking (TensorBoard,
W&B / MLflow on request).

What a training run leaves in runs/<name>/fold<k>/: where that folder is, metrics.csv and curves.png,
and setting an earlier run aside on a fresh start (so an old best.pt is never taken for the new run's).

Live experiment tracking: TensorBoard event files in the run folder, optional W&B / MLflow on request.

Why: metrics.csv and curves.png are read after a run; while it runs (hours on a GPU) people watch
TensorBoard, the tool this field already uses. `Tracker` is the whole interface, so the training loop
needs a handful of lines: `Tracker.open` once, `step` every `log_every` optimizer steps (loss, lr),
`epoch` at each epoch end (the history row, each held-out domain's mIoU, a few validation patches drawn
as RGB | truth | prediction in the official colours), `close` at the end.

- Everything is keyed by the optimizer step (epoch values at the epoch's last step), so a resumed run
  opens with `purge_step` = its step and TensorBoard drops the events of the interrupted epoch instead
  of drawing it twice; a fresh start (step 0) hides any orphaned events left in the folder.
- Only rank 0 tracks (`enabled`); a disabled Tracker does nothing, so callers need no `if`.
- `loggers=wandb,mlflow` adds those services; each is imported only when asked and a missing package
  is a one-line ConfigError. Nothing is ever contacted unless a setting names it."""
from __future__ import annotations

import atexit
import csv
import math
import os
import resource
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from src.core.files import atomic_write, save_figure, write_text
from src.core.flair import BAND_NAMES, band_indices, colorize
from src.core.settings import Settings
from src.data.normalize import norm_stats
from src.scoring.metrics import IOU_COLS, miou_from_confusion

CSV_COLS = ["epoch", "step", "lr", "train_loss", "train_s2_loss", "val_loss", "miou", *IOU_COLS,
            "img_s", "epoch_s", "nan_steps", "val_skipped"]
RUN_FILES = ("config.yaml", "metrics.csv", "curves.png", "best.pt", "last.pt", "skipped.tsv", "domains.csv",
             "domains.png")
TB_EVENTS = "events.out.tfevents.*"  # TensorBoard event files (src.training.records), set aside with the rest


def mark_latest(cfg: Settings) -> Path:
    """<runs_dir>/latest holds the name of the run started last: `make predict`, `submit`, `evaluate` and
    `export` default to it when neither NAME, RUNS nor CONFIG is given (the Makefile says so in one line)."""
    path = Path(cfg.runs_dir) / "latest"
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text(path, cfg.name + "\n")


def set_aside_previous_run(run_dir: Path, log: Callable[[str], None] = print) -> None:
    """A fresh start (--resume 0) in a used folder moves the old outputs to previous/ (replacing
    what was there), so an old best.pt is never mistaken for the new run's, nor silently lost."""
    old = [run_dir / name for name in RUN_FILES if (run_dir / name).exists()]
    old += sorted(run_dir.glob(TB_EVENTS))
    if not any(p.suffix == ".pt" for p in old):
        return
    keep = run_dir / "previous"
    keep.mkdir(exist_ok=True)
    for p in keep.iterdir():
        p.unlink()
    for p in old:
        os.replace(p, keep / p.name)
    log(f"note: {run_dir} held an earlier run: moved to {keep}/ (use --resume 1 to continue a run)")


def _blank_nan(v: Any) -> Any:
    return "" if isinstance(v, float) and math.isnan(v) else v


def write_metrics(history: list[dict[str, Any]], run_dir: Path, plot: bool = True) -> None:
    """metrics.csv (one row per epoch, rewritten whole so a resumed run stays consistent) + curves.png.

    `plot=False` leaves curves.png as it is: drawing it costs ~0.4 s, as much as a short CPU epoch, and
    only validated epochs add a point to its mIoU panel (TensorBoard has the live curves)."""
    with atomic_write(run_dir / "metrics.csv") as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLS, extrasaction="ignore")
            writer.writeheader()
            for row in history:
                writer.writerow({k: _blank_nan(v) for k, v in row.items()})
    if plot or not (run_dir / "curves.png").exists():
        plot_curves(history, run_dir / "curves.png")


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key: str) -> tuple[list[int], list[float]]:  # validated epochs only (val_every)
        rows = [r for r in history if isinstance(r[key], float) and math.isfinite(r[key])]
        return [r["epoch"] for r in rows], [r[key] for r in rows]

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot(*series("train_loss"), "o-", label="train")
    ax1.plot(*series("val_loss"), "o-", label="validation")
    ax1.set_yscale("log")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.legend()
    ax2.plot(*series("miou"), "o-", color="C2")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("validation mIoU (classes 0..11)")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


# history row key -> tag (the remaining row keys: iou_* -> iou/<k>_<name>; others are not scalars)
EPOCH_TAGS = {"train_loss": "loss/train", "train_s2_loss": "loss/train_s2", "val_loss": "loss/val",
              "miou": "val/miou", "val_skipped": "val/skipped_patches",
              "img_s": "speed/img_s", "epoch_s": "speed/epoch_s", "nan_steps": "train/nan_steps",
              "epoch": "train/epoch"}
SAMPLE_SIDE = 256  # validation pictures are shown at most this wide per panel (small event files)


# ----------------------------------------------------------------------------- validation pictures
def display_rgb(image: Any, cfg: Settings) -> np.ndarray:
    """(C, H, W) model input -> (H, W, 3) uint8: raw uint8 band values as they are, float inputs
    de-normalised with cfg's statistics (src.data.normalize); without R, G and B the first band in grey."""
    img = torch.as_tensor(image).detach().cpu()
    if img.dtype == torch.uint8:
        values = img.numpy().astype(np.float32)
    else:
        mean, std = norm_stats(cfg.bands, cfg.norm)
        values = img.float().numpy() * std[:, None, None] + mean[:, None, None]
    names = [BAND_NAMES[i] for i in band_indices(cfg.bands)]
    rgb = [names.index(b) for b in ("R", "G", "B")] if {"R", "G", "B"} <= set(names) else [0, 0, 0]
    return np.ascontiguousarray(np.clip(np.moveaxis(values[rgb], 0, -1), 0, 255).astype(np.uint8))


def sample_grid(samples: Mapping[str, Any], cfg: Settings, max_n: int = 4,
                side: int = SAMPLE_SIDE) -> np.ndarray | None:
    """One (H, W, 3) uint8 picture: a row per patch, RGB | truth | prediction in the official colours.

    `samples` holds "image" (N, C, H, W), "mask" and "pred" (N, H, W) (tensors or arrays, or lists of
    per-patch ones); ignored mask pixels (255) show black like "other". Panels are subsampled to at most
    `side` pixels. None when there is nothing to draw."""
    n = min(len(samples.get("image", ())), max_n)
    if n == 0:
        return None
    rows = []
    for k in range(n):
        image = torch.as_tensor(samples["image"][k])
        step = max(1, math.ceil(max(image.shape[-2:]) / side))
        rgb = display_rgb(image[:, ::step, ::step], cfg)  # subsampled first: 1/step^2 of the work
        mask = np.asarray(torch.as_tensor(samples["mask"][k]).cpu())[::step, ::step]
        pred = np.asarray(torch.as_tensor(samples["pred"][k]).cpu())[::step, ::step]
        panels = [rgb, colorize(np.where(mask == 255, 12, mask)), colorize(pred)]
        gap = np.full((panels[0].shape[0], 4, 3), 255, np.uint8)
        rows.append(np.concatenate([panels[0], gap, panels[1], gap, panels[2]], axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    return np.concatenate(rows, axis=0)[:-4]


def memory_scalars(device: torch.device | None) -> dict[str, float]:
    """Peak memory since the last call: GPU allocated/reserved on CUDA (peak reset, so it is per epoch),
    else the process's peak resident size (Linux reports KiB, macOS bytes)."""
    if device is not None and device.type == "cuda":
        out = {"memory/gpu_max_allocated_gb": torch.cuda.max_memory_allocated(device) / 2**30,
               "memory/gpu_max_reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30}
        torch.cuda.reset_peak_memory_stats(device)
        return out
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"memory/max_rss_gb": rss / (2**30 if sys.platform == "darwin" else 2**20)}


def epoch_scalars(row: Mapping[str, Any], domains: Sequence[str] = (),
                  per_domain: Any = None) -> dict[str, float]:
    """Tag -> value of an epoch's history row (NaN left out: not validated that epoch) and, when given,
    each domain's mIoU from its (D, 13, 13) confusion stack."""
    out = {tag: float(row[key]) for key, tag in EPOCH_TAGS.items() if key in row}
    for k, col in enumerate(IOU_COLS):  # iou/00_building ... (zero-padded: TensorBoard sorts tags as text)
        if col in row:
            out[f"iou/{k:02d}_{col.split('_', 2)[2]}"] = float(row[col])
    if per_domain is not None:
        stack = np.asarray(per_domain)
        for d, name in enumerate(domains):
            out[f"domain_miou/{name}"] = miou_from_confusion(stack[d])
    return {k: v for k, v in out.items() if math.isfinite(v)}


# ----------------------------------------------------------------------------- the extra loggers
class _Wandb:
    """Weights & Biases (WANDB_PROJECT, default flair2-kit): one W&B run per training process."""

    def __init__(self, run_dir: Path, cfg: Settings, title: str):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "flair2-kit"), name=title,
                              config=cfg.to_dict(), dir=str(run_dir))

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def image(self, tag: str, picture: np.ndarray, step: int) -> None:
        self.run.log({tag: self.wandb.Image(picture)}, step=step)

    def close(self) -> None:
        self.run.finish()


class _Mlflow:
    """MLflow (MLFLOW_TRACKING_URI, default ./mlruns): settings as params, scalars as metrics."""

    def __init__(self, run_dir: Path, cfg: Settings, title: str):
        import mlflow

        self.mlflow = mlflow
        mlflow.start_run(run_name=title)
        mlflow.log_params({k: str(v)[:250] for k, v in cfg.to_dict().items()})

    def log(self, values: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(values, step=step)

    def image(self, tag: str, picture: np.ndarray, step: int) -> None:
        self.mlflow.log_image(picture, f"{tag}/step_{step:08d}.png")

    def close(self) -> None:
        self.mlflow.end_run()


# ----------------------------------------------------------------------------- the tracker
def wait_for_a_new_second(run_dir: Path) -> None:
    """TensorBoard reads a folder's event files in name order, and a name starts with its creation second
    (then host, pid and a counter that does not sort as a number): a writer opened in the same second as an
    earlier one could sort before it, and its purge of the interrupted epoch would be ignored. So a new
    writer waits, at most a second, until its name sorts after every file already there."""
    stamps = [int(p.name.split(".")[3]) for p in run_dir.glob("events.out.tfevents.*")
              if len(p.name.split(".")) > 3 and p.name.split(".")[3].isdigit()]
    while stamps and int(time.time()) <= max(stamps):
        time.sleep(0.05)


class Tracker:
    """TensorBoard (+ extra loggers) for one training run; every method is a no-op when disabled."""

    def __init__(self, writer: Any = None, extras: Sequence[Any] = (), cfg: Settings | None = None,
                 device: torch.device | None = None):
        self.writer, self.extras = writer, list(extras)
        self.cfg, self.device = cfg, device
        self.enabled = writer is not None or bool(self.extras)

    @classmethod
    def open(cls, run_dir: str | Path, cfg: Settings, enabled: bool = True,
             resume_step: int | None = None, device: torch.device | None = None) -> Tracker:
        """Start tracking into `run_dir` (event files beside metrics.csv). `resume_step`: the optimizer
        step last.pt holds when resuming; the interrupted process's events after it are dropped (and on
        a fresh start, any orphaned ones). Closed at exit if the caller does not get to `close`."""
        if not enabled:
            return cls()
        run_dir = Path(run_dir)
        writer = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            first = 0 if resume_step is None else resume_step + 1
            wait_for_a_new_second(run_dir)
            writer = SummaryWriter(log_dir=str(run_dir), purge_step=first, flush_secs=30)
            if resume_step is None:
                text = "\n".join(f"    {k}: {v}" for k,
                                 v in cfg.to_dict().items())  # indented: markdown code block
                writer.add_text("config", text, 0)
        title = f"{cfg.name}/{run_dir.name}"
        makers = {"wandb": _Wandb, "mlflow": _Mlflow}
        extras = [makers[n](run_dir, cfg, title) for n in cfg.logger_names]
        tracker = cls(writer, extras, cfg, device)
        atexit.register(tracker.close)  # an error that ends the run still flushes its last events
        return tracker

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """Log tag -> value pairs at an optimizer step."""
        if not self.enabled or not values:
            return
        if self.writer is not None:
            for tag, v in values.items():
                self.writer.add_scalar(tag, v, step)
        for e in self.extras:
            e.log(dict(values), step)

    def step(self, step: int, **values: float) -> None:
        """Per-step training values, e.g. `step(run.step, loss=..., lr=...)` -> train/loss, train/lr."""
        self.scalars({f"train/{k}": float(v) for k, v in values.items()}, step)

    def image(self, tag: str, picture: np.ndarray | None, step: int) -> None:
        """An (H, W, 3) uint8 picture."""
        if not self.enabled or picture is None:
            return
        if self.writer is not None:
            self.writer.add_image(tag, picture, step, dataformats="HWC")
        for e in self.extras:
            e.image(tag, picture, step)

    def epoch(self, row: Mapping[str, Any], domains: Sequence[str] = (), per_domain: Any = None,
              samples: Mapping[str, Any] | None = None) -> None:
        """An epoch end: the history row's scalars (losses, lr, mIoU, per-class IoU, img/s, epoch s),
        peak memory, each domain's mIoU and the validation pictures, at the row's optimizer step."""
        if not self.enabled:
            return
        step = int(row["step"])
        self.scalars({**epoch_scalars(row, domains, per_domain), **memory_scalars(self.device)}, step)
        if samples:
            self.image("val/rgb_truth_prediction", sample_grid(samples, self.cfg,
                                                               self.cfg.tb_images), step)
        if self.writer is not None:
            self.writer.flush()  # an epoch's values are visible at once, not after flush_secs

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        for e in self.extras:
            e.close()
        self.writer, self.extras, self.enabled = None, [], False
