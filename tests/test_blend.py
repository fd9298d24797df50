"""The ensemble search on out-of-fold stores (src.blend) and its recipe at test time (predict --recipe):
two synthetic "runs" written directly with probstore, A right on classes 0-5 and B on 6-12, where no
weighting helps and the per-class choice is perfect; the recipe's round trip; predict applying it equals
the hand-computed combination; bad inputs are one-line errors naming the folder."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from src import blend as B
from src import predict as P
from src.core.checkpoint import save_checkpoint
from src.core.errors import PredictError
from src.core.files import read_label, write_json
from src.core.flair import NUM_CLASSES, remap
from src.core.settings import Settings
from src.core.tables import load_folds, load_index
from src.ensembling.oof import STORE_MANIFEST, store_name
from src.ensembling.recipe import (
    RECIPE_FORMAT,
    check_recipe,
    class_weight_matrix,
    load_recipe,
    recipe_checkpoints,
    save_recipe,
)
from src.ensembling.search import mix_predict
from src.prediction.ensemble import Mix, predict_batch
from src.prediction.stores import prob_path, save_prob

torch.set_num_threads(1)
GOOD = {"a": set(range(6)), "b": set(range(6, NUM_CLASSES))}


def partner(t: np.ndarray) -> np.ndarray:
    """The class each run confuses a pixel with: 6+t for t <= 5, t mod 6 above."""
    return np.where(t <= 5, t + 6, t % 6)


def fake_probs(t: np.ndarray, good: set[int]) -> np.ndarray:
    """uint8 (13,H,W): right (0.5) with 0.4 on the partner class where t is in `good`, else 0.45 on the
    partner class. Any weighted mean of A and B then favours the partner; the per-class choice is exact."""
    right = np.isin(t, sorted(good))
    p = np.where(right, 0.1 / 11, 0.55 / 12)[None].repeat(NUM_CLASSES, 0).astype(np.float32)
    rows, cols = np.indices(t.shape)
    p[t, rows, cols] = np.where(right, 0.5, p[t, rows, cols])
    p[partner(t), rows, cols] = np.where(right, 0.4, 0.45)
    return np.rint(p * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def stores(tmp_path_factory, synth_folds_dir) -> Path:
    """runs/a and runs/b with fold<k>/oof/ for every fold of synth_folds_dir (every training patch once)."""
    root = tmp_path_factory.mktemp("blend")
    folds = load_folds(synth_folds_dir)
    index = load_index(synth_folds_dir / "index_train.csv").set_index("id")
    for name, good in GOOD.items():
        for k, group in folds.groupby("fold"):
            store = root / "runs" / name / f"fold{k}" / store_name()
            store.mkdir(parents=True)
            for pid in group["id"]:
                truth = remap(read_label(index.at[pid, "msk_path"]))
                save_prob(prob_path(store, pid), fake_probs(truth, good))
            write_json(store / STORE_MANIFEST, {"run": name, "fold": str(k), "tta": "none",
                                                "checkpoint": "last", "missing": [], "complete": True})
    return root


def run_blend(root: Path, data: Path, *runs: str, extra: tuple[str, ...] = ()) -> dict:
    out = root / "recipe.json"
    B.main(["--runs", *[str(root / "runs" / r) for r in runs], "--data", str(data), "--out", str(out),
            "--pixels", "64", "--threads", "2", *extra])
    return json.loads(out.read_text())


def truth_classes(data: Path) -> set[int]:
    index = load_index(data / "index_train.csv")
    return set().union(*(np.unique(remap(read_label(p))).tolist() for p in index["msk_path"]))


def test_search_finds_the_per_class_choice_and_beats_each_run(stores, synth_folds_dir, tmp_path):
    root = tmp_path
    shutil.copytree(stores / "runs", root / "runs")
    recipe = run_blend(root, synth_folds_dir, "a", "b")
    present = truth_classes(synth_folds_dir)
    assert len(present) >= 6 and present & GOOD["a"] and present & GOOD["b"]
    matrix = class_weight_matrix(recipe["weights"], recipe["class_choice"])
    for c in present:  # class c's probability from the run that is right on it (chosen, or the whole mix)
        assert matrix[:, c].tolist() == ([1.0, 0.0] if c in GOOD["a"] else [0.0, 1.0]), c
    fig = recipe["figures"]
    assert fig["oof_miou"]["recipe"] == pytest.approx(1.0)          # every pixel, streamed
    assert max(fig["oof_miou"]["a"], fig["oof_miou"]["b"], fig["oof_miou"]["mean"]) < 0.7
    assert fig["sample"]["pixels"] == 64 * fig["sample"]["patches"] and fig["sample"]["recipe_miou"] == 1.0
    assert len(fig["halves"]) == 2 and all(h["recipe"] > h["best_single"] for h in fig["halves"])
    assert set(fig["halves"][0]["fit"]).isdisjoint(fig["halves"][0]["scored"])
    assert set(fig["per_domain"]["recipe"]) == set(load_folds(synth_folds_dir)["domain"])
    table = pd.read_csv(root / "recipe_domains.csv")
    assert set(table["model"]) == {"a", "b", "mean", "recipe"} and (root / "recipe_domains.png").is_file()
    assert recipe["runs"] == [str(root / "runs" / "a"), str(root / "runs" / "b")] and recipe["tta"] == "none"
    assert recipe["folds"] == sorted(int(k) for k in load_folds(synth_folds_dir)["fold"].unique())
    assert recipe["foldall"] is False  # the fold models of the stores, and only those, are applied
    # the recipe round-trips: what load_recipe reads is what was written, and writing it again changes nothing
    loaded = load_recipe(root / "recipe.json")
    assert {k: loaded[k] for k in ("runs", "tta", "checkpoint", "class_choice", "biases")} == \
        {k: recipe[k] for k in ("runs", "tta", "checkpoint", "class_choice", "biases")}
    assert loaded["weights"] == pytest.approx(recipe["weights"])
    save_recipe({k: v for k, v in loaded.items() if k != "format"}, tmp_path / "again.json")
    assert load_recipe(tmp_path / "again.json") == loaded


def test_the_level_is_chosen_among_those_every_run_stored(stores, synth_folds_dir, tmp_path, capsys):
    root = tmp_path
    shutil.copytree(stores / "runs", root / "runs")
    for k in (0, 1, 2):  # run a also has a "flip" store, b does not: flip cannot be used
        fold = root / "runs" / "a" / f"fold{k}"
        shutil.copytree(fold / "oof", fold / "oof_flip")
    with pytest.raises(SystemExit):
        run_blend(root, synth_folds_dir, "a", "b", extra=("--tta", "flip", "--no-biases"))
    capsys.readouterr()
    assert run_blend(root, synth_folds_dir, "a", "b", extra=("--no-biases",))["tta"] == "none"
    out = capsys.readouterr().out  # said, not passed over silently
    assert "TTA levels stored by every run: none; not comparable: flip (only a)" in out
    assert "3 domains" in out and "scored on 1 other:" in out or "scored on 2 others:" in out


@pytest.mark.parametrize("damage, message", [
    ("missing_fold", "b: no fold2/ folder"),
    ("missing_id", "fold1/oof: 1 of"),
    ("foreign_id", "fold0/oof: 1 PROB files of ids not in fold 0"),
    ("no_store", "fold1: no out-of-fold store oof/"),
])
def test_bad_stores_are_one_line_errors_naming_the_folder(stores, synth_folds_dir, tmp_path, capsys, damage,
                                                          message):
    shutil.copytree(stores / "runs", tmp_path / "runs")
    b = tmp_path / "runs" / "b"
    if damage == "missing_fold":
        shutil.rmtree(b / "fold2")
    elif damage == "missing_id":
        sorted((b / "fold1" / "oof").glob("PROB_*.npz"))[0].unlink()
    elif damage == "foreign_id":  # a run made with other data or another split
        shutil.copy(next((b / "fold0" / "oof").glob("PROB_*.npz")), b / "fold0" / "oof" / "PROB_999999.npz")
    else:
        shutil.rmtree(b / "fold1" / "oof")
    with pytest.raises(SystemExit) as info:
        run_blend(tmp_path, synth_folds_dir, "a", "b")
    err = capsys.readouterr().err.strip()
    assert info.value.code == 1 and message in err and "\n" not in err


def test_bad_recipes_are_refused_naming_the_file(tmp_path):
    path = tmp_path / "r.json"
    ok = {"runs": ["runs/a"], "checkpoint": "last", "tta": "none", "weights": [1.0],
          "class_choice": [None] * NUM_CLASSES, "biases": [0.0] * NUM_CLASSES}
    save_recipe(ok, path)
    assert load_recipe(path)["format"] == RECIPE_FORMAT
    for bad, what in [({"class_choice": [3] + [None] * 12}, "class_choice"), ({"weights": [1, 2]}, "weights"),
                      ({"biases": [0.0]}, "biases"), ({"tta": "x"}, "tta"), ({"folds": [0, 0]}, "folds"),
                      ({"folds": []}, "folds"), ({"foldall": "yes"}, "foldall")]:
        path.write_text(json.dumps({**ok, "format": RECIPE_FORMAT, **bad}))
        with pytest.raises(PredictError, match=f"{path}: .*{what}"):
            load_recipe(path)
    path.write_text("{")
    with pytest.raises(PredictError, match="unreadable recipe"):
        load_recipe(path)


# ------------------------------------------------------------------------------- predict --recipe
def test_a_recipe_applies_the_folds_it_was_fitted_on_and_foldall_only_on_request(tmp_path):
    """fold0, fold1 and foldall under a run: the recipe of the fold0/fold1 OOF stores loads those two; a
    recipe written with --foldall adds the full-data model; a fold it names that is missing is an error."""
    run = tmp_path / "runs" / "a"
    for sub in ("fold0", "fold1", "foldall"):
        (run / sub).mkdir(parents=True)
        (run / sub / "last.pt").touch()
    recipe = {"format": RECIPE_FORMAT, "runs": [str(run)], "checkpoint": "last", "tta": "none",
              "weights": [1.0], "class_choice": [None] * NUM_CLASSES, "biases": [0.0] * NUM_CLASSES,
              "folds": [0, 1]}
    notes: list[str] = []
    paths, mix = recipe_checkpoints(check_recipe(recipe, "r"), notes.append)
    assert paths == [run / "fold0" / "last.pt", run / "fold1" / "last.pt"]
    assert mix.class_weights == ((0.5,) * NUM_CLASSES,) * 2
    assert len(notes) == 1 and "foldall/last.pt left out" in notes[0]
    old = {k: v for k, v in recipe.items() if k != "folds"}  # a recipe from before "folds": every fold<k>/
    assert recipe_checkpoints(check_recipe(old, "r"), notes.append)[0] == paths
    paths, mix = recipe_checkpoints(check_recipe({**recipe, "foldall": True}, "r"), notes.append)
    assert paths[-1] == run / "foldall" / "last.pt" and len(mix.class_weights) == 3
    assert mix.class_weights[0][0] == pytest.approx(1 / 3)
    with pytest.raises(PredictError, match=r"fold2/last\.pt: not found: the recipe applies last\.pt of fold"):
        recipe_checkpoints(check_recipe({**recipe, "folds": [0, 1, 2]}, "r"))


class _Fixed(torch.nn.Module):
    """A 'model' whose softmax is the given probabilities whatever the image."""

    def __init__(self, probs: torch.Tensor):
        super().__init__()
        self.register_buffer("logp", probs.log())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logp.expand(len(x), -1, -1, -1)


def test_numpy_and_torch_mixes_give_the_same_prediction():
    """The recipe is written twice, for numpy (the search and its full-pixel figures: mix_predict) and for
    torch (predict --recipe: ensemble.Mix inside predict_batch): both give the same argmax."""
    rng = np.random.default_rng(0)
    probs = [rng.dirichlet(np.full(NUM_CLASSES, 0.5), size=(48, 48)).transpose(2, 0, 1).astype(np.float32)
             for _ in range(3)]
    for trial in range(4):
        weights = rng.dirichlet(np.ones(3))
        choice = [None if rng.random() < 0.6 else int(rng.integers(3)) for _ in range(NUM_CLASSES)]
        biases = rng.normal(0, 0.5, NUM_CLASSES) * (trial > 0)
        matrix = class_weight_matrix(weights, choice)
        want = mix_predict([p.reshape(NUM_CLASSES, -1) for p in probs], matrix.astype(np.float32), biases)
        mix = Mix(tuple(tuple(row) for row in matrix), tuple(biases))
        models = [_Fixed(torch.from_numpy(p)[None]) for p in probs]
        got = predict_batch(models, None, {"image": torch.zeros(1, 3, 48, 48)}, mix=mix)
        assert (got.argmax(1).flatten().numpy() == want).all(), trial


def tiny_checkpoints(root: Path, data: Path) -> list[Path]:
    """runs/a with two folds and runs/b with one: tiny random models saved as kit checkpoints."""
    from src.models.flair_model import build_model

    cfg = Settings(arch="FPN", encoder="tu-test_resnet", encoder_weights="none", data_dir=str(data),
                   workers=0,
                   batch_size=2, precision="fp32", channels_last=False)
    paths = []
    for seed, (run, k) in enumerate([("a", 0), ("a", 1), ("b", 0)]):
        torch.manual_seed(seed)
        path = root / "runs" / run / f"fold{k}" / "last.pt"
        path.parent.mkdir(parents=True)
        save_checkpoint(path, {"model": build_model(cfg).state_dict(), "config": cfg.to_dict()})
        paths.append(path)
    return paths


def test_predict_with_a_recipe_is_the_hand_computed_combination(synth_data_dir, tmp_path, capsys):
    from src.data.dataset import FlairDataset
    from src.data.loader import collate
    from src.data.normalize import normalize
    from src.models.flair_model import load_for_inference

    paths = tiny_checkpoints(tmp_path, synth_data_dir)
    test = load_index(synth_data_dir / "index_test.csv").head(2)
    test.to_csv(tmp_path / "index_two.csv", index=False)
    choice = [None] * NUM_CLASSES
    choice[1], choice[3] = 0, 1
    biases = [0.0] * NUM_CLASSES
    biases[2], biases[5] = 0.5, -0.3
    recipe = {"runs": [str(tmp_path / "runs" / "a"), str(tmp_path / "runs" / "b")], "checkpoint": "last",
              "tta": "none", "weights": [0.3, 0.7], "class_choice": choice, "biases": biases}
    save_recipe(recipe, tmp_path / "recipe.json")
    P.main(["--recipe", str(tmp_path / "recipe.json"), "--index", str(tmp_path / "index_two.csv"),
            "--out", str(tmp_path / "pred"), f"data_dir={synth_data_dir}", "workers=0", "batch_size=2"])
    # by hand: each run = the mean of its folds' softmax; class c from the chosen run or 0.3 a + 0.7 b
    cfg = load_for_inference(paths[0])[1]
    raw = collate([FlairDataset(test, cfg, train=False, labels=False)[i] for i in range(2)])
    x = normalize(raw["image"], cfg)
    with torch.no_grad():
        p = [load_for_inference(q)[0](x)["logits"].softmax(1) for q in paths]
    run_a, run_b = (p[0] + p[1]) / 2, p[2]
    mix = 0.3 * run_a + 0.7 * run_b
    mix[:, 1], mix[:, 3] = run_a[:, 1], run_b[:, 3]
    hand = (mix * torch.tensor(biases).exp().view(1, -1, 1, 1)).argmax(1).numpy()
    plain = (0.3 * run_a + 0.7 * run_b).argmax(1).numpy()
    for j, pid in enumerate(raw["id"]):
        got = read_label(tmp_path / "pred" / f"PRED_{pid}.tif")
        assert (got == hand[j]).mean() > 0.9999  # float sums in another order may flip a rare tie
        assert (got != plain[j]).any()  # the choice and biases changed something
    out = capsys.readouterr().out  # the log says what is applied: the recipe's weights, not equal ones
    assert "a recipe's per-class weights" in out and "weights 0.5" not in out
    # a missing recipe is a one-line error naming the file
    with pytest.raises(SystemExit):
        P.main(["--recipe", str(tmp_path / "nope.json"), "--out", str(tmp_path / "p2")])
    err = capsys.readouterr().err.strip()
    assert "nope.json: recipe not found" in err and "\n" not in err


def test_auto_sample_size_grows_on_small_sets():
    """--pixels auto: 128 per patch on the real training set (61,712 patches: 7.9 M pixels), at least 4 M
    pixels in all on a small one (the 32 patches of the demo set get 125,000 each)."""
    from src.ensembling.blend import MIN_SAMPLE, sample_pixels

    assert sample_pixels("auto", 61_712) == 128
    assert sample_pixels("auto", 32) == 125_000 and 32 * 125_000 >= MIN_SAMPLE
    assert sample_pixels("64", 32) == 64
