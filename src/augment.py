"""Training augmentation applied jointly to the aerial image, its mask and the Sentinel-2 crop.

Presets (`cfg["augment"]`, train only; validation and test get the identity at full size):
- `none`: no augmentation; only the random training crop to `crop_size` (when < 512).
- `light`: D4 (a random element of the 8 flips/rotations by 90 degrees) + the random crop.
- `heavy`: D4, then with p=0.75 a random scale/rotate crop (zoom 0.75..1.33 log-uniform, limited so the
  source square fits in the patch, rotation +-15 degrees with p=0.5, random position: RandomResizedCrop
  and Affine/ShiftScaleRotate in one resampling), otherwise the plain random crop; then photometric
  transforms on the aerial image only (albumentations, all valid for any number of bands): per-band
  brightness/contrast/gamma (`PerBandJitter`, spectral bands only, never the elevation band),
  GaussNoise, Gaussian or motion blur, CoarseDropout (holes filled with 0, mask untouched).

Geometry is done here (numpy/OpenCV) rather than by albumentations' geometric transforms because the S2
crop has another size and resolution: one S2 pixel (10 m) = 50 aerial pixels (0.2 m), and the aerial
patch covers the central ~10.24 S2 pixels of the 40x40 crop. Every geometric step is a map M of aerial
pixel coordinates; the S2 crop gets the same map expressed about its own centre, so the invariant
"S2 crop centred on the aerial output centre, axes aligned with it, 1 S2 pixel = 50 output aerial pixels"
holds after augmentation (docs/data-format.md, "Geometry"):
- D4 is applied exactly (array flips/rot90) to image, mask, S2 and its validity mask;
- a crop, zoom or rotation of the aerial image moves/zooms/rotates the S2 crop by the same linear part
  and by the aerial translation divided by 50 (bilinear resampling of S2; pixels that come from outside
  the crop or from NaN pads are marked invalid in `s2_valid`).
Mask pixels that come from outside the patch (rotation corners) are filled with 12 ("other", weight 0
under the default class weights). S2 temporal augmentation: each date is dropped with probability
`cfg["s2_date_dropout"]` at train time, at least one date is kept.

Randomness comes from one numpy Generator per Augment (and the albumentations Compose seeded from it);
`reseed` is called by the dataset once per DataLoader worker so workers never repeat each other.
"""
from __future__ import annotations

from typing import Any

import albumentations as A
import cv2
import numpy as np

from src.bands import BAND_NAMES
from src.geometry import AERIAL_PER_S2

PRESETS = ("none", "light", "heavy")
MASK_FILL = 12        # label of pixels that come from outside the patch ("other")


def d4(arr: np.ndarray, k: int, axes: tuple[int, int] = (0, 1)) -> np.ndarray:
    """Element k (0..7) of the dihedral group on the plane `axes`: optional flip, then k%4 rotations by 90."""
    if k >= 4:
        arr = np.flip(arr, axis=axes[1])
    return np.rot90(arr, k % 4, axes=axes)


class PerBandJitter(A.ImageOnlyTransform):
    """Brightness, contrast and gamma drawn independently for each spectral band of a uint8 image.

    albumentations' colour transforms either assume RGB or apply one factor to every band; sensors and
    acquisitions differ per band, and the elevation band must not be "brightened" at all. One 256-entry
    lookup table per band (cv2.LUT on all bands at once), so the cost does not depend on the ranges.
    """

    def __init__(self, spectral: tuple[int, ...], brightness: float = 0.1, contrast: float = 0.2,
                 gamma: float = 0.2, p: float = 0.5):
        super().__init__(p=p)
        self.spectral = tuple(spectral)
        self.brightness, self.contrast, self.gamma = brightness, contrast, gamma

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        img = data["image"]
        rng = self.random_generator
        n = len(self.spectral)
        means = img[::8, ::8, list(self.spectral)].reshape(-1, n).mean(axis=0) / 255.0 if n else []
        return {
            "brightness": rng.uniform(-self.brightness, self.brightness, n),
            "contrast": np.exp(rng.uniform(np.log(1 - self.contrast), -np.log(1 - self.contrast), n)),
            "gamma": np.exp(rng.uniform(np.log(1 - self.gamma), -np.log(1 - self.gamma), n)),
            "means": np.asarray(means),
        }

    def apply(self, img: np.ndarray, brightness=(), contrast=(), gamma=(), means=(), **params) -> np.ndarray:
        if not self.spectral:
            return img
        channels = img.shape[2] if img.ndim == 3 else 1
        levels = np.arange(256, dtype=np.float32) / 255.0
        lut = np.repeat(np.arange(256, dtype=np.uint8)[:, None], channels, axis=1)
        for i, band in enumerate(self.spectral):
            v = levels ** np.float32(gamma[i])
            pivot = np.float32(means[i]) ** np.float32(gamma[i])
            v = (v - pivot) * np.float32(contrast[i]) + pivot + np.float32(brightness[i])
            lut[:, band] = np.clip(np.rint(v * 255.0), 0, 255).astype(np.uint8)
        if channels == 1:
            return cv2.LUT(img, lut[:, 0]).reshape(img.shape)
        return cv2.LUT(np.ascontiguousarray(img), lut.reshape(256, 1, channels))

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("spectral", "brightness", "contrast", "gamma")


