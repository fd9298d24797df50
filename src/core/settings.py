"""Every experiment setting of the kit, declared once: name, type, default, allowed values, one-line help and
the jobs that read it (nanoGPT style: one flat namespace of plain values, `configs/*.yaml` + `key=value`).

`Settings` is that declaration. Building one (from YAML, the command line, a checkpoint or in a test) checks
every value and the rules between them (`RULES`) before anything heavy is imported: this module needs no
torch, so a typo costs a fraction of a second. Library code receives a `Settings` (or
explicit arguments) and never writes a default of its own. Loading, saving and the printed table are in
src.core.config.
"""
from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from src.core.errors import ConfigError
from src.core.flair import BAND_NAMES, PATCH_SIZE, S2_WINDOW

NORMS = ("mean_std", "scale", "s2_stats")
AUGMENTS = ("none", "light", "heavy")
CLOUD_PIXELS = ("keep", "fill")  # s2_cloud_pixels (src.data.sentinel.fill_cloudy)
FUSIONS = ("none", "utt")
S2_EARLY = ("none", "ndvi", "bands")
EXTRA_INIT = ("mean", "copy", "random")
LOSSES = ("ce", "ce_dice", "focal")
FREQUENCY_WEIGHTS = ("inverse", "inverse_sqrt")  # numbers from the training masks (src.training.data)
CLASS_WEIGHT_WORDS = ("default", "none", *FREQUENCY_WEIGHTS)
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
TTA_LEVELS = ("none", "flip", "d4")  # the views of each: src.prediction.tta
TTA_CHOICES = ("auto", *TTA_LEVELS)  # auto: by device (src.prediction.ensemble.device_tta)
SLIM_DTYPES = ("fp16", "bf16")  # float types of `make export`'s slim checkpoint (src.deploy.export)
OOF_CHECKPOINTS = ("last", "best")  # the weights an out-of-fold store is made with (src.ensembling.oof)
ENSEMBLES = ("probs", "logits")
ENGINES = ("auto", "torch", "onnx")  # who runs the networks of predict and infer (src.prediction.onnx_engine)
BN_ADAPT = ("none", "domain")
LOGGERS = ("wandb", "mlflow")
NO_WEIGHTS = ("", "none", "None", "null")  # encoder_weights words for "no pretrained weights"
WINDOW_ALIGN = 32  # encoder output stride: inference windows on this grid see what a whole-raster pass sees

# Who reads a setting. Input and model settings are saved in every checkpoint, so the jobs that rebuild a
# model (predict, oof, infer, export) read them from there.
TRAIN = ("train",)
MODEL = ("train", "predict", "oof", "infer", "export")
PREDICT = ("predict", "oof", "infer")


def setting(default: Any, help: str, *, jobs: tuple[str, ...] = TRAIN, choices: tuple = (),
            low: float | None = None, high: float | None = None, above: float | None = None,
            below: float | None = None) -> Any:
    """One declared setting: its default and what is allowed (`low`/`high` inclusive, `above`/`below`
    exclusive bounds)."""
    return field(default=default, metadata={"help": help, "jobs": jobs, "choices": choices, "low": low,
                                            "high": high, "above": above, "below": below})


