"""Typed stage configs: dataclass defaults < preset < TOML file < command-line flags.

Every stage's settings are one dataclass whose fields carry a help text (litgpt's TrainArgs
style). `resolve_config` applies the layers in that order, so a flag always wins and a preset only
fills what the user did not say. Example:

    >>> cfg = resolve_config(TokenizerConfig, preset="tiny", overrides={"vocab_size": 1024})
    >>> cfg.vocab_size, cfg.run
    (1024, 'tiny')
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A bad setting: the message names the setting, where it came from and what to do."""


def option(default: Any, help: str) -> Any:
    """A dataclass field with a help text; lists get a default_factory so instances never share one."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


# ----------------------------------------------------------------------------------------------
# Settings every stage shares.


@dataclass
class CommonConfig:
    run: str = option("default", "run name: artifacts go to <runs_dir>/<run>/<stage>/")
    runs_dir: str = option("runs", "folder holding all runs")
    data_dir: str = option("", "dataset folder laid out like shared/data (default: $CHATFORGE_DATA_DIR)")
    device: str = option("auto", "cuda | mps | cpu | auto (cuda, then mps, then cpu)")
    threads: int = option(0, "torch/tokenizer threads; 0 = one per physical core available")
    seed: int = option(1337, "random seed")
    force: bool = option(False, "redo the stage even if its completion marker exists")


@dataclass
class TokenizerConfig(CommonConfig):
    corpus: list[str] = option(
        [],
        "training text: files or globs (.txt[.gz], .jsonl[.gz] with a 'text' field, .parquet with a "
        "'text' column); relative paths are looked up in the data dir. Empty: the run's data stage shards",
    )
    vocab_size: int = option(32768, "vocabulary size, special tokens included")
    pattern: str = option("gpt4", "pre-tokenizer split regex: 'gpt4', 'gpt2' or a regex")
    max_chars: int = option(2_000_000_000, "stop reading the corpus after this many characters")
    doc_chars: int = option(10_000, "truncate each document to this many characters")
    report_chars: int = option(200_000, "characters of held-out text per kind for the compression report")


# ----------------------------------------------------------------------------------------------
# Presets: named bundles of settings, per stage. A preset only sets fields; flags still override.

STAGE_CONFIGS: dict[str, type] = {"tokenizer": TokenizerConfig}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # 2 CPU cores, minutes end to end: a small vocab keeps the embedding and head cheap on CPU.
    "tiny": {
        "common": {"run": "tiny"},
        "tokenizer": {
            "vocab_size": 4096,
            "corpus": [
                "text/wiki_demo.txt",
                "text/c4_demo.jsonl",
                "text/tinyshakespeare.txt.gz",
                "math/gsm8k/train.jsonl",
                "chat/oasst/en_100_tree.jsonl",
            ],
            "max_chars": 20_000_000,
        },
    },
    # One GPU, a few hours; the tokenizer matches nanochat's size class.
    "gpu": {
        "common": {"run": "gpu"},
        "tokenizer": {"vocab_size": 32768, "max_chars": 2_000_000_000},
    },
}


# ----------------------------------------------------------------------------------------------
# Parsing values from strings (CLI) and checking values from TOML.


def field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_list(tp: Any) -> bool:
    return typing.get_origin(tp) is list


def _scalar_type(tp: Any) -> Any:
    """int | None -> int; list[str] -> str."""
    if _is_list(tp):
        return typing.get_args(tp)[0]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def parse_value(tp: Any, text: str, name: str) -> Any:
    """Parse a command-line string into the field's type.

    >>> parse_value(list[str], "a.txt,b.txt", "corpus")
    ['a.txt', 'b.txt']
    >>> parse_value(bool, "no", "force")
    False
    """
    if _is_list(tp):
        return [parse_value(_scalar_type(tp), t, name) for t in text.split(",") if t != ""]
    base = _scalar_type(tp)
    if text.lower() == "none" and base is not str and tp is not base:
        return None
    try:
        if base is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if base is int:
            return int(float(text)) if "e" in text.lower() else int(text.replace("_", ""))
        return base(text)
    except ValueError:
        raise ConfigError(f"--{name}: cannot read {text!r} as {base.__name__}") from None


def check_value(tp: Any, value: Any, name: str, source: str) -> Any:
    """Check (and lightly coerce) a value from a TOML file or a preset against the field type."""
    base = _scalar_type(tp)
    if value is None and tp is not base:
        return None
    if _is_list(tp):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{source}: '{name}' must be a list of {base.__name__}, got {value!r}")
        return [check_value(base, v, name, source) for v in value]
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        raise ConfigError(f"{source}: '{name}' must be {base.__name__}, got {value!r}")
    return value


# ----------------------------------------------------------------------------------------------
# Layering.


def load_toml(path: str | os.PathLike, stage: str) -> tuple[str | None, dict[str, Any]]:
    """Read a config file: top-level keys are this stage's fields, `[<stage>]` tables configure one
    stage (so one file can hold a whole run), `preset = "..."` picks a preset."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: file not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {path}: not valid TOML ({e})") from None
    preset = data.pop("preset", None)
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key in STAGE_CONFIGS:
            if key == stage:
                values.update(value)
        else:
            values[key] = value
    return preset, values


def resolve_config(
    cls: type,
    stage: str | None = None,
    preset: str | None = None,
    config_file: str | os.PathLike | None = None,
    overrides: dict[str, Any] | None = None,
):
    """Build `cls` from defaults < preset < TOML file < overrides (already parsed values)."""
    stage = stage or next((k for k, v in STAGE_CONFIGS.items() if v is cls), "")
    types_ = field_types(cls)
    layers: list[tuple[str, dict[str, Any]]] = []
    file_values: dict[str, Any] = {}
    if config_file:
        file_preset, file_values = load_toml(config_file, stage)
        preset = preset or file_preset
    if preset:
        if preset not in PRESETS:
            raise ConfigError(f"--preset {preset}: unknown preset; choose one of {', '.join(PRESETS)}")
        p = PRESETS[preset]
        layers.append((f"preset {preset}", {**p.get("common", {}), **p.get(stage, {})}))
    if config_file:
        layers.append((f"--config {config_file}", file_values))
    values: dict[str, Any] = {}
    for source, layer in layers:
        for name, value in layer.items():
            if name not in types_:
                raise ConfigError(f"{source}: unknown setting '{name}' for stage '{stage}' "
                                  f"(known: {', '.join(types_)})")
            values[name] = check_value(types_[name], value, name, source)
    for name, value in (overrides or {}).items():
        if name not in types_:
            raise ConfigError(f"unknown setting '{name}' for stage '{stage}'")
        values[name] = value
    return cls(**values)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
