"""Batch transforms on the device: a collated uint8 batch becomes the model's inputs where the model runs.

Why on the device: per pixel, a flip, a lookup table, noise or a small blur costs a DataLoader worker
more than reading the pixel did; on a GPU it is a few kernels over the whole batch. So workers ship
uint8 images and masks (4x and 8x smaller than float32/int64, docs/data-format.md, "Samples and
batches") and the parameters they drew (src.data.augment, `aug`); `device_batch` then, on the device:
1. copies the batch (non-blocking from pinned memory on CUDA);
2. in training, applies `heavy`'s zoom/rotation (`warp_batch`: each sample's source window resampled to
   the crop through its map in `aug`, one affine_grid + grid_sample per tensor: bilinear image rounded to
   uint8 as OpenCV's warp does, nearest mask filled with 12 outside, bilinear S2 whose validity follows
   the CPU rule of src.data.augment.warp_s2), then its photometric transforms (per-band
   brightness/contrast/gamma lookup table on spectral bands only, about the band means of the warped
   image; Gaussian noise, blur, coarse dropout; each result rounded and clipped to 0..255 as on uint8
   images) and each sample's D4 element jointly to image, mask, S2 crop and S2 validity (one gather per
   tensor through 8 cached index tables built from the reference `src.data.augment.d4`: no host
   synchronisation, no per-group loop);
3. normalises the image through src.data.normalize (the one definition) in the model's dtype, and turns
   the mask into int64 class indices and S2 into float32.
Validation and prediction take the same path without step 2."""
from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from src.core.runtime import derive_seed
from src.core.settings import Settings
from src.data.augment import MASK_FILL, MAX_HOLES, Slot, d4
from src.data.normalize import normalize

# Batch keys that carry pixels of the aerial grid or of the S2 grid: they turn with the D4 element.
TURNED = ("mask", "s2", "s2_valid")
BLUR_SIDE = 7  # largest blur kernel (MotionBlur 3..7)
VALID_TOL = 1e-4  # an S2 neighbour with a bilinear weight below this does not count (warp_s2's snap)


@functools.lru_cache(maxsize=16)
def d4_tables(h: int, w: int, device: torch.device) -> torch.Tensor:
    """(8, h*w) int64: row k lists, for each output pixel, the input pixel that element k moves there."""
    if h != w:
        raise ValueError(f"D4 on the device needs square images, got {h}x{w} (use a square crop_size)")
    grid = np.arange(h * w, dtype=np.int64).reshape(h, w)
    return torch.from_numpy(np.stack([d4(grid, k).reshape(-1) for k in range(8)])).to(device)