def _warp_image(img: np.ndarray, matrix: np.ndarray, size: int, nearest: bool, fill: int) -> np.ndarray:
    """cv2.warpAffine of an (H,W) or (H,W,C) array to (size,size), one band at a time.

    OpenCV's generic path for more than 4 channels interpolates differently (and slower) than its
    single-channel path, so bands are warped separately to keep every band identical to a 1-band warp.
    """
    flags = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    kw = dict(flags=flags, borderMode=cv2.BORDER_CONSTANT, borderValue=fill)
    if img.ndim == 2:
        return cv2.warpAffine(img, matrix, (size, size), **kw)
    out = np.empty((size, size, img.shape[2]), dtype=img.dtype)
    for b in range(img.shape[2]):
        out[:, :, b] = cv2.warpAffine(np.ascontiguousarray(img[:, :, b]), matrix, (size, size), **kw)
    return out


def s2_matrix(matrix: np.ndarray, in_hw: tuple[int, int], out_hw: tuple[int, int],
              s2_size: int) -> np.ndarray:
    """The S2 counterpart of an aerial map `matrix` (2x3, input -> output pixel-centre coordinates).

    Same linear part; translation = where the aerial input centre lands relative to the output centre,
    divided by 50, so the S2 crop stays centred on the aerial output at 1 S2 pixel = 50 output pixels.
    """
    lin = matrix[:, :2]
    c_in = np.array([(in_hw[1] - 1) / 2.0, (in_hw[0] - 1) / 2.0])
    c_out = np.array([(out_hw[1] - 1) / 2.0, (out_hw[0] - 1) / 2.0])
    c_s2 = np.full(2, (s2_size - 1) / 2.0)
    shift = (lin @ c_in + matrix[:, 2] - c_out) / AERIAL_PER_S2
    return np.hstack([lin, (c_s2 - lin @ c_s2 + shift)[:, None]])


