"""Anchor-target layer: label every anchor positive, negative or ignored, sample a balanced
minibatch, and give the positives their box-regression targets.

Shapes: N images, R anchors per image, G ground-truth boxes of one image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import box_iou

from frcnn.modeling.sampling import subsample_labels
from frcnn.structures import IGNORE, NEGATIVE, POSITIVE, BoxCoder, Targets, box_ioa


@dataclass
class AnchorTargets:
    """``labels`` (N, R) int64 in {POSITIVE, NEGATIVE, IGNORE} after sampling; ``box_targets``
    (N, R, 4) float32 deltas, zero where the anchor is not positive."""

    labels: Tensor
    box_targets: Tensor


@dataclass(frozen=True)
class AnchorMatcher:
    """The matching rules of the paper (section 3.1.2), with jwyang's and detectron2's options.

    An anchor is positive when its IoU with some ground-truth box is >= ``fg_iou_thresh`` or when
    it is among the best anchors of some box (ties included, IoU > 0); negative when its best IoU
    is < ``bg_iou_thresh``; ignored otherwise. With ``clobber_positives`` the negative rule is
    applied last, so a best anchor under ``bg_iou_thresh`` ends up negative (jwyang's option).
    Anchors crossing the image border by more than ``allowed_border`` pixels are ignored
    (``allowed_border < 0`` keeps all). Crowd boxes are never matched; a negative anchor lying more
    than ``crowd_ioa_thresh`` inside a crowd box is ignored.
    """

    fg_iou_thresh: float = 0.7
    bg_iou_thresh: float = 0.3
    allowed_border: float = -1.0
    clobber_positives: bool = False
    crowd_ioa_thresh: float = 0.7

    def __call__(
        self, anchors: Tensor, targets: Targets, image_size: tuple[int, int]
    ) -> tuple[Tensor, Tensor]:
        """Labels (R,) before sampling and the matched ground-truth box of every anchor (R, 4).

        Only tensor shapes and the host-side crowd count are read, so this never waits for the
        device. The (G, R) IoU matrix is the memory peak; it is modified in place.
        """
        inside = self._inside(anchors, image_size)
        if targets.boxes.shape[0] == 0:
            return torch.where(inside, NEGATIVE, IGNORE), torch.zeros_like(anchors)
        iou = box_iou(targets.boxes.float(), anchors)  # (G, R)
        if targets.num_crowd:
            iou.masked_fill_(targets.iscrowd[:, None], -1.0)
        if self.allowed_border >= 0:
            iou.masked_fill_(~inside[None, :], -1.0)
        max_iou, matched = iou.max(dim=0)
        best_per_gt = iou.amax(dim=1, keepdim=True)  # (G, 1)
        # a box that overlaps no anchor has no best anchor: compare with an impossible IoU
        best_per_gt = torch.where(best_per_gt > 0, best_per_gt, 2.0)
        is_best = (iou == best_per_gt).any(dim=0)
        del iou
        positive = (max_iou >= self.fg_iou_thresh) | is_best
        negative = inside & (max_iou < self.bg_iou_thresh)
        if self.clobber_positives:
            positive = positive & ~negative
        else:
            negative = negative & ~positive
        if targets.num_crowd:
            negative = negative & ~self._in_crowd(anchors, targets)
        labels = torch.where(positive, POSITIVE, torch.where(negative, NEGATIVE, IGNORE))
        return labels, targets.boxes[matched].float()

    def _in_crowd(self, anchors: Tensor, targets: Targets) -> Tensor:
        """(R,) anchors lying more than ``crowd_ioa_thresh`` inside a crowd box."""
        crowd_index = torch.topk(targets.iscrowd.int(), int(targets.num_crowd)).indices
        crowd_boxes = targets.boxes.index_select(0, crowd_index).float()
        return (box_ioa(anchors, crowd_boxes) > self.crowd_ioa_thresh).any(dim=1)

    def _inside(self, anchors: Tensor, image_size: tuple[int, int]) -> Tensor:
        if self.allowed_border < 0:
            return torch.ones(anchors.shape[0], dtype=torch.bool, device=anchors.device)
        height, width = image_size
        border = self.allowed_border
        return (
            (anchors[:, 0] >= -border)
            & (anchors[:, 1] >= -border)
            & (anchors[:, 2] <= width + border)
            & (anchors[:, 3] <= height + border)
        )


def anchor_targets(
    anchors: Tensor,
    targets: list[Targets],
    image_sizes: list[tuple[int, int]],
    matcher: AnchorMatcher,
    box_coder: BoxCoder,
    batch_size_per_image: int = 256,
    positive_fraction: float = 0.5,
    generator: torch.Generator | None = None,
) -> AnchorTargets:
    """Labels and box targets for a batch. Matching runs per image (ground-truth counts differ and
    a (G, R) IoU matrix per image bounds the memory); sampling and encoding run on the whole batch.
    """
    labels_and_boxes = [
        matcher(anchors, target, size) for target, size in zip(targets, image_sizes)
    ]
    labels = torch.stack([labels for labels, _ in labels_and_boxes])  # (N, R)
    matched_boxes = torch.stack([boxes for _, boxes in labels_and_boxes])  # (N, R, 4)
    chosen_pos, chosen_neg = subsample_labels(
        labels == POSITIVE, labels == NEGATIVE, batch_size_per_image, positive_fraction, generator
    )
    sampled = torch.where(chosen_pos, POSITIVE, torch.where(chosen_neg, NEGATIVE, IGNORE))
    deltas = box_coder.encode(anchors.expand_as(matched_boxes), matched_boxes)
    # anchors matched to nothing (or to a degenerate box) would carry inf/NaN deltas
    box_targets = torch.where(chosen_pos[..., None], deltas, torch.zeros_like(deltas))
    return AnchorTargets(sampled, box_targets)
