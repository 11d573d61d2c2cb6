"""Strict conversion between plain YAML data and a tree of dataclasses. Generic; imports no torch.

A *sources* mapping (dotted key -> the file that set it, or ``--opts``) travels with the data so
that every message can say where the bad value came from.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")

# PyYAML follows YAML 1.1, which reads `1e-3` (no dot) and `1.0e3` (no exponent sign) as strings.
_FLOAT_TEXT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_INDEX = re.compile(r"\[\d+\]")
_INVALID = object()  # returned by a conversion that has already recorded its error


class ConfigError(ValueError):
    """A config that cannot be used. The message alone (no traceback) tells the user what to fix."""


def raise_problems(messages: list[str]) -> None:
    """Raise one ConfigError listing every message, or do nothing when there are none."""
    if len(messages) == 1:
        raise ConfigError(messages[0])
    if messages:
        listed = "\n".join(f"  - {message}" for message in messages)
        raise ConfigError(f"{len(messages)} problems in the config:\n{listed}")


def where(sources: Mapping[str, str], key: str, unset: str = "") -> str:
    """`` in <file>`` for a key set in a file or ``--opts``, else `unset`."""
    source = sources.get(_INDEX.sub("", key))
    return f" in {source}" if source else unset


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations of a dataclass's fields (the schema uses postponed annotations)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def field_type(schema: type, key: str) -> Any | None:
    """The annotation at dotted `key` under `schema`, or None when no such field exists."""
    tp: Any = schema
    for part in key.split("."):
        if not (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
            return None
        tp = field_types(tp).get(part)
        if tp is None:
            return None
    return tp


@functools.cache
def all_keys(schema: type) -> tuple[str, ...]:
    """Every dotted key (sections and values) under `schema`."""
    keys: list[str] = []
    for name, tp in field_types(schema).items():
        keys.append(name)
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            keys.extend(f"{name}.{sub}" for sub in all_keys(tp))
    return tuple(keys)


def describe(tp: Any) -> str:
    """A type as the user reads it in a message: `float`, `list[list[float]]`, `a section`."""
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return "a section (a mapping of keys)"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else describe(a) for a in args)
    if origin in (list, tuple):
        return f"{origin.__name__}[{', '.join(describe(a) for a in args if a is not ...)}]"
    return getattr(tp, "__name__", str(tp))


def to_plain(value: Any) -> Any:
    """A dataclass tree as dicts, lists and scalars only (what yaml.safe_dump accepts)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [to_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: to_plain(item) for key, item in value.items()}
    return value


def from_plain(schema: type[T], data: Any, sources: Mapping[str, str]) -> T:
    """Build `schema` from plain data, or raise one ConfigError listing every bad key and value."""
    converter = _Converter(schema, sources)
    result = converter.section(schema, data, "")
    raise_problems(converter.problems)
    return result


