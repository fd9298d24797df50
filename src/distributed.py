"""Multi-GPU / multi-node glue for runs launched by torchrun: which process this is, sums over processes,
waiting for each other, and teardown. On a single process every helper is a no-op, so the training loop
has no `if world > 1` branches."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device); initialises the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world, device


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
