"""Balanced random sampling of positives and negatives, batched and free of host syncs.

Shapes: N images, R candidates per image (anchors or proposals).
"""

from __future__ import annotations

import torch
from torch import Tensor


def subsample_labels(
    positive: Tensor,
    negative: Tensor,
    batch_size_per_image: int,
    positive_fraction: float,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Pick at most ``batch_size_per_image * positive_fraction`` positives per image at random and
    fill the rest of the batch with random negatives.

    ``positive`` and ``negative`` are disjoint (N, R) masks; returns the (N, R) masks of the chosen
    ones. Counts stay on the device: each candidate gets a random key offset by its kind
    (positives [0, 1), negatives [2, 3), others [4, 5)), one sort ranks them all, and a candidate is
    kept when its rank within its kind is below that kind's quota.
    """
    num_images, num_candidates = positive.shape
    num_pos_available = positive.sum(dim=1)
    num_neg_available = negative.sum(dim=1)
    num_pos = num_pos_available.clamp(max=int(batch_size_per_image * positive_fraction))
    num_neg = torch.minimum(batch_size_per_image - num_pos, num_neg_available)

    keys = torch.rand((num_images, num_candidates), generator=generator, device=positive.device)
    keys = keys + 2.0 * (~positive) + 2.0 * (~positive & ~negative)
    rank = _rank_along_rows(keys)
    chosen_pos = positive & (rank < num_pos[:, None])
    chosen_neg = negative & (rank - num_pos_available[:, None] < num_neg[:, None])
    return chosen_pos, chosen_neg


def _rank_along_rows(keys: Tensor) -> Tensor:
    """Position of every element in its row's ascending order: (N, R) -> (N, R) int64."""
    order = keys.argsort(dim=1)
    positions = torch.arange(keys.shape[1], device=keys.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)