@dataclass(frozen=True)
class Settings:
    """The resolved settings of a run; immutable (`with_values` makes a checked copy)."""

    # --- run ---
    name: str = setting("run", "run name: outputs go to <runs_dir>/<name>/fold<k>/", jobs=("train", "oof"))
    seed: int = setting(42, "seed of everything random in training (order, augmentation, init)")
    runs_dir: str = setting("runs", "folder holding the runs", jobs=("train", "oof"))
    # --- data ---
    data_dir: str = setting("data", "folder with index_train.csv, index_test.csv, folds.csv",
                            jobs=("train", "predict", "oof"))
    bands: tuple[str, ...] = setting(BAND_NAMES, "aerial bands fed to the model: a subset of R,G,B,NIR,E",
                                     jobs=MODEL)
    norm: str = setting("mean_std", "input normalisation: train mean/std, /255, or per-patch S2 statistics",
                        jobs=MODEL, choices=NORMS)
    crop_size: int = setting(512, "training crop side in pixels (0: the whole 512 patch)", low=0)
    augment: str = setting("light", "training augmentation preset", choices=AUGMENTS)
    augment_extra: str = setting("", "your albumentations pixel transforms: path/to/file.py:build")
    use_s2: bool = setting(False, "read the Sentinel-2 time series of each patch", jobs=MODEL)
    s2_size: int = setting(S2_WINDOW, "S2 crop side in 10 m pixels around the patch centroid", jobs=MODEL,
                           low=1)
    s2_filter_clouds: bool = setting(True, "drop S2 dates whose cloud/snow cover exceeds s2_cover_max",
                                     jobs=MODEL)
    s2_cover_max: float = setting(0.5, "largest cloud/snow share of a kept S2 date", jobs=MODEL, low=0,
                                  high=1)
    s2_prob_min: int = setting(60, "cloud/snow probability (%) from which a pixel counts as covered",
                               jobs=MODEL,
                               low=0, high=100)
    s2_monthly: bool = setting(True, "average the kept S2 dates into monthly composites", jobs=MODEL)
    s2_cloud_pixels: str = setting("keep", "cloudy/snowy pixels of kept S2 dates: keep them (official) or "
                                   "fill them from the pixel's clear dates", jobs=MODEL, choices=CLOUD_PIXELS)
    s2_date_dropout: float = setting(0.0, "probability of dropping each S2 date at train time", low=0, high=1)
    use_metadata: bool = setting(False, "feed the aerial metadata vector (position, date, camera)",
                                 jobs=MODEL)
    skip_bad: bool = setting(False, "skip (and log) unreadable patches instead of stopping",
                             jobs=("train", "predict", "oof"))
    pseudo_dir: str = setting("",
                              "pseudo-labelled patches (make pseudo) added to training; {fold}, {runs_dir}")
    pseudo_threshold: float = setting(0.7, "pseudo-label pixels less confident than this are ignored",
                                      low=0, high=1)
    pseudo_weight: float = setting(1.0, "loss weight of pseudo-labelled patches (labelled ones weigh 1)",
                                   low=0)
    pseudo_only: bool = setting(False, "train on the pseudo-labelled patches alone (needs pseudo_dir)")
    # --- model ---
    arch: str = setting("Unet", "any segmentation_models_pytorch architecture", jobs=MODEL)
    encoder: str = setting("resnet34", "any smp encoder or timm 'tu-...' encoder", jobs=MODEL)
    encoder_weights: str = setting("imagenet", "imagenet | none | path/to/weights.pth | hf:<repo>[:<file>]",
                                   jobs=MODEL)
    init_from: str = setting("",
                             "warm start: a checkpoint whose matching tensors are loaded; {fold}, {runs_dir}")
    extra_init: str = setting("mean", "first-layer kernels of the bands beyond RGB", choices=EXTRA_INIT)
    extra_copy_band: str = setting("R", "band whose kernel is copied when extra_init=copy", choices=("R", "G",
                                                                                                     "B"))
    num_classes: int = setting(13, "output classes (FLAIR #2: 13, 'other' included)", jobs=MODEL, low=2)
    fusion: str = setting("none", "Sentinel-2 fusion: none, or U-T&T (U-TAE features added to each stage)",
                          jobs=MODEL, choices=FUSIONS)
    s2_early: str = setting("none", "monthly S2 features as extra input channels of the aerial encoder",
                            jobs=MODEL, choices=S2_EARLY)
    utae_widths: tuple[int, ...] = setting((64, 64, 128, 128), "U-TAE encoder widths", jobs=MODEL, low=1)
    utae_decoder_widths: tuple[int, ...] = setting((32, 32, 64, 128), "U-TAE decoder widths", jobs=MODEL,
                                                   low=1)
    ltae_heads: int = setting(16, "L-TAE attention heads", jobs=MODEL, low=1)
    ltae_d_model: int = setting(256, "L-TAE model width", jobs=MODEL, low=1)
    ltae_d_k: int = setting(4, "L-TAE key width", jobs=MODEL, low=1)
    s2_aux_weight: float = setting(1.0, "loss weight of the auxiliary S2 head (fusion=utt)", low=0)
    modality_dropout: float = setting(0.0, "probability of zeroing a sample's S2 input at train time",
                                      jobs=MODEL,
                                      low=0, high=1)
    meta_dim: int = setting(14, "length of the metadata vector (use_metadata)", jobs=MODEL, low=1)
    # --- training ---
    epochs: int = setting(10, "training epochs", low=1)
    batch_size: int = setting(8, "patches per batch and process", jobs=("train", "predict", "oof", "infer"),
                              low=1)
    lr: float = setting(3e-4, "peak learning rate (AdamW)", above=0)
    encoder_lr_ratio: float = setting(1.0, "the encoder's lr = lr * this (0 freezes it)", low=0)
    weight_decay: float = setting(1e-2, "AdamW weight decay (not on norms and biases)", low=0)
    warmup_epochs: float = setting(1.0, "linear warmup, in epochs, before the cosine decay", low=0)
    min_lr_ratio: float = setting(0.01, "final lr = lr * this", low=0, high=1)
    grad_clip: float = setting(1.0, "gradient norm clip (0: off)", low=0)
    accum_steps: int = setting(1, "batches accumulated per optimizer step", low=1)
    loss: str = setting("ce", "training loss", choices=LOSSES)
    class_weights: str | tuple[float, ...] = setting(
        "default", "default (0 for 'other') | none | inverse | inverse_sqrt | num_classes numbers",
        choices=CLASS_WEIGHT_WORDS, low=0)
    sample_rare: float = setting(0.0, "draw training patches with weight sum_c share_c / f_c ** this "
                                 "(f_c: class c's share of the training pixels; 0: uniform, no replacement)",
                                 low=0, high=1)
    label_smoothing: float = setting(0.0, "label smoothing of the cross-entropy", low=0, below=1)
    ema: float = setting(0.999, "EMA decay of the saved weights (0: off)", low=0, below=1)
    bn_recalibrate: int = setting(32, "training batches whose BatchNorm statistics replace the lagging "
                                  "running ones of the validated and saved weights (0: off)", low=0)
    avg_last: int = setting(0, ">0: also average the weights of the last N epochs into avg.pt", low=0)
    sync_bn: bool = setting(False, "SyncBatchNorm under DDP (CUDA, several processes)")
    precision: str = setting("auto", "autocast precision (auto: bf16 on a GPU, fp32 on CPU)",
                             jobs=("train", "predict", "oof", "infer"), choices=PRECISIONS)
    channels_last: bool = setting(True, "channels-last memory format (faster convolutions)",
                                  jobs=("train", "predict", "oof", "infer"))
    compile: bool = setting(False, "torch.compile the training model")
    workers: int | str = setting("auto", "DataLoader workers per process: a number, or auto (cores - 1)",
                                 jobs=("train", "predict", "oof"), low=0)
    max_train_batches: int = setting(0, ">0: cap on training batches per epoch (smoke tests, demos)", low=0)
    max_val_batches: int = setting(0, ">0: cap on validation batches", low=0)
    val_every: int = setting(1, "validate every N epochs (and after the last)", low=1)
    log_every: int = setting(10, "steps between progress and TensorBoard scalars", low=0)
    tensorboard: bool = setting(True, "TensorBoard event files in the run folder (make tensorboard)")
    tb_images: int = setting(4, "validation patches drawn in TensorBoard each validated epoch", low=0)
    loggers: str = setting("", "extra trackers, a comma list of wandb, mlflow (never contacted otherwise)")
    oof: bool = setting(True, "a fold run saves its held-out fold's probabilities (fold<k>/oof)")
    max_nan_steps: int = setting(20, "consecutive non-finite losses before the run stops", low=0)
    deterministic: bool = setting(False, "GPU: deterministic kernels (slower); CPU runs always are")
    # --- prediction ---
    tta: str = setting("auto", "test-time augmentation: none, flip (3 views), d4 (8); auto: d4 on a GPU, "
                       "none on a CPU", jobs=PREDICT, choices=TTA_CHOICES)
    time_budget_s: float = setting(0.0, ">0: the largest TTA level projected to fit this many seconds",
                                   jobs=("predict",), low=0)
    ensemble: str = setting("probs", "average softmax probabilities or logits over views and models",
                            jobs=PREDICT, choices=ENSEMBLES)
    engine: str = setting("auto", "who runs the networks: torch, onnx (onnxruntime on a CPU: each "
                          "checkpoint's checked export, made if missing); auto: onnx on CPU, torch on GPU",
                          jobs=("predict", "infer"), choices=ENGINES)
    bn_adapt: str = setting("none", "domain: re-estimate BatchNorm statistics on each test domain first",
                            jobs=("predict",), choices=BN_ADAPT)
    bn_adapt_patches: int = setting(256, "bn_adapt=domain: patches per domain of the estimate (0: all)",
                                    jobs=("predict",), low=0)
    infer_window: int = setting(PATCH_SIZE, "whole-orthophoto inference: window side (px)", jobs=("infer",),
                                low=WINDOW_ALIGN)
    infer_overlap: int = setting(128, "whole-orthophoto inference: overlap of windows (px)", jobs=("infer",),
                                 low=0)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, check_value(f, getattr(self, f.name)))
        for rule in RULES:
            rule(self)

    def with_values(self, **values: Any) -> Settings:
        """A checked copy with some values changed (unknown names are a ConfigError)."""
        unknown = [k for k in values if k not in SPECS]
        if unknown:
            raise ConfigError(unknown_message(unknown[0], "with_values"))
        return dataclasses.replace(self, **values)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (lists, not tuples): what config.yaml and checkpoints hold."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def run_dir(self, fold: str | int) -> Path:
        """Where a fold run of these settings writes: <runs_dir>/<name>/fold<k>/."""
        return Path(self.runs_dir) / self.name / f"fold{fold}"

    @property
    def reads_s2(self) -> bool:
        """Does the model read the Sentinel-2 series (U-T&T fusion or early channels)? Without one an early
        fusion model still runs (zero S2 channels) but predicts as if every date were missing, so tools that
        feed models (export, make infer) ask this, not `fusion` alone."""
        return self.use_s2 and (self.fusion != "none" or self.s2_early != "none")

    @property
    def early_s2(self) -> str:
        """The early S2 channels a model is built with: use_s2 is the one switch for S2 inputs, so
        `fusion=none use_s2=false` stays the aerial-only model of any preset, early channels included."""
        return self.s2_early if self.use_s2 else "none"

    @property
    def pretrained(self) -> str | None:
        """The encoder's pretrained weights (a name, a file or hf: reference), None for none."""
        return None if self.encoder_weights in NO_WEIGHTS else self.encoder_weights

    @property
    def logger_names(self) -> list[str]:
        """The extra loggers asked for (`loggers: wandb,mlflow`), each once."""
        return list(dict.fromkeys(n.strip().lower() for n in self.loggers.split(",") if n.strip()))

    @property
    def class_weights_from_data(self) -> bool:
        """inverse | inverse_sqrt: numbers only once the training masks are counted (src.training.data)."""
        return self.class_weights in FREQUENCY_WEIGHTS


