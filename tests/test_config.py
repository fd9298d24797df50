"""src.core.config: defaults <- YAML <- key=value, with one syntax for every list-valued setting."""
from __future__ import annotations

from pathlib import Path

import pytest

from src.core.config import DEFAULTS, load_config, parse_overrides, resolve
from src.core.errors import ConfigError
from src.models.losses import Criterion

WEIGHTS = [0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0]


@pytest.mark.parametrize("override", [
    "class_weights=0,1,1,1,1,1,1,1,1,1,1,1,0",          # the command-line syntax of bands=R,G,B
    "class_weights=[0,1,1,1,1,1,1,1,1,1,1,1,0]",        # YAML flow syntax
    "class_weights=0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0",
])
def test_class_weights_list_on_the_command_line(override):
    cfg = load_config(overrides=[override])
    assert cfg["class_weights"] == WEIGHTS
    assert Criterion(cfg).w.tolist() == [float(w) for w in WEIGHTS]


def test_class_weights_words_and_yaml_file(tmp_path: Path):
    assert load_config(overrides=["class_weights=none"])["class_weights"] == "none"
    assert load_config()["class_weights"] == DEFAULTS["class_weights"] == "default"
    for text in ("class_weights: [0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0]\n",
                 "class_weights: 0,1,1,1,1,1,1,1,1,1,1,1,0\n"):
        (tmp_path / "c.yaml").write_text(text)
        assert load_config(tmp_path / "c.yaml")["class_weights"] == WEIGHTS
    with pytest.raises(ConfigError, match="class_weights: expected 13 numbers"):
        Criterion(load_config(overrides=["class_weights=1,x"]))


def test_list_settings_share_one_syntax():
    for raw in ("R,G,B", "[R,G,B]", "R, G, B"):
        assert load_config(overrides=[f"bands={raw}"])["bands"] == ["R", "G", "B"]
    assert load_config(overrides=["utae_widths=8,8,16,16"])["utae_widths"] == [8, 8, 16, 16]
    with pytest.raises(ConfigError, match="bands: expected a list"):
        load_config(overrides={"bands": 3})


def test_types_keys_and_yaml_errors_are_one_line(tmp_path: Path):
    assert load_config(overrides=["lr=1e-3", "epochs=3", "compile=1"]) == {
        **DEFAULTS, "lr": 1e-3, "epochs": 3, "compile": True}
    for bad, message in ((["epochs=abc"], "epochs: expected an integer"),
                         (["lr=x"], "lr: expected a number"),
                         (["ema_decay=1"], "unknown setting 'ema_decay'"),
                         (["lr"], "not of the form key=value"),
                         (["compile=2"], "compile: expected true/false"),
                         (["name=[a]"], "name: expected a string")):
        with pytest.raises(ConfigError, match=message):
            load_config(overrides=bad)
    (tmp_path / "bad.yaml").write_text("lr: [1\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "none.yaml")
    assert parse_overrides(["--seed=3", "name="]) == {"seed": 3, "name": ""}
    assert resolve({"seed": 1}, {**DEFAULTS, "seed": 5})["seed"] == 1


def test_text_settings_keep_braces_and_bad_yaml_is_one_line():
    """A path with placeholders is text, not a YAML mapping; an unreadable number names the setting."""
    over = parse_overrides(["init_from={runs_dir}/s1/fold{fold}/best.pt", "name={fold}", "bands=[R,G]"])
    assert over == {"init_from": "{runs_dir}/s1/fold{fold}/best.pt", "name": "{fold}", "bands": ["R", "G"]}
    with pytest.raises(ConfigError, match=r"lr=\[1,: not a readable value"):
        parse_overrides(["lr=[1,"])
