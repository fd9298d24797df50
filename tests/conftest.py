"""Shared fixtures: a small synthetic FLAIR #2 tree written once per session (real files on disk)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A small synthetic FLAIR #2 tree (official layout), written once per session. Do not modify it."""
    from src.prep.synth_write import SynthSpec, make_dataset

    return make_dataset(tmp_path_factory.mktemp("synth"), SynthSpec(train_domains=3, test_domains=2, zones=2,
                                                                    patches=3, seed=0))


@pytest.fixture(scope="session")
def synth_index(synth_root) -> dict:
    """build_index(synth_root): {"train": df, "test": df}."""
    from src.prep.index_scan import build_index

    return build_index(synth_root)


@pytest.fixture(scope="session")
def synth_data_dir(tmp_path_factory, synth_index) -> Path:
    """A data dir holding index_train.csv and index_test.csv of synth_root (tests add folds.csv to it)."""
    from src.core.tables import write_index

    data = tmp_path_factory.mktemp("data")
    write_index(synth_index, data)
    return data


@pytest.fixture(scope="session")
def synth_folds_dir(tmp_path_factory, synth_data_dir) -> Path:
    """A copy of synth_data_dir with folds.csv (K=3: one synthetic training domain per fold).
    Shared by the training tests: copy it before damaging anything in it."""
    import shutil

    from src.prep.folds import make_folds

    data = tmp_path_factory.mktemp("folds_data")
    for name in ("index_train.csv", "index_test.csv"):
        shutil.copy(synth_data_dir / name, data / name)
    make_folds(data, k=3, seed=0, plot=False)
    return data
