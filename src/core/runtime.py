"""How the kit uses an accelerator and its processes: the precision policy, devices, seeds and RNG states,
and the torchrun glue (worker counts and other torch-free policies: src.core.workers).

One place for each of these decisions, so training, validation, prediction and the benchmarks cannot
disagree (docs/architecture.md, "Runtime policies"):
- everything random in a training epoch is a function of (seed, epoch, rank), so a resumed run replays an
  epoch bit for bit on CPU;
- under torchrun (multi-GPU / multi-node) `setup_distributed` places the process; sums over processes,
  barriers and teardown are no-ops on a single process, so the loops have no `if world > 1` branches."""
from __future__ import annotations

import contextlib
import os
import random
import signal
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from src.core.workers import cpu_count, process_env

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}  # the `precision` setting's words


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision setting on a device (None = plain fp32).

    `auto` is bf16 on a CUDA device that supports it and fp32 elsewhere (CPU autocast is slower than
    fp32 for convolutions); an explicit bf16/fp16 is honoured on any device."""
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


def derive_seed(*parts: int) -> int:
    """A 32-bit seed from a tuple such as (seed, epoch, rank), well mixed by numpy's SeedSequence."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def seed_everything(*parts: int) -> int:
    """Seed python, numpy and torch from a tuple (e.g. seed, epoch, rank); returns the derived seed."""
    seed = derive_seed(*parts)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return seed


def init_worker(worker_id: int) -> None:
    """A DataLoader worker: seeded from torch's seed (`seed_worker`), deaf to Ctrl-C (the main process handles
    it and stops its workers; a worker of its own would print a traceback each)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    seed_worker(worker_id)


def seed_worker(worker_id: int) -> None:
    """DataLoader workers: torch gives each a distinct seed; numpy and python follow it."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass(frozen=True)
class Placement:
    """Where this process runs: its rank among the torchrun processes, their number, and its device."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Rank 0: the process that logs and writes the shared files."""
        return self.rank == 0


def setup_distributed(device: str = "auto") -> Placement:
    """This process's place. `auto` is its local GPU (cuda:LOCAL_RANK) when there is one, else the CPU; under
    torchrun the process group is initialised (NCCL on GPUs, gloo on CPUs)."""
    rank, world, local = process_env()
    cuda = torch.cuda.is_available()
    dev = torch.device(f"cuda:{local}" if cuda else "cpu") if device == "auto" else torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Placement(dist.get_rank() if dist.is_initialized() else rank, world, dev)


def share_cores(placement: Placement) -> None:
    """CPU processes of one machine share its cores (torch would give each all of them)."""
    if placement.device.type == "cpu" and placement.world > 1:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", placement.world))
        torch.set_num_threads(max(1, cpu_count() // local))


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks, in place (no-op on a single process)."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool, device: torch.device) -> bool:
    """Is `flag` true on any rank? (Decisions that change the step must be the same on every rank.)"""
    return all_sum(torch.tensor(1.0 if flag else 0.0, device=device)).item() > 0


def barrier() -> None:
    """Wait for every rank (no-op on a single process)."""
    if dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (torchrun warns about, and may hang on, a group left open)."""
    if dist.is_initialized():
        dist.destroy_process_group()
