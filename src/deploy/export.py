"""Export trained checkpoints for deployment (`python -m src.export`): a slim weights-only checkpoint and an
ONNX model, both checked.

For every checkpoint (every best.pt under a run folder, or the files given) it writes, beside it:
- `<stem>.slim.pt`: the inference weights ("model") cast to fp16 (or bf16), the "config" and a small
  "meta" dict -- no optimizer, raw weights, EMA copy or history, so it is a fraction of best.pt's size.
  It loads through the same `load_for_inference` as best.pt (load_state_dict copies the half-precision
  tensors into the float32 parameters), so `make predict RUNS=.../best.slim.pt` and `make infer` run from
  it. A tensor that would overflow fp16 is kept in float32.
- `<stem>.onnx` (opset 18, torch.onnx dynamo exporter): see `OnnxModel` for its inputs. It embeds the
  input normalisation, so a user of the ONNX file feeds raw band values and needs none of the kit's
statistics. Each file is checked on CPU before the command reports success, on real patches (`check_inputs`:
the first CHECK_PATCHES of the run's training index, else of a synthetic tree from the kit's generator), not
noise (uniform noise drove a from-scratch model's logits to ~1e4, making any relative tolerance loose): the
slim checkpoint reloaded against best.pt, the ONNX model in onnxruntime against PyTorch. A file fails, and is
deleted, when its argmax agrees with the reference on fewer than MIN_AGREEMENT of the pixels the reference
decides by more than the tolerated logit difference (`agreement`), or its largest logit difference exceeds
that tolerance (slim: SLIM_RTOL of the largest logit, fp16 weights; ONNX: ONNX_ATOL or ONNX_RTOL of it); both
figures are printed with the three file sizes.
"""
from __future__ import annotations

import contextlib
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from src.core.checkpoint import find_checkpoints, load_checkpoint, save_checkpoint
from src.core.errors import DataError
from src.core.files import atomic_write
from src.core.flair import PATCH_SIZE
from src.core.settings import SLIM_DTYPES, Settings
from src.core.tables import load_index
from src.data.dataset import S2_SCALE, FlairDataset
from src.data.loader import collate
from src.data.normalize import normalize
from src.models.flair_model import load_for_inference
from src.prep.index_scan import scan
from src.prep.synth_write import SynthSpec, make_dataset

DTYPES = dict(zip(SLIM_DTYPES, (torch.float16, torch.bfloat16)))
OPSET = 18
# Accepted max |logit difference| between onnxruntime and PyTorch (fp32, CPU): 1e-3, or 1e-5 of the largest
# logit for models with large logits (measured: 1.0e-3 on logits up to 437 of an untrained U-Net R34).
ONNX_ATOL, ONNX_RTOL = 1e-3, 1e-5
# Slim (fp16/bf16 weights) against best.pt: max |logit difference| up to 2% of the largest logit (~1e-3
# relative per weight, accumulated over the layers).
SLIM_RTOL = 2e-2
MIN_AGREEMENT = 0.999  # share of the decided pixels whose class must match the reference's (`agreement`)
CHECK_PATCHES = 3      # real patches checked on (not the traced batch of 2: the batch is dynamic)


# ----------------------------------------------------------------------------------- slim checkpoint
def slim_state(state: dict[str, Any], dtype: torch.dtype = torch.float16, source: str = "") -> dict[str, Any]:
    """{"model": half-precision inference weights, "config", "meta"} from a training checkpoint."""
    weights, kept = {}, []
    limit = torch.finfo(dtype).max
    for key, value in state["model"].items():
        if value.is_floating_point():
            if value.abs().max() > limit if value.numel() else False:
                kept.append(key)  # would become inf: stays float32
            else:
                value = value.to(dtype)
        weights[key] = value.detach().clone().contiguous()
    meta = {"format": "flair2-kit slim checkpoint (inference weights only)",
            "dtype": str(dtype).split(".")[-1], "kept_float32": kept, "source": source,
            "torch": torch.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **{k: state.get(k) for k in ("fold", "epoch", "best_miou")}}
    return {"model": weights, "config": dict(state["config"]), "meta": meta}


# ------------------------------------------------------------------------------------------- ONNX
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


def example_inputs(cfg: Settings, batch: int = 2, size: int = PATCH_SIZE, dates: int = 6,
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


# ------------------------------------------------------------------------------------- one checkpoint
def logits_of(model: nn.Module, cfg: Settings, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        return OnnxModel(model, cfg).eval()(**inputs)


def mb(path: Path) -> str:
    return f"{path.stat().st_size / 1e6:.1f} MB"


def export_checkpoint(path: Path, dtype: str = "fp16", onnx: bool = True, size: int = PATCH_SIZE,
                      log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write and check `<stem>.slim.pt` (and `<stem>.onnx`) beside checkpoint `path`; a report dict."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    state = load_checkpoint(path)
    slim = path.with_name(f"{path.stem}.slim.pt")
    save_checkpoint(slim, slim_state(state, DTYPES[dtype], source=str(path)))
    del state
    model, cfg = load_for_inference(path, "cpu")
    small, _ = load_for_inference(slim, "cpu")
    inputs, source = check_inputs(cfg, size)
    ref = logits_of(model, cfg, inputs)
    scale = float(ref.abs().max())
    agree, diff, slim_figures = check_file(slim, logits_of(small, cfg, inputs), ref, SLIM_RTOL * scale,
                                           path.name)
    report: dict[str, Any] = {"checkpoint": str(path), "slim": str(slim), "checked_on": source,
                              "slim_agreement": agree, "slim_max_diff": diff,
                              "sizes": {"checkpoint": path.stat().st_size, "slim": slim.stat().st_size}}
    line = (f"export: {path} ({mb(path)}) -> {slim.name} ({mb(slim)}, {dtype}; {slim_figures}); "
            f"checked on {source}, logits up to {scale:.3g}")
    if onnx and cfg.use_metadata:  # its input is the kit's own metadata encoding: no portable ONNX
        line += "; no ONNX: metadata models (use_metadata=true) are not exported"
    elif onnx and cfg.norm == "s2_stats":  # each patch is normalised by numbers from its S2 series
        line += "; no ONNX: norm=s2_stats needs per-patch S2 statistics the ONNX input does not carry"
    elif onnx:
        out = path.with_name(f"{path.stem}.onnx")
        export_onnx(OnnxModel(model, cfg).eval(), example_inputs(cfg, size=size), out)
        agree, diff, onnx_figures = check_file(out, onnx_logits(out, inputs), ref,
                                               max(ONNX_ATOL, ONNX_RTOL * scale), "PyTorch")
        report.update(onnx=str(out), onnx_agreement=agree, onnx_max_diff=diff)
        report["sizes"]["onnx"] = out.stat().st_size
        line += f"; {out.name} ({mb(out)}; {onnx_figures})"
    log(line)
    return report


def export(runs: Sequence[str | Path], dtype: str = "fp16", onnx: bool = True, size: int = PATCH_SIZE,
           log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Export every best.pt under `runs` (or the checkpoint files given)."""
    return [export_checkpoint(p, dtype, onnx, size, log) for p in find_checkpoints(list(runs))]
