"""Fixtures for end-to-end runs of the tools."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def shapes_root(tmp_path: Path) -> Path:
    return tmp_path / "shapes"
