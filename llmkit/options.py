"""Dataclass configs filled from YAML recipes and `--key value` flags; a verb's flags made from its function.

A verb is a function whose parameters are dataclasses (each field a flag) or plain typed parameters
(each a flag; `Annotated[T, arg("help")]` adds help). `--help` lists each flag with its default once,
and a YAML key or flag that names no field is an error before any work starts. Precedence: defaults
< YAML recipe (`--config`) < command-line flags. One convention for every verb: MODEL (and PROMPT)
may be given positionally, and a field has the same flag spellings wherever it appears (`SPELLINGS`).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from llmkit.errors import ConfigError

T = TypeVar("T")

# A field's flags wherever it appears: vLLM's and llama.cpp's spellings, then the older llmkit one.
SPELLINGS: dict[str, tuple[str, ...]] = {
    "model": ("-m", "--model"),
    "prompt": ("-p", "--prompt"),
    "max_new_tokens": ("-n", "--max-tokens", "--max-new-tokens"),
    "temperature": ("--temperature", "--temp"),
    "repetition_penalty": ("--repetition-penalty", "--repeat-penalty"),
    "top_k": ("-k", "--top-k"),
    "threads": ("-t", "--threads"),
    "max_rows": ("--max-num-seqs", "--max-rows"),
    "max_docs_per_source": ("--max-docs-per-source", "--max-docs"),
}
POSITIONAL = ("model", "prompt")  # fields also taken positionally, in this order


def arg(help: str = "", positional: bool = False) -> dict:
    """Field metadata (or `Annotated` extra) for a flag: its help, and whether it is also positional."""
    return {"help": help, "positional": positional}


def arg_of(cls, name: str) -> dict:
    """The `arg` metadata of field `name` of dataclass `cls`, to give another verb's parameter the same help."""
    return dict(next(f for f in dataclasses.fields(cls) if f.name == name).metadata)


@dataclasses.dataclass(frozen=True)
class Kind:
    """How a field's text becomes a value: `convert` per word, `choices`, `many` (repeatable)."""

    base: Any
    convert: Callable[[str], Any] | None  # None: the field cannot be a flag (a dict, a union of types)
    choices: tuple = ()
    many: bool = False


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _choice(choices: tuple) -> Callable[[str], Any]:
    """Text -> the choice it names (case-insensitive for strings)."""
    def convert(text: str):
        for c in choices:
            if str(c).lower() == text.lower():
                return c
        return text  # argparse names the choices

    return convert


def kind(tp: Any) -> Kind:
    """`int | None` -> int; `Literal["a", "b"]` -> choices; `str | list[str]` -> repeatable str."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = list(dict.fromkeys(str if a in (Path, os.PathLike) else a
                                  for a in typing.get_args(tp) if a is not type(None)))
        lists = [a for a in args if typing.get_origin(a) is list]
        if lists and all(a in (*lists, *typing.get_args(lists[0])) for a in args):
            return dataclasses.replace(kind(typing.get_args(lists[0])[0]), base=list, many=True)
        return kind(args[0]) if len(args) == 1 else Kind(tp, None)
    if typing.get_origin(tp) is typing.Literal:
        choices = typing.get_args(tp)
        return Kind(type(choices[0]), _choice(choices), choices)
    if typing.get_origin(tp) is list:
        return dataclasses.replace(kind(typing.get_args(tp)[0]), base=list, many=True)
    if tp is bool:
        return Kind(bool, _parse_bool)
    if tp in (int, float, str):
        return Kind(tp, tp)
    if tp in (Path, os.PathLike):
        return Kind(str, str)
    return Kind(tp, None)


def _field_kinds(cls) -> dict[str, Kind]:
    hints = typing.get_type_hints(cls)
    return {f.name: kind(hints[f.name]) for f in dataclasses.fields(cls) if f.init}


def _default(f: dataclasses.Field, instance=None) -> Any:
    """The field's default (from `instance` when given); MISSING when it has none."""
    if instance is not None:
        return getattr(instance, f.name)
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, str) and (not value or " " in value) else str(value)


