"""How the kit uses an accelerator: the precision policy and device choices (worker counts: src.workers).

One place for each of these decisions, so training, validation, prediction and the benchmarks cannot
disagree (docs/architecture.md, "Runtime policies").
"""
from __future__ import annotations

import contextlib
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