def warp_s2(s2: np.ndarray, valid: np.ndarray, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear warp of (T,C,S,S) float32 by a 2x3 forward map; (warped, validity).

    numpy rather than OpenCV: S2 stacks have T*10 channels (OpenCV's many-channel path is imprecise
    and capped at 512 channels), and validity must follow exactly which source pixels were used. An
    output pixel is valid when all its interpolation neighbours with non-zero weight are valid.
    """
    size = s2.shape[-1]
    inv = cv2.invertAffineTransform(matrix.astype(np.float64))
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    sx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
    sy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    # Snap coordinates within 1e-4 of a pixel centre, so exact moves (D4-like) do not touch neighbours.
    sx = np.where(np.abs(sx - np.rint(sx)) < 1e-4, np.rint(sx), sx)
    sy = np.where(np.abs(sy - np.rint(sy)) < 1e-4, np.rint(sy), sy)
    x0, y0 = np.floor(sx).astype(np.int64), np.floor(sy).astype(np.int64)
    fx, fy = (sx - x0).astype(np.float32), (sy - y0).astype(np.float32)
    out = np.zeros_like(s2)
    ok = np.ones((size, size), bool)
    corners = ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 0, fy * (1 - fx)), (1, 1, fy * fx))
    for dy, dx, w in corners:
        xi, yi = x0 + dx, y0 + dy
        used = w > 0
        inside = (xi >= 0) & (xi < size) & (yi >= 0) & (yi < size)
        xc, yc = np.clip(xi, 0, size - 1), np.clip(yi, 0, size - 1)
        ok &= ~used | (inside & valid[yc, xc])
        out += s2[:, :, yc, xc] * np.where(inside, w, 0).astype(np.float32)
    out[:, :, ~ok] = 0.0
    return out, ok


class Augment:
    """Callable joint augmentation: `aug(image, mask=None, s2=None, s2_valid=None, s2_days=None) -> dict`.

    `image` uint8 (H,W,C), `mask` uint8 (H,W), `s2` float32 (T,10,S,S), `s2_valid` bool (S,S), `s2_days`
    int64 (T,). Returns the same keys (None stays None), with H,W = `crop_size` when cropping.
    """

    def __init__(self, preset: str = "none", crop_size: int | None = None, spectral: tuple[int, ...] = (),
                 date_dropout: float = 0.0, seed: int | None = None):
        if preset not in PRESETS:
            raise ValueError(f"augment preset {preset!r}: expected one of {', '.join(PRESETS)}")
        self.preset = preset
        self.crop_size = crop_size
        self.use_d4 = preset in ("light", "heavy")
        self.scale_rotate_p = 0.75 if preset == "heavy" else 0.0
        self.zoom = (0.75, 4.0 / 3.0)
        self.rotate_p, self.max_angle = 0.5, 15.0
        self.date_dropout = float(date_dropout)
        self.photometric = None
        if preset == "heavy":
            self.photometric = A.Compose([
                PerBandJitter(spectral, brightness=0.1, contrast=0.2, gamma=0.2, p=0.8),
                A.GaussNoise(std_range=(0.01, 0.04), noise_scale_factor=0.5, p=0.3),
                A.OneOf([A.GaussianBlur(blur_limit=(3, 5)), A.MotionBlur(blur_limit=(3, 7))], p=0.2),
                A.CoarseDropout(num_holes_range=(1, 6), hole_height_range=(0.03, 0.12),
                                hole_width_range=(0.03, 0.12), fill=0, p=0.3),
            ])
        self.reseed(seed)

    def reseed(self, seed: int | None) -> None:
        """Fresh random state (the dataset calls this once in each DataLoader worker)."""
        self.rng = np.random.default_rng(seed)
        if self.photometric is not None:
            self.photometric.set_random_seed(int(self.rng.integers(2**31)))

    def _geometry(self, h: int, w: int) -> tuple[np.ndarray | None, tuple[int, int] | None, int]:
        """(matrix or None, integer crop offset or None, output size) for an (h, w) input."""
        out = min(self.crop_size or max(h, w), h, w)
        rng = self.rng
        if self.scale_rotate_p and rng.random() < self.scale_rotate_p:
            zoom = float(np.exp(rng.uniform(np.log(self.zoom[0]), np.log(self.zoom[1]))))
            zoom = max(zoom, out / min(h, w))  # the source square must fit in the patch
            side = out / zoom
            cx, cy = rng.uniform(side / 2, w - side / 2), rng.uniform(side / 2, h - side / 2)
            angle = rng.uniform(-self.max_angle, self.max_angle) if rng.random() < self.rotate_p else 0.0
            # forward map b = zoom * R(angle) (a - centre) + c_out, in pixel-centre coordinates
            rad = np.deg2rad(angle)
            lin = zoom * np.array([[np.cos(rad), -np.sin(rad)], [np.sin(rad), np.cos(rad)]])
            centre = np.array([cx - 0.5, cy - 0.5])
            c_out = np.full(2, (out - 1) / 2.0)
            return np.hstack([lin, (c_out - lin @ centre)[:, None]]), None, out
        if out < h or out < w:
            return None, (int(rng.integers(0, h - out + 1)), int(rng.integers(0, w - out + 1))), out
        return None, None, out

    def __call__(self, image: np.ndarray, mask: np.ndarray | None = None, s2: np.ndarray | None = None,
                 s2_valid: np.ndarray | None = None, s2_days: np.ndarray | None = None) -> dict[str, Any]:
        rng = self.rng
        if s2 is not None and s2_valid is None:
            s2_valid = np.ones(s2.shape[-2:], bool)
        if s2 is not None and self.date_dropout > 0 and s2.shape[0] > 1:
            keep = rng.random(s2.shape[0]) >= self.date_dropout
            if not keep.any():
                keep[rng.integers(s2.shape[0])] = True
            s2 = s2[keep]
            s2_days = s2_days[keep] if s2_days is not None else None

        if self.use_d4:
            k = int(rng.integers(8))
            if k:
                image = d4(image, k)
                mask = d4(mask, k) if mask is not None else None
                if s2 is not None:
                    s2, s2_valid = d4(s2, k, axes=(2, 3)), d4(s2_valid, k)

        h, w = image.shape[:2]
        matrix, offset, out = self._geometry(h, w)
        if offset is not None:
            r, c = offset
            image = image[r:r + out, c:c + out]
            mask = mask[r:r + out, c:c + out] if mask is not None else None
            matrix = np.array([[1.0, 0.0, -c], [0.0, 1.0, -r]])
        elif matrix is not None:
            image = _warp_image(image, matrix, out, nearest=False, fill=0)
            if mask is not None:
                mask = _warp_image(np.ascontiguousarray(mask), matrix, out, nearest=True, fill=MASK_FILL)
        if matrix is not None and s2 is not None:
            s2, s2_valid = warp_s2(s2, s2_valid, s2_matrix(matrix, (h, w), (out, out), s2.shape[-1]))

        if self.photometric is not None:
            shape = image.shape
            image = self.photometric(image=np.ascontiguousarray(image))["image"].reshape(shape)
        return {"image": image, "mask": mask, "s2": s2, "s2_valid": s2_valid, "s2_days": s2_days}


def build_augment(cfg: dict, train: bool) -> Augment:
    """The training preset of `cfg["augment"]` (with crop and date dropout), or the identity for eval."""
    if not train:
        return Augment("none")
    bands = list(cfg.get("bands", BAND_NAMES))
    spectral = tuple(i for i, b in enumerate(bands) if str(b).upper() != "E")
    crop = int(cfg.get("crop_size") or 0) or None
    return Augment(cfg.get("augment", "none"), crop_size=crop, spectral=spectral,
                   date_dropout=float(cfg.get("s2_date_dropout", 0.0)), seed=cfg.get("seed"))
