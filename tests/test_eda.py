"""notebooks/eda.ipynb runs headlessly on the synthetic data and writes every figure; the analysis modules
(src/eda_*.py) agree with the kit's S2 pipeline and with facts the synthetic generator builds in."""
from __future__ import annotations

import datetime as dt
import shutil

import matplotlib.image
import nbformat
import numpy as np
import pandas as pd
import pytest

from src import eda
from src.analysis import classes as eda_classes
from src.analysis import common as eda_data
from src.analysis import meta as eda_meta
from src.analysis import prose as eda_prose
from src.analysis import s2 as eda_s2
from src.analysis.common import block_class_counts, block_majority
from src.core.errors import DataError
from src.data.sentinel import encode_days
from src.prep.class_hist import HIST_COLS
from src.prep.folds import make_folds

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def eda_data_dir(synth_data_dir, tmp_path_factory):
    """A copy of the session data dir with folds.csv (and class_hist.csv) written by src.folds."""
    data = tmp_path_factory.mktemp("eda_data")
    for name in ("index_train.csv", "index_test.csv"):
        shutil.copy(synth_data_dir / name, data / name)
    make_folds(data, k=3, seed=0, restarts=4, plot=False)
    return data


@pytest.fixture(scope="module")
def executed(eda_data_dir, tmp_path_factory):
    """`python -m src.eda` on the synthetic data: (exit code, output folder)."""
    out = tmp_path_factory.mktemp("eda_out")
    return eda.main(["--data", str(eda_data_dir), "--out", str(out)]), out


