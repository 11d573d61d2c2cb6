from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch

from frcnn.engine.seed import get_rng_state, seed_all, set_deterministic, set_rng_state


def _draw() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_seed_all_repeats_and_differs_per_rank() -> None:
    assert seed_all(7, rank=1) == 8
    first = _draw()
    seed_all(7, rank=1)
    assert _draw() == first
    seed_all(7, rank=0)
    assert _draw() != first


def test_rng_state_survives_weights_only_round_trip() -> None:
    seed_all(3)
    random.gauss(0, 1)  # leaves a cached gaussian in python's state
    state = get_rng_state()
    expected = _draw()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    _draw()
    set_rng_state(torch.load(buffer, weights_only=True))
    assert _draw() == expected


@pytest.fixture()
def _restore_determinism() -> object:
    before = torch.are_deterministic_algorithms_enabled()
    yield
    set_deterministic(before)


def test_set_deterministic(_restore_determinism: object) -> None:
    set_deterministic(True)
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    set_deterministic(False)
    assert not torch.are_deterministic_algorithms_enabled()
