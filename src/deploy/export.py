"""Export trained checkpoints for deployment (`python -m src.export`): a slim weights-only checkpoint and an
ONNX model, both checked.

For every checkpoint (every best.pt under a run folder, or the files given) it writes, beside it:
- `<stem>.slim.pt`: the inference weights ("model") cast to fp16 (or bf16), the "config" and a small
  "meta" dict -- no optimizer, raw weights, EMA copy or history, so it is a fraction of best.pt's size.
  It loads through the same `load_for_inference` as best.pt (load_state_dict copies the half-precision
  tensors into the float32 parameters), so `make predict RUNS=.../best.slim.pt` and `make infer` run from
  it. A tensor that would overflow fp16 is kept in float32.
- `<stem>.onnx` and its stamp `<stem>.onnx.json` (src.prediction.onnx_file: what the file computes, how it is
  checked, what the stamp vouches for). `make predict` / `make infer` run it with onnxruntime on a CPU
  (src.prediction.onnx_engine).
Both files are checked on CPU before the command reports success, on the same real patches
(src.prediction.onnx_file.check_inputs): the slim checkpoint reloaded against best.pt (max logit difference
up to SLIM_RTOL of the largest logit, fp16 weights), the ONNX model in onnxruntime against PyTorch. A file
that fails is deleted; the figures are printed with the three file sizes.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from src.core.checkpoint import find_checkpoints, load_checkpoint, save_checkpoint
from src.core.flair import PATCH_SIZE
from src.core.settings import SLIM_DTYPES
from src.models.flair_model import load_for_inference
from src.prediction.onnx_file import check_file, export_checked, logits_of, onnx_path, onnx_refusal, reference

DTYPES = dict(zip(SLIM_DTYPES, (torch.float16, torch.bfloat16)))
# Slim (fp16/bf16 weights) against best.pt: max |logit difference| up to 2% of the largest logit (~1e-3
# relative per weight, accumulated over the layers).
SLIM_RTOL = 2e-2


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


# ------------------------------------------------------------------------------------- one checkpoint
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
    ref = reference(model, cfg, size)
    agree, diff, slim_figures = check_file(slim, logits_of(small, cfg, ref.inputs), ref.logits,
                                           SLIM_RTOL * ref.scale, path.name)
    report: dict[str, Any] = {"checkpoint": str(path), "slim": str(slim), "checked_on": ref.source,
                              "slim_agreement": agree, "slim_max_diff": diff,
                              "sizes": {"checkpoint": path.stat().st_size, "slim": slim.stat().st_size}}
    line = (f"export: {path} ({mb(path)}) -> {slim.name} ({mb(slim)}, {dtype}; {slim_figures}); "
            f"checked on {ref.source}, logits up to {ref.scale:.3g}")
    why_not = onnx_refusal(cfg) if onnx else None
    if why_not:
        line += f"; no ONNX: {why_not}"
    elif onnx:
        stamp, out = export_checked(path, model, cfg, ref), onnx_path(path)
        report.update(onnx=str(out), onnx_agreement=stamp.agreement, onnx_max_diff=stamp.max_diff)
        report["sizes"]["onnx"] = out.stat().st_size
        line += f"; {out.name} ({mb(out)}; {stamp.figures})"
    log(line)
    return report


def export(runs: Sequence[str | Path], dtype: str = "fp16", onnx: bool = True, size: int = PATCH_SIZE,
           log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Export every best.pt under `runs` (or the checkpoint files given)."""
    return [export_checkpoint(p, dtype, onnx, size, log) for p in find_checkpoints(list(runs))]
