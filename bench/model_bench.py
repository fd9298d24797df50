"""Model presets: parameter count, forward (inference) and train-step time at a given crop size.

Why: picks between presets (and sizes the time budget of predict) need real figures per machine.
CPU by default here; on a GPU it uses bf16 autocast and channels_last, like the trainer.

  python bench/model_bench.py                               # all presets, 512 px, batch 1, CPU
  python bench/model_bench.py --presets unet_r34,utt_r34 --size 256 --batch 2 --iters 3
  python bench/model_bench.py --device cuda --batch 8 --iters 20 --json bench/models_gpu.json

Weights are random (encoder_weights=none): timing does not depend on them. A train step is
forward + the training loss (src.models.losses.Criterion: the preset's loss, + the auxiliary S2 loss for fused
presets) + backward + AdamW step.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from src.core.config import load_settings  # noqa: E402
from src.core.files import write_json  # noqa: E402
from src.core.runtime import amp_dtype, autocast, pick_device  # noqa: E402
from src.models.flair_model import build_model, count_parameters  # noqa: E402
from src.models.losses import Criterion  # noqa: E402

PRESETS = ["unet_r34", "utt_r34", "segformer_b5", "maxvit_unet"]
S2_DATES = 12  # monthly composites: at most one date per month


def make_batch(cfg: dict, batch: int, size: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    out = {"image": torch.randn(batch, len(cfg.bands), size, size, generator=g),
           "mask": torch.randint(0, cfg.num_classes, (batch, size, size), generator=g)}
    if cfg.fusion != "none":
        s = cfg.s2_size
        out["s2"] = torch.rand(batch, S2_DATES, 10, s, s, generator=g)
        out["s2_days"] = (torch.arange(S2_DATES) * 30 - 150).repeat(batch, 1)
        out["s2_pad"] = torch.zeros(batch, S2_DATES, dtype=torch.bool)
        out["s2_valid"] = torch.ones(batch, s, s, dtype=torch.bool)
    if cfg.use_metadata:
        out["meta"] = torch.randn(batch, cfg.meta_dim, generator=g)
    return {k: v.to(device) for k, v in out.items()}


def _call(model: torch.nn.Module, b: dict) -> dict:
    return model(b["image"], b.get("s2"), b.get("s2_days"), b.get("s2_pad"), b.get("meta"))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, iters: int, warmup: int, device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) per call. CPU seconds (all threads) are the steadier figure
    on a shared machine, where wall time mostly measures the neighbours."""
    for _ in range(warmup):
        fn()
    _sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / iters, (time.process_time() - cpu) / iters


def bench_preset(name: str, size: int, batch: int, iters: int, warmup: int, device: torch.device) -> dict:
    cfg = load_settings(ROOT / "configs" / f"{name}.yaml", {"encoder_weights": "none"})
    model = build_model(cfg).to(device)
    gpu = device.type == "cuda"
    if gpu:
        model = model.to(memory_format=torch.channels_last)
    b = make_batch(cfg, batch, size, device)
    if gpu:
        b["image"] = b["image"].contiguous(memory_format=torch.channels_last)
    dtype = amp_dtype("auto", device)  # the trainer's default precision: bf16 on a GPU, fp32 on CPU
    criterion = Criterion(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def forward() -> None:
        model.eval()
        with torch.inference_mode(), autocast(device, dtype):
            _call(model, b)

    def train_step() -> None:
        model.train()
        with autocast(device, dtype):
            out = _call(model, b)
            loss, _ = criterion(out, b["mask"], s2_valid=b.get("s2_valid"))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    if gpu:
        torch.cuda.reset_peak_memory_stats()
    row = {"preset": name, "arch": cfg.arch, "encoder": cfg.encoder, "bands": "".join(
        b_[0] if b_ != "NIR" else "I" for b_ in cfg.bands), "s2": cfg.fusion != "none",
        "params_m": round(count_parameters(model) / 1e6, 2), "size": size, "batch": batch,
        "device": str(device)}
    wall, cpu = _timed(forward, iters, warmup, device)
    row["forward_s"], row["forward_cpu_s"] = round(wall, 4), round(cpu, 3)
    wall, cpu = _timed(train_step, iters, warmup, device)
    row["train_step_s"], row["train_cpu_s"] = round(wall, 4), round(cpu, 3)
    row["forward_img_per_s"] = round(batch / row["forward_s"], 2)
    if gpu:
        row["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return row


def to_markdown(rows: list[dict]) -> str:
    cols = ["preset", "arch", "encoder", "bands", "s2", "params_m", "size", "batch", "device", "forward_s",
            "train_step_s", "forward_img_per_s"]
    if rows and rows[0]["device"] == "cpu":
        cols += ["forward_cpu_s", "train_cpu_s"]
    if any("peak_mem_gb" in r for r in rows):
        cols.append("peak_mem_gb")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default=",".join(PRESETS), help="comma-separated names of configs/*.yaml")
    ap.add_argument("--size", type=int, default=512, help="square crop side in pixels")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--iters", type=int, default=2, help="timed iterations (after --warmup)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.presets.split(",") if n.strip()]
    unknown = [n for n in names if not (ROOT / "configs" / f"{n}.yaml").is_file()]
    if unknown:
        ap.error(f"no configs/<name>.yaml for {unknown}")
    rows = []
    for name in names:
        row = bench_preset(name, args.size, args.batch, args.iters, args.warmup, device)
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} CPU threads\n")
    print(to_markdown(rows))
    if args.json:
        write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
