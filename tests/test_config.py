"""The settings schema (src.core.settings) and its loading (src.core.config): defaults <- YAML <- key=value,
every value and rule checked in one place before torch loads, one syntax for every list, saved settings
read back (older checkpoints included), and the table the README's reference is generated from."""
from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from src.core.config import from_saved, load_settings, parse_overrides, save_settings, settings_table
from src.core.errors import ConfigError
from src.core.settings import SPECS, Settings, check_job

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = (0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0)


@pytest.mark.parametrize("override", [
    "class_weights=0,1,1,1,1,1,1,1,1,1,1,1,0",          # the command-line syntax of bands=R,G,B
    "class_weights=[0,1,1,1,1,1,1,1,1,1,1,1,0]",        # YAML flow syntax
    "class_weights=0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0",
])
def test_class_weights_list_on_the_command_line(override):
    from src.models.losses import Criterion

    cfg = load_settings(overrides=[override])
    assert cfg.class_weights == WEIGHTS
    assert Criterion(cfg).w.tolist() == [float(w) for w in WEIGHTS]


def test_class_weights_words_and_yaml_file(tmp_path: Path):
    assert load_settings(overrides=["class_weights=none"]).class_weights == "none"
    assert load_settings().class_weights == Settings().class_weights == "default"
    for text in ("class_weights: [0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0]\n",
                 "class_weights: 0,1,1,1,1,1,1,1,1,1,1,1,0\n"):
        (tmp_path / "c.yaml").write_text(text)
        assert load_settings(tmp_path / "c.yaml").class_weights == WEIGHTS
    with pytest.raises(ConfigError, match="class_weights: expected a number"):
        load_settings(overrides=["class_weights=1,x"])
    with pytest.raises(ConfigError, match="class_weights: expected 13 numbers"):
        load_settings(overrides=["class_weights=1,2"])


def test_list_settings_share_one_syntax():
    for raw in ("R,G,B", "[R,G,B]", "R, G, B"):
        assert load_settings(overrides=[f"bands={raw}"]).bands == ("R", "G", "B")
    assert load_settings(overrides=["utae_widths=8,8,16,16"]).utae_widths == (8, 8, 16, 16)
    with pytest.raises(ConfigError, match="bands: expected a list"):
        load_settings(overrides={"bands": 3})


