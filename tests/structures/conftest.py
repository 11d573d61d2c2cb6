from __future__ import annotations

from collections.abc import Callable

import pytest
import torch


@pytest.fixture
def random_boxes() -> Callable[..., torch.Tensor]:
    """A seeded maker of well-formed (..., 4) float32 boxes: corners in [0, 200), sides in
    [1, 100)."""
    generator = torch.Generator().manual_seed(0)

    def make(*shape: int) -> torch.Tensor:
        top_left = torch.rand((*shape, 2), generator=generator) * 200.0
        size = 1.0 + torch.rand((*shape, 2), generator=generator) * 99.0
        return torch.cat([top_left, top_left + size], dim=-1)

    return make
