"""Training augmentation, CPU half: the draw of everything, the crop, heavy's source window (your own
albumentations pixel transforms, `augment_extra`, are src.data.augment_extra).

The data path keeps a sample uint8 until the device (docs/data-format.md, "Samples and batches"): a
DataLoader worker does here only what cannot be done on a batch -- the random crop of `none`/`light` (a
slice, and the matching S2 warp), `heavy`'s source window (a slice), S2 date dropout -- and draws the
parameters of the rest into a small float32 vector `aug` (layout: `Slot`). src.data.device_augment applies
`aug` to the whole batch on the device: `heavy`'s zoom/rotation warp, the D4 element (flips and quarter
turns, jointly on image, mask, S2 crop and its validity) and the photometric transforms of `heavy`.

Why `heavy`'s warp is on the device: six bilinear 512x512 warps and the S2 warp cost a worker ~2 ms a sample,
more than reading it; on a batch they are one grid_sample per tensor. A batch must have one shape, so every
`heavy` sample (zoomed, rotated or plainly cropped) ships a source window of the same size: the smallest
rectangle that holds the source region (with its bilinear neighbours) of any zoom/rotation the preset can
draw for this crop and patch size, capped at the patch (`Augment.window_shape`; 423 px for a 256 crop, the
whole patch for 512, so the worker copies nothing), placed about the drawn region and clamped inside the
patch. The map from output pixels to window pixels, and the S2 one, travel in `aug` (`Slot.GRID`,
`Slot.S2_GRID`); the S2 crop travels as read. Every pixel the output can sample is in the window or outside
the patch, so the result is that of warping the whole patch.

Presets (`cfg.augment`, train only; validation and test get the identity at full size):
- `none`: no augmentation; only the random training crop to `crop_size` (when < 512).
- `light`: D4 (a random element of the 8 flips/rotations by 90 degrees) + the random crop.
- `heavy`: D4, with p=0.75 a random scale/rotate crop (zoom 0.75..1.33 log-uniform, limited so the source
  square fits in the patch, rotation +-15 degrees with p=0.5, random position: RandomResizedCrop and
  Affine in one resampling), otherwise the plain random crop; then, on the aerial image only: per-band
  brightness/contrast/gamma (p=0.8, spectral bands only, never the elevation band), Gaussian noise
  (p=0.3), Gaussian or motion blur (p=0.2) and coarse dropout (p=0.3, holes filled with 0, mask untouched),
  with albumentations' parameter ranges.

D4 is drawn before the crop but applied after it (and after `heavy`'s warp), on the device: the two orders
give the same distribution (the crop position is uniform and the zoom centre's range is symmetric).

The S2 crop has another size and resolution: one S2 pixel (10 m) = 50 aerial pixels (0.2 m), and the
aerial patch covers the central ~10.24 S2 pixels of the 40x40 crop. Every geometric step is a map M of
aerial pixel coordinates; the S2 crop gets the same map expressed about its own centre, so the invariant
"S2 crop centred on the aerial output centre, axes aligned with it, 1 S2 pixel = 50 output aerial pixels"
holds after augmentation (docs/data-format.md, "Geometry"): a crop, zoom or rotation of the aerial image
moves/zooms/rotates the S2 crop by the same linear part and by the aerial translation divided by 50
(bilinear resampling of S2; pixels that come from outside the crop or from NaN pads are marked invalid in
`s2_valid`). Mask pixels that come from outside the patch (rotation corners) are filled with 12 ("other",
weight 0 under the default class weights). S2 date dropout: each date is dropped with probability
`cfg.s2_date_dropout`, at least one is kept.

Randomness: the caller passes a numpy Generator per sample, seeded from (seed, epoch, sample index)
(src.data.dataset), so a sample's augmentation does not depend on the worker that loads it.

Your own albumentations pixel transforms (`augment_extra`) run in the worker too: src.data.augment_extra;
after the crop for `none`/`light`, on the source window before the zoom/rotation for `heavy`."""
from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from src.core.flair import AERIAL_PER_S2, BAND_NAMES
from src.core.settings import AUGMENTS, Settings
from src.data.augment_extra import ExtraTransform

MASK_FILL = 12        # label of pixels that come from outside the patch ("other")
MAX_BANDS = len(BAND_NAMES)
MAX_HOLES = 6


