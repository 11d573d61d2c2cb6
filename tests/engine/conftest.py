"""Fixtures of the engine tests; the fake model and batch stream are in engine_fakes.py."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _single_thread(single_thread: None) -> None:
    """Every test here runs on one intra-op thread (tests/conftest.py)."""
