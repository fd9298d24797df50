"""ONNX Runtime as the CPU inference engine of `make predict` and `make infer` (setting `engine`).

Why: on a CPU, onnxruntime runs the exported U-Net about 1.8x faster than PyTorch (BENCHMARKS.md, "Export and
whole-orthophoto inference"), and the GIS teams who map land cover on CPU servers have no GPU to fall back on.

- `engine=torch`: PyTorch, as in training. `engine=onnx`: each model's checked `<stem>.onnx` beside its
  checkpoint (src.prediction.onnx_file), exported and checked first when missing or stale. `engine=auto`
  (default): onnx on a CPU, torch on a GPU; on a CPU a missing export is made only when the job is big
  enough to pay for it (EXPORT_PAYS images: an export and its check cost about as much as predicting ~25
  windows), otherwise torch, said in one line.
- A model ONNX cannot take (metadata models, norm=s2_stats), a precision other than fp32, bn_adapt=domain
  (it re-estimates PyTorch BatchNorm layers) or a missing onnxruntime keep that model on torch, with one line
  saying why; `engine=onnx` on a GPU is refused (onnxruntime here is the CPU build).
- An `OnnxRunner` stands in the ensemble where the PyTorch model stood and is called the same way, so TTA
  views, weights, recipes and outputs are those of src.prediction.ensemble. It takes raw band values (the
  normalisation is inside the file): `Ensemble.feed` skips normalisation for it.
- onnxruntime gets the threads the kit's worker policy gave torch (src.core.runtime.share_cores).
"""
from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from src.core.errors import PredictError
from src.core.runtime import amp_dtype
from src.core.settings import Settings
from src.data.dataset import S2_SCALE
from src.prediction.ensemble import Ensemble
from src.prediction.onnx_file import export_checked, is_current, onnx_path, onnx_refusal, reference

# Images (patches or windows, times TTA views) from which exporting a missing ONNX file pays on a CPU:
# exporting and checking takes ~7 s (U-Net R18) to ~20 s (U-T&T) on 2 cores, and onnxruntime saves ~0.2 s per
# 512 px window (BENCHMARKS.md, "Export and whole-orthophoto inference").
EXPORT_PAYS = 64
NO_ONNXRUNTIME = "onnxruntime is not installed (pip install onnxruntime)"


class OnnxRunner(nn.Module):
    """A checked ONNX file run by onnxruntime on the CPU, called like the kit's models:
    `runner(image, s2=..., s2_days=..., s2_pad=...) -> {"logits": (B, 13, H, W)}`, with `image` the raw band
    values as float (the file normalises) and `s2` as the kit's batches carry it (reflectance / S2_SCALE)."""

    takes_raw = True

    def __init__(self, path: Path, size: int, threads: int):
        super().__init__()
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]
        self.path, self.size = path, size

    def forward(self, image: torch.Tensor, s2: torch.Tensor | None = None,
                s2_days: torch.Tensor | None = None, s2_pad: torch.Tensor | None = None,
                meta: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if tuple(image.shape[-2:]) != (self.size, self.size):
            raise PredictError(f"{self.path}: takes {self.size}x{self.size} windows, got "
                               f"{image.shape[-2]}x{image.shape[-1]} (engine=torch takes any size)")
        given = {"image": image.float(), "s2": None if s2 is None else s2.float() * S2_SCALE,
                 "s2_days": s2_days, "s2_pad": s2_pad}
        feed = {k: np.ascontiguousarray(given[k].cpu().numpy()) for k in self.names}
        return {"logits": torch.from_numpy(self.session.run(["logits"], feed)[0])}


def _shared_refusal(cfg: Settings, device: torch.device) -> str | None:
    """Why no model of this job can run in onnxruntime (None when they may)."""
    if amp_dtype(cfg.precision, device) is not None:
        return f"precision={cfg.precision} runs in PyTorch (onnxruntime runs the fp32 export)"
    if cfg.bn_adapt == "domain":
        return "bn_adapt=domain re-estimates PyTorch BatchNorm layers"
    return None


class EngineChoice:
    """The engine of each model of one job, decided once before the job predicts anything."""

    def __init__(self, ens: Ensemble, work: int, size: int, job: str, log: Callable[[str], None]):
        self.ens, self.work, self.size, self.job, self.log = ens, work, size, job, log
        self.explicit = ens.cfg.engine == "onnx"
        self.threads = torch.get_num_threads()

    def runner(self, k: int) -> nn.Module:
        """Model k's engine: an OnnxRunner when it can and should have one, else its PyTorch model."""
        model, cfg, ckpt = self.ens.models[k], self.ens.settings[k], Path(self.ens.paths[k])
        why = onnx_refusal(cfg)
        if why:
            return self._torch(k, why)
        path = onnx_path(ckpt)
        if is_current(ckpt, path, cfg, self.size):
            self.log(f"{self.job}: model {k + 1}: engine onnx ({path}, checked; onnxruntime, {self.threads} "
                     "threads)")
            return OnnxRunner(path, self.size, self.threads)
        if not self.explicit and self.work < EXPORT_PAYS:
            return self._torch(k, f"no checked {path.name} for {self.size} px windows, and {self.work} "
                               f"images are too few for exporting one to pay (from {EXPORT_PAYS}; `make "
                               "export` or engine=onnx makes it)")
        t0 = time.perf_counter()
        stale = "replacing a stale one" if path.exists() else "once"
        stamp = export_checked(ckpt, model, cfg, reference(model, cfg, self.size))
        self.log(f"{self.job}: model {k + 1}: exported {path} ({stale}, {time.perf_counter() - t0:.0f} s; "
                 f"{stamp.figures}); engine onnx (onnxruntime, {self.threads} threads)")
        return OnnxRunner(path, self.size, self.threads)

    def _torch(self, k: int, why: str) -> nn.Module:
        self.log(f"{self.job}: model {k + 1}: engine torch: {why}")
        return self.ens.models[k]


def use_engine(ens: Ensemble, work: int, size: int, job: str, log: Callable[[str], None] = print) -> Ensemble:
    """The ensemble with each model on the engine `ens.cfg.engine` gives it on this device, for a job of
    about `work` images of `size` px; one line per model says which and why."""
    cfg, device = ens.cfg, ens.device
    if cfg.engine == "torch" or (cfg.engine == "auto" and device.type != "cpu"):
        log(f"{job}: engine torch ({'engine=torch' if cfg.engine == 'torch' else f'auto on {device}'})")
        return ens
    if device.type != "cpu":
        raise PredictError(f"engine=onnx runs onnxruntime on the CPU and this job runs on {device}: add "
                           "--device cpu, or engine=torch")
    installed = importlib.util.find_spec("onnxruntime") is not None
    if not installed and cfg.engine == "onnx":
        raise PredictError(f"engine=onnx: {NO_ONNXRUNTIME}")
    why = ((None if installed else NO_ONNXRUNTIME) or _shared_refusal(cfg, device)
           or (None if ens.paths else "models given without checkpoint files"))
    if why:
        log(f"{job}: engine torch for every model: {why}")
        return ens
    choice = EngineChoice(ens, work, size, job, log)
    return ens.with_models([choice.runner(k) for k in range(len(ens.models))])
