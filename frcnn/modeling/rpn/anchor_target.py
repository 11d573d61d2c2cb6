"""Anchor-target layer: label every anchor positive, negative or ignored, sample a balanced
minibatch, and give the positives their box-regression targets.

Shapes: N images, R anchors per image, G ground-truth boxes of one image, A anchors per location,
Hl x Wl the size of feature level l.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import box_iou

from frcnn.modeling.sampling import subsample_labels
from frcnn.structures import IGNORE, NEGATIVE, POSITIVE, BoxCoder, Targets, box_ioa

# (Hl, Wl, A) of every level, the layout AnchorGenerator lays its anchors out in
GridSizes = Sequence[tuple[int, int, int]]


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
        self,
        anchors: Tensor,
        targets: Targets,
        image_size: tuple[int, int],
        grid_sizes: GridSizes | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Labels (R,) before sampling and the matched ground-truth box of every anchor (R, 4)."""
        labels, matched_boxes = self.match_batch(anchors, [targets], [image_size], grid_sizes)
        return labels[0], matched_boxes[0]

    def match_batch(
        self,
        anchors: Tensor,
        targets: list[Targets],
        image_sizes: list[tuple[int, int]],
        grid_sizes: GridSizes | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Labels (N, R) before sampling and matched ground-truth boxes (N, R, 4) of a batch.

        Images are matched one at a time (ground-truth counts differ, and one (R, G) IoU matrix
        at a time bounds the memory), all in one workspace: fresh memory costs a page fault per
        page, more than the arithmetic done in it. ``grid_sizes`` says that ``anchors`` are
        AnchorGenerator's grid, (Hl, Wl, A) per level, which builds the same IoU faster (see
        ``grid_box_iou``). Only tensor shapes and host-side crowd counts are read, so this never
        waits for the device.
        """
        num_images, num_anchors = len(targets), anchors.shape[0]
        max_num_gt = max((target.boxes.shape[0] for target in targets), default=0)
        dtype = torch.promote_types(anchors.dtype, torch.float32)
        # (2, R * G) -> an IoU matrix and a scratch matrix, both (R, G), for every image
        workspace = anchors.new_empty((2, num_anchors * max_num_gt), dtype=dtype)
        labels = torch.empty((num_images, num_anchors), dtype=torch.int64, device=anchors.device)
        matched_boxes = anchors.new_empty((num_images, num_anchors, 4), dtype=torch.float32)
        for target, size, labels_i, matched_boxes_i in zip(
            targets, image_sizes, labels, matched_boxes
        ):
            labels_i.copy_(
                self._match(anchors, target, size, grid_sizes, workspace, matched_boxes_i)
            )
        return labels, matched_boxes

    def _match(
        self,
        anchors: Tensor,
        targets: Targets,
        image_size: tuple[int, int],
        grid_sizes: GridSizes | None,
        workspace: Tensor,
        matched_boxes: Tensor,
    ) -> Tensor:
        """Labels (R,); the matched boxes are written to ``matched_boxes`` (R, 4)."""
        inside = self._inside(anchors, image_size)
        num_gt = targets.boxes.shape[0]
        if num_gt == 0:
            matched_boxes.zero_()
            return torch.where(inside, NEGATIVE, IGNORE)
        gt_boxes = targets.boxes.float()
        num_anchors = anchors.shape[0]
        iou, scratch = workspace[:, : num_anchors * num_gt].view(2, num_anchors, num_gt)
        if grid_sizes is None:
            iou = box_iou(anchors, gt_boxes)  # (R, G)
        else:
            grid_box_iou(anchors, gt_boxes, grid_sizes, out=iou, scratch=scratch)
        if targets.num_crowd:
            iou.masked_fill_(targets.iscrowd[None, :], -1.0)
        if self.allowed_border >= 0:
            iou.masked_fill_(~inside[:, None], -1.0)
        max_iou, matched = _max_and_first_argmax(iou, scratch)
        torch.index_select(gt_boxes, 0, matched, out=matched_boxes)
        positive = (max_iou >= self.fg_iou_thresh) | _is_best_anchor(iou, scratch)
        negative = inside & (max_iou < self.bg_iou_thresh)
        if self.clobber_positives:
            positive = positive & ~negative
        else:
            negative = negative & ~positive
        if targets.num_crowd:
            negative = negative & ~self._in_crowd(anchors, targets)
        return torch.where(positive, POSITIVE, torch.where(negative, NEGATIVE, IGNORE))

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


def _max_and_first_argmax(iou: Tensor, scratch: Tensor) -> tuple[Tensor, Tensor]:
    """``iou.max(dim=1)`` of an (R, G) matrix: the max of every row and the first column at it.

    torch.max with indices is a scalar loop; these vectorised passes take half its time. A row
    holding NaN has max NaN at its first NaN, the first entry not below +inf (an IoU is never
    +inf).
    """
    max_iou = iou.amax(dim=1)  # (R,)
    row_max = torch.where(max_iou.isnan(), torch.inf, max_iou)
    keys = torch.lt(iou, row_max[:, None], out=scratch)  # 1.0 below the max
    # g * 2**-23 and 1 + g * 2**-23 are exact for G <= 2**23: the smallest key is the first
    # column at the max
    fraction = torch.arange(iou.shape[1], dtype=iou.dtype, device=iou.device) * 2.0**-23
    first = keys.add_(fraction).amin(dim=1)
    return max_iou, (first * 2.0**23).long()


def _is_best_anchor(iou: Tensor, scratch: Tensor) -> Tensor:
    """(R,) anchors among the best of some box (ties included) of an (R, G) IoU matrix.

    A box that overlaps no anchor has no best anchor. The comparison writes floats, not bools:
    it vectorises, and a sum of 0/1 floats (exact) is many times faster than ``any`` of bools.
    """
    best_per_gt = _column_max(iou)  # (G,)
    # a box that overlaps no anchor: compare with an impossible IoU
    best_per_gt = torch.where(best_per_gt > 0, best_per_gt, 2.0)
    hits = torch.eq(iou, best_per_gt, out=scratch)
    return hits.sum(dim=1) > 0


def _column_max(matrix: Tensor, rows_per_fold: int = 8) -> Tensor:
    """``matrix.amax(dim=0)`` of a contiguous (R, G) matrix, faster for small G.

    A max over R of rows only G long vectorises poorly; folding 8 rows into one first takes a
    third of the time, and a max is exact in any order.
    """
    num_rows, num_cols = matrix.shape
    num_folded = num_rows - num_rows % rows_per_fold
    if num_folded == 0:
        return matrix.amax(dim=0)
    # (R', G) -> (R' / 8, 8 * G) -> (8 * G) -> (8, G)
    folded = matrix[:num_folded].reshape(-1, rows_per_fold * num_cols).amax(dim=0)
    folded = torch.cat([folded.view(rows_per_fold, num_cols), matrix[num_folded:]])
    return folded.amax(dim=0)


def grid_box_iou(
    anchors: Tensor,
    boxes: Tensor,
    grid_sizes: GridSizes,
    out: Tensor | None = None,
    scratch: Tensor | None = None,
) -> Tensor:
    """``box_iou(anchors, boxes)`` (R, G), bit for bit, for anchors laid out on grids.

    Within a level, ``anchors`` (R, 4) are ordered (row h, column w, anchor a) and an anchor's
    x-coordinates depend only on (w, a), its y-coordinates only on (h, a). The intersection's
    width is thus a small (Wl, A, G) tensor and its height an (Hl, A, G) one, and the full
    matrix costs four elementwise passes (product, sum of areas, union, ratio) where box_iou
    takes about twelve. Every rounding has box_iou's operands, hence the same bits. ``out`` and
    ``scratch``, (R, G) tensors, receive the IoU and the intersections if given.
    """
    num_anchors = sum(h * w * a for h, w, a in grid_sizes)
    if num_anchors != anchors.shape[0]:
        raise ValueError(
            f"grid sizes {list(grid_sizes)} describe {num_anchors} anchors, not {anchors.shape[0]}"
        )
    shape = (num_anchors, boxes.shape[0])
    dtype = torch.promote_types(anchors.dtype, boxes.dtype)
    iou = anchors.new_empty(shape, dtype=dtype) if out is None else out
    inter = anchors.new_empty(shape, dtype=dtype) if scratch is None else scratch
    anchor_area = (anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1])
    gt_area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    start = 0
    for height, width, num_per_location in grid_sizes:
        end = start + height * width * num_per_location
        grid = anchors[start:end].reshape(height, width, num_per_location, 4)
        overlap_x = _overlap(boxes[:, 0::2], grid[0, :, :, 0::2])  # (Wl, A, G)
        overlap_y = _overlap(boxes[:, 1::2], grid[:, 0, :, 1::2])  # (Hl, A, G)
        level_inter = inter[start:end]
        # (Hl, 1, A, G) * (1, Wl, A, G) -> (Hl, Wl, A, G), written as (Hl*Wl*A, G)
        torch.mul(overlap_y[:, None], overlap_x[None], out=level_inter.view(grid.shape[:3] + (-1,)))
        # box_iou's union, gt area + anchor area - intersection, then the ratio in its place
        union = torch.add(gt_area, anchor_area[start:end, None], out=iou[start:end])
        union.sub_(level_inter)
        torch.div(level_inter, union, out=union)
        start = end
    return iou


def _overlap(box_span: Tensor, anchor_span: Tensor) -> Tensor:
    """Overlap length of (G, 2) box intervals with (..., 2) anchor intervals: (..., G)."""
    low = torch.maximum(box_span[:, 0], anchor_span[..., 0, None])
    high = torch.minimum(box_span[:, 1], anchor_span[..., 1, None])
    return (high - low).clamp(min=0)


def anchor_targets(
    anchors: Tensor,
    targets: list[Targets],
    image_sizes: list[tuple[int, int]],
    matcher: AnchorMatcher,
    box_coder: BoxCoder,
    batch_size_per_image: int = 256,
    positive_fraction: float = 0.5,
    generator: torch.Generator | None = None,
    grid_sizes: GridSizes | None = None,
) -> AnchorTargets:
    """Labels and box targets for a batch: matching runs per image (see AnchorMatcher.match_batch,
    also for ``grid_sizes``), sampling and encoding on the whole batch.
    """
    labels, matched_boxes = matcher.match_batch(anchors, targets, image_sizes, grid_sizes)
    chosen_pos, chosen_neg = subsample_labels(
        labels == POSITIVE, labels == NEGATIVE, batch_size_per_image, positive_fraction, generator
    )
    sampled = torch.where(chosen_pos, POSITIVE, torch.where(chosen_neg, NEGATIVE, IGNORE))
    # (R, 4) against (N, R, 4): the anchors' widths and centres are computed once, not N times
    deltas = box_coder.encode(anchors, matched_boxes)
    # anchors matched to nothing (or to a degenerate box) would carry inf/NaN deltas
    box_targets = deltas.masked_fill_(~chosen_pos[..., None], 0.0)
    return AnchorTargets(sampled, box_targets)
