"""Training throughput (images/s) and peak memory of a config on synthetic in-memory batches.

No disk and no data loading: this measures the model step alone (the batch's trip to the device and its
normalisation there, forward, loss, backward, clip, AdamW, EMA), with the same precision / channels_last
/ compile settings as src.train, so data-loading bottlenecks can be told apart from model cost.
bench/gpu_check.sh measures the same on a GPU for every preset, and with the real DataLoader.

    python bench/train_bench.py                                  # CPU defaults (demo + U-Net R34, small)
    python bench/train_bench.py --config configs/utt_r34.yaml --batch-size 8 --crop 512 --steps 20
    python bench/train_bench.py --config configs/unet_r34.yaml precision=bf16 compile=true

On a GPU with no --config the defaults are U-Net R34 and U-T&T at bf16 on 512x512 crops.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.core.config import exit_on_config_error, load_settings  # noqa: E402
from src.core.errors import ConfigError  # noqa: E402
from src.core.runtime import amp_dtype as precision_dtype  # noqa: E402
from src.core.runtime import autocast, needs_grad_scaler, precision_name  # noqa: E402
from src.models.flair_model import build_model  # noqa: E402
from src.models.losses import Criterion  # noqa: E402
from src.training.state import (
    EMA,  # noqa: E402
    param_groups,  # noqa: E402
)
from src.training.validation import to_device  # noqa: E402

S2_DATES = 12  # monthly composites


def synthetic_batch(cfg: dict, batch: int, crop: int) -> dict[str, torch.Tensor]:
    """A raw batch with the dataset's keys, dtypes and shapes (uint8 image and mask), random values."""
    g = torch.Generator().manual_seed(0)
    out = {"image": torch.randint(0, 256, (batch, len(cfg.bands), crop, crop), generator=g,
                                  dtype=torch.uint8),
           "mask": torch.randint(0, 13, (batch, crop, crop), generator=g, dtype=torch.uint8)}
    if cfg.use_s2:
        s = cfg.s2_size
        out["s2"] = (torch.rand(batch, S2_DATES, 10, s, s, generator=g) * 0.3).half()
        out["s2_days"] = torch.arange(S2_DATES).repeat(batch, 1) * 30 - 120
        out["s2_pad"] = torch.zeros(batch, S2_DATES, dtype=torch.bool)
    return out


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (Linux: KiB)


def bench(cfg: dict, batch: int, crop: int, steps: int, warmup: int) -> dict:
    """Images/s over `steps` timed optimizer steps after `warmup` untimed ones."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    amp_dtype = precision_dtype(cfg.precision, device)
    use_scaler = needs_grad_scaler(cfg.precision, device)
    model = build_model(cfg.with_values(encoder_weights="none")).to(device).train()
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = EMA(model, cfg.ema) if cfg.ema > 0 else None
    run_model = torch.compile(model) if cfg.compile else model
    criterion = Criterion(cfg).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    data = synthetic_batch(cfg, batch, crop)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def one_step() -> None:
        image, extra, mask, _ = to_device(data, cfg, device, amp_dtype, cfg.channels_last)
        with autocast(device, amp_dtype):
            out = run_model(image, **extra)
        loss, _ = criterion(out, mask)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(model)

    for _ in range(warmup):
        one_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        one_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    return {"arch": cfg.arch, "encoder": cfg.encoder, "fusion": cfg.fusion, "device": str(device),
            "precision": precision_name(amp_dtype), "threads": torch.get_num_threads(),
            "batch": batch, "crop": crop, "steps": steps, "img_s": round(batch * steps / elapsed, 2),
            "s_per_step": round(elapsed / steps, 3), "peak_mem_mb": round(peak_memory_mb(device)),
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", action="append", help="config file (repeatable); default: see above")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 2 on CPU, 8 on GPU")
    parser.add_argument("--crop", type=int, default=None, help="default: 128 on CPU, 512 on GPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 5 CPU, 20 GPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default 2 CPU, 5 GPU)")
    parser.add_argument("--json", default=None, help="append results as JSON lines to this file")
    parser.add_argument("overrides", nargs="*", help="key=value settings for every config")
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    configs = args.config or (["configs/unet_r34.yaml", "configs/utt_r34.yaml"] if gpu
                              else ["configs/demo.yaml", "configs/unet_r34.yaml"])
    batch = args.batch_size or (8 if gpu else 2)
    crop = args.crop or (512 if gpu else 128)
    steps = args.steps or (20 if gpu else 5)
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 2)
    try:
        cfgs = [(c, load_settings(c, ["precision=bf16", *args.overrides] if gpu and not args.config
                                else args.overrides)) for c in configs]
    except ConfigError as err:
        exit_on_config_error(err)
    print(f"train bench: synthetic batches {batch}x{crop}x{crop}, {steps} timed steps after {warmup}")
    for path, cfg in cfgs:
        res = {"config": path, **bench(cfg, batch, crop, steps, warmup)}
        print(f"{path:28s} {res['arch']}/{res['encoder']} fusion={res['fusion']} {res['device']} "
              f"{res['precision']}: {res['img_s']:.2f} img/s ({res['s_per_step']:.3f} s/step), "
              f"peak memory {res['peak_mem_mb']} MB, {res['params_m']} M params")
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
