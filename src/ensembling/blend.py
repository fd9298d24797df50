"""Fitting an ensemble recipe on out-of-fold predictions (`python -m src.blend`, `make ensemble`).

Each run is a folder of K fold runs of one config, whose `fold<k>/oof*/` stores (src.ensembling.oof) hold
every training patch once, predicted by the fold model that did not train on it. The search
(src.ensembling.search) maximises the official OOF mIoU over the run weights, a per-class choice of one run
(2nd place), the TTA level among those stored by every run, and per-class biases, on a fixed pixel subsample
(src.ensembling.search says why and how big). Against overfitting it also fits on half of the domains and
scores the other half (and the swap), next to the best single run and the plain mean. The chosen recipe is
then scored on every pixel, per class and per domain, and written as JSON (src.ensembling.recipe) for `make
submit RECIPE=recipes/recipe.json` (`python -m src.predict --recipe recipes/recipe.json`), which applies the
fold models of those stores (a run's `foldall/` model only with --foldall). Outputs: the recipe,
`<stem>_domains.csv` (every run, the mean and the recipe, per domain) and `<stem>_domains.png` (the recipe).
Docs: docs/recipes.md, "Out-of-fold ensembling".
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from src.core.errors import PredictError
from src.core.flair import CLASS_NAMES, NUM_SCORED
from src.core.progress import count
from src.core.tables import load_folds, train_index
from src.ensembling import search as S
from src.ensembling.oof import read_store_manifest
from src.ensembling.recipe import save_recipe
from src.ensembling.search import (
    RunStores,
    checked_ids,
    common_levels,
    find_stores,
    load_sample,
    load_truth,
    stream_confusions,
)
from src.scoring.domains import domain_rows, plot, write_csv
from src.scoring.metrics import ious_from_confusion, miou_from_confusion


@dataclass(frozen=True)
class BlendOptions:
    """What the search may use and how: the data folder (None: the one the stores were written from), the
    TTA level (auto: the best among those every run stored), the stores of last.pt or best.pt, sampled
    pixels per patch (auto or a number), the seed of the sample and the domain halves, the per-class run
    choice, per-class biases, threads reading PROB files, and whether the recipe applies foldall/ too."""

    data: str | Path | None = None
    tta: str = "auto"
    checkpoint: str = "last"
    pixels: int | str = "auto"
    seed: int = 0
    choice: bool = True
    biases: bool = True
    threads: int = 8
    foldall: bool = False


MIN_SAMPLE = 4_000_000  # pixels: --pixels auto samples at least this many in all (small sets)


def _setup(runs: Sequence[str | Path], opts: BlendOptions, log: Callable[[str], None]
           ) -> tuple[list[RunStores], list[str], dict[str, int], dict[str, str], dict[str, str]]:
    """(stores of each run, TTA levels to try, id -> fold, id -> label path, id -> domain), all checked."""
    runs, data = [Path(r) for r in runs], opts.data
    if len(set(r.resolve() for r in runs)) != len(runs):
        raise PredictError("--runs: the same run is given twice")
    if data is None:  # the data folder the first store was written from
        first = next(iter(sorted(runs[0].glob("fold*/oof*/oof.json"))), None)
        data = (read_store_manifest(first.parent) or {}).get("data_dir", "data") if first else "data"
    index = train_index(data).merge(load_folds(data)[["id", "fold"]], on="id", how="inner")
    folds = sorted(int(k) for k in index["fold"].unique())
    stores = [find_stores(r, folds, opts.checkpoint) for r in runs]
    levels = common_levels(stores)
    extra = {lvl: [r.run.name for r in stores if lvl in r.stores] for r0 in stores for lvl in r0.stores
             if lvl not in levels}
    if extra:  # a level only some runs stored cannot be compared: say so instead of passing over it silently
        log(f"blend: TTA levels stored by every run: {', '.join(levels)}; not comparable: "
            + "; ".join(f"{lvl} (only {', '.join(names)})" for lvl, names in extra.items())
            + " (python -m src.oof --tta ... on the other runs)")
    if opts.tta != "auto":
        if opts.tta not in levels:
            raise PredictError(f"--tta {opts.tta}: not stored by every run (stored: {', '.join(levels)})")
        levels = [opts.tta]
    ids = checked_ids(stores, levels, index[["id", "fold"]], log)
    rows = index.set_index(index["id"].astype(str))
    labels = {i: str(rows.at[i, "msk_path"]) for i in ids}
    domains = {i: str(rows.at[i, "domain"]) for i in ids}
    log(f"blend: {len(runs)} runs, {len(ids)} training patches in {len(folds)} folds, "
        f"{count(len(set(domains.values())), 'domain')} (data {data})")
    return stores, levels, ids, labels, domains


def _fit_level(stores: Sequence[RunStores], level: str, ids: dict[str, int], truth: np.ndarray,
               opts: BlendOptions, log: Callable[[str], None]) -> tuple[S.Fit, list[np.ndarray]]:
    probs = [load_sample(r.stores[level], ids, opts.pixels, opts.seed, opts.threads,
                         f"sampling {r.run.name} ({level})") for r in stores]
    log(f"blend: tta {level}: single runs {', '.join(f'{S.miou_of(p.argmax(0), truth):.4f}' for p in probs)}")
    fit = S.search(probs, truth, choice=opts.choice, biases=opts.biases, log=log)
    log(f"blend: tta {level}: recipe mIoU {fit.miou:.4f} on the sample")
    return fit, probs


def _halves(probs: list[np.ndarray], truth: np.ndarray, pix_dom: np.ndarray, names: list[str],
            opts: BlendOptions, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Fit on half of the domains, score on the other half, and the swap: does the search generalise?"""
    order = list(np.random.default_rng(opts.seed).permutation(len(names)))
    if len(order) < 2:
        log("blend: one domain only: no held-out check")
        return []
    half = [sorted(order[: len(order) // 2]), sorted(order[len(order) // 2:])]
    out = []
    for a, b in (half, half[::-1]):
        fit_px, test_px = np.isin(pix_dom, a), np.isin(pix_dom, b)
        fit = S.search([p[:, fit_px] for p in probs], truth[fit_px], choice=opts.choice, biases=opts.biases,
                       log=lambda *x: None)
        test = [p[:, test_px] for p in probs]
        t = truth[test_px]
        singles = [S.miou_of(p.argmax(0), t) for p in test]
        res = {"fit": [names[i] for i in a], "scored": [names[i] for i in b], "recipe": S.miou_of(
            S.predict(test, fit), t), "mean": S.miou_of(S.predict(test, S.mean_fit(len(test))), t),
            "best_single": max(singles)}
        out.append(res)
        log(f"blend: held-out check: fit on {count(len(a), 'domain')}, scored on {count(len(b), 'other')}: "
            f"recipe {res['recipe']:.4f}, plain mean {res['mean']:.4f}, best single run "
            f"{res['best_single']:.4f}")
    if any(h["recipe"] < max(h["mean"], h["best_single"]) for h in out):
        log("blend: warning: on held-out domains the recipe does not beat the plain mean or the best run: "
            "its extra parts fit noise (try --no-biases, --no-choice, or more --pixels)")
    return out


def _tables(conf: np.ndarray, names: list[str], domains: list[str], log: Callable[[str], None]
            ) -> dict[str, Any]:
    """Per-class and per-domain OOF tables (every pixel) of each run, the mean and the recipe."""
    cols = [*names, "mean", "recipe"]
    total = conf.sum(1)
    ious = [ious_from_confusion(c) for c in total]
    log("blend: OOF IoU per class, every pixel (" + " | ".join(cols) + ")")
    for k, cname in enumerate(CLASS_NAMES):
        cells = "  ".join("   nan" if np.isnan(i[k]) else f"{i[k]:6.4f}" for i in ious)
        log(f"  {k:>2} {cname:<24} {cells}" + ("  (not in mIoU)" if k >= NUM_SCORED else ""))
    mious = [miou_from_confusion(c) for c in total]
    log(f"     {'mIoU':<24} " + "  ".join(f"{x:6.4f}" for x in mious))
    log("blend: OOF mIoU per domain")
    per_domain = {c: {} for c in cols}
    for d, dname in enumerate(domains):
        row = [miou_from_confusion(conf[j, d]) for j in range(len(cols))]
        for c, v in zip(cols, row):
            per_domain[c][dname] = None if np.isnan(v) else v
        log(f"     {dname:<24} " + "  ".join(f"{x:6.4f}" for x in row))
    return {"oof_miou": {c: None if np.isnan(v) else v for c, v in zip(cols, mious)},
            "ious": {c: [None if np.isnan(x) else float(x) for x in i] for c, i in zip(cols, ious)},
            "per_domain": per_domain}


def _used_runs(fit: S.Fit) -> list[int]:
    """Runs the recipe needs at test time (a zero weight and no class choice: not loaded)."""
    return [m for m in range(len(fit.weights)) if fit.weights[m] > 0 or m in fit.choice]


def sample_pixels(pixels: int | str, n_patches: int) -> int:
    """Pixels per patch of the search sample: a number, or auto = 128 per patch (7.9 M pixels on the real
    training set) but at least MIN_SAMPLE pixels in all, so a small set is not searched on a few thousand."""
    if pixels != "auto":
        return int(pixels)
    return max(128, math.ceil(MIN_SAMPLE / max(n_patches, 1)))


def blend(runs: Sequence[str | Path], out: str | Path, opts: BlendOptions,
          log: Callable[[str], None] = print) -> dict[str, Any]:
    """Search, check, score and write the recipe; returns it (with its figures)."""
    stores, levels, ids, labels, domain_of_id = _setup(runs, opts, log)
    opts = replace(opts, pixels=sample_pixels(opts.pixels, len(ids)))
    names = [r.run.name for r in stores]
    domains = sorted(set(domain_of_id.values()))
    dom_code = {d: k for k, d in enumerate(domains)}
    truth = load_truth(labels, list(ids), opts.pixels, opts.seed, opts.threads)
    per_patch = len(truth) // len(ids)
    pix_dom = np.repeat([dom_code[domain_of_id[i]] for i in ids], per_patch)
    log(f"blend: search sample: {per_patch} pixels per patch, {len(truth)} pixels (seed {opts.seed})")
    level_miou: dict[str, float] = {}
    for lvl in levels:  # only the best level's samples are kept (~100 MB per run and level)
        candidate = _fit_level(stores, lvl, ids, truth, opts, log)
        level_miou[lvl] = candidate[0].miou
        if lvl == max(level_miou, key=level_miou.get):
            level, (fit, probs) = lvl, candidate
    log(f"blend: tta {level} chosen" + (f" among {', '.join(levels)}" if len(levels) > 1 else ""))
    halves = _halves(probs, truth, pix_dom, domains, opts, log)
    conf = stream_confusions([r.stores[level] for r in stores], ids, labels,
                             {i: dom_code[domain_of_id[i]] for i in ids}, len(domains), fit.matrix(),
                             fit.biases, opts.threads)
    figures = _tables(conf, names, domains, log)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for j, col in enumerate([*names, "mean", "recipe"]):
        rows += [{"model": col, **r} for r in domain_rows(conf[j], domains)]
    write_csv(rows, out.with_name(out.stem + "_domains.csv"), lead=("model",))
    plot(domain_rows(conf[-1], domains), out.with_name(out.stem + "_domains.png"), f"{out.stem} (OOF):")
    used = _used_runs(fit)
    recipe = {"runs": [str(stores[m].run) for m in used], "checkpoint": opts.checkpoint, "tta": level,
              "weights": [float(fit.weights[m]) for m in used],
              "class_choice": [None if c is None else used.index(c) for c in fit.choice],
              "biases": [round(float(b), 4) for b in fit.biases],
              "folds": sorted(stores[0].stores[level]), "foldall": opts.foldall,
              "figures": {"sample": {"pixels_per_patch": per_patch, "patches": len(ids), "pixels": len(truth),
                                     "seed": opts.seed, "levels": level_miou,
                                     "recipe_miou": fit.miou, "steps": fit.steps},
                          "halves": halves, **figures}}
    save_recipe(recipe, out)
    miou = figures["oof_miou"]
    log(f"blend: OOF mIoU on every pixel: recipe {miou['recipe']:.4f}, plain mean {miou['mean']:.4f}, "
        f"best single run {max(miou[n] or 0.0 for n in names):.4f}; recipe written to {out}")
    return recipe
