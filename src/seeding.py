"""Seeds and RNG states: everything random in a training epoch is a function of (seed, epoch, rank), so a
resumed run replays an epoch bit for bit on CPU."""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


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