SPECS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(Settings)}


def unknown_message(key: str, source: str) -> str:
    close = [k for k in SPECS if k.startswith(key[:3])]
    hint = f" (did you mean {', '.join(close[:3])}?)" if close else ""
    return f"unknown setting {key!r} in {source}{hint}"


# ------------------------------------------------------------------------------------------ one value
def _number(name: str, value: Any, kind: type) -> int | float:
    if isinstance(value, str) and kind is float:  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and isinstance(value,
                                                                                                     float)):
        raise ConfigError(f"{name}: expected {'an integer' if kind is int else 'a number'}, got {value!r}")
    return kind(value)


def _bounded(f: dataclasses.Field, value: int | float) -> int | float:
    m = f.metadata
    if ((m["low"] is not None and value < m["low"]) or (m["high"] is not None and value > m["high"])
            or (m["above"] is not None and value <= m["above"])
            or (m["below"] is not None and value >= m["below"])):
        raise ConfigError(f"{f.name}: expected {describe_range(f)}, got {value!r}")
    return value


def describe_range(f: dataclasses.Field) -> str:
    m = f.metadata
    lower = (f">= {m['low']:g}" if m["low"] is not None
             else f"> {m['above']:g}" if m["above"] is not None else "")
    upper = (f"<= {m['high']:g}" if m["high"] is not None
             else f"< {m['below']:g}" if m["below"] is not None else "")
    return "a value " + " and ".join(b for b in (lower, upper) if b) if lower or upper else "a value"


