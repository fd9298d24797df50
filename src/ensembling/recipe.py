"""The ensemble recipe JSON that `python -m src.blend` writes and `python -m src.predict --recipe` applies
(docs/recipes.md, "Out-of-fold ensembling").

    {"format": RECIPE_FORMAT, "runs": ["runs/a", "runs/b"], "checkpoint": "last", "tta": "flip",
     "weights": [0.6, 0.4],               # per run, sum 1: the mix of every class without a choice
     "class_choice": [null, 1, ...],      # 13 entries: the run whose probability alone gives class c, or null
     "biases": [0.0, 0.2, ...],           # 13 entries added to the log-probabilities (p_c * exp(b_c))
     "folds": [0, 1, 2, 3, 4],            # the folds of its OOF stores (absent: every fold<k>/)
     "foldall": false,                    # true: each run's foldall/ model too (src.blend --foldall)
     "figures": {...}}                    # what the search measured (OOF mIoU, per class, per domain, halves)

A run is the checkpoints `fold<k>/<checkpoint>.pt` of exactly those folds, its weight split evenly between
them: the OOF stores the recipe was fitted on hold each fold model's predictions of the patches it never
saw, and the test set gets the average of the same fold models. A `foldall/` model (FOLD=all, every
domain) has no OOF store, so the search never saw it: it is left out unless the recipe opts in."""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from src.core.errors import PredictError
from src.core.files import write_json
from src.core.flair import NUM_CLASSES
from src.core.settings import OOF_CHECKPOINTS, TTA_LEVELS
from src.ensembling.oof import fold_dirs
from src.prediction.ensemble import Mix

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
    if recipe.get("tta") not in TTA_LEVELS or recipe.get("checkpoint") not in OOF_CHECKPOINTS:
        raise bad("'tta' must be none, flip or d4 and 'checkpoint' last or best")
    folds = recipe.get("folds")
    if folds is not None and (not isinstance(folds, list) or not folds or len(set(folds)) != len(folds) or not
                              all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in folds)):
        raise bad("'folds' must be a non-empty list of distinct fold numbers >= 0")
    if not isinstance(recipe.get("foldall", False), bool):
        raise bad("'foldall' must be true or false")
    return {**recipe, "class_choice": choice, "biases": [float(x) for x in b],
            "weights": [float(x) / sum(w) for x in w], "folds": folds,
            "foldall": recipe.get("foldall", False)}


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


def run_checkpoints(run: str | Path, recipe: dict[str, Any], log: Callable[[str], None] = print
                    ) -> list[Path]:
    """One run's checkpoints that the recipe applies: `fold<k>/<checkpoint>.pt` of the recipe's folds (every
    fold<k>/ when it records none), then `foldall/` only when the recipe opts in; errors name the file."""
    run, which = Path(run), f"{recipe['checkpoint']}.pt"
    if not run.is_dir():
        raise PredictError(f"{run}: no such run folder (a recipe's runs are folders of fold<k>/ runs)")
    dirs = fold_dirs(run)
    folds = sorted(dirs) if recipe.get("folds") is None else recipe["folds"]
    if not folds:
        raise PredictError(f"{run}: no fold<k>/ folder: the recipe applies the fold models of its OOF stores")
    paths = [dirs.get(k, run / f"fold{k}") / which for k in folds]
    full = run / "foldall" / which  # FOLD=all: trained on every domain, no OOF store
    if recipe.get("foldall"):
        paths.append(full)
    elif full.is_file():
        log(f"predict: {full} left out: the recipe was fitted on the OOF stores of folds {folds} "
            "(python -m src.blend --foldall writes a recipe that adds it)")
    for p in paths:
        if not p.is_file():
            raise PredictError(f"{p}: not found: the recipe applies {which} of folds {folds}"
                               f"{' and foldall' if recipe.get('foldall') else ''} of {run}")
    return paths


def recipe_checkpoints(recipe: dict[str, Any], log: Callable[[str], None] = print) -> tuple[list[Path], Mix]:
    """The checkpoints of the recipe's runs (run_checkpoints) and the per-class Mix that applies the recipe
    to them (a run's class weights split evenly between its checkpoints)."""
    matrix = class_weight_matrix(recipe["weights"], recipe["class_choice"])
    paths: list[Path] = []
    rows: list[tuple[float, ...]] = []
    for r, run in enumerate(recipe["runs"]):
        found = run_checkpoints(run, recipe, log)
        paths += found
        rows += [tuple(float(x) / len(found) for x in matrix[r])] * len(found)
    return paths, Mix(tuple(rows), tuple(recipe["biases"]))
