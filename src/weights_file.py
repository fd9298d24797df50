"""Weights files: a local file or one on the Hugging Face hub -> a state dict (name -> tensor).

Shared by `encoder_weights` (src.models) and `init_from` (src.warm_start), so both read the same files
the same way:
- local: .safetensors, or anything torch.save wrote (.pt/.pth/.bin/.ckpt), read with the safe
  `weights_only` unpickler; NumPy arrays are allowed because a flair2-kit checkpoint holds NumPy's RNG
  state (src.seeding). A state dict is taken from the file itself or from its "model" / "state_dict" entry.
- `hf:<owner>/<name>[:<file>]`: downloaded once into the standard Hugging Face cache with
  `huggingface_hub.hf_hub_download` (HF_HOME / HF_HUB_CACHE choose where) and read from there afterwards,
  offline too (HF_HUB_OFFLINE=1). Without `<file>`: `model.safetensors`, then `pytorch_model.bin` (the
  names timm and transformers use), then the repo's only weights file when it has exactly one
  (listed on the hub, or in the cache when offline).
Errors are one-line ValueErrors naming the file or the repo (the trainer turns them into setting errors).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

HF_PREFIX = "hf:"
HF_DEFAULT_FILES = ("model.safetensors", "pytorch_model.bin")
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


def is_weights_ref(value: str) -> bool:
    """Does a setting value name a weights file (a path or an hf: reference) rather than a weight name?"""
    return value.startswith(HF_PREFIX) or "/" in value or "\\" in value or value.endswith(WEIGHT_SUFFIXES)


# ----------------------------------------------------------------------------------- Hugging Face hub
def parse_hf(ref: str) -> tuple[str, str | None]:
    """`hf:owner/name[:file]` -> (repo id, file or None)."""
    body = ref.removeprefix(HF_PREFIX)
    repo, _, filename = body.partition(":")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ValueError(f"{ref}: expected hf:<owner>/<name>[:<file>]")
    return repo, filename or None


def _cached_files(repo: str) -> list[str]:
    """Files of `repo` in the local hub cache (every snapshot), relative to their snapshot folder."""
    from huggingface_hub import constants

    snapshots = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "snapshots"
    if not snapshots.is_dir():
        return []
    return sorted({p.relative_to(snap).as_posix() for snap in snapshots.iterdir() if snap.is_dir()
                   for p in snap.rglob("*") if p.is_file()})


def _repo_files(repo: str) -> list[str]:
    """The repo's files: listed on the hub, or found in the cache when offline / unreachable."""
    from huggingface_hub import HfApi, constants

    if not constants.HF_HUB_OFFLINE:
        try:
            return list(HfApi().list_repo_files(repo))
        except Exception:  # unreachable or unknown repo: the cache is all there is
            pass
    return _cached_files(repo)


def _download(repo: str, filename: str) -> Path:
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id=repo, filename=filename))


def _why(err: Exception) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def hf_weights_file(ref: str) -> Path:
    """The local path of `hf:owner/name[:file]`, downloaded into the hub cache on first use."""
    from huggingface_hub import constants

    repo, filename = parse_hf(ref)
    names = [filename] if filename else list(HF_DEFAULT_FILES)
    errors: list[Exception] = []
    for name in names:
        try:
            return _download(repo, name)
        except Exception as err:  # not cached and offline, no such file/repo, network, auth
            errors.append(err)
    if filename is None:
        found = [f for f in _repo_files(repo) if f.endswith(WEIGHT_SUFFIXES)]
        if len(found) == 1:
            try:
                return _download(repo, found[0])
            except Exception as err:
                errors.append(err)
        elif found:
            raise ValueError(f"{ref}: no {' or '.join(HF_DEFAULT_FILES)} and several weights files "
                             f"({', '.join(found[:5])}): name one as hf:{repo}:<file>")
    where = "not in the Hugging Face cache " + str(constants.HF_HUB_CACHE)
    where += " and HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else " and not downloadable"
    raise ValueError(f"{ref}: could not get {' or '.join(names)} from {repo} ({where}; "
                     f"{_why(errors[-1])})")


def weights_path(ref: str | os.PathLike) -> Path:
    """A local path for a weights reference: the file itself, or the cached copy of an hf: file."""
    text = str(ref)
    return hf_weights_file(text) if text.startswith(HF_PREFIX) else Path(text)


# ----------------------------------------------------------------------------------- reading
def _numpy_globals() -> list[Any]:
    """What unpickling NumPy's RNG state needs (a flair2-kit checkpoint's "rng"), NumPy 1 and 2."""
    core = getattr(np, "_core", None) or np.core
    out: list[Any] = [core.multiarray._reconstruct, np.ndarray, np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        out += [getattr(dtypes, n) for n in ("UInt32DType",) if hasattr(dtypes, n)]
    return out


def read_weights(ref: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any], Path]:
    """(state dict, the file's other top-level entries -- e.g. a checkpoint's "config" and "epoch" --,
    local path) of a weights file or hf: reference; ValueError naming it when it is not one."""
    path = weights_path(ref)
    if not path.is_file():
        raise ValueError(f"{ref}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            obj: Any = load_file(str(path))
        else:
            with torch.serialization.safe_globals(_numpy_globals()):
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{ref}: cannot read weights ({_why(err)})") from None
    info: dict[str, Any] = {}
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            info = {k: v for k, v in obj.items() if k != key}
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{ref}: not a state dict (expected a mapping of parameter names to tensors)")
    return dict(obj), info, path


def strip_prefixes(key: str, prefixes: tuple[str, ...]) -> str:
    """`key` without any leading run of `prefixes` (DDP's "module.", torch.compile's "_orig_mod.", ...)."""
    changed = True
    while changed:
        changed = False
        for prefix in prefixes:
            if prefix and key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def load_state_file(path: str | os.PathLike, strip: tuple[str, ...] = ("module.", "_orig_mod.", "net.")
                    ) -> dict[str, torch.Tensor]:
    """A state dict from a weights file or hf: reference, unwrapped from "model"/"state_dict", with the
    DDP, torch.compile and flair2-kit ("net.") key prefixes removed."""
    state, _, _ = read_weights(path)
    return {strip_prefixes(k, strip): v for k, v in state.items()}
