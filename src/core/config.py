"""Experiment settings: plain values in `configs/*.yaml`, overridden on the command line as key=value.

One flat namespace (nanoGPT style). Every key has a default here, so an unknown key (a typo) or a
value of the wrong type is a one-line error before any heavy work starts. The resolved config is
saved with every run and checkpoint, so a checkpoint alone rebuilds its model.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from src.core.errors import ConfigError
from src.core.files import write_text

DEFAULTS: dict[str, Any] = {
    # --- run ---
    "name": "run",                # runs/<name>/fold<k>/
    "seed": 42,
    "runs_dir": "runs",
    # --- data ---
    "data_dir": "data",           # holds index_train.csv, index_test.csv, folds.csv
    "bands": ["R", "G", "B", "NIR", "E"],  # any subset of R,G,B,NIR,E (E = nDSM elevation)
    "norm": "mean_std",           # mean_std (train statistics) | scale (/255, as the baseline) | s2_stats
    "crop_size": 512,             # training crop (random crop; validation and test use full 512)
    "augment": "light",           # none | light | heavy
    "augment_extra": "",          # your albumentations pixel transforms: path/to/file.py:build
    "use_s2": False,
    "s2_size": 40,                # S2 crop in 10 m pixels (multiple of 8)
    "s2_filter_clouds": True,
    "s2_cover_max": 0.5,
    "s2_prob_min": 60,
    "s2_monthly": True,
    "s2_date_dropout": 0.0,       # probability of dropping each date at train time
    "use_metadata": False,
    "skip_bad": False,            # skip (and log) unreadable samples instead of stopping
    "pseudo_dir": "",             # pseudo-labelled patches (make pseudo) added to the training split
    "pseudo_threshold": 0.7,      # pseudo-label pixels less confident than this are ignored by the loss
    "pseudo_weight": 1.0,         # loss weight of pseudo-labelled patches (labelled ones weigh 1)
    "pseudo_only": False,         # train on the pseudo-labelled patches alone (the 2nd place's fine-tune)
    # --- model ---
    "arch": "Unet",               # any smp architecture name
    "encoder": "resnet34",        # any smp encoder or timm "tu-..." encoder
    "encoder_weights": "imagenet",  # imagenet | none | path/to/local_weights.pth | hf:<repo>[:<file>]
    "init_from": "",              # warm start: a checkpoint; tensors matching in name and shape are loaded
    "extra_init": "mean",         # init of input channels beyond RGB: mean | copy | random
    "extra_copy_band": "R",       # band whose kernel is copied when extra_init=copy
    "num_classes": 13,
    "fusion": "none",             # none | utt (U-T&T: U-TAE features added to each aerial stage)
    "s2_early": "none",           # none | ndvi | bands: monthly S2 features as extra aerial input channels
    "utae_widths": [64, 64, 128, 128],
    "utae_decoder_widths": [32, 32, 64, 128],
    "ltae_heads": 16,
    "ltae_d_model": 256,
    "ltae_d_k": 4,
    "s2_aux_weight": 1.0,         # weight of the auxiliary S2 head's loss
    "modality_dropout": 0.0,      # probability of zeroing the S2 branch for a sample at train time
    "meta_dim": 14,               # length of the "meta" vector when use_metadata (= src.data.dataset.META_DIM)
    # --- training ---
    "epochs": 10,
    "batch_size": 8,
    "lr": 3e-4,
    "encoder_lr_ratio": 1.0,      # the pretrained encoder's lr = lr * this (e.g. 0.1)
    "weight_decay": 1e-2,
    "warmup_epochs": 1.0,
    "min_lr_ratio": 0.01,
    "grad_clip": 1.0,
    "accum_steps": 1,
    "loss": "ce",                 # ce | ce_dice | focal
    "class_weights": "default",   # default (0 for "other") | none | inverse | inverse_sqrt | 13 numbers
    "label_smoothing": 0.0,
    "ema": 0.999,                 # 0 disables the EMA
    "avg_last": 0,                # >0: also average the weights of the last N epochs (SWA-style) into avg.pt
    "sync_bn": False,             # SyncBatchNorm under DDP
    "precision": "auto",          # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
    "channels_last": True,
    "compile": False,
    "workers": "auto",            # DataLoader workers per process: a number, or auto (the cores, minus one)
    "max_train_batches": 0,       # >0 caps batches per epoch (smoke tests, demos)
    "max_val_batches": 0,
    "val_every": 1,               # validate every N epochs (and always after the last one)
    "log_every": 10,
    "tensorboard": True,          # TensorBoard event files in the run folder (make tensorboard)
    "tb_images": 4,               # validation patches drawn as RGB | truth | prediction each validated epoch
    "loggers": "",                # extra trackers: a comma list of wandb, mlflow (never contacted otherwise)
    "oof": True,                  # a fold run saves its held-out fold's probabilities (fold<k>/oof)
    "max_nan_steps": 20,          # consecutive non-finite losses before the run stops
    "deterministic": False,       # GPU: deterministic kernels (slower); CPU runs are always deterministic
    # --- prediction ---
    "tta": "d4",                  # none | flip | d4
    "time_budget_s": 0.0,         # >0: pick the largest TTA level projected to fit
    "ensemble": "probs",          # probs | logits
    "bn_adapt": "none",           # none | domain: re-estimate BatchNorm statistics on each test domain first
    "bn_adapt_patches": 256,      # bn_adapt=domain: patches of the domain used for the estimate (0: all)
}


# settings whose value is a word (their str default) or a list: `class_weights=default` or `=0,1,...,0`
LIST_OR_WORD = frozenset({"class_weights"})
# settings whose value is a whole number or the word auto: `workers=8`, `workers=auto`
INT_OR_AUTO = frozenset({"workers"})


def _as_list(value: Any) -> Any:
    """One list syntax for every list-valued setting: `a,b,c` (command line or YAML) or `[a, b, c]`."""
    if isinstance(value, str):
        return [yaml.safe_load(v) for v in value.split(",") if v.strip() != ""]
    return value


def _coerce(key: str, value: Any, default: Any) -> Any:
    if key in INT_OR_AUTO:
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool)):
            return value
        raise ConfigError(f"{key}: expected a whole number or auto, got {value!r}")
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if isinstance(default, list):
        value = _as_list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return value
    if isinstance(default, str):
        if key in LIST_OR_WORD and (isinstance(value, list) or (isinstance(value, str) and "," in value)):
            return _as_list(value)
        if isinstance(value, (list, dict)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def split_overrides(items: list[str], overrides: list[str]) -> tuple[list[str], list[str]]:
    """argparse's nargs='+' (--runs, --combine) swallows key=value tokens placed after it: (the paths, the
    overrides with those tokens moved back). A token with "=" that names an existing path stays a path."""
    keep = [x for x in items if not ("=" in x and not Path(x).exists())]
    return keep, overrides + [x for x in items if x not in keep]


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`key=value` strings -> dict; values are parsed as YAML (so 3, 1e-3, true, [a,b] work)."""
    out: dict[str, Any] = {}
    for arg in args:
        if "=" not in arg:
            raise ConfigError(f"override {arg!r} is not of the form key=value")
        key, raw = arg.split("=", 1)
        key = key.strip().lstrip("-")
        out[key] = _parse_value(key, raw)
    return out


