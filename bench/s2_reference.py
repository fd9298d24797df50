"""The Sentinel-2 reference a fusion model must clear (issue 18, item 7): a per-pixel random forest.

On the kit's own synthetic set (scripts/demo.sh's shape by default: 8 training domains, 2 unseen test
domains), each aerial pixel is described by its 5 aerial bands and, with --s2, the NDVI of each monthly S2
composite of the S2 pixel it lies in (10 m, docs/data-format.md "Geometry"; months absent from a series
repeat the nearest present one). The S2 features are the kit's own early-fusion features
(src/models/s2_features.py, `s2_early=ndvi`) sampled nearest, i.e. the S2 pixel under each aerial pixel, so
the forest and the models read the same numbers. A random forest is fitted on pixels sampled from the training
patches (every one, or with --fold K the demo's training rows of fold K: the domains outside fold K) and
scored on every pixel of the test patches with the official metric (mIoU over classes 0..11). It is the
reference the issue asks for: herbaceous vegetation (9) and agricultural land (10) are identical in the
synthetic aerial bands and differ only in their S2 phenology, so a model that uses the series well must beat
the forest on them.

    .venv/bin/python bench/s2_reference.py [--data DIR] [--fold all|K] [--pixels 2000] [--trees 100]
                                           [--seed 0 [1 ...]] [--features monthly [dates stats]]
                                           [--phenology smooth|events] [--patches 2] [--json FILE]

Without --data it writes the synthetic set (and the demo's folds: K=4, seed 0) into a temporary folder first
(a few seconds; `--phenology` and `--patches` change that set: issue 28's "events" tree, more patches a
zone). Prints the per-class IoU of the forest with and without the S2 features, side by
side; `--json FILE` also writes them (bench/s2_variants.py puts them beside the models').

`--features` picks which per-pixel S2 features the forest gets besides the aerial bands (issue 28: which S2
inputs carry short events), one column each:
  monthly -- the NDVI of each monthly composite (the default; the official processing, `s2_early=ndvi`);
  dates   -- the NDVI of every date the kit's cloud filter keeps (`s2_monthly=false`), interpolated linearly
             onto a fixed day-of-year grid (every DATE_STEP days), so a 2-6 week event keeps its own time;
  stats   -- NDVI statistics over those clear dates (`ndvi_stats`: max, its day, min after it, the largest
             drop between consecutive dates and its day): five channels a network could be given cheaply.
Several `--seed`s (forest and pixel sampling) print the mean and the spread (min-max) over the seeds.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from sklearn.ensemble import RandomForestClassifier  # noqa: E402

from src.core.config import load_settings, parse_overrides  # noqa: E402
from src.core.flair import CLASS_NAMES, NUM_SCORED  # noqa: E402
from src.core.tables import fold_rows, load_index  # noqa: E402
from src.data.dataset import FlairDataset  # noqa: E402
from src.models.s2_features import REF_DOY, early_features, per_date, sample_footprint  # noqa: E402
from src.scoring.metrics import confusion_matrix, ious_from_confusion, miou_from_confusion  # noqa: E402

FEATURES = ("monthly", "dates", "stats")
COLUMN = {"monthly": "aerial+S2 NDVI", "dates": "aerial+S2 dates", "stats": "aerial+S2 stats"}
DATE_STEP = 10  # days between the points of the `dates` grid (0, 10, ..., 360: 37 channels)


def make_data(folder: Path, patches: int = 2, phenology: str = "smooth") -> Path:
    """The demo's synthetic set, indexed, with its folds (scripts/demo.sh: 8 + 2 domains x 2 zones x 2
    patches, seed 0; K=4 stratified folds, seed 0); `patches` per zone and the S2 `phenology` may change."""
    from src.core.tables import write_index
    from src.prep.folds import make_folds
    from src.prep.index_scan import build_index
    from src.prep.synth_write import SynthSpec, make_dataset

    root = make_dataset(folder / "raw", SynthSpec(train_domains=8, test_domains=2, zones=2, patches=patches,
                                                  seed=0, phenology=phenology))
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    write_index(build_index(root), data)
    make_folds(data, k=4, seed=0, scheme="stratified", plot=False)
    return data


def ndvi_dates(sample: dict) -> tuple[np.ndarray, np.ndarray]:
    """(ndvi (T, S, S) float32, doy (T,) 0-based day of year) of a sample read with `s2_monthly=false`: the
    NDVI of each date the kit's cloud filter kept (src.data.sentinel.s2_series), computed as the models do
    (src.models.s2_features.per_date), ordered by day of year."""
    ndvi = per_date(sample["s2"][None], "ndvi")[0, :, 0].numpy()
    doy = np.remainder(REF_DOY - sample["s2_days"].numpy(), 365)
    order = np.argsort(doy, kind="stable")
    return ndvi[order], doy[order]


def interp_dates(ndvi: np.ndarray, doy: np.ndarray, step: int = DATE_STEP) -> np.ndarray:
    """(ceil(365 / step), S, S): the series linearly interpolated at days 0, step, 2*step, ... (held flat
    before the first and after the last date, as np.interp). Why: a fixed grid gives every pixel the same
    channels whatever its dates, and an event keeps the day it happens on, where a monthly mean dilutes a
    2-6 week event and a calendar shift moves it to another month. `doy` ascending; equal days averaged."""
    days, inverse = np.unique(doy, return_inverse=True)
    values = np.zeros((days.size, *ndvi.shape[1:]), np.float32)
    np.add.at(values, inverse, ndvi)
    values /= np.bincount(inverse, minlength=days.size).astype(np.float32)[:, None, None]
    grid = np.arange(0, 365, step, dtype=np.float64)
    if days.size == 1:
        return np.repeat(values, grid.size, axis=0)
    hi = np.clip(np.searchsorted(days, grid), 1, days.size - 1)
    lo = hi - 1
    w = np.clip((grid - days[lo]) / (days[hi] - days[lo]), 0.0, 1.0).astype(np.float32)[:, None, None]
    return (1 - w) * values[lo] + w * values[hi]


def ndvi_stats(ndvi: np.ndarray, doy: np.ndarray) -> np.ndarray:
    """(5, S, S) float32 over the clear dates: max NDVI, day of year of the max (first on a tie), min NDVI
    on or after that day, the largest drop between consecutive dates (0 when it never falls) and the day of
    the date after that drop (the first date's day when it never falls). Why: a green peak, a harvest or a
    mowing is one max, one fall and their dates, whatever month they land in; five channels, not 37."""
    t = np.arange(ndvi.shape[0])[:, None, None]
    top = ndvi.argmax(axis=0)
    after = np.where(t >= top[None], ndvi, np.inf).min(axis=0)
    falls = ndvi[:-1] - ndvi[1:]
    if falls.shape[0]:
        at = falls.argmax(axis=0)
        drop = np.maximum(np.take_along_axis(falls, at[None], 0)[0], 0.0)
        drop_day = np.where(drop > 0, doy[at + 1], doy[0])
    else:
        drop, drop_day = np.zeros(ndvi.shape[1:], np.float32), np.full(ndvi.shape[1:], doy[0])
    return np.stack([ndvi.max(axis=0), doy[top], after, drop, drop_day]).astype(np.float32)


def pixel_features(sample: dict, features: str | None) -> np.ndarray:
    """(H*W, F) float32: the aerial bands, then the S2 features of `features` (None: none) of each pixel's
    S2 pixel (nearest; monthly: the 12 monthly NDVI; dates / stats: `interp_dates` / `ndvi_stats` of the
    sample's clear dates, which must then be read with `s2_monthly=false`)."""
    image = sample["image"].numpy().astype(np.float32)
    c, h, w = image.shape
    feats = [image.reshape(c, -1)]
    if features == "monthly":
        s2, days = sample["s2"][None].float(), sample["s2_days"][None]
        ndvi = early_features(s2, days, torch.zeros(days.shape, dtype=torch.bool), "ndvi", (h, w), "nearest")
        feats.append(ndvi[0].numpy().reshape(ndvi.shape[1], -1))
    elif features in ("dates", "stats"):
        maps = (interp_dates if features == "dates" else ndvi_stats)(*ndvi_dates(sample))
        on_grid = sample_footprint(torch.from_numpy(maps)[None], (h, w), (h, w), "nearest")[0]
        feats.append(on_grid.numpy().reshape(maps.shape[0], -1))
    elif features is not None:
        raise ValueError(f"features must be one of {FEATURES}, got {features!r}")
    return np.concatenate(feats).T


def load_samples(data: Path, fold: str, monthly: bool, overrides: dict | None = None
                 ) -> tuple[list[dict], list[dict]]:
    """(training samples of `fold`, test samples), read by the kit's dataset (S2 cloud filter included) with
    monthly composites or with the clear dates themselves; `overrides`: other kit settings (e.g. a stricter
    cloud filter, s2_cover_max)."""
    cfg = load_settings(None, {"use_s2": True, "data_dir": str(data), "workers": 0, "s2_monthly": monthly,
                               **(overrides or {})})
    train_rows, _ = fold_rows(data, fold)  # the rows `make train FOLD=<fold>` trains on
    train = FlairDataset(train_rows, cfg, train=False)
    test = FlairDataset(load_index(data / "index_test.csv"), cfg, train=False)
    return [train[i] for i in range(len(train))], [test[i] for i in range(len(test))]


def pixel_picks(samples: list[dict], pixels: int, seed: int, s2: bool) -> list[np.ndarray]:
    """The `pixels` training pixels drawn from each sample: the aerial column takes the seed's first draw,
    every S2 column its second (the draws of the single-column runs before issue 28, so their figures stay,
    and every S2 feature set is fitted on the same pixels)."""
    rng = np.random.default_rng(seed)
    draws = [[rng.choice(s["mask"].numel(), size=pixels, replace=False) for s in samples]
             for _ in range(1 + s2)]
    return draws[-1]


def fit_and_score(train_samples: list[dict], test_samples: list[dict], features: str | None, pixels: int,
                  trees: int, seed: int) -> np.ndarray:
    """Test confusion matrix of a forest fitted on `pixels` random pixels of each training sample."""
    xs, ys = [], []
    for s, pick in zip(train_samples, pixel_picks(train_samples, pixels, seed, features is not None)):
        xs.append(pixel_features(s, features)[pick])
        ys.append(s["mask"].numpy().reshape(-1)[pick])
    # one warning per tree where the installed joblib and scikit-learn disagree on versions: harmless
    warnings.filterwarnings("ignore", message=".*sklearn.utils.parallel.delayed.*")
    forest = RandomForestClassifier(n_estimators=trees, min_samples_leaf=2, n_jobs=-1, random_state=seed)
    forest.fit(np.concatenate(xs), np.concatenate(ys))
    conf = np.zeros((len(CLASS_NAMES), len(CLASS_NAMES)), np.int64)
    for s in test_samples:
        pred = forest.predict(pixel_features(s, features)).astype(np.uint8)
        conf += confusion_matrix(pred, s["mask"].numpy().reshape(-1))
    return conf


def run(data: Path, pixels: int, trees: int, seed: int | list[int], fold: str = "all",
        features: tuple[str, ...] = ("monthly",), overrides: dict | None = None
        ) -> dict[str, list[np.ndarray]]:
    """{column: [test confusion of each seed]}: the forest on the aerial bands, then on aerial + each S2
    feature set of `features`."""
    seeds = [seed] if isinstance(seed, int) else list(seed)
    sets: dict[bool, tuple[list[dict], list[dict]]] = {}
    out: dict[str, list[np.ndarray]] = {}
    for feat in (None, *features):
        monthly = feat in (None, "monthly")
        if monthly not in sets:
            sets[monthly] = load_samples(data, fold, monthly, overrides)
            print(f"fold {fold}: {len(sets[monthly][0])} training patches, {len(sets[monthly][1])} test "
                  f"patches (s2_monthly={monthly})", flush=True)
        name = "aerial" if feat is None else COLUMN[feat]
        for sd in seeds:
            t0 = time.perf_counter()
            conf = fit_and_score(*sets[monthly], feat, pixels, trees, sd)
            out.setdefault(name, []).append(conf)
            print(f"{name}, seed {sd}: {len(sets[monthly][0])} patches x {pixels} px, {trees} trees, "
                  f"test mIoU {miou_from_confusion(conf):.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, help="indexed data (default: the demo's synthetic set)")
    parser.add_argument("--pixels", type=int, default=2000, help="training pixels sampled per patch")
    parser.add_argument("--trees", type=int, default=100)
    parser.add_argument("--seed", type=int, nargs="+", default=[0], help="one forest per seed (mean, spread)")
    parser.add_argument("--fold", default="all", help="train on the rows of `make train FOLD=` (all | K)")
    parser.add_argument("--features", nargs="+", choices=FEATURES, default=["monthly"],
                        help="S2 feature sets, one forest column each (module docstring)")
    parser.add_argument("--phenology", choices=("smooth", "events"), default="smooth",
                        help="S2 phenology of the synthetic set written without --data")
    parser.add_argument("--patches", type=int, default=2, help="patches per zone of the synthetic set")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="kit settings for reading the S2 series (e.g. s2_cover_max=0.05)")
    parser.add_argument("--json", type=Path, help="also write {name: {miou, ious, confusion}} here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or make_data(Path(tmp), args.patches, args.phenology)
        confs = run(data, args.pixels, args.trees, args.seed, args.fold, tuple(dict.fromkeys(args.features)),
                    parse_overrides(args.set))
    print()
    print(table(confs, many=len(args.seed) > 1))
    if args.json:
        args.json.write_text(json.dumps(summary(confs, args.seed), indent=1))


def _seed_ious(confs: list[np.ndarray]) -> np.ndarray:
    """(seeds, 13) IoU of each seed's confusion (NaN for a class absent from prediction and truth)."""
    return np.stack([ious_from_confusion(c) for c in confs])


def _mean(values: np.ndarray) -> float | None:
    """Mean over the non-NaN seeds (None, JSON's null, when all are NaN)."""
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else None


def _floats(values: np.ndarray) -> list[float | None]:
    """`values` as a JSON list, NaN as null."""
    return [None if np.isnan(v) else float(v) for v in values]


def table(confs: dict[str, list[np.ndarray]], many: bool) -> str:
    """Per-class test IoU and mIoU of each column: the value, or with `many` seeds the mean (min-max)."""
    width = 20 if many else 16

    def cell(values: np.ndarray) -> str:
        values = values[~np.isnan(values)]
        if not values.size:
            return f"{'n/a':>{width}}"
        text = f"{values.mean():.3f}" + (f" ({values.min():.3f}-{values.max():.3f})" if many else "")
        return f"{text:>{width}}"

    ious = {n: _seed_ious(cs) for n, cs in confs.items()}
    head = "test-set IoU" + (" mean (min-max)" if many else "")
    lines = [f"{head:<32}" + "".join(f"{n:>{width}}" for n in confs)]
    for k in range(NUM_SCORED):
        lines.append(f"{k:>2} {CLASS_NAMES[k]:<29}" + "".join(cell(ious[n][:, k]) for n in confs))
    lines.append(f"{'mIoU (classes 0..11)':<32}"
                 + "".join(cell(np.array([miou_from_confusion(c) for c in cs])) for cs in confs.values()))
    return "\n".join(lines)


def summary(confs: dict[str, list[np.ndarray]], seeds: list[int]) -> dict[str, dict]:
    """{column: {miou, ious, confusion}}: with one seed that seed's figures (the JSON bench/s2_variants.py
    reads); with several the means over the seeds, the summed confusion and the per-seed figures."""
    out = {}
    for n, cs in confs.items():
        ious, mious = _seed_ious(cs), [float(miou_from_confusion(c)) for c in cs]
        entry = {"miou": float(np.mean(mious)), "ious": [_mean(col) for col in ious.T],
                 "confusion": np.sum(cs, axis=0).tolist()}
        if len(cs) > 1:
            entry.update(seeds=list(seeds), miou_seeds=mious, ious_seeds=[_floats(row) for row in ious])
        out[n] = entry
    return out


if __name__ == "__main__":
    main()
