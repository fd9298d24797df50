"""Per-band input normalisation of the aerial image: the one definition of what a model is fed.

`norm=mean_std` subtracts the train mean and divides by the train std of each band (0..255 scale);
`norm=scale` divides by 255 (the official baseline); `norm=s2_stats` (the 2nd place's "Sentinel-2
normalisation", docs/recipes.md) standardises each patch with statistics of its own Sentinel-2 series:
R, G, B, NIR use the mean and spatial std of the matching S2 band (B4, B3, B2, B8) under the patch,
brought to the aerial grey-level scale by `S2_TO_DN` (reflectance x 10000 of 2000 = grey level 255, the
team's scaling); E, and every band of a patch without usable S2, keep the train mean/std. Those per-patch
numbers are computed in the DataLoader worker (src.s2_norm, sample key "norm_stats") and applied here.
Applied to raw band values (uint8, or float grey levels after the device-side augmentation), on the
device, to whole batches (src.device_augment).
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from src.bands import BAND_MEAN, BAND_NAMES, BAND_STD, band_indices

NORMS = ("mean_std", "scale", "s2_stats")
# Aerial band -> index of the matching Sentinel-2 band (order B2 B3 B4 B5 B6 B7 B8 B8A B11 B12). E has none.
S2_BAND_OF = {"R": 2, "G": 1, "B": 0, "NIR": 6}
# Stored S2 value (reflectance x 10000) -> aerial grey level: 2000 (reflectance 0.2) -> 255, as the 2nd
# place's code compares image/255 with reflectance/2000.
S2_TO_DN = 255.0 / 2000.0
# Smallest per-patch std (grey levels) norm=s2_stats divides by: an S2 box of uniform values (std 0)
# would otherwise divide by zero. 1 grey level = 8 reflectance units, below the S2 L2A noise.
S2_STD_MIN = 1.0


def norm_stats(cfg: dict) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) float32 per selected band, on the 0..255 scale, for cfg bands and norm. For s2_stats
    these are the fallback numbers (train mean/std): the per-patch ones travel with each sample."""
    idx = band_indices(cfg.get("bands", BAND_NAMES))
    norm = cfg.get("norm", "mean_std")
    if norm in ("mean_std", "s2_stats"):
        return BAND_MEAN[idx].copy(), BAND_STD[idx].copy()
    if norm == "scale":
        return np.zeros(len(idx), np.float32), np.full(len(idx), 255.0, np.float32)
    raise ValueError(f"norm {norm!r}: expected one of {', '.join(NORMS)}")


def s2_patch_stats(bands: list[str] | tuple[str, ...], s2_mean: np.ndarray | None,
                   s2_std: np.ndarray | None) -> np.ndarray:
    """(C, 2) float32 (mean, std) in grey levels for `bands` from one patch's S2 statistics.

    `s2_mean`, `s2_std`: (10,) per S2 band, in stored units (reflectance x 10000), NaN where unknown, or
    None when the patch has no usable S2. A band with an S2 counterpart and finite numbers gets
    (S2_TO_DN * mean, max(S2_TO_DN * std, S2_STD_MIN)); E and the others get the train mean/std."""
    idx = band_indices(bands)
    out = np.stack([BAND_MEAN[idx], BAND_STD[idx]], axis=1).astype(np.float32)
    if s2_mean is None or s2_std is None:
        return out
    for c, i in enumerate(idx):
        s2 = S2_BAND_OF.get(BAND_NAMES[i])
        if s2 is not None and np.isfinite(s2_mean[s2]) and np.isfinite(s2_std[s2]):
            out[c] = (S2_TO_DN * s2_mean[s2], max(S2_TO_DN * float(s2_std[s2]), S2_STD_MIN))
    return out


@functools.lru_cache(maxsize=32)
def _stats_on(bands: tuple[str, ...], norm: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) as (1, C, 1, 1) float32 on `device`, copied there once: a copy per batch would make
    the host wait for the device."""
    mean, std = norm_stats({"bands": list(bands), "norm": norm})
    return (torch.as_tensor(mean, device=device).view(1, -1, 1, 1),
            torch.as_tensor(std, device=device).view(1, -1, 1, 1))


def normalize(image: torch.Tensor, cfg: dict, dtype: torch.dtype = torch.float32,
              stats: torch.Tensor | None = None) -> torch.Tensor:
    """(B, C, H, W) raw band values (uint8 or float, 0..255) of cfg's bands -> normalised `dtype`
    ((x - mean) / std computed in float32, then cast).

    With norm=s2_stats, `stats` (B, C, 2) holds each sample's (mean, std) ("norm_stats", src.s2_norm);
    without it (no S2 at all: an ONNX export) every sample gets the fallback, the train mean/std."""
    norm = str(cfg.get("norm", "mean_std"))
    if norm == "s2_stats" and stats is not None:
        s = stats.to(image.device, torch.float32)
        if s.shape != (image.shape[0], image.shape[1], 2):
            raise ValueError(f"norm=s2_stats: norm_stats of shape {tuple(s.shape)} for an image batch of "
                             f"shape {tuple(image.shape)} (expected (B, C, 2))")
        return ((image.float() - s[..., 0, None, None]) / s[..., 1, None, None]).to(dtype)
    bands = tuple(str(b) for b in cfg.get("bands", BAND_NAMES))
    m, s = _stats_on(bands, norm, image.device)
    return ((image.float() - m) / s).to(dtype)