# ---- a function's parameters as dataclasses ------------------------------------------------


@dataclasses.dataclass
class Param:
    """One dataclass a verb's function takes: by parameter `name`, or `name` None for its plain parameters."""

    name: str | None
    cls: type
    defaults: Any = None  # an instance whose fields are the defaults (a parameter's default value)


def params(fn: Callable) -> list[Param]:
    """The dataclasses `fn` takes; its plain typed parameters are gathered into one more, made here."""
    hints = typing.get_type_hints(fn, include_extras=True)
    out, plain = [], []
    for p in inspect.signature(fn).parameters.values():
        tp = hints[p.name]
        if dataclasses.is_dataclass(tp):
            out.append(Param(p.name, tp, None if p.default is inspect.Parameter.empty else p.default))
            continue
        meta = next((m for m in getattr(tp, "__metadata__", ()) if isinstance(m, dict)), {})
        tp = typing.get_args(tp)[0] if typing.get_origin(tp) is typing.Annotated else tp
        default = dataclasses.MISSING if p.default is inspect.Parameter.empty else p.default
        plain.append((p.name, tp, dataclasses.field(default=default, metadata=meta)))
    if plain:
        required = [p for p in plain if p[2].default is dataclasses.MISSING]
        made = dataclasses.make_dataclass(fn.__name__, required + [p for p in plain if p not in required])
        made.__module__ = fn.__module__
        out.append(Param(None, made))
    return out


def _flag_fields(ps: list[Param]):
    """(param, field, kind) for every field that can be a flag; one field name may appear once."""
    seen: set[str] = set()
    for p in ps:
        kinds = _field_kinds(p.cls)
        for f in dataclasses.fields(p.cls):
            if not f.init or kinds[f.name].convert is None:
                continue
            if f.name in seen:
                raise TypeError(f"field {f.name!r} appears twice in the parameters of a verb")
            seen.add(f.name)
            yield p, f, kinds[f.name]


def add_arguments(parser: argparse.ArgumentParser, fn: Callable) -> None:
    """`--config` and a flag per field of `fn`'s parameters (see the module docstring)."""
    parser.add_argument("--config", metavar="YAML", default=argparse.SUPPRESS,
                        help="a YAML recipe (see recipes/) of field: value; flags override it")
    fields = list(_flag_fields(params(fn)))
    positional = [(p, f, k) for p, f, k in fields if f.name in POSITIONAL or f.metadata.get("positional")]
    positional.sort(key=lambda x: POSITIONAL.index(x[1].name) if x[1].name in POSITIONAL else len(POSITIONAL))
    for p, f, k in positional:
        default = _default(f, p.defaults)
        parser.add_argument(f"{f.name}__pos", metavar=f.name.upper(), nargs="*" if k.many else "?",
                            default=argparse.SUPPRESS, help=_help(f, default, f"--{f.name.replace('_', '-')}"))
    for p, f, k in fields:
        default = _default(f, p.defaults)
        flags = SPELLINGS.get(f.name, (f"--{f.name.replace('_', '-')}",))
        extra: dict[str, Any] = {"nargs": "?", "const": True} if k.base is bool else {}
        if k.many:
            extra["action"] = "append"
        if k.choices:
            extra["choices"] = k.choices
        in_positional = any(f is g for _, g, _ in positional)
        parser.add_argument(*flags, dest=f.name, type=k.convert, default=argparse.SUPPRESS,
                            metavar=None if k.choices and not in_positional else "BOOL" if k.base is bool
                            else f.name.upper(),
                            help=f"the same as {f.name.upper()}" if in_positional else _help(f, default), **extra)


