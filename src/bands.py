"""The aerial bands of FLAIR #2 and their train statistics (torch-free: the notebook imports it cheaply)."""
from __future__ import annotations

import numpy as np

BAND_NAMES = ("R", "G", "B", "NIR", "E")  # E = nDSM elevation; the order of the bands in IMG_*.tif
# Train mean/std per band on the 0-255 scale [spec section 3, from participants' code].
BAND_MEAN = np.array([113.78, 118.08, 109.27, 102.36, 16.70], dtype=np.float32)
BAND_STD = np.array([35.41, 32.06, 30.71, 27.09, 15.85], dtype=np.float32)
