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
                                           [--seed 0] [--json FILE]

Without --data it writes the synthetic set (and the demo's folds: K=4, seed 0) into a temporary folder first
(a few seconds). Prints the per-class IoU of the forest with and without the S2 features, side by side;
`--json FILE` also writes them (bench/s2_variants.py puts them beside the models').
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from sklearn.ensemble import RandomForestClassifier  # noqa: E402

from src.core.config import load_settings  # noqa: E402
from src.core.flair import CLASS_NAMES, NUM_SCORED  # noqa: E402
from src.core.tables import fold_rows, load_index  # noqa: E402
from src.data.dataset import FlairDataset  # noqa: E402
from src.models.s2_features import early_features  # noqa: E402
from src.scoring.metrics import confusion_matrix, ious_from_confusion, miou_from_confusion  # noqa: E402


def make_data(folder: Path) -> Path:
    """The demo's synthetic set, indexed, with its folds (scripts/demo.sh: 8 + 2 domains x 2 zones x 2
    patches, seed 0; K=4 stratified folds, seed 0)."""
    from src.core.tables import write_index
    from src.prep.folds import make_folds
    from src.prep.index_scan import build_index
    from src.prep.synth_write import SynthSpec, make_dataset

    root = make_dataset(folder / "raw", SynthSpec(train_domains=8, test_domains=2, zones=2, patches=2,
                                                  seed=0))
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    write_index(build_index(root), data)
    make_folds(data, k=4, seed=0, scheme="stratified", plot=False)
    return data


def pixel_features(sample: dict, with_s2: bool) -> np.ndarray:
    """(H*W, F) float32: the aerial bands, then (with_s2) the 12 monthly NDVI of each pixel's S2 pixel."""
    image = sample["image"].numpy().astype(np.float32)
    c, h, w = image.shape
    feats = [image.reshape(c, -1)]
    if with_s2:
        s2, days = sample["s2"][None].float(), sample["s2_days"][None]
        ndvi = early_features(s2, days, torch.zeros(days.shape, dtype=torch.bool), "ndvi", (h, w), "nearest")
        feats.append(ndvi[0].numpy().reshape(ndvi.shape[1], -1))
    return np.concatenate(feats).T


def run(data: Path, pixels: int, trees: int, seed: int, fold: str = "all") -> dict[str, np.ndarray]:
    cfg = load_settings(None, {"use_s2": True, "data_dir": str(data), "workers": 0})
    train_rows, _ = fold_rows(data, fold)  # the rows `make train FOLD=<fold>` trains on
    print(f"fold {fold}: {len(train_rows)} training patches from {train_rows['domain'].nunique()} domains")
    train = FlairDataset(train_rows, cfg, train=False)
    test = FlairDataset(load_index(data / "index_test.csv"), cfg, train=False)
    rng = np.random.default_rng(seed)
    train_samples = [train[i] for i in range(len(train))]
    test_samples = [test[i] for i in range(len(test))]
    out = {}
    for name, with_s2 in (("aerial", False), ("aerial+S2 NDVI", True)):
        t0 = time.perf_counter()
        xs, ys = [], []
        for s in train_samples:
            pick = rng.choice(s["mask"].numel(), size=pixels, replace=False)
            xs.append(pixel_features(s, with_s2)[pick])
            ys.append(s["mask"].numpy().reshape(-1)[pick])
        forest = RandomForestClassifier(n_estimators=trees, min_samples_leaf=2, n_jobs=-1, random_state=seed)
        forest.fit(np.concatenate(xs), np.concatenate(ys))
        conf = np.zeros((len(CLASS_NAMES), len(CLASS_NAMES)), np.int64)
        for s in test_samples:
            pred = forest.predict(pixel_features(s, with_s2)).astype(np.uint8)
            conf += confusion_matrix(pred, s["mask"].numpy().reshape(-1))
        out[name] = conf
        print(f"{name}: {len(xs)} patches x {pixels} px, {trees} trees, test mIoU "
              f"{miou_from_confusion(conf):.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, help="indexed data (default: the demo's synthetic set)")
    parser.add_argument("--pixels", type=int, default=2000, help="training pixels sampled per patch")
    parser.add_argument("--trees", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fold", default="all", help="train on the rows of `make train FOLD=` (all | K)")
    parser.add_argument("--json", type=Path, help="also write {name: {miou, ious, confusion}} here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or make_data(Path(tmp))
        confs = run(data, args.pixels, args.trees, args.seed, args.fold)
    names = list(confs)
    print(f"\n{'test-set IoU':<32}" + "".join(f"{n:>16}" for n in names))
    ious = {n: ious_from_confusion(c) for n, c in confs.items()}
    for k in range(NUM_SCORED):
        print(f"{k:>2} {CLASS_NAMES[k]:<29}" + "".join(
            f"{'n/a' if np.isnan(ious[n][k]) else f'{ious[n][k]:.3f}':>16}" for n in names))
    print(f"{'mIoU (classes 0..11)':<32}" + "".join(f"{miou_from_confusion(confs[n]):>16.3f}" for n in names))
    if args.json:
        args.json.write_text(json.dumps({n: {"miou": float(miou_from_confusion(confs[n])),
                                             "ious": [None if np.isnan(v) else float(v) for v in ious[n]],
                                             "confusion": confs[n].tolist()}
                                         for n in names}, indent=1))


if __name__ == "__main__":
    main()
