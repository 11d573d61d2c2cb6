"""Read a YAML config (with ``_base_`` inheritance and ``--opts`` overrides) into a typed Config.

Files are parsed with ``yaml.safe_load`` only: a config is data, never code, so a Python tag such
as ``!!python/object/apply`` is refused before anything it names can run. Imports no torch.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from frcnn.config.checks import range_problems
from frcnn.config.convert import (
    ConfigError,
    field_type,
    from_plain,
    keys_under,
    labelled,
    raise_problems,
    to_plain,
    where,
)
from frcnn.config.schema import Config

BASE_KEY = "_base_"
OPTS = "--opts"

_TAG = re.compile(r"tag '([^']*)'")


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """The Config in YAML file `path` (after its `_base_` files), with `overrides` applied.

    `overrides` are ``dotted.key=value`` strings; each value is read as YAML, so ``1e-3``,
    ``[1, 2]``, ``true`` and ``null`` work. Raises ConfigError naming the key, the file (or
    ``--opts``) and the fix for a misspelled key, a wrong type or an out-of-range value.
    """
    data, sources = read_config_tree(path)
    apply_overrides(data, sources, overrides, Config)
    return _build(data, sources, unset=" (default)")


def with_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """A copy of `cfg` with ``dotted.key=value`` `overrides` applied and validated."""
    data = config_to_dict(cfg)
    sources: dict[str, str] = {}
    apply_overrides(data, sources, overrides, Config)
    return _build(data, sources)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as nested dicts, lists and scalars (what yaml.safe_dump writes)."""
    return to_plain(cfg)


def dump_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML that load_config reads back to an equal Config."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.dump(config_to_dict(cfg), Dumper=_ReadableSafeDumper, sort_keys=False)
    path.write_text(f"# resolved frcnn config (defaults, _base_ files and --opts applied)\n{text}")
    return path


class _ReadableSafeDumper(yaml.SafeDumper):
    """yaml.safe_dump's dumper (plain types only), with sections in block style, one key a line,
    and lists of scalars on one line, the way a person writes a config."""

    def represent_list(self, data: list[Any]) -> yaml.Node:
        flow = all(not isinstance(item, (list, dict)) for item in data)
        return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_ReadableSafeDumper.add_representer(list, _ReadableSafeDumper.represent_list)


def validate(cfg: Config) -> None:
    """Raise one ConfigError listing every out-of-range value or invalid choice in `cfg`."""
    raise_problems([f"'{key}': {text}" for key, text in range_problems(cfg)])


def _build(data: dict[str, Any], sources: Mapping[str, str], unset: str = "") -> Config:
    cfg = from_plain(Config, data, sources)
    problems = range_problems(cfg)
    raise_problems([f"'{key}'{where(sources, key, unset)}: {text}" for key, text in problems])
    return cfg


def read_config_tree(path: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The merged plain data of `path` and its `_base_` files, and where each key was set."""
    return _read_tree(Path(path), included_by=None, chain=())


def _read_tree(
    path: Path, included_by: str | None, chain: tuple[tuple[Path, str], ...]
) -> tuple[dict[str, Any], dict[str, str]]:
    shown = os.path.normpath(path)
    real = path.resolve()
    if any(real == seen for seen, _ in chain):
        loop = " -> ".join([name for _, name in chain] + [shown])
        raise ConfigError(f"{BASE_KEY} files include each other in a cycle: {loop}")
    data = read_yaml(path, shown, included_by)
    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for base in _base_paths(data.pop(BASE_KEY, []), shown):
        base_path = base if base.is_absolute() else path.parent / base
        base_data, base_sources = _read_tree(base_path, shown, (*chain, (real, shown)))
        merge(merged, sources, base_data, base_sources)
    merge(merged, sources, data, labelled(data, shown))
    return merged, sources


def _base_paths(value: Any, shown: str) -> list[Path]:
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(
            f"{shown}: {BASE_KEY} must be a file path or a list of file paths "
            f"(relative to {shown}'s folder), got {value!r}"
        )
    return [Path(name) for name in names]


def merge(
    dst: dict[str, Any],
    dst_sources: dict[str, str],
    src: Mapping[str, Any],
    src_sources: Mapping[str, str],
    prefix: str = "",
) -> None:
    """Merge `src` into `dst` in place: mappings merge key by key, lists and scalars replace."""
    for name, value in src.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if isinstance(value, Mapping) and isinstance(dst.get(name), dict):
            dst_sources[key] = src_sources.get(key, dst_sources.get(key, ""))
            merge(dst[name], dst_sources, value, src_sources, key)
            continue
        dst[name] = copy.deepcopy(dict(value) if isinstance(value, Mapping) else value)
        for stale in keys_under(dst_sources, key):
            del dst_sources[stale]
        dst_sources.update({k: src_sources[k] for k in keys_under(src_sources, key)})


def read_yaml(path: Path, shown: str, included_by: str | None = None) -> dict[str, Any]:
    """One YAML file as a mapping, through yaml.safe_load; every failure is a ConfigError."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        by = f" (named in {BASE_KEY} of {included_by})" if included_by else ""
        raise ConfigError(f"config file not found: {shown}{by}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read config file {shown}: {error}") from None
    data = safe_load_text(text, shown)
    _check_duplicate_keys(text, shown)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{shown}: the top level must be a mapping of sections (model:, solver:, ...), "
            f"got {type(data).__name__}"
        )
    return data


