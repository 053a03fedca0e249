"""Dataclass configs filled from YAML recipes and `--key value` flags.

Every CLI verb that takes a config (pretrain, finetune, ...) builds its flags from the dataclass, so
`--help` lists each field with its default, and a YAML key or flag that names no field is an error
before any work starts. Precedence: dataclass defaults < YAML recipe < command-line flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from llmkit.errors import ConfigError

T = TypeVar("T")


def _base_type(tp: Any) -> Any:
    """`int | None` -> int; `str` -> str."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: _base_type(hints[f.name]) for f in dataclasses.fields(cls)}


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One `--field-name VALUE` flag per dataclass field; defaults stay in the dataclass."""
    types_ = _field_types(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        tp = types_[f.name]
        convert = _parse_bool if tp is bool else (tp if tp in (int, float, str) else str)
        help_text = (f.metadata.get("help", "") + f" (default: {default!r})").strip()
        extra = {"nargs": "?", "const": True} if tp is bool else {}  # `--resume` alone means true
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=convert,
                            default=argparse.SUPPRESS, metavar=tp.__name__.upper() if hasattr(tp, "__name__") else "X",
                            help=help_text, **extra)


def build_config(cls: type[T], recipe: str | Path | None = None, overrides: dict[str, Any] | None = None) -> T:
    """Defaults, then the YAML recipe, then explicit overrides; unknown keys are a ConfigError."""
    import yaml

    values: dict[str, Any] = {}
    known = {f.name for f in dataclasses.fields(cls)}
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise ConfigError(f"recipe {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"recipe {path} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"recipe {path} must be a mapping of field: value, got {type(loaded).__name__}")
        unknown = sorted(set(loaded) - known)
        if unknown:
            raise ConfigError(f"recipe {path}: unknown key(s) {unknown}; known keys: {sorted(known)}")
        values.update(loaded)
    overrides = overrides or {}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown}; known options: {sorted(known)}")
    values.update(overrides)
    types_ = _field_types(cls)
    for name, value in values.items():
        tp = types_[name]
        if value is None or tp not in (int, float, bool):
            continue
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            values[name] = float(value)
        elif not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ConfigError(f"option {name!r} must be {tp.__name__}, got {value!r}")
    return cls(**values)


def parsed_overrides(args: argparse.Namespace, cls) -> dict[str, Any]:
    """The dataclass fields that were given on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
