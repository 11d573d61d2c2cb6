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
    ones. Counts stay on the device, and no full sort is needed: every candidate gets a random
    key, and the chosen ones of a kind are the ``count`` smallest keys of that kind in their row,
    read off a top-k as long as the most that can be taken (``batch_size_per_image *
    positive_fraction`` positives, ``batch_size_per_image`` negatives). The smallest keys of a
    random draw are a uniformly random subset.
    """
    num_images, num_candidates = positive.shape
    max_pos = int(batch_size_per_image * positive_fraction)
    num_pos = positive.sum(dim=1).clamp(max=max_pos)
    num_neg = torch.minimum(batch_size_per_image - num_pos, negative.sum(dim=1))
    keys = torch.rand((num_images, num_candidates), generator=generator, device=positive.device)
    chosen_pos = _smallest_keys(keys, positive, num_pos, max_pos)
    chosen_neg = _smallest_keys(keys, negative, num_neg, batch_size_per_image)
    return chosen_pos, chosen_neg


def _smallest_keys(keys: Tensor, members: Tensor, count: Tensor, max_count: int) -> Tensor:
    """(N, R) mask of the ``count[i]`` members of row i with the smallest keys (keys in [0, 1),
    ``count[i]`` at most the row's members and ``max_count``)."""
    k = min(max_count, keys.shape[1])
    # (N, R) -> (N, k): non-members (key 2) rank after every member
    _, index = keys.masked_fill(~members, 2.0).topk(k, dim=1, largest=False, sorted=True)
    taken = torch.arange(k, device=keys.device)[None, :] < count[:, None]
    return torch.zeros_like(members).scatter_(1, index, taken)
