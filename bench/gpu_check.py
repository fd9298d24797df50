"""One prepared GPU check: what the kit's presets cost on this machine, and whether data keeps up.

Run through `bash bench/gpu_check.sh` (it installs missing packages from bench/wheels first). Measures,
on the first CUDA device, in bf16 with channels_last at 512x512 (the presets' settings otherwise,
random weights):
1. model-only training img/s, s/step and peak memory for unet_r34, utt_r34, segformer_b5, maxvit_unet,
   eager and with `compile=true` (whether torch.compile works, and its first-step time);
2. the device half of the data path per batch of 16 (src.data.device_augment): host-to-device copy, `light`
   and `heavy` transforms (as drawn, and with every photometric transform on every sample) + normalisation;
3. prediction patches/s with D4 TTA (8 views per patch) for one and five models, and the projected time
   for the 16,050 test patches (network and device work; reading runs in parallel workers);
4. training img/s fed by the real DataLoader (src.data.dataset + src.data.loader, persistent workers, pinned
   memory) from synthetic uncompressed files with 8 and 16 workers, the share of time spent waiting for
   data, and whether the step is data-bound (below 90 % of the model-only rate).
Compiled runs go last and are skipped once the time budget (--budget-s, default 330 s) is spent.
Writes bench/results/gpu-<date>.json and .md (--out to change), and prints the table.

`--smoke` runs the same code on the CPU with tiny sizes and encoders in about a minute (a fast test).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from loader_bench import uncompressed_copy, warm  # noqa: E402

from src.core.config import load_settings  # noqa: E402
from src.core.flair import N_TEST_PATCHES  # noqa: E402
from src.core.runtime import amp_dtype, autocast, tune_cuda  # noqa: E402
from src.core.workers import cpu_count  # noqa: E402
from src.data.augment import MAX_HOLES, Slot  # noqa: E402
from src.data.dataset import FlairDataset  # noqa: E402
from src.data.device_augment import augment_batch, device_batch  # noqa: E402
from src.data.loader import EpochSampler, build_loader, collate  # noqa: E402
from src.models.flair_model import build_model  # noqa: E402
from src.prediction.ensemble import predict_batch  # noqa: E402
from src.prep.index_scan import build_index  # noqa: E402
from src.prep.synth_write import SynthSpec, make_dataset  # noqa: E402
from src.training.state import build_nets  # noqa: E402
from src.training.validation import to_device  # noqa: E402

PRESETS = ("unet_r34", "utt_r34", "segformer_b5", "maxvit_unet")
TINY = {"encoder": "tu-test_resnet", "utae_widths": [8, 8, 16, 16], "utae_decoder_widths": [8, 8, 8, 16],
        "ltae_heads": 2, "ltae_d_model": 16, "ltae_d_k": 4}


@dataclass
class Plan:
    """Sizes of one run: the real ones on a GPU, tiny ones for --smoke."""

    device: torch.device
    smoke: bool
    crop: int = 512
    steps: int = 10
    warmup: int = 3
    workers: tuple[int, ...] = (8, 16)
    loader_steps: int = 30
    budget_s: float = 330.0
    backend: str = "inductor"      # torch.compile backend (smoke: "eager", dynamo tracing without codegen)
    t0: float = field(default_factory=time.perf_counter)

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)


def make_plan(args: argparse.Namespace) -> Plan:
    if args.smoke:
        return Plan(torch.device("cpu"), True, crop=64, steps=1, warmup=1, workers=(1, 2), loader_steps=3,
                    budget_s=args.budget_s, backend="eager")
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device (use --smoke to run the same code on the CPU)")
    return Plan(torch.device("cuda"), False, budget_s=args.budget_s)


def preset_cfg(name: str, plan: Plan, **over: Any) -> dict:
    """A preset's config as trained, with random weights; tiny encoders in smoke mode."""
    values = {"encoder_weights": "none", "crop_size": plan.crop, "channels_last": True, "compile": False,
              "precision": "fp32" if plan.smoke else "bf16", "workers": 0, **(TINY if plan.smoke else {}),
              **over}
    return load_settings(ROOT / "configs" / f"{name}.yaml", values)


def batch_size(cfg: dict, plan: Plan) -> int:
    return 2 if plan.smoke else int(cfg.batch_size)