def d4_batch(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """x (B, ..., H, W): sample b transformed by D4 element k[b] (0..7) on its last two axes, exactly as
    src.data.augment.d4 would (a permutation of pixels: bit-identical for every dtype)."""
    b, (h, w) = x.shape[0], x.shape[-2:]
    flat = x.reshape(b, -1, h * w)
    index = d4_tables(h, w, x.device)[k.long()]
    return flat.gather(2, index[:, None, :].expand(b, flat.shape[1], h * w)).view(x.shape)


def spectral_bands(cfg: Settings) -> tuple[bool, ...]:
    """Which of cfg's bands the photometric jitter may change: all but the elevation band E."""
    return tuple(str(b).upper() != "E" for b in cfg.bands)


@functools.lru_cache(maxsize=16)
def _on_device(values: tuple, device: torch.device) -> torch.Tensor:
    """A small constant tensor, copied to the device once (a copy per batch would wait for the device)."""
    return torch.tensor(values, device=device)


def jitter(x: torch.Tensor, p: torch.Tensor, spectral: tuple[bool, ...]) -> torch.Tensor:
    """Per-band brightness/contrast/gamma about the band mean, through one 256-level table per sample and
    band: v = (l^g - m^g) * c + m^g + b on the 0..1 scale, rounded to 0..255 (identity where not drawn)."""
    b, c = x.shape[:2]
    levels = torch.arange(256, device=x.device, dtype=torch.float32)
    gamma = p[:, Slot.GAMMA:Slot.GAMMA + c, None]
    pivot = p[:, Slot.MEAN:Slot.MEAN + c, None] ** gamma
    v = ((levels / 255) ** gamma - pivot) * p[:, Slot.CONTRAST:Slot.CONTRAST + c, None] + pivot
    lut = ((v + p[:, Slot.BRIGHT:Slot.BRIGHT + c, None]) * 255).round().clamp(0, 255)
    on = (p[:, Slot.JITTER, None] > 0) & _on_device(spectral, x.device)[None, :]
    lut = torch.where(on[..., None], lut, levels)
    return lut.gather(2, x.reshape(b, c, -1).long()).view(x.shape)


def add_noise(x: torch.Tensor, p: torch.Tensor, host: torch.Tensor) -> torch.Tensor:
    """Gaussian noise drawn at half resolution and upsampled (albumentations' noise_scale_factor=0.5),
    per band; the generator is seeded from the batch's drawn seeds, so a replayed batch gets the same."""
    b, c, h, w = x.shape
    gen = torch.Generator(device=x.device)
    gen.manual_seed(derive_seed(*host[:, Slot.NOISE_SEED].long().tolist()))
    small = torch.randn((b, c, (h + 1) // 2, (w + 1) // 2), generator=gen, device=x.device)
    noise = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    return (x + noise * p[:, Slot.NOISE_STD, None, None, None]).round().clamp(0, 255)


def blur_kernels(p: torch.Tensor) -> torch.Tensor:
    """(B, 7, 7) normalised kernels: Gaussian (side, sigma), motion (a centred line of `side` pixels in
    a direction), or the identity for samples without blur."""
    r = torch.arange(BLUR_SIDE, device=p.device, dtype=torch.float32) - BLUR_SIDE // 2
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    kind, half = p[:, Slot.BLUR, None, None], (p[:, Slot.BLUR_SIZE, None, None] - 1) / 2
    param = p[:, Slot.BLUR_PARAM, None, None]
    inside = (xx.abs() <= half) & (yy.abs() <= half)
    gauss = torch.exp(-(xx**2 + yy**2) / (2 * param.clamp_min(1e-3) ** 2)) * inside
    angle = torch.deg2rad(param)
    along, across = xx * angle.cos() + yy * angle.sin(), yy * angle.cos() - xx * angle.sin()
    line = ((across.abs() <= 0.5) & (along.abs() <= half)).float()
    delta = ((xx == 0) & (yy == 0)).float().expand_as(line)
    kernels = torch.where(kind == 1, gauss, torch.where(kind == 2, line, delta))
    return kernels / kernels.sum(dim=(1, 2), keepdim=True)


def blur(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Each sample convolved with its kernel (one grouped convolution for the batch, reflected borders)."""
    b, c, h, w = x.shape
    weight = blur_kernels(p)[:, None].expand(b, c, BLUR_SIDE, BLUR_SIDE).reshape(b * c, 1, BLUR_SIDE,
                                                                                  BLUR_SIDE)
    pad = BLUR_SIDE // 2
    padded = F.pad(x.reshape(1, b * c, h, w), (pad, pad, pad, pad), mode="reflect")
    return F.conv2d(padded, weight, groups=b * c).view(b, c, h, w).round().clamp(0, 255)


def dropout(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Rectangular holes filled with 0 (the raw value, as CoarseDropout(fill=0) on uint8)."""
    b, _, h, w = x.shape
    holes = p[:, Slot.HOLES:Slot.HOLES + 4 * MAX_HOLES].view(b, MAX_HOLES, 4, 1)
    ys = torch.arange(h, device=x.device, dtype=torch.float32)
    xs = torch.arange(w, device=x.device, dtype=torch.float32)
    rows = (ys >= holes[:, :, 0]) & (ys < holes[:, :, 2])
    cols = (xs >= holes[:, :, 1]) & (xs < holes[:, :, 3])
    hole = (rows[:, :, :, None] & cols[:, :, None, :]).any(dim=1)
    return x.masked_fill(hole[:, None], 0)


def photometric(image: torch.Tensor, p: torch.Tensor, host: torch.Tensor, spectral: tuple[bool, ...]
                ) -> torch.Tensor:
    """`heavy`'s photometric transforms in albumentations' order (jitter, noise, blur, dropout), each only
    when some sample of the batch drew it (`host`: the parameters still on the CPU, read without waiting
    for the device). Returns float32 grey levels, or the uint8 image untouched when nothing was drawn."""
    drawn = [bool(host[:, s].any()) for s in (Slot.JITTER, Slot.NOISE_STD, Slot.BLUR)]
    drawn.append(bool(host[:, Slot.HOLES:Slot.HOLES + 4 * MAX_HOLES].any()))
    if not any(drawn):
        return image
    x = jitter(image, p, spectral) if drawn[0] else image.float()
    if drawn[1]:
        x = add_noise(x, p, host)
    if drawn[2]:
        x = blur(x, p)
    return dropout(x, p) if drawn[3] else x


def _theta(maps: torch.Tensor, in_hw: tuple[int, int], out: int) -> torch.Tensor:
    """(B, 2, 3) affine_grid matrices (align_corners=False) of pixel-centre maps output -> input (B, 6),
    composed in float64: pixel x <-> normalised (2x + 1) / size - 1 on both sides."""
    g = maps.double().view(-1, 2, 3)
    (h, w), b = in_hw, g.shape[0]
    to_norm = torch.tensor([[2 / w, 0, 1 / w - 1], [0, 2 / h, 1 / h - 1], [0, 0, 1]], dtype=torch.float64)
    from_norm = torch.tensor([[out / 2, 0, (out - 1) / 2], [0, out / 2, (out - 1) / 2], [0, 0, 1]],
                             dtype=torch.float64)
    square = torch.cat([g, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64).expand(b, 1, 3)], dim=1)
    return (to_norm @ square @ from_norm)[:, :2].float()


def _grid(theta: torch.Tensor, b: int, out: int, device: torch.device) -> torch.Tensor:
    return F.affine_grid(theta.to(device), [b, 1, out, out], align_corners=False)


def _sample(x: torch.Tensor, grid: torch.Tensor, mode: str) -> torch.Tensor:
    """x (B, C, H, W) float at the grid's points, zeros outside."""
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def warp_s2_batch(s2: torch.Tensor, valid: torch.Tensor | None, theta: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """S2 (B, T, C, S, S) bilinear, and its validity: an output pixel is valid when the weights of its valid,
    inside neighbours sum to 1 (every neighbour with non-zero weight usable: the rule of
    src.data.augment.warp_s2); invalid pixels are 0."""
    b, t, c, size = *s2.shape[:3], s2.shape[-1]
    grid = _grid(theta, b, size, s2.device)
    valid = torch.ones((b, size, size), dtype=torch.bool, device=s2.device) if valid is None else valid
    ok = _sample(valid[:, None].float(), grid, "bilinear")[:, 0] > 1 - VALID_TOL
    flat = _sample(s2.reshape(b, t * c, size, size).float(), grid, "bilinear")
    return (flat * ok[:, None]).view(b, t, c, size, size).to(s2.dtype), ok


def warp_batch(batch: dict[str, torch.Tensor], host: torch.Tensor) -> dict[str, torch.Tensor]:
    """`heavy`: each sample's source window resampled to the (OUT, OUT) crop through its map in `host`
    (`Slot.GRID`, `Slot.S2_GRID`), on image (bilinear, 0 outside, rounded to uint8), mask (nearest, 12
    outside) and S2 crop + validity (`warp_s2_batch`)."""
    out, image = int(host[0, Slot.OUT]), batch["image"]
    grid = _grid(_theta(host[:, Slot.GRID:Slot.GRID + 6], image.shape[-2:], out), image.shape[0], out,
                 image.device)
    done = dict(batch)
    # bilinear weights are convex: values stay in 0..255 (to float error), rounding is enough before uint8
    done["image"] = _sample(image.float(), grid, "bilinear").round_().to(torch.uint8)
    if "mask" in batch:  # shifted by the fill so that grid_sample's zeros outside become MASK_FILL
        shifted = batch["mask"][:, None].float() - MASK_FILL
        done["mask"] = (_sample(shifted, grid, "nearest")[:, 0] + MASK_FILL).to(batch["mask"].dtype)
    if "s2" in batch:
        s2 = batch["s2"]
        s2_theta = _theta(host[:, Slot.S2_GRID:Slot.S2_GRID + 6], s2.shape[-2:], s2.shape[-1])
        done["s2"], done["s2_valid"] = warp_s2_batch(s2, batch.get("s2_valid"), s2_theta)
    return done


def with_band_means(p: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """`p` with Slot.MEAN set to each band's mean (0..1) over every 8th pixel of the image the jitter
    will change: its pivot, taken after the warp."""
    c = image.shape[1]
    p = p.clone()
    p[:, Slot.MEAN:Slot.MEAN + c] = image[:, :, ::8, ::8].float().mean(dim=(2, 3)) / 255
    return p


def augment_batch(batch: dict[str, torch.Tensor], host: torch.Tensor, cfg: Settings) -> dict[str,
                                                                                             torch.Tensor]:
    """The device half of the training augmentation on a batch already on the device (`host`: its "aug"
    parameters on the CPU): heavy's warp, photometric transforms, then each sample's D4 element on every
    gridded key."""
    p = host.to(batch["image"].device, non_blocking=True)
    out = dict(batch)
    if bool(host[:, Slot.WARP].any()):
        if not bool(host[:, Slot.WARP].all()):
            raise ValueError("augment_batch: a batch mixes warped (heavy) and plain samples")
        out = warp_batch(out, host)
    if bool(host[:, Slot.JITTER].any()):
        p = with_band_means(p, out["image"])
    out["image"] = photometric(out["image"], p, host, spectral_bands(cfg))
    k = p[:, Slot.K]
    for key in ("image", *TURNED):
        if key in out:
            out[key] = d4_batch(out[key], k)
    return out


def device_batch(batch: dict[str, Any], cfg: Settings, device: torch.device, *,
                 dtype: torch.dtype | None = None,
                 channels_last: bool = False, augment: bool = False,
                 normalise: bool = True) -> dict[str, torch.Tensor]:
    """A collated batch -> tensors on `device`: "image" normalised (cfg's `norm`) in `dtype` (float32 when
    None; with norm=s2_stats through each sample's "norm_stats", which is consumed), "mask" int64, "s2"
    float32, and "s2_days", "s2_pad", "s2_valid", "meta" when present. With
    `augment`, the batch's "aug" parameters are applied first (training). Without `normalise`, "image" stays
    raw band values in float32 (for an ONNX file, which normalises itself)."""
    nb = device.type == "cuda"
    out = {k: v.to(device, non_blocking=nb) for k, v in batch.items()
           if isinstance(v, torch.Tensor) and k != "aug"}
    if augment and isinstance(batch.get("aug"), torch.Tensor):
        out = augment_batch(out, batch["aug"], cfg)
    stats = out.pop("norm_stats", None)  # norm=s2_stats: each sample's (mean, std), consumed here
    if normalise and stats is None and cfg.norm == "s2_stats":
        raise ValueError("norm=s2_stats: the batch has no 'norm_stats' (the per-patch S2 statistics that "
                         "src.data.dataset.FlairDataset adds to each sample)")
    image = normalize(out["image"], cfg, dtype or torch.float32, stats) if normalise else out["image"].float()
    out["image"] = image.contiguous(memory_format=torch.channels_last) if channels_last else image
    if "mask" in out:
        out["mask"] = out["mask"].long()
    if "s2" in out:
        out["s2"] = out["s2"].float()
    return out