def _help(f: dataclasses.Field, default: Any, flag: str | None = None) -> str:
    """The field's help and its default, once (a help that speaks of its default keeps its own words)."""
    text = f.metadata.get("help", "")
    if "default" in text:
        return text
    if default is dataclasses.MISSING:
        note = "required" + (f", or {flag}" if flag else "")
    else:
        note = f"default: {_shown(default)}"
    return f"{text} ({note})".strip()


# ---- values: defaults < YAML < flags ---------------------------------------------------------


def read_recipe(recipe: str | Path) -> dict[str, Any]:
    """A YAML recipe's mapping of field: value."""
    import yaml

    path = Path(recipe)
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path} is not valid YAML: {e}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"recipe {path} must be a mapping of field: value, got {type(loaded).__name__}")
    return loaded


def build_config(cls: type[T], recipe: str | Path | None = None, overrides: dict[str, Any] | None = None,
                 defaults: Any = None) -> T:
    """Defaults (of `defaults`, an instance, when given), then the YAML recipe, then explicit overrides;
    unknown keys and missing required fields are a ConfigError."""
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    values: dict[str, Any] = {} if defaults is None else {n: getattr(defaults, n) for n in known}
    for source, given in ((f"recipe {recipe}", read_recipe(recipe) if recipe is not None else {}),
                          ("", overrides or {})):
        unknown = sorted(set(given) - known)
        if unknown:
            where = f"{source}: unknown key(s)" if source else "unknown option(s)"
            raise ConfigError(f"{where} {unknown}; known {'keys' if source else 'options'}: {sorted(known)}")
        values.update(given)
    missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing {', '.join(n.upper() if n in POSITIONAL else '--' + n.replace('_', '-') for n in missing)}")
    kinds = _field_kinds(cls)
    for name, value in values.items():
        values[name] = _checked(name, value, kinds[name])
    return cls(**values)


def _checked(name: str, value: Any, k: Kind) -> Any:
    if value is None or k.base not in (int, float, bool, str) or k.many:
        return value
    if k.choices and value not in k.choices:
        raise ConfigError(f"option {name!r} must be one of {list(k.choices)}, got {value!r}")
    if k.base is str:
        return value
    if k.base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, k.base) or (k.base is int and isinstance(value, bool)):
        raise ConfigError(f"option {name!r} must be {k.base.__name__}, got {value!r}")
    return value


def parsed_overrides(args: argparse.Namespace, cls) -> dict[str, Any]:
    """The fields of `cls` given on the command line (positionally or as a flag, not both)."""
    out = {}
    for f in dataclasses.fields(cls):
        given = [getattr(args, n) for n in (f"{f.name}__pos", f.name) if hasattr(args, n)]
        given = [v for v in given if v != []]  # a repeatable positional left out
        if len(given) == 2 and given[0] != given[1]:
            raise ConfigError(f"{f.name.upper()} given twice ({given[0]!r} and --{f.name.replace('_', '-')} "
                              f"{given[1]!r}); give it once")
        if given:
            out[f.name] = given[0]
    return out


def call(fn: Callable, args: argparse.Namespace) -> tuple[Any, list]:
    """Build `fn`'s parameters from the parsed flags (and `--config`), call it; (result, the arguments)."""
    recipe = read_recipe(args.config) if getattr(args, "config", None) else {}
    ps = params(fn)
    owned = {f.name for p in ps for f in dataclasses.fields(p.cls)}
    unknown = sorted(set(recipe) - owned)
    if unknown:
        raise ConfigError(f"recipe {args.config}: unknown key(s) {unknown}; known keys: {sorted(owned)}")
    built, kwargs = [], {}
    for p in ps:
        names = {f.name for f in dataclasses.fields(p.cls)}
        given = {k: v for k, v in recipe.items() if k in names} | parsed_overrides(args, p.cls)
        value = build_config(p.cls, None, given, p.defaults)
        built.append(value)
        if p.name is None:
            kwargs.update({f.name: getattr(value, f.name) for f in dataclasses.fields(value)})
        else:
            kwargs[p.name] = value
    return fn(**kwargs), built
