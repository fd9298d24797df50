"""Weights files (local or hf:) and warm starts (`init_from`): what goes into a model's tensors before
training.

Weights files: a local file or one on the Hugging Face hub -> a state dict (name -> tensor).

Shared by `encoder_weights` (src.models.flair_model) and `init_from` (src.models.weights), so both read the
same files the same way:
- local: .safetensors, or anything torch.save wrote (.pt/.pth/.bin/.ckpt), read with the safe
  `weights_only` unpickler; NumPy arrays are allowed because a flair2-kit checkpoint holds NumPy's RNG
  state (src.core.runtime). A state dict is taken from the file itself or from its "model" / "state_dict"
  entry.
- `hf:<owner>/<name>[:<file>]`: downloaded once into the standard Hugging Face cache with
  `huggingface_hub.hf_hub_download` (HF_HOME / HF_HUB_CACHE choose where) and read from there afterwards,
  offline too (HF_HUB_OFFLINE=1). Without `<file>`: `model.safetensors`, then `pytorch_model.bin` (the
  names timm and transformers use), then the repo's only weights file when it has exactly one
  (listed on the hub, or in the cache when offline).
Errors are one-line ValueErrors naming the file or the repo (the trainer turns them into setting errors).

Warm start (`init_from`): copy every tensor whose name and shape match from a weights file into a
freshly built model of any architecture, and say exactly what was loaded, skipped and left new.

Why: a two-stage recipe trains an aerial U-Net first, then a U-T&T (U-Net + U-TAE) initialised from it
(docs/recipes.md); a model trained elsewhere (e.g. IGN's FLAIR U-Nets) can start a run too. Partial
loads are the point -- a new branch or a head with another class count stays freshly initialised -- so
the report is printed; but a file of which nothing, or only a stray tensor or two, matches (less than
half of the file's tensors and of the model's) is an error, never a silent no-op.

`init_from` is a path (`{fold}` becomes the fold being trained, so stage 2 of fold 3 starts from stage 1's
fold 3; `{runs_dir}` the runs folder setting) or `hf:<owner>/<name>[:<file>]` (src.models.weights).
Accepted: a flair2-kit checkpoint (its "model": the EMA weights when EMA was on), a plain state dict,
"model"/"state_dict" wrappers, DDP ("module.") and torch.compile ("_orig_mod.") prefixes. Key names
are aligned by trying, besides the names as they are, dropping up to 3 leading name parts (a wrapper
such as Lightning's "model.") and adding one of the model's own module prefixes (e.g. "net." for a plain
smp model loaded into FlairModel, or "net.encoder." for an encoder-only file); the alignment that loads
the most tensors wins (ties: the smallest change), and the report names it. Nothing else is adapted: a
file for other bands or classes leaves the first convolution or the head new (listed as "other shape"),
with one exception: a convolution that only gained input channels (a model with early S2 channels,
`s2_early`, warm-started from one without) gets the file's kernels for its first inputs and zeros for the
new ones, so it starts as the file's model did ("widened")."""
from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from src.core.errors import ConfigError
from src.core.settings import Settings

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


WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP, torch.compile
MAX_DROP = 3        # leading name parts a remapping may drop
SHOWN = 6           # names listed per kind in the report
MIN_SHARE = 0.5     # a load must cover this share of the file's tensors or of the model's (else: wrong file)