def _as_list(value: Any) -> Any:
    """One list syntax for every list-valued setting: `a,b,c` (command line or YAML) or `[a, b, c]`."""
    if isinstance(value, str):
        import yaml

        return [yaml.safe_load(v) for v in value.split(",") if v.strip() != ""]
    return value


def _word(f: dataclasses.Field, value: Any) -> str:
    if value is None:  # `key: null` in YAML: the empty word
        value = ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ConfigError(f"{f.name}: expected a string, got {value!r}")
    value = str(value)
    choices = f.metadata["choices"]
    if choices and value not in choices:
        raise ConfigError(f"{f.name}: expected one of {', '.join(choices)}, got {value!r}")
    return value


def _bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ConfigError(f"{name}: expected true/false, got {value!r}")


def _int_list(f: dataclasses.Field, value: Any) -> tuple[int, ...]:
    value = _as_list(value)
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"{f.name}: expected a non-empty list of integers, got {value!r}")
    return tuple(_bounded(f, _number(f.name, v, int)) for v in value)


def _bands(f: dataclasses.Field, value: Any) -> tuple[str, ...]:
    value = _as_list(value)
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{f.name}: expected a list, got {value!r}")
    names = tuple(str(b) for b in value)
    unknown = [b for b in names if b.upper() not in BAND_NAMES]
    if unknown:
        raise ConfigError(f"bands: unknown band {unknown[0]!r}: expected a subset of {', '.join(BAND_NAMES)}")
    if not names or len({b.upper() for b in names}) != len(names):
        raise ConfigError(f"bands must be a non-empty list without repeats, got {list(names)}")
    return names


