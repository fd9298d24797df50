"""The aerial bands of FLAIR #2, their train statistics and the parsing of a `bands` setting (torch-free:
the notebook imports it cheaply)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

BAND_NAMES = ("R", "G", "B", "NIR", "E")  # E = nDSM elevation; the order of the bands in IMG_*.tif
# Train mean/std per band on the 0-255 scale, from participants' code (docs/data-format.md, "Aerial images").
BAND_MEAN = np.array([113.78, 118.08, 109.27, 102.36, 16.70], dtype=np.float32)
BAND_STD = np.array([35.41, 32.06, 30.71, 27.09, 15.85], dtype=np.float32)


def band_indices(bands: Sequence[str]) -> list[int]:
    """Band names (R, G, B, NIR, E; case-insensitive) -> indices into the 5-band aerial image.

    ValueError (naming the setting) for an unknown name, a repeat or an empty list."""
    out = []
    for b in bands:
        name = str(b).upper()
        if name not in BAND_NAMES:
            raise ValueError(f"bands: unknown band {b!r}: expected a subset of {', '.join(BAND_NAMES)}")
        out.append(BAND_NAMES.index(name))
    if not out or len(set(out)) != len(out):
        raise ValueError(f"bands must be a non-empty list without repeats, got {list(bands)}")
    return out