def raw_batch(cfg: dict, b: int, crop: int, dates: int = 12) -> dict[str, torch.Tensor]:
    """A collated raw batch (uint8 image and mask, float16 S2) of random values, pinned on CUDA."""
    g = torch.Generator().manual_seed(0)
    out = {"image": torch.randint(0, 256, (b, len(cfg.bands), crop, crop), generator=g, dtype=torch.uint8),
           "mask": torch.randint(0, 13, (b, crop, crop), generator=g, dtype=torch.uint8)}
    if cfg.use_s2:
        s = cfg.s2_size
        out["s2"] = (torch.rand(b, dates, 10, s, s, generator=g) * 0.3).half()
        out["s2_days"] = (torch.arange(dates) * 30 - 150).repeat(b, 1)
        out["s2_pad"] = torch.zeros(b, dates, dtype=torch.bool)
        out["s2_valid"] = torch.ones(b, s, s, dtype=torch.bool)
    return {k: v.pin_memory() for k, v in out.items()} if torch.cuda.is_available() else out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Trainer:
    """One training step exactly as src.train takes it (src.training.state.build_nets: EMA, loss, AdamW)."""

    def __init__(self, cfg: dict, device: torch.device, backend: str = "inductor"):
        torch.manual_seed(0)
        self.cfg, self.device = cfg, device
        self.dtype = amp_dtype(cfg.precision, device)
        self.nets = build_nets(cfg, build_model(cfg).to(device).train(), device)
        self.run = torch.compile(self.nets.model, backend=backend) if cfg.compile else self.nets.model

    def step(self, batch: dict[str, Any]) -> None:
        n = self.nets
        image, extra, mask, valid = to_device(batch, self.cfg, self.device, self.dtype,
                                              self.cfg.channels_last, augment=True)
        with autocast(self.device, self.dtype):
            out = self.run(image, **extra)
        loss, _ = n.criterion(out, mask, s2_valid=valid)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(n.model.parameters(), self.cfg.grad_clip or float("inf"))
        n.optimizer.step()
        n.optimizer.zero_grad(set_to_none=True)
        if n.ema is not None:
            n.ema.update(n.model)


def peak_gb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def model_only(name: str, plan: Plan, compiled: bool) -> dict[str, Any]:
    """Model-only training img/s on a batch already in (pinned) memory."""
    cfg = preset_cfg(name, plan, compile=compiled)
    b = batch_size(cfg, plan)
    if plan.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(plan.device)
    trainer = Trainer(cfg, plan.device, plan.backend)
    batch = raw_batch(cfg, b, plan.crop)
    t = time.perf_counter()
    trainer.step(batch)
    sync(plan.device)
    first_s = time.perf_counter() - t
    for _ in range(plan.warmup - 1):
        trainer.step(batch)
    sync(plan.device)
    t = time.perf_counter()
    for _ in range(plan.steps):
        trainer.step(batch)
    sync(plan.device)
    per = (time.perf_counter() - t) / plan.steps
    return {"preset": name, "compile": compiled, "batch": b, "img_s": round(b / per, 1),
            "s_per_step": round(per, 4), "first_step_s": round(first_s, 2),
            "peak_mem_gb": peak_gb(plan.device),
            "params_m": round(sum(p.numel() for p in trainer.nets.model.parameters()) / 1e6, 1)}


def timed(fn: Callable[[], Any], device: torch.device, repeat: int) -> float:
    """Median seconds of `fn` over `repeat` calls after one warm-up call (synchronised)."""
    fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def synthetic_index(tmp: Path, plan: Plan) -> pd.DataFrame:
    """Train rows of a synthetic tree, tiles rewritten uncompressed, repeated so an epoch is long."""
    root = make_dataset(tmp / "synth", SynthSpec(train_domains=2, test_domains=1, zones=2,
                                                 patches=2 if plan.smoke else 8, seed=0))
    df = uncompressed_copy(build_index(root)["train"].reset_index(drop=True), tmp / "tiles")
    warm(df)
    return pd.concat([df] * (2 if plan.smoke else 32), ignore_index=True)


def worst_case(aug: torch.Tensor) -> None:
    """Every photometric transform on every sample: jitter, noise, a 7x7 motion blur, six holes."""
    aug[:, Slot.JITTER] = 1.0
    aug[:, Slot.BRIGHT:Slot.MEAN] = torch.tensor([0.05] * 5 + [1.1] * 5 + [0.9] * 5)
    aug[:, Slot.MEAN:Slot.NOISE_STD] = 0.4
    aug[:, Slot.NOISE_STD], aug[:, Slot.NOISE_SEED] = 6.0, torch.arange(len(aug)).float()
    aug[:, Slot.BLUR], aug[:, Slot.BLUR_SIZE], aug[:, Slot.BLUR_PARAM] = 2.0, 7.0, 30.0
    aug[:, Slot.HOLES:Slot.HOLES + 4 * MAX_HOLES] = torch.tensor([10.0, 10.0, 40.0, 50.0] * MAX_HOLES)


def tensors_to(batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=device.type == "cuda") for k, v in batch.items()
            if isinstance(v, torch.Tensor)}


