"""One NMS over the whole batch, then the first k surviving boxes of every image.

Shapes: B candidate boxes (all images together), N images, M boxes kept by NMS (in decreasing
score), k slots per image.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms, nms


def nms_per_group(
    boxes: Tensor,
    scores: Tensor,
    groups: Tensor,
    usable: Tensor,
    iou_thresh: float,
    one_call: bool = True,
) -> Tensor:
    """Indices into the B candidates kept by NMS run separately within each group (image and
    level, or image and class), in decreasing score. ``boxes`` (..., 4), ``scores``, ``groups``
    and ``usable`` (...) flatten to B.

    One NMS call serves every group: each group's boxes are shifted along the diagonal by a
    multiple of the coordinate span, so that boxes of different groups never overlap. That keeps
    the host reads per call at two (the candidate count below, and NMS's own result) however many
    images and levels or classes there are; torchvision's batched_nms instead loops over the
    groups above 4000 boxes on CPU (20000 on CUDA), reading every group's size on the host.

    Unusable candidates (too small, under the score threshold, empty slots) are dropped first:
    left in, they would suppress nothing but cost NMS quadratic time.

    ``one_call=False`` hands the groups to torchvision's batched_nms instead. The CPU kernel of
    NMS compares every kept box with every later box of the call, groups or not, so one call over
    many well-populated groups (detections: images x classes) costs far more than a call per
    group there, while a host read costs nothing on a CPU.
    """
    candidates = torch.nonzero(usable.reshape(-1)).squeeze(1)
    # float64: the shift is up to (number of groups) x (coordinate span), and in float32 its
    # rounding would let one image's result depend on the others in the batch
    boxes = boxes.reshape(-1, 4)[candidates].double()
    groups = groups.reshape(-1)[candidates]
    scores = scores.reshape(-1)[candidates].double()
    if not one_call:
        return candidates[batched_nms(boxes, scores, groups, iou_thresh)]
    low = boxes.amin() if boxes.numel() else boxes.new_zeros(())
    high = boxes.amax() if boxes.numel() else boxes.new_zeros(())
    shift = groups.double() * (high - low + 1.0)
    kept = nms(boxes - low + shift[:, None], scores, iou_thresh)
    return candidates[kept]


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
