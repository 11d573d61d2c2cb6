"""Proposal layer: turn the RPN's scores and deltas into a fixed number of proposals per image.

Shapes: N images, R anchors per image, L levels, T = sum over levels of min(pre_nms_topk, Rl)
candidates per image, K = post_nms_topk proposal slots per image (fewer when NMS keeps fewer: see
num_slots).

Steps, as in the paper and torchvision: per-level top-k by objectness, decode, clip, drop boxes
smaller than ``min_size`` or scoring under ``score_thresh``, NMS per image and level, keep the best
K. One NMS call serves the whole batch (groups keyed by image and level; one call per CPU
thread, see topk_per_image.py). The output has a fixed shape with a ``valid`` mask; the only
count read on the host is the one NMS needs. ``one_call=False`` hands each call's groups to
torchvision's batched_nms instead (the RPN's choice at inference on a CPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from frcnn.modeling.topk_per_image import nms_calls, scatter_top_per_image
from frcnn.structures import BoxCoder, clip_boxes


@dataclass
class Proposals:
    """``boxes`` (N, K, 4) float32 in the padded batch's pixels, ``scores`` (N, K) objectness
    probabilities in decreasing order, ``valid`` (N, K) mask of filled slots (an image's filled
    slots come before its empty ones)."""

    boxes: Tensor
    scores: Tensor
    valid: Tensor


@dataclass(frozen=True)
class ProposalSettings:
    pre_nms_topk: int = 1000
    post_nms_topk: int = 1000
    nms_thresh: float = 0.7
    min_size: float = 1e-3
    score_thresh: float = 0.0


def generate_proposals(
    anchors: Tensor,
    objectness: Tensor,
    deltas: Tensor,
    image_sizes: Tensor,
    num_anchors_per_level: list[int],
    settings: ProposalSettings,
    box_coder: BoxCoder,
    one_call: bool = True,
) -> Proposals:
    """``anchors`` (R, 4), ``objectness`` (N, R) logits, ``deltas`` (N, R, 4), ``image_sizes``
    (N, 2) of (height, width) -> Proposals. Nothing here is differentiated. ``one_call``: as
    topk_per_image.nms_per_group's."""
    objectness = objectness.detach()
    deltas = deltas.detach()
    num_images = objectness.shape[0]
    top_idx, levels = _top_per_level(objectness, num_anchors_per_level, settings.pre_nms_topk)
    scores = torch.sigmoid(torch.gather(objectness, 1, top_idx))  # (N, T)
    # index_select on flat rows: several times faster than gather or advanced indexing on a CPU
    shape = top_idx.shape
    top_anchors = anchors.index_select(0, top_idx.reshape(-1)).view(*shape, 4)
    if deltas.is_contiguous():
        image_offset = torch.arange(num_images, device=top_idx.device)[:, None] * deltas.shape[1]
        flat_idx = (top_idx + image_offset).reshape(-1)
        top_deltas = deltas.reshape(-1, 4).index_select(0, flat_idx).view(*shape, 4)
    else:
        top_deltas = torch.gather(deltas, 1, top_idx[..., None].expand(-1, -1, 4))
    boxes = box_coder.decode(top_deltas, top_anchors)  # (N, T, 4)
    boxes = clip_boxes(boxes, image_sizes[:, None, :])

    widths = boxes[..., 2] - boxes[..., 0]
    heights = boxes[..., 3] - boxes[..., 1]
    keep = (widths >= settings.min_size) & (heights >= settings.min_size)
    keep &= scores >= settings.score_thresh
    num_levels = len(num_anchors_per_level)
    image_ids = torch.arange(num_images, device=boxes.device)[:, None].expand_as(scores)
    groups = image_ids * num_levels + levels
    calls = nms_calls(boxes, scores, groups, keep, settings.nms_thresh, one_call)
    kept = torch.cat(calls)
    kept_image = torch.div(kept, shape[1], rounding_mode="floor")  # flat index -> image
    valid, (out_boxes, out_scores) = scatter_top_per_image(
        kept_image,
        num_images,
        num_slots(settings.post_nms_topk, calls),
        boxes.reshape(-1, 4).index_select(0, kept),
        scores.reshape(-1).index_select(0, kept),
    )
    return Proposals(out_boxes, out_scores, valid)


def num_slots(post_nms_topk: int, calls: list[Tensor]) -> int:
    """Proposal slots per image: ``post_nms_topk``, or fewer when no NMS call kept that many (an
    image's survivors all come from one call, whose count the host knows). Slots no image could
    fill would be sampled as RoIs, pooled and run through the box head for nothing (a detector
    far from converged keeps few boxes), where torchvision's lists just end.

    The bound is exact when every call holds one image (a CPU batch no larger than the thread
    count); a call of several images (larger CPU batches, the one call on a GPU) bounds them
    by its total. The RoI sampler draws its random keys per slot, so a run's sample depends on
    the slot count and with it on the thread count, as its float rounding already does."""
    return max(1, min(post_nms_topk, max((len(call) for call in calls), default=0)))


def _top_per_level(
    objectness: Tensor, num_anchors_per_level: list[int], pre_nms_topk: int
) -> tuple[Tensor, Tensor]:
    """Indices (N, T) of each level's best ``pre_nms_topk`` anchors and their level ids (N, T)."""
    indices, levels = [], []
    offset = 0
    for level, (scores) in enumerate(objectness.split(num_anchors_per_level, dim=1)):
        k = min(pre_nms_topk, scores.shape[1])
        _, idx = scores.topk(k, dim=1)
        indices.append(idx + offset)
        levels.append(torch.full_like(idx, level))
        offset += scores.shape[1]
    return torch.cat(indices, dim=1), torch.cat(levels, dim=1)
