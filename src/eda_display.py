"""What the EDA notebook displays besides tables: saved figures inline, generated Markdown, and the list
of the figures written (IPython imported only when called, so the analysis modules stay kernel-free).
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd


def show(path: str | os.PathLike | None) -> None:
    """Display a saved figure inline (notebook)."""
    from IPython.display import Image, display

    if path is not None:
        display(Image(filename=str(path), alt=Path(path).stem.replace("_", " ")))


def md(text: str) -> None:
    """Display generated Markdown (notebook)."""
    from IPython.display import Markdown, display

    display(Markdown(text))


def figure_report(folder: str | os.PathLike) -> pd.DataFrame:
    """The PNGs of a figure folder with their size (the last cell of the notebook)."""
    folder = Path(folder)
    rows = [{"figure": p.name, "kB": round(p.stat().st_size / 1024, 1)} for p in sorted(folder.glob("*.png"))]
    return pd.DataFrame(rows, columns=["figure", "kB"])
