"""Fixtures of the reliability tests: tool runs reuse tests/integration/tooling.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# tooling.py (run_tool, tiny_overrides) lives with the integration tests
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))


@pytest.fixture(autouse=True)
def _single_thread(single_thread: None) -> None:
    """Every test here runs on one intra-op thread (tests/conftest.py)."""


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the tools write the tiny generated shapes set: the first run generates it, the
    others find it complete and reuse it."""
    return tmp_path_factory.mktemp("data") / "shapes"