class Slot:
    """Positions in the per-sample `aug` vector (float32, AUG_LEN values) that src.data.device_augment reads.

    Per-band values are in the config's band order (unused slots stay 0). Integers (k, seeds, pixel
    coordinates) are below 2**24, exactly representable in float32. The maps of `heavy` are stored inverted
    (what grid_sample reads), computed in float64: ~1e-4 px once in float32, and integer shifts stay exact."""

    K = 0                          # D4 element 0..7 (`d4`)
    JITTER = 1                     # 1: per-band brightness/contrast/gamma about the band mean
    BRIGHT = 2                     # MAX_BANDS brightness shifts (0..1 scale)
    CONTRAST = BRIGHT + MAX_BANDS  # MAX_BANDS contrast factors
    GAMMA = CONTRAST + MAX_BANDS   # MAX_BANDS gamma exponents
    MEAN = GAMMA + MAX_BANDS       # MAX_BANDS band means (0..1) of the output, every 8th pixel (device)
    NOISE_STD = MEAN + MAX_BANDS   # Gaussian noise std in grey levels (0: no noise)
    NOISE_SEED = NOISE_STD + 1
    BLUR = NOISE_SEED + 1          # 0: none, 1: Gaussian, 2: motion
    BLUR_SIZE = BLUR + 1           # odd kernel side, 3..7
    BLUR_PARAM = BLUR_SIZE + 1     # Gaussian sigma (pixels) or motion direction (degrees)
    HOLES = BLUR_PARAM + 1         # MAX_HOLES x (top, left, bottom, right); an unused hole is all 0
    WARP = HOLES + 4 * MAX_HOLES   # 1: the sample is heavy's source window, resampled on the device
    OUT = WARP + 1                 # output side in pixels (the crop)
    GRID = OUT + 1                 # 2x3 row-major: output pixel centre -> window pixel centre (aerial)
    S2_GRID = GRID + 6             # 2x3 row-major: output S2 pixel centre -> input S2 pixel centre


AUG_LEN = Slot.S2_GRID + 6


def d4(arr: np.ndarray, k: int, axes: tuple[int, int] = (0, 1)) -> np.ndarray:
    """Element k (0..7) of the dihedral group on the plane `axes`: optional flip, then k%4 rotations by 90.

    The reference definition: src.data.device_augment applies the same elements to batches (tested equal)."""
    if k >= 4:
        arr = np.flip(arr, axis=axes[1])
    return np.rot90(arr, k % 4, axes=axes)


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
    flat = s2.reshape(*s2.shape[:-2], size * size)  # gathers along one flat axis: ~4x faster than 2-D
    out = np.zeros_like(flat)
    ok = np.ones((size, size), bool)
    corners = ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 0, fy * (1 - fx)), (1, 1, fy * fx))
    for dy, dx, w in corners:
        xi, yi = x0 + dx, y0 + dy
        used = w > 0
        inside = (xi >= 0) & (xi < size) & (yi >= 0) & (yi < size)
        xc, yc = np.clip(xi, 0, size - 1), np.clip(yi, 0, size - 1)
        ok &= ~used | (inside & valid[yc, xc])
        weight = np.where(inside, w, 0).astype(np.float32).ravel()
        out += np.take(flat, (yc * size + xc).ravel(), axis=-1) * weight
    out = out.reshape(s2.shape)
    out[..., ~ok] = 0.0
    return out, ok


def draw_photometric(rng: np.random.Generator, c: int, h: int, w: int, aug: np.ndarray) -> None:
    """`heavy`'s photometric parameters for a (c,h,w) output, written into `aug` (see `Slot`); the band
    means the jitter pivots about are taken on the device, from the warped image.

    Ranges and probabilities of the albumentations transforms they replace: brightness +-0.1, contrast
    and gamma x0.8..1.25 (p=0.8); GaussNoise std 1..4 % of 255 at half resolution (p=0.3); GaussianBlur
    3..5 px, sigma 0.5..3 or MotionBlur 3..7 px (p=0.2); CoarseDropout 1..6 holes of 3..12 % (p=0.3)."""
    if rng.random() < 0.8:
        aug[Slot.JITTER] = 1.0
        aug[Slot.BRIGHT:Slot.BRIGHT + c] = rng.uniform(-0.1, 0.1, c)
        aug[Slot.CONTRAST:Slot.CONTRAST + c] = np.exp(rng.uniform(np.log(0.8), -np.log(0.8), c))
        aug[Slot.GAMMA:Slot.GAMMA + c] = np.exp(rng.uniform(np.log(0.8), -np.log(0.8), c))
    if rng.random() < 0.3:
        aug[Slot.NOISE_STD] = rng.uniform(0.01, 0.04) * 255.0
        aug[Slot.NOISE_SEED] = rng.integers(2**24)
    if rng.random() < 0.2:
        motion = rng.random() < 0.5
        aug[Slot.BLUR] = 2.0 if motion else 1.0
        aug[Slot.BLUR_SIZE] = rng.choice([3, 5, 7] if motion else [3, 5])
        aug[Slot.BLUR_PARAM] = rng.uniform(0.0, 180.0) if motion else rng.uniform(0.5, 3.0)
    if rng.random() < 0.3:
        for j in range(int(rng.integers(1, MAX_HOLES + 1))):
            hh, hw = int(h * rng.uniform(0.03, 0.12)), int(w * rng.uniform(0.03, 0.12))
            top, left = int(rng.integers(0, h - hh + 1)), int(rng.integers(0, w - hw + 1))
            aug[Slot.HOLES + 4 * j:Slot.HOLES + 4 * j + 4] = (top, left, top + hh, left + hw)


