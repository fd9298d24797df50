"""Settings in and out: `configs/*.yaml` + `key=value` overrides -> a checked `Settings` (src.core.settings),
a run's config.yaml and a checkpoint's saved settings back, and the settings table (`make settings`).

Torch-free and quick, so every job can check its settings and fail with one line before loading a model.
The resolved settings are saved with every run and checkpoint, so a checkpoint alone rebuilds its model.
"""
from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from src.core.errors import ConfigError
from src.core.settings import SPECS, Settings, check_value, describe_range, unknown_message


def split_overrides(items: list[str], overrides: list[str]) -> tuple[list[str], list[str]]:
    """argparse's nargs='+' (--runs, --combine) swallows key=value tokens placed after it: (the paths, the
    overrides with those tokens moved back). A token with "=" that names an existing path stays a path."""
    keep = [x for x in items if not ("=" in x and not Path(x).exists())]
    return keep, overrides + [x for x in items if x not in keep]


def parse_overrides(args: Iterable[str]) -> dict[str, Any]:
    """`key=value` strings -> {key: value}; values are read as YAML (3, 1e-3, true, [a,b]). An unknown key or
    a bad value is an error at once (the rules between settings are checked when they are all known)."""
    out: dict[str, Any] = {}
    for arg in args:
        if "=" not in arg:
            raise ConfigError(f"override {arg!r} is not of the form key=value")
        key, raw = arg.split("=", 1)
        key = key.strip().lstrip("-")
        if key not in SPECS:
            raise ConfigError(unknown_message(key, "command line"))
        out[key] = check_value(SPECS[key], _parse_value(key, raw))
    return out


def _parse_value(key: str, raw: str) -> Any:
    """A command-line value as YAML; a text setting keeps its raw text when YAML would not give a plain
    scalar (`init_from={runs_dir}/s1/fold{fold}/best.pt` is a path with placeholders, not a mapping)."""
    text_setting = str(SPECS[key].type) == "str"
    if raw == "":
        return ""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        if text_setting:
            return raw
        raise ConfigError(f"{key}={raw}: not a readable value ({one_line_yaml(err)})") from None
    return raw if text_setting and isinstance(value, dict) else value


def one_line_yaml(err: yaml.YAMLError) -> str:
    return " ".join(str(err).split())[:160]


def _known(values: dict[str, Any], source: str) -> dict[str, Any]:
    unknown = [k for k in values if k not in SPECS]
    if unknown:
        raise ConfigError(unknown_message(unknown[0], source))
    return values


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping of a settings YAML file, with one-line errors naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML ({one_line_yaml(err)})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of settings")
    return _known(values, str(path))


def load_settings(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Settings:
    """Defaults <- YAML file <- key=value overrides, checked as a whole (values and the rules between
    them)."""
    values = read_yaml(path) if path else {}
    if overrides:
        values.update(_known(dict(overrides), "command line") if isinstance(overrides, dict)
                      else parse_overrides(overrides))
    return Settings(**values)


def from_saved(saved: dict[str, Any], source: str, overrides: dict[str, Any] | None = None,
               log: Any = print) -> Settings:
    """The settings a run or checkpoint saved, with `overrides` on top. Settings newer than the file get
    their default and settings an older kit had are dropped, each said once in one line."""
    missing = [k for k in SPECS if k not in saved]
    dropped = sorted(k for k in saved if k not in SPECS)
    notes = ([f"{', '.join(missing)} not saved (older kit): defaults used"] if missing else []) + (
        [f"{', '.join(dropped)} no longer exist: ignored"] if dropped else [])
    if notes:
        _note_once(f"note: {source}: {'; '.join(notes)}", log)
    values = {k: v for k, v in saved.items() if k in SPECS}
    values.update(overrides or {})
    return Settings(**values)


_NOTED: set[str] = set()


def _note_once(line: str, log: Any) -> None:
    if line not in _NOTED:
        _NOTED.add(line)
        log(line)


def save_settings(settings: Settings, path: str | Path) -> None:
    """The resolved settings as YAML (written atomically: `load_settings` reads them back unchanged)."""
    from src.core.files import write_text

    write_text(path, yaml.safe_dump(settings.to_dict(), sort_keys=False))


def exit_on_config_error(err: ConfigError) -> None:
    """Print a one-line error and exit 2 (used by every command-line entry point)."""
    print(f"config error: {err}", file=sys.stderr)
    raise SystemExit(2)


# ------------------------------------------------------------------------------------------ the table
def _allowed(f: dataclasses.Field) -> str:
    m = f.metadata
    if m["choices"]:
        return " \\| ".join(m["choices"])
    if any(m[k] is not None for k in ("low", "high", "above", "below")):
        return describe_range(f).removeprefix("a value ")
    return ""


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return "''" if value == "" else str(value).lower() if isinstance(value, bool) else str(value)


def settings_rows() -> list[tuple[str, str, str, str, str, str]]:
    """(name, type, default, allowed, jobs, help) of every setting, in declaration order."""
    return [(f.name, str(f.type), _shown(f.default), _allowed(f), ", ".join(f.metadata["jobs"]),
             f.metadata["help"]) for f in SPECS.values()]


def settings_table(markdown: bool = False) -> str:
    """Every setting as a table: plain text for a terminal, or the Markdown of the README's reference."""
    head = ("setting", "type", "default", "allowed", "read by", "what it does")
    rows = settings_rows()
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join([f"`{r[0]}`", r[1].replace("|", "\\|"), f"`{r[2]}`", *r[3:]]) + " |"
                  for r in rows]
        return "\n".join(lines)
    widths = [max(len(x) for x in col) for col in zip(head, *rows)][:5]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
    return "\n".join(fmt.format(*(c.replace("\\|", "|") for c in r)) for r in [head, *rows])
