"""The ONNX file of a checkpoint: what it computes, how it is written, how it is checked, and the stamp that
says it was checked against that checkpoint.

- `<stem>.onnx` (opset 18, torch.onnx dynamo exporter) computes `OnnxModel`: raw band values in, logits out,
  the input normalisation built in, so its users need none of the kit's statistics.
- It is checked on CPU before anything uses it, on real patches (`check_inputs`: the first CHECK_PATCHES of
  the run's training index, else of a synthetic tree from the kit's generator), not noise (uniform noise
  drove a from-scratch model's logits to ~1e4, making any relative tolerance loose). It fails, and is
  deleted, when its argmax agrees with PyTorch's on fewer than MIN_AGREEMENT of the pixels PyTorch decides
  by more than the tolerated logit difference (`agreement`), or its largest logit difference exceeds
  ONNX_ATOL or ONNX_RTOL of the largest logit.
- A passed check writes `<stem>.onnx.json` (`Stamp`): the checkpoint's and the file's size and SHA-256, the
  input settings and window side it was made for, and the check's figures. The ONNX engine
  (src.prediction.onnx_engine) uses a file only while its stamp matches: a retrained best.pt, a copied or
  edited .onnx, or other input settings make it stale. Content hashes, not modification times, so a run
  folder copied from a GPU machine keeps its export.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from src.core.errors import DataError
from src.core.files import atomic_write, write_json
from src.core.settings import Settings
from src.core.tables import load_index
from src.data.dataset import S2_SCALE, FlairDataset
from src.data.loader import collate, input_signature
from src.data.normalize import normalize
from src.prep.index_scan import scan
from src.prep.synth_write import SynthSpec, make_dataset

OPSET = 18
# Accepted max |logit difference| between onnxruntime and PyTorch (fp32, CPU): 1e-3, or 1e-5 of the largest
# logit for models with large logits (measured: 1.0e-3 on logits up to 437 of an untrained U-Net R34).
ONNX_ATOL, ONNX_RTOL = 1e-3, 1e-5
MIN_AGREEMENT = 0.999  # share of the decided pixels whose class must match the reference's (`agreement`)
CHECK_PATCHES = 3      # real patches checked on (not the traced batch of 2: the batch is dynamic)


class OnnxModel(nn.Module):
    """What the ONNX file computes: raw inputs -> normalisation -> the model -> logits (B, 13, H, W).

    Inputs: `image` float32 (B, C, H, W) raw band values 0..255, C = the config's bands in their order
    (e.g. R, G, B, NIR, E); the normalisation of the config (train mean/std or /255) is inside.
    Fusion models (fusion=utt) also take `s2` float32 (B, T, 10, S, S) Sentinel-2 reflectance x 10000 as
    stored in the FLAIR #2 arrays (NaN allowed: read as 0), `s2_days` int64 (B, T) and `s2_pad` bool
    (B, T), True on padded dates (docs/data-format.md, "Samples and batches"). B and T are dynamic; H and
    W are the export size (`--size`, 512 by default: the window `make infer` uses). Dynamic sides are not
    offered: the dynamo exporter of torch 2.5-2.6 with onnxscript 0.1 fails on the U-Net decoder's
    upsampling to symbolic sizes, and a fixed window is what tiled inference feeds anyway.
    Softmax of the logits gives the class probabilities.
    """

    def __init__(self, model: nn.Module, cfg: Settings):
        super().__init__()
        self.model, self.cfg = model, cfg
        self.fusion = cfg.reads_s2  # U-T&T and/or early S2 channels

    def forward(self, image: torch.Tensor, s2: torch.Tensor | None = None,
                s2_days: torch.Tensor | None = None, s2_pad: torch.Tensor | None = None) -> torch.Tensor:
        if s2 is not None:
            s2 = torch.nan_to_num(s2, nan=0.0) / S2_SCALE
        return self.model(normalize(image, self.cfg), s2=s2, s2_days=s2_days, s2_pad=s2_pad)["logits"]


def onnx_refusal(cfg: Settings) -> str | None:
    """Why a model has no ONNX file (None when it can have one)."""
    if cfg.use_metadata:
        return "metadata models (use_metadata=true) are not exported: their input is the kit's own encoding"
    if cfg.norm == "s2_stats":
        return "norm=s2_stats needs per-patch S2 statistics the ONNX input does not carry"
    return None


def example_inputs(cfg: Settings, batch: int = 2, size: int = 512, dates: int = 6,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """Random raw inputs of the shapes the ONNX model takes (the last sample with padded dates)."""
    g = torch.Generator().manual_seed(seed)
    out = {"image": torch.randint(0, 256, (batch, len(cfg.bands), size, size), generator=g).float()}
    if cfg.reads_s2:
        s = cfg.s2_size
        out["s2"] = torch.randint(0, 4000, (batch, dates, 10, s, s), generator=g).float()
        out["s2_days"] = torch.sort(torch.randint(-130, 230, (batch, dates), generator=g), dim=1).values
        out["s2_pad"] = torch.zeros(batch, dates, dtype=torch.bool)
        out["s2_pad"][-1, dates // 2:] = True
    return out


def export_onnx(wrapper: OnnxModel, inputs: dict[str, torch.Tensor], path: Path) -> Path:
    """torch.onnx.export (dynamo) with a dynamic batch (and dates), sides fixed, written atomically."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    shapes: dict[str, dict[int, Any]] = {"image": {0: batch}}
    if wrapper.fusion:
        dates = torch.export.Dim("dates", min=1, max=1024)
        shapes.update({"s2": {0: batch, 1: dates}, "s2_days": {0: batch, 1: dates},
                       "s2_pad": {0: batch, 1: dates}})
    names = list(inputs)
    with atomic_write(path) as tmp, contextlib.redirect_stdout(sys.stderr), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # axis-renaming notes of the exporter
        program = torch.onnx.export(wrapper.eval(), tuple(inputs.values()), dynamic_shapes=shapes,
                                    input_names=names, output_names=["logits"], opset_version=OPSET,
                                    dynamo=True, external_data=False, verbose=False)
        program.save(str(tmp))
    return path