def test_types_keys_and_yaml_errors_are_one_line(tmp_path: Path):
    assert load_settings(overrides=["lr=1e-3", "epochs=3", "compile=1"]) == Settings(lr=1e-3, epochs=3,
                                                                                     compile=True)
    for bad, message in ((["epochs=abc"], "epochs: expected an integer"),
                         (["lr=x"], "lr: expected a number"),
                         (["ema_decay=1"], "unknown setting 'ema_decay' in command line"),
                         (["lr"], "not of the form key=value"),
                         (["compile=2"], "compile: expected true/false"),
                         (["name=[a]"], "name: expected a string"),
                         (["tta=d8"], "tta: expected one of auto, none, flip, d4"),
                         (["lr=0"], "lr: expected a value > 0"),
                         (["ema=1"], "ema: expected a value >= 0 and < 1"),
                         (["workers=-1"], "workers: expected a value >= 0"),
                         (["workers=many"], "workers: expected a whole number or auto")):
        with pytest.raises(ConfigError, match=message):
            load_settings(overrides=bad)
    (tmp_path / "bad.yaml").write_text("lr: [1\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_settings(tmp_path / "bad.yaml")
    (tmp_path / "typo.yaml").write_text("lr_max: 1\n")
    with pytest.raises(ConfigError, match=f"unknown setting 'lr_max' in {re.escape(str(tmp_path))}"):
        load_settings(tmp_path / "typo.yaml")
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(tmp_path / "none.yaml")
    assert parse_overrides(["--seed=3", "name="]) == {"seed": 3, "name": ""}
    assert Settings(seed=5).with_values(seed=1).seed == 1


def test_text_settings_keep_braces_and_bad_yaml_is_one_line():
    """A path with placeholders is text, not a YAML mapping; an unreadable number names the setting."""
    over = parse_overrides(["init_from={runs_dir}/s1/fold{fold}/best.pt", "name={fold}", "bands=[R,G]"])
    assert over == {"init_from": "{runs_dir}/s1/fold{fold}/best.pt", "name": "{fold}", "bands": ("R", "G")}
    with pytest.raises(ConfigError, match=r"lr=\[1,: not a readable value"):
        parse_overrides(["lr=[1,"])


@pytest.mark.parametrize("values, message", [
    ({"pseudo_only": True}, "pseudo_only=true needs pseudo_dir"),
    ({"loggers": "wandb,comet"}, "loggers: unknown logger 'comet'"),
    ({"augment_extra": "aug.py"}, "augment_extra: expected path/to/file.py:function"),
    ({"infer_window": 500}, "infer_window 500 / infer_overlap 128: need multiples of 32"),
    ({"infer_overlap": 512}, "0 <= overlap < window"),
])
def test_rules_between_settings(values, message):
    with pytest.raises(ConfigError, match=message):
        Settings(**values)


def test_job_rules_name_the_checkpoint():
    for values, message in (({"fusion": "utt"}, "fusion=utt needs use_s2=true"),
                            ({"use_s2": True}, "use_s2=true does nothing with fusion=none")):
        cfg = Settings(**values)  # a dataset may read S2 for its own uses: a training rule
        with pytest.raises(ConfigError, match=message):
            check_job(cfg, "train")
    aerial = Settings(norm="s2_stats")
    check_job(aerial, "predict")  # s2_stats is fine where patches have S2
    with pytest.raises(ConfigError, match=r"^runs/x/best.pt: this model normalises each patch"):
        check_job(aerial, "infer", "runs/x/best.pt")
    with pytest.raises(ConfigError, match="this model needs Sentinel-2 time series"):
        check_job(Settings(use_s2=True, fusion="utt"), "infer")
    assert Settings(use_s2=True, s2_early="ndvi").reads_s2 and not Settings(s2_early="ndvi").reads_s2


def test_saved_settings_round_trip_and_older_checkpoints(tmp_path: Path):
    cfg = load_settings(REPO / "configs" / "demo.yaml", ["lr=1e-3"])
    save_settings(cfg, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert list(saved) == list(SPECS) and saved["bands"] == ["R", "G", "B", "NIR", "E"]
    assert load_settings(tmp_path / "config.yaml") == cfg
    # a checkpoint of an older kit: newer settings take their default, removed ones are dropped, said once
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("bn_adapt", "infer_window")}
    lines: list[str] = []
    for _ in range(2):
        got = from_saved({**old, "retired_knob": 1}, "old.pt", {"batch_size": 2}, log=lines.append)
    assert got == cfg.with_values(batch_size=2) and len(lines) == 1
    assert "bn_adapt, infer_window not saved (older kit): defaults used" in lines[0]
    assert "retired_knob no longer exist" in lines[0]


def test_every_setting_is_declared_once_with_help_and_jobs():
    for f in dataclasses.fields(Settings):
        m = f.metadata
        assert m["help"] and m["jobs"], f.name
        assert Settings().with_values(**{f.name: f.default}) == Settings()
        if m["choices"]:
            assert f.default in m["choices"] or f.name == "class_weights"


def test_the_settings_reference_is_generated_from_the_schema():
    """docs/settings.md holds `python -m src.train --settings md` between its markers, exactly."""
    text = (REPO / "docs" / "settings.md").read_text()
    block = text.split("<!-- settings:begin -->\n", 1)[1].split("<!-- settings:end -->", 1)[0]
    assert block.strip() == settings_table(markdown=True).strip(), (
        "docs/settings.md is stale: regenerate it with "
        "`python -m src.train --settings md` between the settings markers")


def test_setting_errors_fail_before_torch_is_imported(tmp_path: Path):
    """A typo, an unknown TTA level or a missing config file: one line, exit 2, and torch never loaded."""
    probe = ("import sys, runpy; sys.argv = sys.argv[1:]; "
             "exec('try:\\n runpy.run_module(sys.argv[0], run_name=\"__main__\")\\n"
             "finally:\\n print(\"torch\" in sys.modules, file=sys.stderr)')")
    cases = [(["src.train", "lr_typo=1"], "unknown setting 'lr_typo' in command line"),
             (["src.train", "--config", str(tmp_path / "none.yaml")], "config file not found"),
             (["src.predict", "--runs", str(tmp_path), "--out", str(tmp_path / "p"), "tta=d8"],
              "tta: expected one of auto, none, flip, d4"),
             (["src.infer", "--runs", str(tmp_path), "--src", "x.tif", "--out", "y.tif", "batchsize=2"],
              "unknown setting 'batchsize'")]
    for argv, message in cases:
        run = subprocess.run([sys.executable, "-c", probe, *argv], cwd=REPO, capture_output=True,
                             text=True)
        err = run.stderr.strip().splitlines()
        assert run.returncode == 2 and message in err[0] and err[0].startswith("config error:"), run.stderr
        assert err[-1] == "False", f"{argv[0]} imported torch before failing on a setting"
