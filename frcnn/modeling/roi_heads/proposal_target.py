"""Proposal-target layer: sample the RoIs the box head trains on and give them class labels and
class-specific regression targets.

Shapes: N images, K proposal slots per image, Gm the most ground-truth boxes of any image in the
batch, C = K + Gm candidates per image, S = RoIs sampled per image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from frcnn.modeling.rpn.proposals import Proposals
from frcnn.modeling.sampling import sample_slots
from frcnn.structures import IGNORE, BoxCoder, Targets, batched_box_iou


@dataclass
class RoISamples:
    """``boxes`` (N, S, 4) sampled RoIs, ``labels`` (N, S) int64 class (0 background, IGNORE for
    unfilled slots), ``box_targets`` (N, S, 4) deltas towards the matched box, zero unless
    foreground. Every image's foreground RoIs come first, then its background ones, each in
    candidate order (proposals, then ground truth)."""

    boxes: Tensor
    labels: Tensor
    box_targets: Tensor


@dataclass(frozen=True)
class ProposalTargetSettings:
    fg_iou_thresh: float = 0.5
    bg_iou_thresh_hi: float = 0.5
    bg_iou_thresh_lo: float = 0.0
    batch_size_per_image: int = 512
    positive_fraction: float = 0.25


def pad_targets(targets: list[Targets], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Ground truth padded to (N, Gm, 4) boxes, (N, Gm) labels and (N, Gm) usable mask (real,
    not crowd): one padding op per field, not a copy per image."""
    if not targets:
        return (
            torch.zeros((0, 0, 4), device=device),
            torch.zeros((0, 0), dtype=torch.int64, device=device),
            torch.zeros((0, 0), dtype=torch.bool, device=device),
        )
    boxes = pad_sequence([t.boxes.float() for t in targets], batch_first=True)
    labels = pad_sequence([t.labels.long() for t in targets], batch_first=True)
    crowd = pad_sequence([t.iscrowd for t in targets], batch_first=True, padding_value=True)
    return boxes.to(device), labels.to(device), ~crowd.to(device)


def sample_proposals(
    proposals: Proposals,
    targets: list[Targets],
    settings: ProposalTargetSettings,
    box_coder: BoxCoder,
    generator: torch.Generator | None = None,
) -> RoISamples:
    """Append the ground truth to the proposals, label candidates by IoU (foreground >= fg
    threshold, background in [bg_lo, bg_hi)), sample S per image with at most
    ``positive_fraction`` foreground. Crowd boxes are neither matched nor appended."""
    gt_boxes, gt_labels, gt_usable = pad_targets(targets, proposals.boxes.device)
    candidates = torch.cat([proposals.boxes, gt_boxes], dim=1)  # (N, C, 4)
    candidate_valid = torch.cat([proposals.valid, gt_usable], dim=1)
    iou = batched_box_iou(gt_boxes, candidates)  # (N, Gm, C)
    iou = iou.masked_fill(~gt_usable[..., None], -1.0)
    if iou.shape[1] > 0:
        max_iou, matched = iou.max(dim=1)  # (N, C)
    else:
        max_iou = iou.new_zeros(candidates.shape[:2])
        matched = torch.zeros(candidates.shape[:2], dtype=torch.int64, device=iou.device)
    max_iou = max_iou.clamp(min=0.0)  # an image without ground truth: everything is background
    foreground = candidate_valid & (max_iou >= settings.fg_iou_thresh)
    background = (
        candidate_valid
        & (max_iou < settings.bg_iou_thresh_hi)
        & (max_iou >= settings.bg_iou_thresh_lo)
        & ~foreground
    )
    # (N, S) candidate indices: the sampled foreground, then background, then unfilled slots
    index, is_fg, is_bg = sample_slots(
        foreground,
        background,
        settings.batch_size_per_image,
        settings.positive_fraction,
        generator,
    )
    return _gather_samples(candidates, index, is_fg, is_bg, matched, gt_boxes, gt_labels, box_coder)


def _gather_samples(
    candidates: Tensor,
    index: Tensor,
    is_fg: Tensor,
    is_bg: Tensor,
    matched: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    box_coder: BoxCoder,
) -> RoISamples:
    boxes = torch.gather(candidates, 1, index[..., None].expand(-1, -1, 4))
    matched = torch.gather(matched, 1, index)
    labels = (
        torch.gather(gt_labels, 1, matched) if gt_labels.shape[1] else torch.zeros_like(matched)
    )
    labels = torch.where(is_fg, labels, torch.where(is_bg, 0, IGNORE))
    if gt_boxes.shape[1]:
        matched_boxes = torch.gather(gt_boxes, 1, matched[..., None].expand(-1, -1, 4))
        deltas = box_coder.encode(boxes, matched_boxes)
        box_targets = torch.where(is_fg[..., None], deltas, torch.zeros_like(deltas))
    else:
        box_targets = torch.zeros_like(boxes)
    return RoISamples(boxes, labels, box_targets)
