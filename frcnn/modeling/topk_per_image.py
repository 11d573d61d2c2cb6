"""Keep the first k surviving boxes of every image after one NMS over the whole batch.

Shapes: N images, M boxes kept by NMS (all images together, in decreasing score), k slots per image.
"""

from __future__ import annotations

import torch
from torch import Tensor


def scatter_top_per_image(
    image_of_kept: Tensor, num_images: int, k: int, *values: Tensor
) -> tuple[Tensor, list[Tensor]]:
    """Place the first ``k`` kept entries of each image into fixed (N, k, ...) slots.

    ``image_of_kept`` (M,) gives each kept entry's image, or ``num_images`` for entries that are not
    to be kept at all; entries are in the order they should fill their image's slots. ``values``
    are (M, ...) tensors to place. Returns the (N, k) mask of filled slots and the placed values
    (zeros where empty). Works on the device without reading any count on the host: a stable sort
    groups entries by image, a cumulative count gives each one its rank in its image, and ranks
    past k are sent to a spill slot that is cut off.
    """
    device = image_of_kept.device
    num_kept = image_of_kept.shape[0]
    image_sorted, order = torch.sort(image_of_kept, stable=True)
    counts = torch.zeros(num_images + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, image_sorted, torch.ones_like(image_sorted))
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(num_kept, device=device) - starts[image_sorted]
    slot = torch.where(rank < k, rank, torch.full_like(rank, k))

    filled = torch.zeros((num_images + 1, k + 1), dtype=torch.bool, device=device)
    filled[image_sorted, slot] = True
    placed = []
    for value in values:
        out = value.new_zeros((num_images + 1, k + 1, *value.shape[1:]))
        out[image_sorted, slot] = value[order]
        placed.append(out[:num_images, :k])
    return filled[:num_images, :k], placed