def test_notebook_executes_on_synthetic_data(executed, eda_data_dir):
    rc, out = executed
    assert rc == 0
    nb = nbformat.read(str(out / "eda.ipynb"), as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    errors = [o for c in code for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, errors[0]["evalue"] if errors else ""
    assert all(c.execution_count for c in code), "a code cell was not executed"
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and repr(str(eda_data_dir.resolve())) in injected[0].source
    markdown = [o["data"]["text/markdown"] for c in code for o in c.get("outputs", [])
                if o.output_type == "display_data" and "text/markdown" in o["data"]]
    assert len(markdown) >= 7  # a generated conclusion per section and subsection
    html = (out / "eda.html").read_text(encoding="utf-8")
    assert "<html" in html and "Class frequencies" in html and "data:image/png;base64" in html


@pytest.mark.parametrize("name", eda.FIGURES)
def test_notebook_writes_each_figure(executed, name):
    _, out = executed
    path = out / "figures" / name
    assert path.is_file(), f"{name} not written"
    assert path.read_bytes()[:8] == PNG_MAGIC
    img = matplotlib.image.imread(path)
    assert img.shape[0] >= 200 and img.shape[1] >= 300, img.shape
    assert path.stat().st_size > 10_000
    assert float(np.asarray(img[..., :3]).std()) > 0.05, "blank figure"


def test_committed_notebook_has_no_outputs_and_one_parameters_cell():
    nb = nbformat.read(str(eda.NOTEBOOK), as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "commit the notebook cleared"
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and "DATA = " in params[0].source
    assert not [c for c in code if "injected-parameters" in c.metadata.get("tags", [])]


def test_inject_parameters_replaces_an_earlier_injection():
    nb = nbformat.read(str(eda.NOTEBOOK), as_version=4)
    eda.inject_parameters(nb, {"DATA": "/a"})
    eda.inject_parameters(nb, {"DATA": "/b", "SEED": 3})
    injected = [i for i, c in enumerate(nb.cells) if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1
    assert "parameters" in nb.cells[injected[0] - 1].metadata.get("tags", [])
    assert "DATA = '/b'" in nb.cells[injected[0]].source and "SEED = 3" in nb.cells[injected[0]].source


def test_main_fails_fast_on_missing_data(tmp_path, capsys):
    assert eda.main(["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 1
    assert "nope" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_load_data_index_folder_and_raw_root(eda_data_dir, synth_root, synth_index):
    data = eda_data.load_data(eda_data_dir)
    assert data.data_dir == eda_data_dir and data.folds is not None
    assert set(data.folds["domain"]) == set(data.train["domain"])
    raw = eda_data.load_data(synth_root)  # no index CSV there: built in memory
    assert raw.data_dir is None and raw.folds is None
    assert list(raw.train["id"]) == list(synth_index["train"]["id"])
    assert len(raw.patches) == len(synth_index["train"]) + len(synth_index["test"])
    with pytest.raises(DataError, match="missing"):
        eda_data.load_data(eda_data_dir / "missing")


def test_sample_by_domain_spreads_over_domains(synth_index):
    df = synth_index["train"]
    k = df["domain"].nunique()
    first = eda_data.sample_by_domain(df, k, seed=1)
    assert first["domain"].nunique() == k
    assert first["id"].tolist() == eda_data.sample_by_domain(df, k, seed=1)["id"].tolist()
    everything = eda_data.sample_by_domain(df, 10 * len(df), seed=1)
    assert sorted(everything["id"]) == sorted(df["id"])


def test_class_pixels_uses_the_folds_cache_and_samples_the_rest(eda_data_dir, tmp_path):
    data = eda_data.load_data(eda_data_dir)
    hist = eda_classes.class_pixels(data, tmp_path, max_masks=4, seed=0)
    train, test = hist[hist["split"] == "train"], hist[hist["split"] == "test"]
    assert len(train) == len(data.train)  # all of them, through DATA/class_hist.csv
    assert len(test) == 4 and test["domain"].nunique() == data.test["domain"].nunique()
    assert (tmp_path / "class_hist_test.csv").is_file() and not (tmp_path / "class_hist_train.csv").exists()
    assert (hist[HIST_COLS].sum(axis=1) == 512 * 512).all()
    assert np.allclose(eda_classes.percent_table(hist, "split").sum(axis=1), 100, atol=0.1)
    shift = eda_classes.split_shift(hist)
    assert sorted(shift["class"]) == list(range(13))
    assert shift["diff_pts"].abs().is_monotonic_decreasing
    assert "Largest train -> test changes" in eda_prose.conclude_classes(hist)


def test_window_cover_keeps_what_s2_series_keeps(synth_index):
    rows = pd.concat([synth_index["train"], synth_index["test"]], ignore_index=True)
    for _, row in rows.iterrows():  # includes a window padded at the super-area's edge
        cover = eda_s2.patch_cover(row)
        x, dates = eda_s2.patch_series(row, monthly=False, filter_clouds=True)
        kept = sorted(cover.loc[cover["kept"], "date"].dt.date)
        assert dates == kept, row["id"]
        assert np.allclose(cover["snow"] + cover["cloud"], cover["cover"])


def test_survey_ndvi_separates_agricultural_land_from_herbaceous_vegetation(synth_index):
    # The generator makes agricultural land bare in winter and herbaceous vegetation green all year,
    # with the same aerial look: only their S2 series differ.
    rows = pd.concat([synth_index["train"], synth_index["test"]], ignore_index=True)
    survey = eda_s2.s2_survey(rows)
    lengths = survey["lengths"]
    assert len(lengths) == len(rows)
    assert (lengths["filtered"] <= lengths["raw"]).all()
    assert ((lengths["monthly"] <= lengths["filtered"]) & (lengths["monthly"] <= 12)).all()
    assert len(survey["cover"]) == lengths["raw"].sum()
    nd = survey["ndvi"]
    agri = nd[nd["class"] == 10].set_index("month")["mean"]
    herb = nd[nd["class"] == 9].set_index("month")["mean"]
    winter = [m for m in (12, 1, 2) if m in agri.index and m in herb.index]
    assert winter
    assert all(agri[m] < herb[m] - 0.15 for m in winter), (agri, herb)
    water = nd[nd["class"] == 4]["mean"]
    assert len(water) and water.max() < herb.min()
    assert "Agricultural land vs herbaceous vegetation" in eda_prose.conclude_ndvi(nd)


def test_days_to_dates_inverts_encode_days():
    dates = [dt.date(2020, 1, 3) + dt.timedelta(days=k) for k in range(0, 3 * 365, 5)]
    dates = [d for d in dates if (d.month, d.day) != (2, 29)]  # encode_days folds 29 Feb onto the 28th
    assert eda_s2.days_to_dates(encode_days(dates, 2021), 2021) == dates


def test_s2_pixel_classes_follow_the_50px_blocks_and_purity():
    raw = np.full((512, 512), 1, np.uint8)  # building (class 0)
    raw[:, :260] = 6  # coniferous (class 5): blocks 0..4 pure, block 5 has 10 of 50 columns
    classes = eda_s2.s2_pixel_classes(raw, purity=0.8)
    assert classes.shape == (10, 10)
    assert (classes[:, :5] == 5).all() and (classes[:, 5:] == 0).all()
    raw[:, :275] = 6  # block 5 now half and half: no class reaches 80%
    classes = eda_s2.s2_pixel_classes(raw, purity=0.8)
    assert (classes[:, 5] == -1).all() and (classes[:, 6:] == 0).all()


def test_france_outline_places_known_points():
    x = np.array([652_469, 1_177_000, 100_000, 1_200_000])  # Paris, Ajaccio, Atlantic, Germany
    y = np.array([6_862_035, 6_103_000, 6_600_000, 7_000_000])
    assert eda_meta.inside_france(x, y).tolist() == [True, True, False, False]


def test_metadata_table_parses_dates_and_hours(synth_index):
    meta = eda_meta.metadata_table(synth_index["train"])
    assert meta["date"].notna().all() and meta["hour"].between(0, 24).all()
    text = eda_prose.conclude_metadata(meta)
    assert str(meta["date"].min().date()) in text


def test_block_majority_counts_whole_blocks_only():
    labels = np.full((7, 9), 255, np.uint8)  # 255: not a class (remap's value for raw 0)
    labels[:3, :3] = 4
    labels[0, 0] = 2  # block (0, 0): 8 water, 1 impervious
    labels[:3, 3:6] = [[1, 1, 3], [3, 1, 3], [3, 3, 1]]  # block (0, 1): 4 vs 5, the larger wins
    labels[3:6, :3] = [[2, 5, 5], [2, 5, 2], [5, 2, 0]]  # block (1, 0): 4 vs 4 (+1): tie -> lowest class
    counts = block_class_counts(labels, 3)
    assert counts.shape == (2, 3, 13)  # the partial 7th row is left out
    assert counts[0, 0, 4] == 8 and counts[0, 0, 2] == 1 and counts[1, 2].sum() == 0
    assert block_majority(labels, 3).tolist() == [[4, 3, -1], [2, -1, -1]]
    assert block_majority(labels, 3, purity=0.8).tolist() == [[4, -1, -1], [-1, -1, -1]]


def test_under_patch_is_the_footprint_of_the_pixel_classes():
    under = eda_s2.under_patch()
    assert (under.start, under.stop) == (15, 25)  # the 10 x 10 centre of the 40 x 40 window
    assert eda_s2.s2_pixel_classes(np.ones((512, 512), np.uint8)).shape == (under.stop - under.start,) * 2
