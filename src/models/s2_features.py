"""Early S2 fusion: per-calendar-month Sentinel-2 features as extra input channels of the aerial encoder.

Why: the U-T&T branch (src.models.flair_model, src.models.utae) must learn to read the series from a few
hundred steps of an auxiliary loss, while a per-pixel random forest given the NDVI of each month
(bench/s2_reference.py) separates the phenology classes at once. `s2_early` hands the aerial U-Net those same
features:

  none  -- no extra channel (default);
  ndvi  -- 12 channels: the mean NDVI (B8 - B4) / (B8 + B4) of the real dates of each calendar month;
  bands -- 120 channels: the mean of each of the 10 bands per month (reflectance x BANDS_SCALE).

Months without a date repeat the nearest month that has one (circularly, the earlier on a tie), so
every channel always means "that month" whatever the series' length. A sample without any real date gets
zeros, as does one whose S2 term `modality_dropout` drops. With `use_s2: false` there are no early channels
(`Settings.early_s2`): use_s2 is the one switch for every S2 input. Calendar months come from `s2_days` (days
before 15 May in a 365-day calendar, docs/data-format.md "Sentinel-2"), so the monthly composites and raw
series give the same channels.

The monthly maps live on the S2 crop (B, K, S, S); `sample_footprint` samples its part under the aerial
image onto the aerial grid (exact geometry: 50 aerial pixels per S2 pixel, centred; see its docstring).
Bilinear by default: the 10 m pixels are area means, so interpolating between their centres places a
boundary between two classes that look the same from the air (herbaceous vs agricultural land) at the
sub-pixel position where their mix crosses one half, instead of on the 50-pixel block edges that
nearest sampling draws, which no land-cover edge follows. The features are computed in the model, after
the device augmentation and TTA turned the S2 crop with the image, so they stay aligned with it."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from src.core.flair import s2_pixels_under

MONTHS = 12
S2_BANDS = 10
RED, NIR = 2, 6  # B4 and B8 in the S2 band order B2 B3 B4 B5 B6 B7 B8 B8A B11 B12
BANDS_SCALE = 4.0  # reflectance x 4: about 0..1 for clear land pixels (bands mode)
REF_DOY = 134  # 15 May as a 0-based day of year (365-day calendar): s2_days counts days before it
MONTH_STARTS = (0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334)  # 0-based day of year


def early_channels(mode: str) -> int:
    """Extra input channels for an `s2_early` mode (one of src.core.settings.S2_EARLY)."""
    return {"none": 0, "ndvi": MONTHS, "bands": MONTHS * S2_BANDS}[mode]


def calendar_month(days: torch.Tensor) -> torch.Tensor:
    """s2_days (any shape, days before 15 May) -> calendar month 0..11 (January = 0), exact for any date."""
    doy = torch.remainder(REF_DOY - days.long(), 365)
    starts = torch.tensor(MONTH_STARTS, device=days.device)
    return (doy[..., None] >= starts).sum(dim=-1) - 1  # a comparison, not bucketize: ONNX exports it


def per_date(s2: torch.Tensor, mode: str) -> torch.Tensor:
    """(B,T,10,S,S) reflectance -> (B,T,C,S,S) per-date features of `mode` (C = 1 for ndvi, 10 for bands)."""
    s2 = s2.float()
    if mode == "bands":
        return s2 * BANDS_SCALE
    red, nir = s2[:, :, RED:RED + 1], s2[:, :, NIR:NIR + 1]
    return (nir - red) / (nir + red).clamp_min(1e-6)  # 0 where S2 is zero-filled (invalid or padded)


def monthly(values: torch.Tensor, days: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """(B,T,C,S,S) per-date values -> (B,12*C,S,S) month-major means over each month's real dates, months
    without a date filled with the nearest month that has one; all zero for a sample without dates."""
    b, t, c, h, w = values.shape
    onehot = F.one_hot(calendar_month(days), MONTHS).to(values.dtype) * (~pad.bool())[..., None]
    sums = torch.einsum("btm,btchw->bmchw", onehot, values)
    counts = onehot.sum(dim=1)                                        # (B, 12)
    means = sums / counts.clamp_min(1.0)[:, :, None, None, None]
    month = torch.arange(MONTHS, device=values.device)
    gap = (month[:, None] - month[None, :]).abs()
    gap = torch.minimum(gap, MONTHS - gap).to(values.dtype)           # (12, 12) circular distance
    gap = torch.where(counts[:, None, :] > 0, gap, torch.full_like(gap, math.inf))  # (B, 12, 12)
    source = gap.argmin(dim=-1)                                       # first (earliest) on a tie
    filled = torch.gather(means, 1, source[:, :, None, None, None].expand(b, MONTHS, c, h, w))
    return filled.reshape(b, MONTHS * c, h, w)


def sample_footprint(s2_map: torch.Tensor, content: tuple[int, int], size: tuple[int, int],
                     mode: str = "bilinear") -> torch.Tensor:
    """The exact (fractional) part of an S2 map under the aerial image, sampled at `size`.

    The S2 crop is centred on the aerial image and 1 S2 pixel = 50 aerial pixels (src/data/augment.py keeps
    this true after crops and rotations), so an aerial image of `content` pixels covers the central
    content/50 S2 pixels (10.24 for 512 px). That window is sampled (bilinearly, or `mode` of
    grid_sample) at the pixel centres of an output of `size` -- exact geometry, where the baseline cut an
    integer 10x10 crop and resized it (the integer crop survives as the S2 head's label window,
    src.models.losses.s2_label_window).
    """
    b, _, sh, sw = s2_map.shape
    fy = s2_pixels_under(content[0]) / sh      # fraction of the map's extent covered
    fx = s2_pixels_under(content[1]) / sw
    theta = s2_map.new_tensor([[fx, 0.0, 0.0], [0.0, fy, 0.0]], dtype=torch.float32).expand(b, 2, 3)
    grid = F.affine_grid(theta, [b, 1, *size], align_corners=False)
    return F.grid_sample(s2_map.float(), grid, mode=mode, padding_mode="border", align_corners=False)


def early_features(s2: torch.Tensor, days: torch.Tensor, pad: torch.Tensor, mode: str,
                   size: tuple[int, int], sampling: str = "bilinear") -> torch.Tensor:
    """(B, early_channels(mode), *size) float32: the monthly features of the S2 crop on the aerial grid of
    an image of `size` pixels (see the module docstring)."""
    maps = monthly(per_date(s2, mode), days, pad)
    return sample_footprint(maps, size, size, sampling)


def first_conv_with(encoder: nn.Module, in_channels: int) -> nn.Conv2d:
    """The encoder's first plain nn.Conv2d taking `in_channels` inputs: its stem once the bands are set."""
    for module in encoder.modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == in_channels and module.groups == 1:
            return module
    raise ValueError(f"no {in_channels}-channel input convolution in encoder {type(encoder).__name__}")


def add_input_channels(encoder: nn.Module, bands: int, extra: int, pretrained: bool) -> None:
    """Give the encoder's stem `extra` more inputs after its `bands` ones, in place.

    Pretrained: the band kernels are kept bit for bit and the new ones start at zero, so the network
    computes exactly what it did before until training moves them (their gradient is not zero). From
    scratch: the whole convolution gets PyTorch's default init for its new fan-in.
    """
    if extra <= 0:
        return
    conv = first_conv_with(encoder, bands)
    w = conv.weight.detach()
    new = torch.empty(w.shape[0], bands + extra, *w.shape[2:], dtype=w.dtype)
    if pretrained:
        new[:, :bands] = w
        new[:, bands:] = 0.0
    else:
        nn.init.kaiming_uniform_(new, a=math.sqrt(5))
    conv.weight = nn.Parameter(new)
    conv.in_channels = bands + extra
    if hasattr(encoder, "_in_channels"):
        encoder._in_channels = bands + extra
    if isinstance(getattr(encoder, "_out_channels", None), (list, tuple)):
        encoder._out_channels = [bands + extra, *list(encoder._out_channels)[1:]]
