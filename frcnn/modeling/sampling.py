"""Balanced random sampling of positives and negatives, batched and free of host syncs.

Shapes: N images, R candidates per image (anchors or proposals), S = min(batch size, R) slots.
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
    chosen_pos, chosen_neg, _, _ = subsample_labels_and_positives(
        positive, negative, batch_size_per_image, positive_fraction, generator
    )
    return chosen_pos, chosen_neg


def subsample_labels_and_positives(
    positive: Tensor,
    negative: Tensor,
    batch_size_per_image: int,
    positive_fraction: float,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """subsample_labels' masks, and the chosen positives as (N, P) indices, P = min(
    ``batch_size_per_image * positive_fraction``, R), with the (N, P) mask of the slots that hold
    one: a row's chosen positives come first, the other slots hold distinct unchosen candidates.
    Work that only the chosen positives need can then be done on N x P slots, not on N x R."""
    draw = _Draw(positive, negative, batch_size_per_image, positive_fraction, generator)
    pos_taken = _first_slots(draw.pos_index, draw.num_pos)
    neg_taken = _first_slots(draw.neg_index, draw.num_neg)
    chosen_pos = torch.zeros_like(positive).scatter_(1, draw.pos_index, pos_taken)
    chosen_neg = torch.zeros_like(negative).scatter_(1, draw.neg_index, neg_taken)
    return chosen_pos, chosen_neg, draw.pos_index, pos_taken


def sample_slots(
    positive: Tensor,
    negative: Tensor,
    batch_size_per_image: int,
    positive_fraction: float,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """subsample_labels' draw (the same candidates for the same generator state) as (N, S)
    candidate indices: each row's chosen positives, then its chosen negatives, each in candidate
    order, then unchosen candidates filling the S slots; with the (N, S) masks of the slots that
    hold a chosen positive and a chosen negative. No (N, R) mask is made: the slots are read off
    the two top-k's at offsets given by each row's counts, and only the S slots are sorted."""
    draw = _Draw(
        positive, negative, batch_size_per_image, positive_fraction, generator, fill_slots=True
    )
    num_slots = min(batch_size_per_image, positive.shape[1])
    slot = torch.arange(num_slots, device=positive.device)[None, :]
    num_pos = draw.num_pos[:, None]
    is_pos = slot < num_pos
    is_neg = ~is_pos & (slot < num_pos + draw.num_neg[:, None])
    # slot j < num_pos is the j-th positive; past it, the (j - num_pos)-th negative (or an
    # unchosen candidate beyond the negatives taken): indices into [positives | negatives]
    source = torch.where(is_pos, slot, draw.pos_index.shape[1] + slot - num_pos)
    index = torch.gather(torch.cat([draw.pos_index, draw.neg_index], dim=1), 1, source)
    # each kind's slots in candidate order rather than the draw's: the losses sum over the
    # slots, so their float rounding then depends on which candidates were drawn, not on the
    # keys' order (and is the same as when the slots came from sorting the chosen masks)
    kind = torch.where(is_pos, 0, torch.where(is_neg, 1, 2))
    order = (kind * positive.shape[1] + index).argsort(dim=1)
    return torch.gather(index, 1, order), is_pos, is_neg


class _Draw:
    """One random key per candidate, in [0, 1); ``pos_index`` (N, kp) and ``neg_index`` (N, kn)
    hold each row's candidates of that kind by increasing key, then others (``fill_slots``: the
    positives last among them), and ``num_pos``, ``num_neg`` (N,) how many of each are taken."""

    def __init__(
        self,
        positive: Tensor,
        negative: Tensor,
        batch_size_per_image: int,
        positive_fraction: float,
        generator: torch.Generator | None,
        fill_slots: bool = False,
    ) -> None:
        num_images, num_candidates = positive.shape
        max_pos = int(batch_size_per_image * positive_fraction)
        self.num_pos = positive.sum(dim=1).clamp(max=max_pos)
        self.num_neg = torch.minimum(batch_size_per_image - self.num_pos, negative.sum(dim=1))
        keys = torch.rand((num_images, num_candidates), generator=generator, device=positive.device)
        # non-members rank after every member (key 2)
        self.pos_index = _smallest_keys(keys.masked_fill(~positive, 2.0), max_pos)
        neg_keys = keys.masked_fill(~negative, 2.0)
        if fill_slots:
            # the positives last in the negatives' order, largest key first, so that slot
            # fillers read past the chosen negatives reach the positives that were not chosen
            # before any that were
            neg_keys = torch.where(positive, 3.0 - keys, neg_keys)
        self.neg_index = _smallest_keys(neg_keys, batch_size_per_image)


def _first_slots(index: Tensor, count: Tensor) -> Tensor:
    """(N, k) mask of the first ``count[i]`` slots of ``index``'s row i."""
    return torch.arange(index.shape[1], device=index.device)[None, :] < count[:, None]


def _smallest_keys(keys: Tensor, max_count: int) -> Tensor:
    """(N, k) indices of each row's smallest keys, in increasing order, k = min(max_count, R)."""
    k = min(max_count, keys.shape[1])
    return keys.topk(k, dim=1, largest=False, sorted=True).indices