def onnx_logits(path: Path, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The ONNX model's logits on `inputs`, run by onnxruntime on the CPU."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["logits"], {k: v.numpy() for k, v in inputs.items()})[0])


# ------------------------------------------------------------------------------------------ checks
@dataclass
class Reference:
    """PyTorch's logits on the check inputs: what an exported file must reproduce."""

    inputs: dict[str, torch.Tensor]
    logits: torch.Tensor
    source: str  # where the inputs come from, in words

    @property
    def scale(self) -> float:
        return float(self.logits.abs().max())


def _inputs_of(rows: pd.DataFrame, cfg: Settings, size: int) -> dict[str, torch.Tensor]:
    """The raw inputs OnnxModel takes, from index rows read as prediction reads them (centre `size` crop)."""
    ds = FlairDataset(rows.reset_index(drop=True), cfg, train=False)
    batch = collate([ds[i] for i in range(len(ds))])
    o = max(0, (batch["image"].shape[-1] - size) // 2)
    out = {"image": batch["image"][..., o:o + size, o:o + size].float()}
    if cfg.reads_s2:
        out.update(s2=batch["s2"].float() * S2_SCALE, s2_days=batch["s2_days"], s2_pad=batch["s2_pad"])
    return out


def check_inputs(cfg: Settings, size: int) -> tuple[dict[str, torch.Tensor], str]:
    """(raw inputs, where they come from): CHECK_PATCHES patches of the run's training index, or of a small
    synthetic tree written to a temporary folder by the kit's generator when that index is gone."""
    index = Path(cfg.data_dir) / "index_train.csv"
    if index.is_file():
        rows = load_index(index).head(CHECK_PATCHES)
        return _inputs_of(rows, cfg, size), f"{len(rows)} patches of {index}"
    with tempfile.TemporaryDirectory() as tmp:
        root = make_dataset(Path(tmp) / "synth", SynthSpec(1, 1, 1, CHECK_PATCHES, seed=0, edge_rate=0.0))
        rows = scan(root).frames["train"].head(CHECK_PATCHES)
        return _inputs_of(rows, cfg, size), f"{len(rows)} synthetic patches (no {index})"


def reference(model: nn.Module, cfg: Settings, size: int) -> Reference:
    """PyTorch's logits on the check inputs of `cfg` at `size`."""
    inputs, source = check_inputs(cfg, size)
    return Reference(inputs, logits_of(model, cfg, inputs), source)


def logits_of(model: nn.Module, cfg: Settings, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        return OnnxModel(model, cfg).eval()(**inputs)


def agreement(got: torch.Tensor, want: torch.Tensor, margin: float) -> tuple[float, float]:
    """(share of the decided pixels where `got` picks `want`'s class, share of pixels decided): a pixel is
    decided when `want`'s best logit leads its second by more than `margin`, the logit difference tolerated,
    since within it a near tie may flip legitimately (fp16 weights of an untrained fusion model flipped 0.55%
    of all pixels: a plain 99.9% rule failed it). (B, 13, H, W) logits."""
    top2 = want.topk(2, dim=1).values
    decided = (top2[:, 0] - top2[:, 1]) > margin
    same = (got.argmax(1) == want.argmax(1)) & decided
    n = int(decided.sum())
    return (float(same.sum()) / n if n else 1.0), n / decided.numel()


def check_file(path: Path, got: torch.Tensor, want: torch.Tensor, tol: float, against: str
               ) -> tuple[float, float, str]:
    """Delete `path` and raise DataError naming it when `got` fails against `want`; else (class agreement on
    the decided pixels, max |logit difference|, both in words)."""
    if got.shape != want.shape:
        path.unlink(missing_ok=True)
        raise DataError(f"{path}: logits {tuple(got.shape)}, {against} {tuple(want.shape)}; file removed")
    (agree, decided), diff = agreement(got, want, tol), float((got - want).abs().max())
    figures = (f"class agreement {agree:.4%} of the {decided:.1%} decided pixels, max |logit diff| "
               f"{diff:.2e} vs {against}")
    if agree < MIN_AGREEMENT or not diff <= tol:
        path.unlink(missing_ok=True)  # an unchecked model is not left for use
        raise DataError(f"{path}: {figures} (needs >= {MIN_AGREEMENT:.1%} and <= {tol:.2e}); file removed")
    return agree, diff, figures


# ------------------------------------------------------------------------------------------ the stamp
def onnx_path(checkpoint: Path) -> Path:
    return checkpoint.with_name(f"{checkpoint.stem}.onnx")


def stamp_path(onnx: Path) -> Path:
    return onnx.with_name(f"{onnx.name}.json")


def fingerprint(path: Path) -> str:
    """`<size>:<sha256>` of a file (~0.3 s for a 500 MB checkpoint)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return f"{path.stat().st_size}:{digest.hexdigest()}"


@dataclass(frozen=True)
class Stamp:
    """What `<stem>.onnx.json` records: the ONNX file was checked against this checkpoint, for these
    inputs."""

    checkpoint: str   # fingerprint of the checkpoint it was exported from
    onnx: str         # fingerprint of the ONNX file as checked
    inputs: str       # the input settings baked in (src.data.loader.input_signature: bands, norm, S2)
    size: int         # the window side it takes
    agreement: float  # on the decided pixels (`agreement`)
    max_diff: float
    figures: str      # both, in words
    checked_on: str
    created: str = ""

    @classmethod
    def read(cls, path: Path) -> Stamp | None:
        """The stamp beside an ONNX file, or None (missing or unreadable: the file counts as unchecked)."""
        try:
            return cls(**json.loads(stamp_path(path).read_text()))
        except (OSError, ValueError, TypeError):
            return None


def is_current(checkpoint: Path, onnx: Path, cfg: Settings, size: int) -> bool:
    """Whether `onnx` was checked against this very checkpoint, for `cfg`'s inputs and `size` windows."""
    stamp = Stamp.read(onnx)
    return (stamp is not None and onnx.is_file() and stamp.size == size
            and stamp.inputs == input_signature(cfg) and stamp.checkpoint == fingerprint(checkpoint)
            and stamp.onnx == fingerprint(onnx))


def export_checked(checkpoint: Path, model: nn.Module, cfg: Settings, ref: Reference) -> Stamp:
    """Write `<stem>.onnx` beside `checkpoint` from `model` (its settings `cfg`), check it against `ref` and
    stamp it; DataError (file removed) when the check fails."""
    out = onnx_path(checkpoint)
    stamp_path(out).unlink(missing_ok=True)  # the old stamp never vouches for a new file
    size = ref.inputs["image"].shape[-1]
    export_onnx(OnnxModel(model, cfg).eval(), example_inputs(cfg, size=size), out)
    agree, diff, figures = check_file(out, onnx_logits(out, ref.inputs), ref.logits,
                                max(ONNX_ATOL, ONNX_RTOL * ref.scale), "PyTorch")
    stamp = Stamp(fingerprint(checkpoint), fingerprint(out), input_signature(cfg), size, agree, diff, figures,
                  ref.source, time.strftime("%Y-%m-%dT%H:%M:%S"))
    write_json(stamp_path(out), asdict(stamp))
    return stamp
