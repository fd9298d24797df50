"""The ensemble recipe JSON that `python -m src.blend` writes and `python -m src.predict --recipe` applies
(docs/recipes.md, "Out-of-fold ensembling").

    {"format": RECIPE_FORMAT, "runs": ["runs/a", "runs/b"], "checkpoint": "last", "tta": "flip",
     "weights": [0.6, 0.4],               # per run, sum 1: the mix of every class without a choice
     "class_choice": [null, 1, ...],      # 13 entries: the run whose probability alone gives class c, or null
     "biases": [0.0, 0.2, ...],           # 13 entries added to the log-probabilities (p_c * exp(b_c))
     "figures": {...}}                    # what the search measured (OOF mIoU, per class, per domain, halves)

A run is every fold's checkpoint under it (`<checkpoint>.pt`), its weight split evenly between them: the
OOF stores the recipe was fitted on hold each fold model's predictions of the patches it never saw, and
the test set gets the average of the same fold models.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from src.checkpoint import find_checkpoints
from src.classes import NUM_CLASSES
from src.ensemble import Mix
from src.errors import PredictError
from src.fileio import write_json

RECIPE_FORMAT = "flair2-kit ensemble recipe v1"


def class_weight_matrix(weights: list[float], choice: list[int | None]) -> np.ndarray:
    """(runs, 13) float64: column c is the one-hot of the chosen run, else the run weights."""
    w = np.asarray(weights, dtype=np.float64)
    out = np.repeat(w[:, None], NUM_CLASSES, axis=1)
    for c, m in enumerate(choice):
        if m is not None:
            out[:, c] = 0.0
            out[m, c] = 1.0
    return out


def check_recipe(recipe: Any, where: str) -> dict[str, Any]:
    """The recipe with its fields checked; PredictError naming `where` and the field otherwise."""
    def bad(msg: str) -> PredictError:
        return PredictError(f"{where}: {msg}")

    if not isinstance(recipe, dict) or recipe.get("format") != RECIPE_FORMAT:
        raise bad(f"not an ensemble recipe (expected format {RECIPE_FORMAT!r})")
    runs = recipe.get("runs")
    if not isinstance(runs, list) or not runs or not all(isinstance(r, str) for r in runs):
        raise bad("'runs' must be a non-empty list of run folders")
    n = len(runs)
    w = recipe.get("weights")
    if (not isinstance(w, list) or len(w) != n or not all(isinstance(x, (int, float)) for x in w)
            or any(x < 0 or not math.isfinite(x) for x in w) or sum(w) <= 0):
        raise bad(f"'weights' must be {n} numbers >= 0 with a positive sum")
    choice = recipe.get("class_choice", [None] * NUM_CLASSES)
    if (not isinstance(choice, list) or len(choice) != NUM_CLASSES
            or any(m is not None and (not isinstance(m, int) or not 0 <= m < n) for m in choice)):
        raise bad(f"'class_choice' must be {NUM_CLASSES} entries, each null or a run index 0..{n - 1}")
    b = recipe.get("biases", [0.0] * NUM_CLASSES)
    if (not isinstance(b, list) or len(b) != NUM_CLASSES
            or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in b)):
        raise bad(f"'biases' must be {NUM_CLASSES} finite numbers")
    if recipe.get("tta") not in ("none", "flip", "d4") or recipe.get("checkpoint") not in ("last", "best"):
        raise bad("'tta' must be none, flip or d4 and 'checkpoint' last or best")
    return {**recipe, "class_choice": choice, "biases": [float(x) for x in b],
            "weights": [float(x) / sum(w) for x in w]}


def load_recipe(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        recipe = json.loads(path.read_text())
    except FileNotFoundError:
        raise PredictError(f"{path}: recipe not found (write one with `make ensemble`)") from None
    except (OSError, ValueError) as err:
        raise PredictError(f"{path}: unreadable recipe ({err})") from None
    return check_recipe(recipe, str(path))


def save_recipe(recipe: dict[str, Any], path: str | Path) -> Path:
    recipe = {"format": RECIPE_FORMAT, **recipe}
    check_recipe(recipe, str(path))
    return write_json(path, recipe)


def recipe_checkpoints(recipe: dict[str, Any]) -> tuple[list[Path], Mix]:
    """Every checkpoint of the recipe's runs and the per-class Mix that applies the recipe to them
    (a run's class weights split evenly between its fold checkpoints)."""
    matrix = class_weight_matrix(recipe["weights"], recipe["class_choice"])
    paths: list[Path] = []
    rows: list[tuple[float, ...]] = []
    for r, run in enumerate(recipe["runs"]):
        found = find_checkpoints(run, which=recipe["checkpoint"])
        paths += found
        rows += [tuple(float(x) / len(found) for x in matrix[r])] * len(found)
    return paths, Mix(tuple(rows), tuple(recipe["biases"]))