@dataclass
class WarmStartReport:
    """What `init_from` did to the model's state dict (names are the model's)."""

    source: str
    remap: str = "names as they are"
    loaded: list[str] = field(default_factory=list)
    # model name, file shape, model shape
    other_shape: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    widened: list[str] = field(default_factory=list)    # convolutions that gained input channels (loaded)
    unknown: list[str] = field(default_factory=list)    # file tensors with no model tensor of that name
    new: list[str] = field(default_factory=list)        # model tensors left as initialised
    about: str = ""                                     # what the file is (a kit checkpoint's config)
    mapping: dict[str, str] = field(default_factory=dict, repr=False)  # loaded model name -> file name

    def lines(self) -> list[str]:
        total = len(self.loaded) + len(self.new)
        out = [f"init_from {self.source}{' (' + self.about + ')' if self.about else ''}: loaded "
               f"{len(self.loaded)} of the model's {total} tensors ({self.remap})"]
        if self.other_shape:
            shown = ", ".join(f"{k} {_shape(a)} -> {_shape(b)}" for k, a, b in self.other_shape[:SHOWN])
            out.append(f"  skipped, other shape ({len(self.other_shape)}; file -> model): {shown}"
                       + (", ..." if len(self.other_shape) > SHOWN else ""))
        if self.widened:
            shown = ", ".join(self.widened[:SHOWN])
            out.append(f"  widened, the extra input channels start at zero: {shown}")
        if self.unknown:
            out.append(f"  skipped, not in the model ({len(self.unknown)}): {', '.join(self.unknown[:SHOWN])}"
                       + (", ..." if len(self.unknown) > SHOWN else ""))
        if self.new:
            groups = ", ".join(f"{g} ({n})" for g, n in group_counts(self.new).items())
            out.append(f"  newly initialised ({len(self.new)}): {groups}")
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in shape) or "scalar"


def group_counts(names: list[str]) -> dict[str, int]:
    """Tensor counts by top-level module ("net." models by their second level: net.encoder, net.decoder),
    in first-seen order, so the report stays a line long."""
    def group(name: str) -> str:
        parts = name.split(".")
        depth = 2 if parts[0] == "net" and len(parts) > 2 else 1
        return ".".join(parts[:depth]) if len(parts) > depth else name
    return dict(Counter(group(n) for n in names))


def init_source(spec: str, fold: str | int, runs_dir: str = "runs") -> str:
    """`init_from` with `{fold}` replaced by the fold being trained ("all" for fold all) and `{runs_dir}`
    by the runs folder setting."""
    return str(spec).replace("{fold}", str(fold)).replace("{runs_dir}", str(runs_dir))


def _candidates(prefixes: list[str], keys: list[str]) -> list[tuple[str, dict[str, str]]]:
    """(description, file key -> model key) for every alignment tried, smallest change first."""
    out = []
    for drop in range(MAX_DROP + 1):
        for add in prefixes:
            mapping = {}
            for key in keys:
                parts = key.split(".")
                if len(parts) > drop:
                    mapping[key] = add + ".".join(parts[drop:])
            if drop == 0 and not add:
                desc = "names as they are"
            else:
                dropped = {".".join(k.split(".")[:drop]) for k in mapping} if drop else set()
                what = (f"dropped {sorted(dropped)[0]!r}" if len(dropped) == 1 else
                        f"dropped the first {drop} name parts" if drop else "")
                desc = "names " + ", ".join(w for w in (what, f"prefixed {add!r}" if add else "") if w)
            out.append((desc, mapping))
    return out


def match_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> WarmStartReport:
    """Align the file's names with the model's (see the module docstring) and sort every tensor into
    loaded / other shape / unknown / new, without touching the model."""
    target = model.state_dict()
    state = {strip_prefixes(k, WRAPPER_PREFIXES): v for k, v in state.items()}
    prefixes = [""] + [f"{name}." for name, _ in model.named_modules() if name and name.count(".") < 2]
    best: tuple[int, int] | None = None
    report = WarmStartReport(source)
    for desc, mapping in _candidates(prefixes, list(state)):
        if len(set(mapping.values())) != len(mapping):
            continue  # two file tensors would land on one model tensor: not a real alignment
        hits = [(k, m) for k, m in mapping.items() if m in target]
        fits = sum(1 for k, m in hits if tuple(state[k].shape) == tuple(target[m].shape))
        if best is not None and (fits, len(hits)) <= best:
            continue
        best = (fits, len(hits))
        report = WarmStartReport(source, desc)
        back = {m: k for k, m in mapping.items()}
        for k in state:
            if mapping.get(k) not in target:
                report.unknown.append(k)
        for m, value in target.items():
            k = back.get(m)
            if k is None:
                report.new.append(m)
            elif tuple(state[k].shape) == tuple(value.shape):
                report.loaded.append(m)
            elif _widened(tuple(state[k].shape), tuple(value.shape)):
                report.loaded.append(m)
                report.widened.append(m)
            else:
                report.other_shape.append((m, tuple(state[k].shape), tuple(value.shape)))
                report.new.append(m)
        report.mapping = {m: back[m] for m in report.loaded}
    return report


