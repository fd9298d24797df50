"""Your own albumentations pixel transforms in training: `augment_extra=path/to/file.py:build`.

Why: the kit's presets cover what the winners used, but a competitor wants to try CLAHE, channel shuffles,
ISO noise, posterisation... without editing the kit. `build()` (no arguments) returns an albumentations
transform or Compose; it runs in the DataLoader workers on each training sample's uint8 image (H, W, C in
`bands` order), before the device half of the augmentation: after the crop for `none`/`light`, on the source
window before the zoom/rotation for `heavy` (a pixel transform before a bilinear warp is close to one after
it; per-pixel noise is smoothed a little by a zoom-in).

Only pixel-level transforms (albumentations' ImageOnlyTransform) are accepted: a geometric one would move
the image away from its mask and its S2 crop, which the kit keeps aligned itself (src/data/augment.py), so it
is refused with the transform's name. The transform is tried once on a blank image of the right band count
when the dataset is built, so a transform that cannot take 5 bands (e.g. ToGray) fails there, in one line, not
in a worker. Randomness: each sample re-seeds the transform from its own generator, so the draws are
a function of (seed, epoch, sample) like the rest of the augmentation (exact resume, any worker count)."""
from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from src.core.errors import ConfigError


def _load_builder(spec: str) -> Any:
    """`file.py:function` or `package.module:function` -> the function."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise ConfigError(f"augment_extra: expected path/to/file.py:function or package.module:function, "
                          f"got {spec!r}")
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise ConfigError(f"augment_extra: {path}: file not found")
            module_spec = importlib.util.spec_from_file_location(f"_augment_extra_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ConfigError:
        raise
    except Exception as err:  # an import error of the user's file: name it, in one line
        raise ConfigError(f"augment_extra: cannot import {where}: {type(err).__name__}: {err}") from None
    builder = getattr(module, name, None)
    if not callable(builder):
        raise ConfigError(f"augment_extra: {where} has no function {name!r}")
    return builder


def _leaves(transform: Any) -> Iterator[Any]:
    """Every transform inside (nested Compose, OneOf, SomeOf, ...)."""
    children = getattr(transform, "transforms", None)
    if children is None:
        yield transform
        return
    for child in children:
        yield from _leaves(child)


class ExtraTransform:
    """A checked albumentations pipeline applied to (C, H, W) uint8 images, re-seeded per sample."""

    def __init__(self, spec: str, n_bands: int):
        import albumentations as A

        transform = _load_builder(spec)()
        if not isinstance(transform, (A.BaseCompose, A.BasicTransform)):
            raise ConfigError(f"augment_extra: {spec} returned {type(transform).__name__}, "
                              "not an albumentations transform")
        if not isinstance(transform, A.BaseCompose):
            transform = A.Compose([transform])
        for leaf in _leaves(transform):
            if not isinstance(leaf, A.ImageOnlyTransform):
                raise ConfigError(f"augment_extra: {type(leaf).__name__} is not a pixel-level transform (the "
                                  "kit keeps the mask and the S2 crop aligned: use only ImageOnlyTransform)")
        self.spec, self.transform = spec, transform
        try:
            self.apply(np.random.default_rng(0), np.zeros((n_bands, 64, 64), np.uint8))
        except ConfigError:
            raise
        except Exception as err:
            raise ConfigError(f"augment_extra: {spec} fails on a {n_bands}-band uint8 image: "
                              f"{type(err).__name__}: {err}") from None

    def apply(self, rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
        """(C, H, W) uint8 -> (C, H, W) uint8."""
        self.transform.set_random_seed(int(rng.integers(2**31)))
        out = self.transform(image=np.ascontiguousarray(np.moveaxis(image, 0, -1)))["image"]
        out = np.asarray(out)
        if out.ndim == 2:
            out = out[..., None]
        if out.dtype != np.uint8 or out.shape[:2] != image.shape[1:] or out.shape[2] != image.shape[0]:
            raise ConfigError(f"augment_extra: {self.spec} turned a {image.shape[0]}-band uint8 "
                              f"{image.shape[1]}x{image.shape[2]} image into {out.dtype} {out.shape}")
        return np.ascontiguousarray(np.moveaxis(out, -1, 0))