def _class_weights(f: dataclasses.Field, value: Any) -> str | tuple[float, ...]:
    if isinstance(value, (list, tuple)) or (isinstance(value, str) and "," in value):
        numbers = tuple(float(_bounded(f, _number(f.name, v, float))) for v in _as_list(value))
        if not sum(numbers) > 0:
            raise ConfigError("class_weights: weights must be >= 0 with a positive sum")
        return numbers
    if value not in CLASS_WEIGHT_WORDS:
        raise ConfigError(f"class_weights: expected {' | '.join(CLASS_WEIGHT_WORDS)} | a list of numbers, "
                          f"got {value!r}")
    return value


def _workers(f: dataclasses.Field, value: Any) -> int | str:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"workers: expected a whole number or auto, got {value!r}")
    return _bounded(f, value)


# The coercion of each declared type (the annotation is the key).
_BY_TYPE: dict[str, Callable[[dataclasses.Field, Any], Any]] = {
    "str": _word,
    "bool": lambda f, v: _bool(f.name, v),
    "int": lambda f, v: _bounded(f, _number(f.name, v, int)),
    "float": lambda f, v: _bounded(f, _number(f.name, v, float)),
    "tuple[int, ...]": _int_list,
    "tuple[str, ...]": _bands,
    "str | tuple[float, ...]": _class_weights,
    "int | str": _workers,
}


def check_value(f: dataclasses.Field, value: Any) -> Any:
    """The value of setting `f` in its declared type, or a one-line ConfigError naming the setting."""
    return _BY_TYPE[str(f.type)](f, value)


