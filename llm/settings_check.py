"""Every CLI's settings (`--config FILE.yaml` and `--name value`) checked against the typed signature before
jsonargparse sees them, so a mistake is one line naming the file, line and key (`llm.cli.run_cli`); also the type
checks of ModelArgs' fields."""
from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import numbers
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

SIGNED_INTS = {"seed", "top_k", "group_size", "bos_token_id", "eos_token_id", "pad_token_id"}
"""Integer settings that may be negative (group_size -1: one group per row); every other one is a size or a count,
so a negative value is an error."""


def accepts(value: Any, tp: Any) -> bool:
    """Whether `value` (as YAML or a command line gives it) is a valid `tp`, the way jsonargparse will read it."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object or isinstance(tp, typing.TypeVar):
        return True
    if tp is type(None):
        return value is None
    if origin is Union or origin is types.UnionType:
        return any(accepts(value, t) for t in args)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return _number(value, int)
    if tp is float:
        return _number(value, float)
    if tp is str:
        return value is not None and not isinstance(value, (list, tuple, dict))
    if origin in (list, tuple, set, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(accepts(v, t) for v, t in zip(value, args))
        return all(accepts(v, args[0]) for v in value) if args else True
    if dataclasses.is_dataclass(tp):
        return isinstance(value, (dict, tp))
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    return True  # a type this check does not know: jsonargparse decides


def _number(value: Any, kind: type) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, str):  # "1e-3" is a string to YAML 1.1, a number to jsonargparse
        try:
            kind(value)
            return True
        except ValueError:
            return False
    return isinstance(value, numbers.Integral if kind is int else numbers.Real)


def describe(tp: Any) -> str:
    """`tp` in words, for an error message."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union or origin is types.UnionType:
        words = [describe(t) for t in args if t is not type(None)]
        return " or ".join(words + (["null"] if type(None) in args else []))
    if origin is Literal:
        return "one of " + ", ".join(str(a).lower() if isinstance(a, bool) else str(a) for a in args)
    if origin in (list, tuple, set, collections.abc.Sequence):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} values ({', '.join(describe(t) for t in args)})"
        return f"a list of {describe(args[0]) if args else 'values'}"
    if origin is dict or tp is dict or dataclasses.is_dataclass(tp):
        return "a mapping (key: value)"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def check_value(name: str, value: Any, tp: Any) -> Optional[str]:
    """Why `value` is not a valid setting `name` of type `tp` (a phrase naming it), or None when it is."""
    if not accepts(value, tp):
        return f"{name}: expected {describe(tp)}, got {value!r}"
    leaf = name.rsplit(".", 1)[-1]
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value < 0 and leaf not in SIGNED_INTS:
        return f"{name}: must be >= 0, got {value} (a size or a count)"
    return None


Schema = dict  # setting name -> its type, or a nested Schema (the subcommands of a command with several)


def schema_of(component: Any) -> Schema:
    """The settings a CLI component takes: a function's typed parameters, or {subcommand: its schema}."""
    if isinstance(component, dict):
        return {name: schema_of(c) for name, c in component.items()}
    hints = typing.get_type_hints(component)
    hints.pop("return", None)
    return hints


def _fields(tp: Any) -> Optional[Schema]:
    """The nested settings of a dataclass-typed setting (also Optional[dataclass]), else None."""
    if isinstance(tp, dict):
        return tp
    for t in (tp, *typing.get_args(tp)):
        if dataclasses.is_dataclass(t):
            return schema_of(t)
    return None


def _unknown(name: str, key: str, prefix: str, known: Schema) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    if close:
        return f"unknown {name} {prefix}{key} — did you mean {prefix}{close[0]}?"
    return f"unknown {name} {prefix}{key} — valid: {', '.join(prefix + k for k in sorted(known))}"


class _LineLoader(yaml.SafeLoader):
    """A YAML loader whose mappings remember the line of each key (`.lines`)."""

    def construct_mapping(self, node, deep=False):
        mapping = _Lines(super().construct_mapping(node, deep=True))
        mapping.lines = {}
        for key_node, _ in node.value:
            try:
                mapping.lines[self.construct_object(key_node, deep=True)] = key_node.start_mark.line + 1
            except TypeError:  # an unhashable key: construct_mapping has already refused it
                pass
        return mapping


class _Lines(dict):
    lines: dict


