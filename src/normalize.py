"""Per-band input normalisation of the aerial image: the one definition of what a model is fed.

`norm=mean_std` subtracts the train mean and divides by the train std of each band (0..255 scale);
`norm=scale` divides by 255 (the official baseline). Applied to raw band values (uint8, or float grey
levels after the device-side augmentation), on the device, to whole batches (src.device_augment).
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from src.bands import BAND_MEAN, BAND_NAMES, BAND_STD, band_indices

NORMS = ("mean_std", "scale")


def norm_stats(cfg: dict) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) float32 per selected band, on the 0..255 scale, for cfg bands and norm."""
    idx = band_indices(cfg.get("bands", BAND_NAMES))
    norm = cfg.get("norm", "mean_std")
    if norm == "mean_std":
        return BAND_MEAN[idx].copy(), BAND_STD[idx].copy()
    if norm == "scale":
        return np.zeros(len(idx), np.float32), np.full(len(idx), 255.0, np.float32)
    raise ValueError(f"norm {norm!r}: expected one of {', '.join(NORMS)}")


@functools.lru_cache(maxsize=32)
def _stats_on(bands: tuple[str, ...], norm: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) as (1, C, 1, 1) float32 on `device`, copied there once: a copy per batch would make
    the host wait for the device."""
    mean, std = norm_stats({"bands": list(bands), "norm": norm})
    return (torch.as_tensor(mean, device=device).view(1, -1, 1, 1),
            torch.as_tensor(std, device=device).view(1, -1, 1, 1))


def normalize(image: torch.Tensor, cfg: dict, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, C, H, W) raw band values (uint8 or float, 0..255) of cfg's bands -> normalised `dtype`
    ((x - mean) / std computed in float32, then cast)."""
    bands = tuple(str(b) for b in cfg.get("bands", BAND_NAMES))
    m, s = _stats_on(bands, str(cfg.get("norm", "mean_std")), image.device)
    return ((image.float() - m) / s).to(dtype)
