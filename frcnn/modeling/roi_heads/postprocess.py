"""Detections from the box head's outputs: softmax, per-class decode, clip, score threshold,
per-class NMS, the best detections per image.

Shapes: N images, K proposal slots per image, C foreground classes, D detection slots per image.
One NMS call serves the whole batch on an accelerator, its groups keyed by image and class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from frcnn.modeling.topk_per_image import gather_flat, nms_calls_of, scatter_top_per_image
from frcnn.structures import BoxCoder, Detections, clip_boxes

# boxes narrower or shorter than this are dropped before NMS (torchvision's value)
MIN_BOX_SIZE = 1e-2


@dataclass(frozen=True)
class PostprocessSettings:
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_image: int = 100


def postprocess_detections(
    class_logits: Tensor,
    box_deltas: Tensor,
    proposals: Tensor,
    proposal_valid: Tensor,
    image_sizes: Tensor,
    settings: PostprocessSettings,
    box_coder: BoxCoder,
) -> list[Detections]:
    """``class_logits`` (N, K, C+1), ``box_deltas`` (N, K, 4(C+1)) or (N, K, 4), ``proposals``
    (N, K, 4), ``proposal_valid`` (N, K), ``image_sizes`` (N, 2) -> one Detections per image."""
    num_images, num_proposals, num_logits = class_logits.shape
    num_classes = num_logits - 1
    scores = torch.softmax(class_logits.float(), dim=-1)[..., 1:]  # (N, K, C), a view
    usable = proposal_valid[..., None] & (scores > settings.score_thresh)
    shape = scores.shape
    # (N, K, C', 4): C' = C class-specific deltas (the background's left out), or C' = 1
    class_specific = box_deltas.shape[-1] > 4
    deltas = (box_deltas[..., 4:] if class_specific else box_deltas).unflatten(-1, (-1, 4))

    def boxes_of(flat: Tensor) -> tuple[Tensor, Tensor]:
        """(M,) flat indices into (N, K, C), image-major then proposal then class (the order
        torchvision flattens in) -> their (M, 4) clipped boxes and whether each is large enough
        to keep. Only candidates above the score threshold are decoded (a small share of the
        N x K x C boxes torchvision decodes), each the same as in a whole decode."""
        image, proposal, label = torch.unravel_index(flat, shape)
        picked = deltas[image, proposal, label if class_specific else 0]
        boxes = clip_boxes(box_coder.decode(picked, proposals[image, proposal]), image_sizes[image])
        sides = boxes[:, 2:] - boxes[:, :2]
        return boxes, (sides >= MIN_BOX_SIZE).all(dim=1)

    # group n * C + c is image n's class c + 1 (an expanded view: no (N, K, C) tensor is made)
    groups = torch.arange(num_images * num_classes, device=scores.device)
    groups = groups.view(num_images, 1, num_classes).expand_as(scores)

    def pick(candidates: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        boxes, large = boxes_of(candidates)
        # a box too small to keep is scored -inf rather than dropped (dropping would read a
        # count on the host): last in NMS's order, it suppresses nothing, and it is cut below
        picked_scores = gather_flat(scores, candidates, shape).masked_fill(~large, -math.inf)
        return boxes, picked_scores, gather_flat(groups, candidates, shape)

    # one call on accelerators; per group on a CPU, where that is faster (see nms_per_group)
    one_call = scores.device.type != "cpu"
    calls = nms_calls_of(pick, usable, settings.nms_thresh, one_call)
    kept = torch.cat(calls) if calls else usable.new_zeros(0, dtype=torch.int64)
    kept_boxes, kept_large = boxes_of(kept)
    kept_image = torch.div(kept, num_proposals * num_classes, rounding_mode="floor")
    filled, (det_boxes, det_scores, det_labels) = scatter_top_per_image(
        torch.where(kept_large, kept_image, num_images),  # image N: not kept at all
        num_images,
        settings.detections_per_image,
        kept_boxes,
        gather_flat(scores, kept, shape),
        kept % num_classes + 1,
    )
    counts = filled.sum(dim=1).tolist()  # the one host read: detections leave the device here
    return [
        Detections(det_boxes[i, :n], det_scores[i, :n], det_labels[i, :n])
        for i, n in enumerate(counts)
    ]