def window_start(matrix: np.ndarray, out: int, window: tuple[int, int], patch: tuple[int, int]
                 ) -> tuple[int, int]:
    """(top, left) of a `window` (h, w) of a `patch` (h, w) that holds every pixel the (out, out) output of
    the forward map `matrix` samples, bilinear neighbours included, or that is outside the patch.

    The window is centred on the source region's pixel range, then clamped inside the patch: clamping
    only moves its edge onto the patch edge, beyond which the output samples the fill anyway."""
    inv = cv2.invertAffineTransform(matrix.astype(np.float64))
    edges = np.array([[-0.5, -0.5], [out - 0.5, -0.5], [-0.5, out - 0.5], [out - 0.5, out - 0.5]])
    src = edges @ inv[:, :2].T + inv[:, 2]           # (x, y) of the output's corners in the patch
    first, last = np.floor(src.min(axis=0)), np.floor(src.max(axis=0)) + 1
    size, whole = np.array(window[::-1], np.float64), np.array(patch[::-1], np.float64)
    if np.any((last - first + 1 > size) & (size < whole)):
        raise ValueError(f"source window {window} too small for the map {matrix.tolist()}")
    start = np.rint((first + last) / 2 - (size - 1) / 2)
    left, top = np.clip(start, 0, whole - size).astype(int)
    return int(top), int(left)


def window_maps(matrix: np.ndarray, top: int, left: int, out: int, patch: tuple[int, int],
                s2_size: int | None, aug: np.ndarray) -> None:
    """Write heavy's device warp into `aug`: output side and the inverse maps (output pixel centre ->
    window pixel centre, and the S2 counterpart of `s2_matrix` about the S2 crop centre)."""
    shifted = matrix.astype(np.float64).copy()
    shifted[:, 2] += shifted[:, :2] @ np.array([left, top], np.float64)  # window pixel a' = a - (left, top)
    aug[Slot.WARP], aug[Slot.OUT] = 1.0, out
    aug[Slot.GRID:Slot.GRID + 6] = cv2.invertAffineTransform(shifted).ravel()
    if s2_size:
        s2m = s2_matrix(matrix.astype(np.float64), patch, (out, out), s2_size)
        aug[Slot.S2_GRID:Slot.S2_GRID + 6] = cv2.invertAffineTransform(s2m).ravel()


