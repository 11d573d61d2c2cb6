"""Detections from the box head's outputs: softmax, score threshold, per-class decode and clip
of the candidates over it, minimum size, per-class NMS, the best detections per image.

Shapes: N images, K proposal slots per image, C foreground classes, D detection slots per image.
One NMS call serves the whole batch on an accelerator, its groups keyed by image and class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from frcnn.modeling.topk_per_image import nms_calls_of, scatter_top_per_image
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
    # (N, K, C', 4): C' = C class-specific deltas (the background's left out), or C' = 1
    class_specific = box_deltas.shape[-1] > 4
    deltas = (box_deltas[..., 4:] if class_specific else box_deltas).unflatten(-1, (-1, 4))

    def describe(flat: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(M,) flat indices into (N, K, C), image-major, then proposal, then class (the order
        torchvision flattens in) -> the candidates' images and classes c (label c + 1), their
        scores, their (M, 4) clipped boxes and whether each box is large enough to keep. Only
        candidates above the score threshold are decoded (a small share of the N x K x C boxes
        torchvision decodes), each the same as in a whole decode."""
        image = torch.div(flat, num_proposals * num_classes, rounding_mode="floor")
        proposal = torch.div(flat, num_classes, rounding_mode="floor") % num_proposals
        cls = flat % num_classes
        picked = deltas[image, proposal, cls if class_specific else 0]
        boxes = clip_boxes(box_coder.decode(picked, proposals[image, proposal]), image_sizes[image])
        large = ((boxes[:, 2:] - boxes[:, :2]) >= MIN_BOX_SIZE).all(dim=1)
        return image, cls, scores[image, proposal, cls], boxes, large

    def pick(candidates: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        image, cls, picked_scores, boxes, large = describe(candidates)
        # a box too small to keep is scored -inf rather than dropped (dropping would read a
        # count on the host): last in NMS's order, it suppresses nothing, and it is cut below.
        # Group n * C + c is image n's class c + 1.
        return boxes, picked_scores.masked_fill(~large, -math.inf), image * num_classes + cls

    # one call on accelerators; per group on a CPU, where that is faster (see nms_per_group)
    one_call = scores.device.type != "cpu"
    calls = nms_calls_of(pick, usable, settings.nms_thresh, one_call)
    kept = torch.cat(calls) if calls else usable.new_zeros(0, dtype=torch.int64)
    # the kept ones described again (at most the candidates, far fewer than N x K x C): cheaper
    # than carrying every job's candidate boxes out of nms_calls_of, and the same bits
    image, cls, kept_scores, kept_boxes, large = describe(kept)
    filled, (det_boxes, det_scores, det_labels) = scatter_top_per_image(
        torch.where(large, image, num_images),  # image N: not kept at all
        num_images,
        settings.detections_per_image,
        kept_boxes,
        kept_scores,
        cls + 1,
    )
    counts = filled.sum(dim=1).tolist()  # the one host read: detections leave the device here
    return [
        Detections(det_boxes[i, :n], det_scores[i, :n], det_labels[i, :n])
        for i, n in enumerate(counts)
    ]
