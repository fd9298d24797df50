"""One loader for a whole ensemble: each patch is read once per distinct input setting, not per model.

Models whose input settings differ (bands, norm, S2 on/off and S2 options, metadata) each need their own
sample of the same patch; item i of `MultiInput` is the list of those samples, and `collate_multi`
batches each setting separately (docs/data-format.md, "Samples and batches").
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from torch.utils.data import DataLoader, Dataset

from src.errors import DataError, one_line
from src.loader import build_loader, collate

# Settings that change what a model is fed: models differing in any of them get separate inputs.
DATA_KEYS = ("bands", "norm", "use_s2", "s2_size", "s2_filter_clouds", "s2_cover_max", "s2_prob_min",
             "s2_monthly", "use_metadata")


def input_signature(cfg: dict[str, Any]) -> str:
    return json.dumps({k: cfg.get(k) for k in DATA_KEYS}, sort_keys=True, default=str)


class MultiInput(Dataset):
    """The same patch as seen by each distinct input setting: item i -> [sample of dataset g, ...].

    With skip_bad, an unreadable patch becomes the marker {"id": id, "bad": one-line error} instead of
    raising (the datasets themselves never substitute another patch: every id must get its own
    prediction)."""

    def __init__(self, datasets: list[Dataset], ids: Sequence[str], skip_bad: bool = False):
        self.datasets = datasets
        self.ids = np.asarray([str(i) for i in ids], dtype=str)
        self.skip_bad = skip_bad

    def __len__(self) -> int:
        return len(self.datasets[0])

    def __getitem__(self, i: int) -> list[Any] | dict[str, str]:
        try:
            return [ds[i] for ds in self.datasets]
        except DataError as err:
            if not self.skip_bad:
                raise
            return {"id": str(self.ids[i]), "bad": one_line(err).replace("\n", " ")}


def collate_multi(samples: list[Any]) -> dict[str, Any]:
    """{"batches": one collated batch per input setting (None if every sample was bad),
    "bad": [(id, error), ...]}."""
    bad = [(s["id"], s["bad"]) for s in samples if isinstance(s, dict)]
    good = [s for s in samples if not isinstance(s, dict)]
    batches = [collate([s[g] for s in good]) for g in range(len(good[0]))] if good else None
    return {"batches": batches, "bad": bad}


def input_groups(model_cfgs: Sequence[dict[str, Any]]) -> list[int]:
    """Input index of each model: models with the same input setting share one (in order of first use)."""
    sigs = [input_signature(mcfg) for mcfg in model_cfgs]
    first = list(dict.fromkeys(sigs))
    return [first.index(s) for s in sigs]


def group_configs(model_cfgs: Sequence[dict[str, Any]], group_of: Sequence[int]) -> list[dict[str, Any]]:
    """The config of each input group (its first model's): what that group's samples are read and
    normalised with."""
    return [model_cfgs[group_of.index(g)] for g in range(max(group_of) + 1)]


def prediction_loader(index_df: pd.DataFrame, model_cfgs: Sequence[dict[str, Any]], cfg: dict[str, Any]
                      ) -> tuple[DataLoader, list[int]]:
    """(loader of collate_multi dicts, input index of each model). One dataset per distinct input setting;
    the kit's loader settings (workers, single-threaded OpenCV in them, pinning) with cfg's batch size."""
    from src.dataset import FlairDataset

    group_of = input_groups(model_cfgs)
    df = index_df.reset_index(drop=True)
    datasets: list[Dataset] = [FlairDataset(df, {**gcfg, "skip_bad": False}, train=False, labels=False)
                               for gcfg in group_configs(model_cfgs, group_of)]
    ds = MultiInput(datasets, df["id"].tolist(), bool(cfg.get("skip_bad")))
    loader = build_loader(ds, cfg, train=False, collate_fn=collate_multi, batch_size=int(cfg["batch_size"]))
    return loader, group_of