class Augment:
    """Callable joint augmentation, CPU half:
    `aug(rng, image, mask=None, s2=None, s2_valid=None, s2_days=None) -> dict`.

    `image` uint8 (C,H,W), `mask` uint8 (H,W), `s2` float32 (T,10,S,S), `s2_valid` bool (S,S), `s2_days`
    int64 (T,). Returns the same keys (None stays None), with H,W = `crop_size` when cropping (`heavy`: the
    source window, `window_shape`, and the S2 crop as read), plus "aug": the float32 (AUG_LEN,) parameters
    of the device half (None for `none`, which has no device work). `rng` may be None when the preset draws
    nothing (evaluation).
    """

    def __init__(self, preset: str = "none", crop_size: int | None = None, date_dropout: float = 0.0,
                 extra: ExtraTransform | None = None):
        if preset not in AUGMENTS:
            raise ValueError(f"augment preset {preset!r}: expected one of {', '.join(AUGMENTS)}")
        self.preset = preset
        self.crop_size = crop_size
        self.use_d4 = preset in ("light", "heavy")
        self.scale_rotate_p = 0.75 if preset == "heavy" else 0.0
        self.zoom = (0.75, 4.0 / 3.0)
        self.rotate_p, self.max_angle = 0.5, 15.0
        self.date_dropout = float(date_dropout)
        self.extra = extra  # the user's pixel transforms, after the crop (heavy: on the source window)

    def _out(self, h: int, w: int) -> int:
        return min(self.crop_size or max(h, w), h, w)

    def _geometry(self, rng: np.random.Generator | None, h: int, w: int
                  ) -> tuple[np.ndarray | None, tuple[int, int] | None, int]:
        """(matrix or None, integer crop offset or None, output size) for an (h, w) input."""
        out = self._out(h, w)
        if not self.crop_size and not self.scale_rotate_p:
            return None, None, out  # evaluation: the whole patch, whatever its shape
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

    def window_shape(self, h: int, w: int) -> tuple[int, int]:
        """(rows, cols) of heavy's source window for an (h, w) patch: the bounding box of the widest source
        square (least zoom, largest angle) plus 4 px (bilinear neighbours, rounding), capped at the patch."""
        out = self._out(h, w)
        rad = np.deg2rad(self.max_angle)
        reach = out / max(self.zoom[0], out / min(h, w)) * (np.cos(rad) + np.sin(rad))
        side = int(np.ceil(reach - 1e-9)) + 4
        return min(side, h), min(side, w)

    def _drop_dates(self, rng: np.random.Generator | None, s2: np.ndarray | None,
                    s2_days: np.ndarray | None) -> tuple[np.ndarray | None, np.ndarray | None]:
        if s2 is None or self.date_dropout <= 0 or s2.shape[0] <= 1:
            return s2, s2_days
        keep = rng.random(s2.shape[0]) >= self.date_dropout
        if not keep.any():
            keep[rng.integers(s2.shape[0])] = True
        return s2[keep], (s2_days[keep] if s2_days is not None else None)

    def _crop(self, geometry: tuple, image: np.ndarray, mask: np.ndarray | None, s2: np.ndarray | None,
              s2_valid: np.ndarray | None) -> tuple:
        """`none`/`light`: the integer crop, and the S2 crop moved by it (on the CPU: no device warp)."""
        matrix, offset, out = geometry
        if offset is None:
            return image, mask, s2, s2_valid
        (r, c), (h, w) = offset, image.shape[-2:]
        image = image[:, r:r + out, c:c + out]
        mask = mask[r:r + out, c:c + out] if mask is not None else None
        if s2 is not None:
            matrix = np.array([[1.0, 0.0, -c], [0.0, 1.0, -r]])
            s2, s2_valid = warp_s2(s2, s2_valid, s2_matrix(matrix, (h, w), (out, out), s2.shape[-1]))
        return image, mask, s2, s2_valid

    def _window(self, geometry: tuple, image: np.ndarray, mask: np.ndarray | None, s2_size: int | None,
                aug: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """`heavy`: the source window of the drawn map (a plain crop is a translation), its maps in `aug`."""
        matrix, offset, out = geometry
        if matrix is None:
            r, c = offset or (0, 0)
            matrix = np.array([[1.0, 0.0, -c], [0.0, 1.0, -r]])
        patch = image.shape[-2:]
        rows, cols = self.window_shape(*patch)
        top, left = window_start(matrix, out, (rows, cols), patch)
        window_maps(matrix, top, left, out, patch, s2_size, aug)
        image = image[:, top:top + rows, left:left + cols]
        return image, (mask[top:top + rows, left:left + cols] if mask is not None else None)

    def __call__(self, rng: np.random.Generator | None, image: np.ndarray, mask: np.ndarray | None = None,
                 s2: np.ndarray | None = None, s2_valid: np.ndarray | None = None,
                 s2_days: np.ndarray | None = None) -> dict[str, Any]:
        if s2 is not None and s2_valid is None:
            s2_valid = np.ones(s2.shape[-2:], bool)
        s2, s2_days = self._drop_dates(rng, s2, s2_days)
        aug = None
        if self.use_d4:
            aug = np.zeros(AUG_LEN, np.float32)
            aug[Slot.K] = rng.integers(8)
        geometry = self._geometry(rng, *image.shape[-2:])
        if self.preset == "heavy":
            image, mask = self._window(geometry, image, mask, s2.shape[-1] if s2 is not None else None, aug)
        else:
            image, mask, s2, s2_valid = self._crop(geometry, image, mask, s2, s2_valid)
        if self.extra is not None:
            image = self.extra.apply(rng, image)
        if self.preset == "heavy":
            draw_photometric(rng, image.shape[0], geometry[2], geometry[2], aug)
        return {"image": image, "mask": mask, "s2": s2, "s2_valid": s2_valid, "s2_days": s2_days, "aug": aug}


def build_augment(cfg: Settings, train: bool) -> Augment:
    """The training preset of `cfg.augment` (with crop and date dropout), or the identity for eval."""
    if not train:
        return Augment("none")
    extra = ExtraTransform(cfg.augment_extra, len(cfg.bands)) if cfg.augment_extra else None
    return Augment(cfg.augment, crop_size=cfg.crop_size or None, date_dropout=cfg.s2_date_dropout,
                   extra=extra)
