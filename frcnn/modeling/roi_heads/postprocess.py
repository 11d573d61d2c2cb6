"""Detections from the box head's outputs: softmax, per-class decode, clip, score threshold,
per-class NMS, the best detections per image.

Shapes: N images, K proposal slots per image, C foreground classes, D detection slots per image.
One NMS call serves the whole batch on an accelerator, its groups keyed by image and class.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from frcnn.modeling.topk_per_image import gather_flat, nms_per_group, scatter_top_per_image
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
    class_specific = box_deltas.shape[-1] > 4
    # class-specific: the background's deltas are not decoded, and the boxes come out
    # contiguous (N, K, C, 4), so that nothing below copies them whole
    deltas = box_deltas[..., 4:] if class_specific else box_deltas
    boxes = box_coder.decode(deltas, proposals)
    boxes = boxes.reshape(num_images, num_proposals, deltas.shape[-1] // 4, 4)
    boxes = clip_boxes(boxes, image_sizes[:, None, None, :])
    if not class_specific:
        boxes = boxes.expand(-1, -1, num_classes, -1)

    widths = boxes[..., 2] - boxes[..., 0]
    heights = boxes[..., 3] - boxes[..., 1]
    keep = proposal_valid[..., None] & (scores > settings.score_thresh)
    keep &= (widths >= MIN_BOX_SIZE) & (heights >= MIN_BOX_SIZE)
    # (N, K, C) -> (N*K*C): proposal-major, class-minor, the order torchvision flattens in;
    # group n * C + c is image n's class c + 1 (an expanded view: no (N, K, C) tensor is made)
    groups = torch.arange(num_images * num_classes, device=scores.device)
    groups = groups.view(num_images, 1, num_classes).expand_as(scores)
    # one call on accelerators; per group on a CPU, where that is faster (see nms_per_group)
    one_call = scores.device.type != "cpu"
    kept = nms_per_group(boxes, scores, groups, keep, settings.nms_thresh, one_call)
    shape = scores.shape
    filled, (det_boxes, det_scores, det_labels) = scatter_top_per_image(
        torch.div(kept, num_proposals * num_classes, rounding_mode="floor"),
        num_images,
        settings.detections_per_image,
        gather_flat(boxes, kept, shape),
        gather_flat(scores, kept, shape),
        kept % num_classes + 1,
    )
    counts = filled.sum(dim=1).tolist()  # the one host read: detections leave the device here
    return [
        Detections(det_boxes[i, :n], det_scores[i, :n], det_labels[i, :n])
        for i, n in enumerate(counts)
    ]
