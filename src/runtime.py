"""How the kit uses the machine: the precision policy, devices, worker counts and OpenCV's threads.

One place for each of these decisions, so training, validation, prediction and the benchmarks cannot
disagree (docs/architecture.md, "Runtime policies").
"""
from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

from src.errors import ConfigError

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision setting on a device (None = plain fp32).

    `auto` is bf16 on a CUDA device that supports it and fp32 elsewhere (CPU autocast is slower than
    fp32 for convolutions); an explicit bf16/fp16 is honoured on any device."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return _DTYPES[precision]


def needs_grad_scaler(precision: str, device: torch.device) -> bool:
    """fp16 training needs loss scaling; bf16 and fp32 do not."""
    return amp_dtype(precision, device) is torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    """Autocast context for `dtype` on `device` (a no-op context for fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def precision_name(dtype: torch.dtype | None) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def pick_device(name: str = "auto") -> torch.device:
    """`auto` -> the local CUDA device when there is one, else the CPU; anything else as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def tune_cuda(device: torch.device, deterministic: bool = False) -> None:
    """Fixed-size inputs: let cuDNN pick its fastest kernels (unless asked for determinism); TF32 for fp32."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def cpu_count() -> int:
    """Cores this process may use (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_workers(limit: int = 16) -> int:
    """Threads or processes for reading and decoding files (TIFF decoding releases the GIL): one per core,
    at most `limit` (beyond that a disk rarely keeps up)."""
    return max(1, min(limit, cpu_count()))


def loader_workers(setting: int | str) -> int:
    """DataLoader workers for the `workers` setting: a number as given, `auto` = the cores this process
    may use, shared between the local DDP processes, minus one for the main process."""
    if isinstance(setting, str):
        if setting != "auto":
            raise ConfigError(f"workers: expected a number or auto, got {setting!r}")
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        return max(0, cpu_count() // max(1, local) - 1)
    if setting < 0:
        raise ConfigError(f"workers: expected >= 0 or auto, got {setting}")
    return int(setting)


def single_thread_opencv() -> None:
    """One OpenCV thread in this process. Called before DataLoader workers fork: a worker is one core, and
    inheriting OpenCV's pool would run workers x cores threads (cv2.setNumThreads inside a forked worker
    deadlocks on the parent's pool, so it must happen here, before the fork)."""
    import cv2

    cv2.setNumThreads(1)
