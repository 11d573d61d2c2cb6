"""Fixtures of the reliability tests: tool runs reuse tests/integration/tooling.py."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# tooling.py (run_tool, tiny_overrides) lives with the integration tests
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    # Bitwise comparisons and the shared 2-core machine both want one intra-op thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the tools write the tiny generated shapes set: the first run generates it, the
    others find it complete and reuse it."""
    return tmp_path_factory.mktemp("data") / "shapes"