def _parse_value(key: str, raw: str) -> Any:
    """A command-line value as YAML; a text setting keeps its raw text when YAML would not give a plain
    scalar (`init_from={runs_dir}/s1/fold{fold}/best.pt` is a path with placeholders, not a mapping)."""
    text_setting = isinstance(DEFAULTS.get(key), str) and key not in LIST_OR_WORD
    if raw == "":
        return ""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        if text_setting:
            return raw
        raise ConfigError(f"{key}={raw}: not a readable value ({one_line_yaml(err)})") from None
    return raw if text_setting and isinstance(value, dict) else value


def one_line_yaml(err: yaml.YAMLError) -> str:
    return " ".join(str(err).split())[:160]


def resolve(values: dict[str, Any], base: dict[str, Any] | None = None, source: str = "") -> dict[str, Any]:
    """Merge `values` over `base` (DEFAULTS by default), checking keys and types."""
    cfg = dict(DEFAULTS if base is None else base)
    for key, value in values.items():
        if key not in DEFAULTS:
            where = f" in {source}" if source else ""
            close = [k for k in DEFAULTS if k.startswith(key[:3])]
            hint = f" (did you mean {', '.join(close[:3])}?)" if close else ""
            raise ConfigError(f"unknown setting {key!r}{where}{hint}")
        cfg[key] = _coerce(key, value, DEFAULTS[key])
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> dict[str, Any]:
    """DEFAULTS <- YAML file <- key=value overrides."""
    cfg = dict(DEFAULTS)
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: invalid YAML ({err})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of settings")
        cfg = resolve(values, cfg, str(path))
    if overrides:
        values = overrides if isinstance(overrides, dict) else parse_overrides(list(overrides))
        cfg = resolve(values, cfg, "command line")
    return cfg


def save_config(cfg: dict[str, Any], path: str | Path) -> None:
    """The resolved settings as YAML (written atomically: `load_config` reads it back unchanged)."""
    write_text(path, yaml.safe_dump(cfg, sort_keys=False))


def exit_on_config_error(err: ConfigError) -> None:
    """Print a one-line error and exit 2 (used by every command-line entry point)."""
    print(f"config error: {err}", file=sys.stderr)
    raise SystemExit(2)
