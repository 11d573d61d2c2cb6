"""The loader's generic plain-data -> dataclass conversion, on a schema of its own."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import pytest

from frcnn.config.convert import ConfigError, from_plain, to_plain


@dataclass(frozen=True)
class Inner:
    ratio: float = 0.5
    name: Optional[str] = None  # noqa: UP045 -- the typing spelling must work too
    pair: tuple[int, int] = (1, 2)


@dataclass(frozen=True)
class Outer:
    count: int | None = 3
    sizes: tuple[float, ...] = ()
    inner: Inner = field(default_factory=Inner)
    items: list[Inner] = field(default_factory=list)


def test_optional_values_accept_null_and_their_type():
    got = from_plain(Outer, {"count": None, "inner": {"name": None}}, {})
    assert got == Outer(count=None)
    assert from_plain(Outer, {"count": 4, "inner": {"name": "x"}}, {}).inner.name == "x"


def test_tuples_are_converted_and_fixed_lengths_checked():
    got = from_plain(Outer, {"sizes": [1, 2.5], "inner": {"pair": [3, 4]}}, {})
    assert got.sizes == (1.0, 2.5) and got.inner.pair == (3, 4)
    with pytest.raises(
        ConfigError,
        match=r"'inner.pair': expected tuple\[int, int\], got "
        r"\[1, 2, 3\] \(list\); give exactly 2 items",
    ):
        from_plain(Outer, {"inner": {"pair": [1, 2, 3]}}, {})


def test_sections_inside_lists_are_checked_with_indexed_keys():
    got = from_plain(Outer, {"items": [{"ratio": 1}, {}]}, {})
    assert got.items == [Inner(ratio=1.0), Inner()]
    with pytest.raises(
        ConfigError,
        match=r"unknown key 'items\[1\].ratoi'; did you mean "
        r"'items\[1\].ratio'",
    ):
        from_plain(Outer, {"items": [{}, {"ratoi": 1}]}, {})


def test_sources_name_where_a_bad_value_came_from():
    sources = {"inner": "a.yaml", "inner.ratio": "--opts"}
    with pytest.raises(ConfigError, match=r"^'inner.ratio' in --opts: expected float"):
        from_plain(Outer, {"inner": {"ratio": "high"}}, sources)


def test_to_plain_turns_tuples_into_lists_and_back():
    value = Outer(sizes=(1.0,), items=[Inner(name="a")])
    plain = to_plain(value)
    assert plain["sizes"] == [1.0] and plain["inner"]["pair"] == [1, 2]
    assert from_plain(Outer, plain, {}) == value
