"""Cost of live tracking (src.training.records: TensorBoard event files) next to a training step: is logging
noise?

Measured directly, because on a shared machine two timed training runs differ by more than the logging:
- `Tracker.step` (loss, lr, s2_loss: what the loop logs every `log_every` steps), averaged over many calls;
- `Tracker.epoch` (about 30 scalars, peak memory, the 4-patch RGB | truth | prediction picture at 512 px
  as PNG, and the flush), averaged over a few calls;
- a training step of the config's model on random in-memory batches (forward, loss, backward, AdamW),
  timed with and without a `Tracker.step` after each one, interleaved (A/B), to show the difference is
inside the step-to-step spread. The aerial-only variant of the model is used (fusion=none): the cheapest step,
so the ratio is an upper bound.

    python bench/tracking_bench.py                         # configs/demo.yaml at its batch and crop size
    python bench/tracking_bench.py --config configs/unet_r34.yaml --batch-size 8 --crop 512 --steps 10
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.core.config import exit_on_config_error, load_settings  # noqa: E402
from src.core.errors import ConfigError  # noqa: E402
from src.models.flair_model import build_model  # noqa: E402
from src.models.losses import Criterion  # noqa: E402
from src.training.records import (
    IOU_COLS,  # noqa: E402
    Tracker,  # noqa: E402
)


def row(step: int) -> dict:
    """A validated epoch's history row (every column the tracker draws)."""
    return {"epoch": 1, "step": step, "lr": 1e-3, "train_loss": 1.0, "train_s2_loss": 0.5, "val_loss": 1.1,
            "miou": 0.5, **{c: 0.5 for c in IOU_COLS}, "img_s": 10.0, "epoch_s": 60.0, "nan_steps": 0,
            "val_skipped": 0}


def picture_samples(bands: int, n: int = 4, size: int = 512) -> dict[str, torch.Tensor]:
    """Validation samples shaped like real ones: smooth images and blocky label maps (pure noise would
    make the PNG encoding, the main cost of a picture, several times slower than on real patches)."""
    g = torch.Generator().manual_seed(0)
    image = torch.nn.functional.interpolate(torch.randn(n, bands, 16, 16, generator=g), size=size,
                                            mode="bilinear")
    blocks = [torch.randint(0, 13, (n, 8, 8), generator=g) for _ in range(2)]
    mask, pred = (b.repeat_interleave(size // 8, 1).repeat_interleave(size // 8, 2) for b in blocks)
    return {"image": image, "mask": mask, "pred": pred}


def time_calls(fn, n: int) -> float:
    """Mean seconds per call of fn(i) over n calls."""
    t0 = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - t0) / n


def model_steps(cfg: dict, batch: int, crop: int, steps: int, tracker: Tracker) -> tuple[list, list]:
    """Seconds of `steps` training steps without and with a Tracker.step after each, interleaved."""
    torch.manual_seed(0)
    model = build_model(cfg.with_values(encoder_weights="none", fusion="none", use_s2=False)).train()
    criterion = Criterion(cfg.with_values(fusion="none"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    image = torch.randn(batch, len(cfg.bands), crop, crop)
    mask = torch.randint(0, 13, (batch, crop, crop))

    def one(log: bool, i: int) -> float:
        t0 = time.perf_counter()
        loss, _ = criterion(model(image), mask)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())  # the loop reads the loss for its bar anyway
        if log:
            tracker.step(i, loss=value, lr=1e-4, s2_loss=value)
        return time.perf_counter() - t0

    one(False, 0)  # warm-up
    plain, logged = [], []
    for i in range(steps):
        plain.append(one(False, i))
        logged.append(one(True, i))
    return plain, logged


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the config's batch_size")
    parser.add_argument("--crop", type=int, default=None, help="default: the config's crop_size")
    parser.add_argument("--steps", type=int, default=6, help="A/B training steps of each kind")
    parser.add_argument("--calls", type=int, default=3000, help="Tracker.step calls timed")
    parser.add_argument("overrides", nargs="*", help="key=value settings")
    args = parser.parse_args(argv)
    try:
        cfg = load_settings(args.config, args.overrides)
    except ConfigError as err:
        exit_on_config_error(err)
    args.batch_size = args.batch_size or cfg.batch_size
    args.crop = args.crop or cfg.crop_size
    with tempfile.TemporaryDirectory() as tmp:
        tracker = Tracker.open(tmp, cfg.with_values(tensorboard=True, loggers=""))
        per_step = time_calls(lambda i: tracker.step(i, loss=1.0 / (i + 1), lr=1e-3, s2_loss=0.5), args.calls)
        samples = picture_samples(len(cfg.bands))
        per_epoch = time_calls(lambda i: tracker.epoch(row(args.calls + i), ["D1", "D2"],
                                                       torch.ones(2, 13, 13), samples), 5)
        plain, logged = model_steps(cfg, args.batch_size, args.crop, args.steps, tracker)
        tracker.close()
        size = sum(p.stat().st_size for p in Path(tmp).iterdir())
    step_s = statistics.median(plain)
    print(f"tracking bench ({args.config}, aerial-only model, batch {args.batch_size}x{args.crop}, "
          f"{torch.get_num_threads()} threads)")
    print(f"  Tracker.step (3 scalars):            {per_step * 1e6:8.1f} us per call = "
          f"{100 * per_step / step_s:.4f} % of a training step")
    print(f"  Tracker.epoch (scalars, 4x512 picture, flush): {per_epoch * 1e3:6.1f} ms per epoch")
    print(f"  training step, median of {args.steps}:    {step_s:8.3f} s without logging, "
          f"{statistics.median(logged):.3f} s with Tracker.step "
          f"(step-to-step spread {min(plain + logged):.3f}..{max(plain + logged):.3f} s)")
    print(f"  event file: {size / 1e6:.2f} MB for {args.calls + args.steps} steps and 5 epochs")


if __name__ == "__main__":
    main()
