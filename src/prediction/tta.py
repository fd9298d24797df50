"""Test-time augmentation: the dihedral views of a batch, applied to every spatial input, and undone.

A view is a horizontal flip (optional) followed by `k` quarter turns counter-clockwise in the plane of
the last two axes, so one definition serves the aerial image (B, C, H, W), the Sentinel-2 crop
(B, T, 10, S, S) and the logits (B, 13, H, W): the S2 crop turns with the image around its centre
(the IGN baseline forgot to flip it). Levels:

- `none`: identity (1 view)
- `flip`: identity, horizontal flip, vertical flip (3 views; the vertical flip is flip + half turn)
- `d4`:   the 8 symmetries of the square (4 rotations, each with and without a flip)"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from src.core.settings import TTA_LEVELS


@dataclass(frozen=True)
class View:
    """Flip the last axis (when `flip`), then rotate `k` quarter turns over the last two axes."""

    k: int = 0
    flip: bool = False

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.flip:
            x = x.flip(-1)
        return torch.rot90(x, self.k, dims=(-2, -1)) if self.k % 4 else x

    def invert(self, y: torch.Tensor) -> torch.Tensor:
        if self.k % 4:
            y = torch.rot90(y, -self.k, dims=(-2, -1))
        return y.flip(-1) if self.flip else y

    @property
    def name(self) -> str:
        return ("hflip+" if self.flip else "") + f"rot{90 * (self.k % 4)}"


def views(level: str) -> list[View]:
    """The views of a TTA level, identity first."""
    if level == "none":
        return [View()]
    if level == "flip":
        return [View(), View(0, True), View(2, True)]  # identity, hflip, vflip
    if level == "d4":
        return [View(k, f) for f in (False, True) for k in range(4)]
    raise ValueError(f"unknown TTA level {level!r} (expected one of {', '.join(TTA_LEVELS)})")


# Batch keys that carry pixels (last two axes are space) and must turn with the image.
SPATIAL_KEYS = ("image", "s2")
# Batch keys that are per-sample but not spatial: repeated once per view.
REPEAT_KEYS = ("s2_days", "s2_pad", "meta")


def stack_views(inputs: dict[str, torch.Tensor], vs: list[View]) -> dict[str, torch.Tensor]:
    """{key: (B, ...)} -> {key: (V*B, ...)}, view-major: rows v*B..(v+1)*B-1 hold view v.

    All views must give the same spatial shape (square inputs, or only even quarter turns).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in inputs.items():
        if value is None:
            continue
        if key in SPATIAL_KEYS:
            out[key] = torch.cat([v.apply(value) for v in vs], dim=0)
        elif key in REPEAT_KEYS:
            out[key] = value.repeat(len(vs), *([1] * (value.dim() - 1)))
        else:
            raise KeyError(f"stack_views: no TTA rule for input {key!r}")
    return out


def unstack_views(y: torch.Tensor, vs: list[View]) -> list[torch.Tensor]:
    """(V*B, ...) network output -> list of V tensors (B, ...) mapped back to the original frame."""
    chunks = y.chunk(len(vs), dim=0)
    return [v.invert(c) for v, c in zip(vs, chunks)]


def view_groups(vs: list[View], square: bool) -> list[list[View]]:
    """Views that can share one forward pass. Quarter turns of a non-square image change its shape, so
    they go through the network in a second stack; a square image sends every view at once."""
    if square:
        return [vs]
    even = [v for v in vs if v.k % 2 == 0]
    odd = [v for v in vs if v.k % 2 == 1]
    return [g for g in (even, odd) if g]