def _widened(file_shape: tuple[int, ...], model_shape: tuple[int, ...]) -> bool:
    """A convolution kernel that differs only by more input channels in the model."""
    return (len(file_shape) == 4 == len(model_shape) and file_shape[1] < model_shape[1]
            and file_shape[:1] + file_shape[2:] == model_shape[:1] + model_shape[2:])


def _about(info: dict[str, Any]) -> str:
    """A flair2-kit checkpoint's model in a few words (from its saved config)."""
    saved = info.get("config")  # the file's own mapping (another version's, perhaps): read as it is
    if not isinstance(saved, dict):
        return ""
    words = [f"{saved.get('arch')}/{saved.get('encoder')}", f"fusion={saved.get('fusion')}",
             f"{saved.get('num_classes')} classes"]
    if "fold" in info:
        words.append(f"fold {info['fold']}")
    if "epoch" in info:
        words.append(f"epoch {info['epoch']}")
    return "flair2-kit checkpoint: " + ", ".join(words)


def warm_start(model: nn.Module, spec: str, fold: str | int = "all", runs_dir: str = "runs"
               ) -> WarmStartReport:
    """Load every matching tensor of `spec` (`{fold}`, `{runs_dir}` substituted) into `model`, in place.

    ConfigError (one line, naming the file) when the file cannot be read or nothing in it fits the model.
    """
    source = init_source(spec, fold, runs_dir)
    try:
        state, info, _ = read_weights(source)
    except ValueError as err:
        raise ConfigError(f"init_from: {err}") from None
    state = {strip_prefixes(k, WRAPPER_PREFIXES): v for k, v in state.items()}  # as match_state names them
    report = match_state(model, state, source)
    report.about = _about(info)
    n, n_file, n_model = len(report.loaded), len(state), len(report.loaded) + len(report.new)
    if not n:
        example = f" (file: {next(iter(state))}; model: {next(iter(model.state_dict()))})" if state else ""
        raise ConfigError(f"init_from: {source}: no tensor matches the model by name and shape"
                          f"{example}; is it a checkpoint of this architecture?")
    if n < MIN_SHARE * n_file and n < MIN_SHARE * n_model:
        misfits = (report.unknown or [o[0] for o in report.other_shape])[:2]
        raise ConfigError(f"init_from: {source}: only {n} of its {n_file} tensors fit the model ({n_model} "
                          f"tensors; e.g. {misfits} do not): a checkpoint of another architecture?")
    subset = {name: state[key] for name, key in report.mapping.items()}
    current = model.state_dict()
    for name in report.widened:  # the file's kernels on the first inputs, zeros on the new ones
        kernel = torch.zeros_like(current[name])
        kernel[:, :subset[name].shape[1]] = subset[name]
        subset[name] = kernel
    # nn.Module's own loader: smp encoders override load_state_dict with other signatures
    nn.Module.load_state_dict(model, subset, strict=False)
    return report


def weights_file_report(model: nn.Module) -> str:
    """The line src.models.flair_model left about an `encoder_weights` file (empty when none was loaded)."""
    return next((str(m.weights_report) for m in model.modules() if hasattr(m, "weights_report")), "")


def apply_init_from(model: nn.Module, cfg: Settings, fold: str | int,
                    log: Callable[[str], None] = print) -> WarmStartReport | None:
    """The trainer's one call after build_model on a fresh (not resumed) run: print what an
    encoder_weights file loaded, then warm-start from cfg.init_from when it is set."""
    line = weights_file_report(model)
    if line:
        log(line)
    spec = cfg.init_from.strip()
    if not spec:
        return None
    report = warm_start(model, spec, fold, cfg.runs_dir)
    for text in report.lines():
        log(text)
    return report
