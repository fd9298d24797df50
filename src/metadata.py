"""The aerial metadata of a patch as a fixed-length float vector for the model (docs/data-format.md,
"Metadata").

Layout: x, y (Lambert-93, ~[-1, 1] over mainland France), altitude (km), sin/cos of the day of year,
hour of day ((h - 12) / 6), then a one-hot of the camera name hashed (crc32) into CAMERA_SLOTS. A missing
field encodes as 0 (a missing camera as an all-zero one-hot), so patches without metadata still load.
"""
from __future__ import annotations

import datetime as dt
import math
import zlib

import numpy as np

CAMERA_SLOTS = 8
META_DIM = 6 + CAMERA_SLOTS
_L93_X = (675_000.0, 575_000.0)    # centre, half range
_L93_Y = (6_580_000.0, 540_000.0)


def encode_metadata(camera: str, date: str, hour: str, x: float, y: float, z: float) -> np.ndarray:
    """float32 (META_DIM,) encoding of one patch's aerial metadata (see the module docstring)."""
    out = np.zeros(META_DIM, dtype=np.float32)
    if np.isfinite(x):
        out[0] = (x - _L93_X[0]) / _L93_X[1]
    if np.isfinite(y):
        out[1] = (y - _L93_Y[0]) / _L93_Y[1]
    if np.isfinite(z):
        out[2] = z / 1000.0
    try:
        day = dt.date.fromisoformat(date[:10])
        angle = 2 * math.pi * (day.timetuple().tm_yday - 1) / 365.25
        out[3], out[4] = math.sin(angle), math.cos(angle)
    except ValueError:
        pass
    try:
        hh, mm = hour.lower().split("h")
        out[5] = (int(hh) + int(mm or 0) / 60.0 - 12.0) / 6.0
    except ValueError:
        pass
    if camera:
        out[6 + zlib.crc32(camera.encode()) % CAMERA_SLOTS] = 1.0
    return out