def transform_cost(df: pd.DataFrame, plan: Plan, preset: str, all_on: bool) -> dict[str, Any]:
    """ms per batch of 16 (2 in smoke): copy to the device, then augmentation + normalisation there."""
    b = 2 if plan.smoke else 16
    cfg = preset_cfg("utt_r34", plan, augment=preset)
    ds = FlairDataset(df, cfg, train=True)
    batch = collate([ds[(i, 0)] for i in range(b)])
    if all_on:
        worst_case(batch["aug"])
    if plan.device.type == "cuda":
        batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    on_dev = tensors_to({k: v for k, v in batch.items() if k != "aug"}, plan.device)
    dtype = amp_dtype(cfg.precision, plan.device)
    copy = timed(lambda: tensors_to(batch, plan.device), plan.device, 20)
    work = timed(lambda: device_batch(augment_batch(on_dev, batch["aug"], cfg), cfg, plan.device, dtype=dtype,
                                      channels_last=True), plan.device, 20)
    return {"preset": preset + (" (all transforms)" if all_on else ""), "batch": b, "crop": plan.crop,
            "copy_ms": round(1000 * copy, 3), "transform_ms": round(1000 * work, 3)}


def prediction(name: str, n_models: int, plan: Plan) -> dict[str, Any]:
    """Patches/s of an n-model ensemble with D4 TTA (8 views), from a raw batch to probabilities."""
    cfg = preset_cfg(name, plan)
    b = 2 if plan.smoke else 16
    if plan.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(plan.device)
    models = [build_model(cfg).to(plan.device).eval().to(memory_format=torch.channels_last)
              for _ in range(n_models)]
    batch = raw_batch(cfg, b, plan.crop)
    dtype = amp_dtype(cfg.precision, plan.device)

    def run():
        fed = device_batch(batch, cfg, plan.device, dtype=dtype)
        return predict_batch(models, None, fed, "d4", precision=cfg.precision, channels_last=True)
    per = timed(run, plan.device, 2 if plan.smoke else 5)
    rate = b / per
    return {"preset": name, "models": n_models, "tta": "d4", "batch": b, "patches_s": round(rate, 2),
            "projected_test_s": round(N_TEST_PATCHES / rate, 1), "peak_mem_gb": peak_gb(plan.device)}