_LineLoader.add_constructor("tag:yaml.org,2002:map", lambda loader, node: loader.construct_mapping(node))


def check_config_file(path: str, schema: Schema) -> None:
    """Check a `--config` YAML against the CLI's settings: names, types and signs, before anything else runs.
    Raises ValueError `FILE:LINE: key: what is wrong — the fix` (llm.cli prints it as one line)."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{path}: no such config file — check the path (--config takes a YAML file)")
    if p.is_dir():
        raise ValueError(f"{path}: is a folder — --config takes a YAML file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a UTF-8 text file — --config takes a YAML file") from None
    try:
        data = yaml.load(text, Loader=_LineLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        what = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ValueError(f"{where}: YAML syntax error: {what} — check the indentation, quotes and brackets "
                         "there") from None
    if data is None:
        return
    if not isinstance(data, dict):
        raise ValueError(f"{path}:1: expected a mapping of setting: value at the top level, got "
                         f"{type(data).__name__} — see --print_config for the layout")
    _check_mapping(data, schema, path, "")


def _check_mapping(data: dict, schema: Schema, path: str, prefix: str) -> None:
    for key, value in data.items():
        line = getattr(data, "lines", {}).get(key, "?")
        where = f"{path}:{line}"
        if key not in schema:
            raise ValueError(f"{where}: {_unknown('key', str(key), prefix, schema)}")
        tp, nested = schema[key], _fields(schema[key])
        if nested is not None and isinstance(value, dict):
            _check_mapping(value, nested, path, f"{prefix}{key}.")
        elif problem := check_value(prefix + str(key), value, tp):
            raise ValueError(f"{where}: {problem}")


def check_args(schema: Schema, args: list[str]) -> None:
    """Check a CLI's arguments (`--config FILE`, `--a.b value`, `--a.b=value`, a subcommand) against its settings,
    before jsonargparse parses them. Raises ValueError with a one-line message naming the option or file."""
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg in ("-h", "--help"):
            return  # jsonargparse prints the help
        if not arg.startswith("--"):
            subcommands = {k: v for k, v in schema.items() if isinstance(v, dict)}
            if subcommands and arg not in schema:
                raise ValueError(_unknown("subcommand", arg, "", subcommands))
            if isinstance(schema.get(arg), dict):
                schema = schema[arg]
            continue
        key, eq, value = arg[2:].partition("=")
        if key.startswith("print_config"):
            continue
        if not eq:
            if i >= len(args) or args[i].startswith("--"):
                continue  # jsonargparse says a value is missing
            value, i = args[i], i + 1
        if key == "config":
            check_config_file(value, schema)
            continue
        _check_option(schema, key.rstrip("+"), value, appending=key.endswith("+"))


def _check_option(schema: Schema, key: str, value: str, appending: bool) -> None:
    parts, node, tp = key.split("."), schema, None
    for n, part in enumerate(parts):
        if node is None:  # beneath a free-form mapping (e.g. --model.dim of pretrain's overrides)
            return
        if part not in node:
            flat = _flatten(schema)
            close = difflib.get_close_matches(key, flat, n=1, cutoff=0.6)
            hint = f" — did you mean --{close[0]}?" if close else " — see --help for the options"
            raise ValueError(f"--{key}: unknown option{hint}")
        tp = node[part]
        node = _fields(tp)
        if node is None and n < len(parts) - 1 and not _is_mapping(tp):
            raise ValueError(f"--{key}: unknown option — {'.'.join(parts[:n + 1])} has no fields")
    if appending or _fields(tp) is not None:
        return  # `--list+ item`, or a group given whole (`--train file.yaml`): jsonargparse reads them
    parsed = _yaml(value)  # as jsonargparse reads a value; a plain string where the type takes one
    if problem := check_value(key, parsed if accepts(parsed, tp) or not accepts(value, tp) else value, tp):
        raise ValueError(f"--{problem}")


def _yaml(value: str) -> Any:
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def _is_mapping(tp: Any) -> bool:
    return any(typing.get_origin(t) is dict or t is dict for t in (tp, *typing.get_args(tp)))


def _flatten(schema: Schema, prefix: str = "") -> list[str]:
    out = []
    for k, tp in schema.items():
        nested = _fields(tp)
        out += _flatten(nested, f"{prefix}{k}.") if nested is not None else [prefix + k]
    return out