# ------------------------------------------------------------------------------------------ rules
def _s2_rules(s: Settings) -> None:
    """S2 feeds the fusion branch and/or the early channels: either side alone trains dead weights or reads
    S2 for nothing (use_s2=false switches the early channels off). A training rule: a dataset may read S2
    for other uses, and a fusion checkpoint may be run without its series."""
    if s.fusion != "none" and not s.use_s2:
        raise ConfigError(f"fusion={s.fusion} needs use_s2=true")
    if s.use_s2 and s.fusion == "none" and s.s2_early == "none":
        raise ConfigError("use_s2=true does nothing with fusion=none: set fusion=utt or use_s2=false "
                          "(or s2_early=ndvi|bands)")


def _training_rules(s: Settings) -> None:
    if isinstance(s.class_weights, tuple) and len(s.class_weights) != s.num_classes:
        raise ConfigError(f"class_weights: expected {s.num_classes} numbers, got {list(s.class_weights)}")
    if s.pseudo_only and not s.pseudo_dir:
        raise ConfigError("pseudo_only=true needs pseudo_dir (the folder make pseudo wrote)")
    if s.augment_extra and ":" not in s.augment_extra:
        raise ConfigError(f"augment_extra: expected path/to/file.py:function or package.module:function, "
                          f"got {s.augment_extra!r}")


def _tracking_rules(s: Settings) -> None:
    """Extra loggers by name, and the packages they need (looked up, not imported)."""
    for name in (["tensorboard"] if s.tensorboard else []) + s.logger_names:
        if importlib.util.find_spec(name) is None:
            fix = "tensorboard=false" if name == "tensorboard" else f"drop {name} from loggers"
            raise ConfigError(f"{'tensorboard=true' if name == 'tensorboard' else 'loggers=' + name} needs "
                              f"the {name} package: pip install {name} (or {fix})")


def _window_rules(s: Settings) -> None:
    if s.infer_window % WINDOW_ALIGN or s.infer_overlap % WINDOW_ALIGN or s.infer_overlap >= s.infer_window:
        raise ConfigError(f"infer_window {s.infer_window} / infer_overlap {s.infer_overlap}: need multiples "
                          f"of "
                          f"{WINDOW_ALIGN} with 0 <= overlap < window")


def _aerial_only(s: Settings) -> None:
    """Whole orthophotos have neither a Sentinel-2 series nor per-patch metadata."""
    if s.reads_s2:
        raise ConfigError(f"this model needs Sentinel-2 time series (fusion={s.fusion}, "
                          f"s2_early={s.s2_early}); "
                          "whole-orthophoto inference supports aerial-only models")
    if s.use_metadata:
        raise ConfigError("this model needs per-patch metadata (use_metadata=true); "
                          "whole-orthophoto inference "
                          "supports aerial-only models")
    if s.norm == "s2_stats":
        raise ConfigError("this model normalises each patch with its Sentinel-2 statistics (norm=s2_stats); "
                          "whole orthophotos have no S2: use another model, or force the train statistics "
                          "with "
                          "norm=mean_std (expect worse predictions)")


# Rules every Settings obeys, and what one job needs on top (checked by `check_job`).
def _logger_rules(s: Settings) -> None:
    for n in s.logger_names:
        if n not in LOGGERS:
            raise ConfigError(f"loggers: unknown logger {n!r} (a comma list of: {', '.join(LOGGERS)})")


RULES: tuple[Callable[[Settings], None], ...] = (_training_rules, _logger_rules, _window_rules)
JOB_RULES: dict[str, tuple[Callable[[Settings], None], ...]] = {"train": (_s2_rules, _tracking_rules),
                                                                "infer": (_aerial_only,)}


def check_job(s: Settings, job: str, source: str = "") -> None:
    """The rules of `job` on top of the universal ones; `source` (a checkpoint, say) prefixes the error."""
    for rule in JOB_RULES.get(job, ()):
        try:
            rule(s)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}" if source else str(err)) from None


def reading_jobs(name: str) -> tuple[str, ...]:
    return SPECS[name].metadata["jobs"]