class _Converter:
    def __init__(self, schema: type, sources: Mapping[str, str]) -> None:
        self.schema = schema
        self.sources = sources
        self.problems: list[str] = []

    def section(self, cls: type, data: Any, prefix: str) -> Any:
        if not isinstance(data, Mapping):
            return self.mismatch(prefix or "the top level", cls, data)
        types_by_name = field_types(cls)
        kwargs: dict[str, Any] = {}
        for name, value in data.items():
            key = f"{prefix}.{name}" if prefix else str(name)
            if name not in types_by_name:
                self.problems.append(self.unknown_key_message(cls, prefix, key, str(name)))
                continue
            kwargs[name] = self.value(types_by_name[name], value, key)
        if any(v is _INVALID for v in kwargs.values()) or len(kwargs) < len(data):
            return _INVALID
        return cls(**kwargs)

    def value(self, tp: Any, value: Any, key: str) -> Any:
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            return self.section(tp, value, key)
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin in (typing.Union, types.UnionType):
            return self.union(tp, args, value, key)
        if origin in (list, tuple):
            return self.sequence(tp, origin, args, value, key)
        if tp is Any:
            return value
        if tp in (bool, int, float, str):
            return self.scalar(tp, value, key)
        raise TypeError(f"the config loader does not support the annotation {tp!r} of {key!r}")

    def union(self, tp: Any, args: tuple[Any, ...], value: Any, key: str) -> Any:
        others = [a for a in args if a is not type(None)]
        if value is None and len(others) < len(args):
            return None
        if len(others) != 1:
            raise TypeError(f"the config loader supports only Optional[X] unions, not {tp!r}")
        return self.value(others[0], value, key)

    def sequence(self, tp: Any, origin: type, args: tuple[Any, ...], value: Any, key: str) -> Any:
        if not isinstance(value, (list, tuple)):
            return self.mismatch(key, tp, value)
        if origin is tuple and not (len(args) == 2 and args[1] is ...):
            if len(args) != len(value):
                return self.mismatch(key, tp, value, f"; give exactly {len(args)} items")
            item_types = list(args)
        else:
            item_types = [args[0] if args else Any] * len(value)
        items = [self.value(t, v, f"{key}[{i}]") for i, (t, v) in enumerate(zip(item_types, value))]
        if any(item is _INVALID for item in items):
            return _INVALID
        return items if origin is list else tuple(items)

    def scalar(self, tp: type, value: Any, key: str) -> Any:
        if tp is float and isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            return float(value)
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value) if abs(value) < 2**1023 else self.mismatch(key, tp, value)
        # bool is a subclass of int, but `true` where a count is expected is a mistake
        if isinstance(value, tp) and not (tp is not bool and isinstance(value, bool)):
            return value
        return self.mismatch(key, tp, value, _scalar_hint(tp, value))

    def mismatch(self, key: str, tp: Any, value: Any, hint: str = "") -> object:
        if hint == "" and typing.get_origin(tp) in (list, tuple) and _is_scalar(value):
            hint = f"; write a list, e.g. [{_yaml_text(value)}]"
        got = f"{value!r} ({type(value).__name__})" if value is not None else "null"
        self.problems.append(
            f"'{key}'{where(self.sources, key)}: expected {describe(tp)}, got {got}{hint}"
        )
        return _INVALID

    def unknown_key_message(self, cls: type, prefix: str, key: str, name: str) -> str:
        message = f"unknown key '{key}'{where(self.sources, key)}"
        siblings = list(field_types(cls))
        close = difflib.get_close_matches(name, siblings, n=1)
        if close:
            return f"{message}; did you mean '{_join(prefix, close[0])}'?"
        elsewhere = _same_name_elsewhere(self.schema, name)
        if elsewhere:
            return f"{message}; did you mean {' or '.join(repr(k) for k in elsewhere)}?"
        section = f"in '{prefix}'" if prefix else "at the top level"
        return f"{message}; valid keys {section}: {', '.join(siblings)}"


def _same_name_elsewhere(schema: type, name: str) -> list[str]:
    """Keys in other sections whose last part is (nearly) `name`: a key put in the wrong section."""
    keys = all_keys(schema)
    last_parts = sorted({key.rpartition(".")[2] for key in keys})
    close = difflib.get_close_matches(name, last_parts, n=1, cutoff=0.8)
    if not close:
        return []
    return [key for key in keys if key.rpartition(".")[2] == close[0]]


def _scalar_hint(tp: type, value: Any) -> str:
    if tp is str and isinstance(value, bool):
        return (
            "; YAML reads unquoted yes/no/on/off/true/false as booleans, "
            "so quote the word, e.g. 'off'"
        )
    if tp is str and _is_scalar(value) and value is not None:
        return "; quote it to make it a string"
    if tp is int and isinstance(value, float) and value.is_integer():
        return f"; write it without a decimal point: {int(value)}"
    return ""


def _is_scalar(value: Any) -> bool:
    return not isinstance(value, (Mapping, list, tuple))


def _yaml_text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return "null" if value is None else str(value)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def labelled(data: Mapping[str, Any], source: str, prefix: str = "") -> dict[str, str]:
    """Every dotted key in nested mappings `data`, each mapped to `source`."""
    sources: dict[str, str] = {}
    for name, value in data.items():
        key = _join(prefix, str(name))
        sources[key] = source
        if isinstance(value, Mapping):
            sources.update(labelled(value, source, key))
    return sources


def keys_under(sources: Mapping[str, str], key: str) -> Iterable[str]:
    return [k for k in sources if k == key or k.startswith((f"{key}.", f"{key}["))]