def safe_load_text(text: str, shown: str) -> Any:
    """yaml.safe_load with its errors turned into ConfigErrors naming `shown`."""
    try:
        return yaml.safe_load(text)
    except yaml.constructor.ConstructorError as error:
        tag = _TAG.search(str(error.problem))
        if tag is None:
            raise ConfigError(f"{shown}: invalid YAML: {error}") from None
        name = tag.group(1).replace("tag:yaml.org,2002:", "!!")
        raise ConfigError(
            f"{shown}{_line(error)}: refused YAML tag '{name}': configs are plain data "
            "read with yaml.safe_load and never executed; remove the tag"
        ) from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{shown}: invalid YAML: {error}") from None


def _line(error: yaml.MarkedYAMLError) -> str:
    mark = error.problem_mark or error.context_mark
    return f", line {mark.line + 1}" if mark is not None else ""


def _check_duplicate_keys(text: str, shown: str) -> None:
    # safe_load keeps the last of two equal keys silently: a second `solver:` block would erase
    # the first. Composing builds only the node graph, so no constructor runs here either.
    seen_nodes: set[int] = set()
    pending: list[tuple[yaml.Node, str]] = [(yaml.compose(text, Loader=yaml.SafeLoader), "")]
    while pending:
        node, prefix = pending.pop()
        if node is None or id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            pending.extend((item, f"{prefix}[{i}]") for i, item in enumerate(node.value))
        if not isinstance(node, yaml.MappingNode):
            continue
        names: set[str] = set()
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            key = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            if key_node.value in names:
                raise ConfigError(
                    f"{shown}, line {key_node.start_mark.line + 1}: key '{key}' is given twice "
                    "(the second would silently replace the first); keep one"
                )
            names.add(key_node.value)
            pending.append((value_node, key))


def apply_overrides(
    data: dict[str, Any],
    sources: dict[str, str],
    overrides: Sequence[str],
    schema: type,
) -> None:
    """Apply ``dotted.key=value`` strings to plain config `data` in place, in order."""
    if isinstance(overrides, str):
        raise TypeError("overrides must be a sequence of 'key=value' strings, not one string")
    for text in overrides:
        key, value = parse_override(text, schema)
        *parents, leaf = key.split(".")
        nested: dict[str, Any] = {leaf: value}
        for name in reversed(parents):
            nested = {name: nested}
        merge(data, sources, nested, labelled(nested, OPTS))


def parse_override(text: str, schema: type) -> tuple[str, Any]:
    """Split ``a.b.c=value`` and read the value as YAML (kept verbatim for string fields)."""
    key, sep, raw = text.partition("=")
    key, raw = key.strip(), raw.strip()
    if not sep or not key or not all(key.split(".")):
        raise ConfigError(
            f"{OPTS} takes dotted key=value pairs such as solver.base_lr=0.01; got {text!r}"
        )
    try:
        value = safe_load_text(raw, f"{OPTS} {text!r}") if raw else ""
    except ConfigError as error:
        if "refused YAML tag" in str(error):
            raise
        value = raw  # not YAML (e.g. a path starting with '*'); a non-string field reports it
    if field_type(schema, key) is str and not isinstance(value, str):
        value = raw  # `amp=off`, `device=0`, `output_dir=2024` mean the text the user typed
    return key, value