def loader_fed(name: str, df: pd.DataFrame, workers: int, plan: Plan, alone: float) -> dict[str, Any]:
    """Training img/s fed by the kit's DataLoader; wait share = time blocked on the next batch."""
    cfg = preset_cfg(name, plan, workers=workers)
    b = batch_size(cfg, plan)
    ds = FlairDataset(df, cfg, train=True)
    sampler = EpochSampler(torch.utils.data.DistributedSampler(ds, num_replicas=1, rank=0, seed=0))
    loader = build_loader(ds, cfg, train=True, sampler=sampler, batch_size=b, persistent=True)
    trainer = Trainer(cfg, plan.device, plan.backend)
    it = iter(loader)
    for _ in range(plan.warmup + workers // 4):
        trainer.step(next(it))
    sync(plan.device)
    wait, t0 = 0.0, time.perf_counter()
    for _ in range(plan.loader_steps):
        t = time.perf_counter()
        batch = next(it)
        wait += time.perf_counter() - t
        trainer.step(batch)
    sync(plan.device)
    total = time.perf_counter() - t0
    rate = plan.loader_steps * b / total
    del it, loader  # the workers go with the loader
    return {"preset": name, "workers": workers, "batch": b, "img_s": round(rate, 1),
            "wait_share": round(wait / total, 3), "model_only_img_s": alone,
            "data_bound": bool(alone and rate < 0.9 * alone)}


def guarded(results: dict, key: str, fn: Callable[..., Any], *args: Any) -> None:
    """Run one measurement; an exception is recorded (one line) and the check goes on."""
    try:
        results.setdefault(key, []).append(fn(*args))
    except Exception as err:  # noqa: BLE001 - a failed measurement must not lose the others
        line = f"{type(err).__name__}: {err}".splitlines()[0][:300]
        results.setdefault("errors", []).append({"section": key, "error": line})
        traceback.print_exc()


def environment(plan: Plan) -> dict[str, Any]:
    env = {"date": dt.datetime.now().isoformat(timespec="seconds"), "smoke": plan.smoke,
           "torch": torch.__version__, "python": platform.python_version(), "cores": cpu_count(),
           "device": "cpu"}
    if plan.device.type == "cuda":
        props = torch.cuda.get_device_properties(plan.device)
        env.update(device=props.name, memory_gb=round(props.total_memory / 2**30, 1),
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return env


def run_all(plan: Plan) -> dict[str, Any]:
    res: dict[str, Any] = {"environment": environment(plan)}
    tune_cuda(plan.device)
    for name in PRESETS:
        guarded(res, "model_only", model_only, name, plan, False)
    alone = {r["preset"]: r["img_s"] for r in res.get("model_only", [])}
    with tempfile.TemporaryDirectory() as tmp:
        df = synthetic_index(Path(tmp), plan)
        for preset, all_on in (("light", False), ("heavy", False), ("heavy", True)):
            guarded(res, "device_transforms", transform_cost, df, plan, preset, all_on)
        for name, n in (("unet_r34", 1), ("unet_r34", 5), ("utt_r34", 1)):
            guarded(res, "prediction", prediction, name, n, plan)
        for name in ("unet_r34", "utt_r34"):
            for w in plan.workers:
                guarded(res, "loader_fed", loader_fed, name, df, w, plan, alone.get(name, 0.0))
    for name in PRESETS[:1] if plan.smoke else PRESETS:
        if plan.left() < 0:
            res.setdefault("skipped", []).append(f"{name} compile=true: time budget spent")
            continue
        guarded(res, "model_only", model_only, name, plan, True)
    compiled = [r for r in res.get("model_only", []) if r["compile"]]
    failed = [e for e in res.get("errors", []) if e["section"] == "model_only"]
    res["compile_works"] = bool(compiled) and len(failed) == 0
    res["elapsed_s"] = round(time.perf_counter() - plan.t0, 1)
    return res


def _table(title: str, rows: list[dict[str, Any]], cols: list[tuple[str, str]]) -> str:
    if not rows:
        return f"\n**{title}**: no result\n"
    head = "| " + " | ".join(c for c, _ in cols) + " |\n|" + "---|" * len(cols) + "\n"
    body = "".join("| " + " | ".join(str(r.get(k, "")) for _, k in cols) + " |\n" for r in rows)
    return f"\n**{title}**\n\n{head}{body}"


COLUMNS = {
    "model_only": ("Model-only training (bf16, channels_last, 512x512, random weights)",
                   [("preset", "preset"), ("compile", "compile"), ("batch", "batch"), ("img/s", "img_s"),
                    ("s/step", "s_per_step"), ("peak GB", "peak_mem_gb"), ("params M", "params_m"),
                    ("first step s", "first_step_s")]),
    "device_transforms": ("Device half of the data path, per batch (utt_r34 inputs: 5 bands + S2)",
                          [("augment", "preset"), ("batch", "batch"), ("crop", "crop"),
                           ("copy to device ms", "copy_ms"),
                           ("transforms + normalisation ms", "transform_ms")]),
    "prediction": ("Prediction with D4 TTA (8 views), raw batch to probabilities",
                   [("preset", "preset"), ("models", "models"), ("batch", "batch"),
                    ("patches/s", "patches_s"), ("projected 16,050 patches s", "projected_test_s"),
                    ("peak GB", "peak_mem_gb")]),
    "loader_fed": ("Training fed by the DataLoader (synthetic uncompressed files, persistent workers)",
                   [("preset", "preset"), ("workers", "workers"), ("batch", "batch"), ("img/s", "img_s"),
                    ("wait share", "wait_share"), ("model-only img/s", "model_only_img_s"),
                    ("data-bound", "data_bound")]),
}


def markdown(res: dict[str, Any]) -> str:
    """The results as the Markdown tables BENCHMARKS.md quotes."""
    env = res["environment"]
    text = (f"gpu_check {env['date']}: {env['device']} ({env.get('memory_gb', '-')} GB), "
            f"torch {env['torch']}, CUDA {env.get('cuda', '-')}, {env['cores']} cores"
            f"{' (SMOKE: tiny sizes on the CPU)' if env['smoke'] else ''}\n")
    for key, (title, cols) in COLUMNS.items():
        text += _table(title, res.get(key, []), cols)
    text += f"\ntorch.compile works: {res.get('compile_works')}; elapsed {res.get('elapsed_s')} s\n"
    for e in res.get("errors", []):
        text += f"- error in {e['section']}: {e['error']}\n"
    for s in res.get("skipped", []):
        text += f"- skipped: {s}\n"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (the fast test)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for the JSON and .md")
    parser.add_argument("--budget-s", type=float, default=330.0, help="start no compiled run after this")
    args = parser.parse_args(argv)
    plan = make_plan(args)
    res = run_all(plan)
    res["plan"] = {k: (str(v) if k == "device" else v) for k, v in asdict(plan).items() if k != "t0"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "gpu-" + dt.datetime.now().strftime("%Y%m%d-%H%M") + ("-smoke" if plan.smoke else "")
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1) + "\n")
    table = markdown(res)
    (out / f"{stem}.md").write_text(table)
    print(table)
    print(f"gpu_check: wrote {out / stem}.json and .md in {res['elapsed_s']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
