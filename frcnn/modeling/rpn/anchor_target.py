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

from frcnn.modeling.sampling import subsample_labels_and_positives
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
        """Labels (N, R) before sampling and matched ground-truth boxes (N, R, 4) of a batch (zero
        boxes in an image without any); see match_batch_indices."""
        labels, matched, boxes = self.match_batch_indices(anchors, targets, image_sizes, grid_sizes)
        return labels, boxes[matched]

    def match_batch_indices(
        self,
        anchors: Tensor,
        targets: list[Targets],
        image_sizes: list[tuple[int, int]],
        grid_sizes: GridSizes | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Labels (N, R) before sampling, and the matched ground-truth box of every anchor as
        (N, R) indices into the batch's boxes (every image's in turn, as float32, then one zero
        box that the anchors of an image without boxes are matched to), (M + 1, 4).

        Images are matched one at a time (ground-truth counts differ, and one (G, R) IoU matrix
        at a time bounds the memory), all in one workspace: fresh memory costs a page fault per
        page, more than the arithmetic done in it. The matrix is (G, R), not (R, G): with G small
        (a few boxes per image), reductions over the G boxes of each anchor are then G
        elementwise passes over rows of R, and those over the anchors of each box contiguous
        rows, where in (R, G) both vectorise poorly. ``grid_sizes`` says that ``anchors`` are
        AnchorGenerator's grid, (Hl, Wl, A) per level, which builds the same IoU faster with the
        anchors in grid order (see ``grid_box_iou``); the anchors' results are put back in
        anchor order at the end. Only tensor shapes and host-side crowd counts are read, so
        this never waits for the device.
        """
        num_images, num_anchors = len(targets), anchors.shape[0]
        max_num_gt = max((target.boxes.shape[0] for target in targets), default=0)
        dtype = torch.promote_types(anchors.dtype, torch.float32)
        # (2, G * R) -> an IoU matrix and a scratch matrix, both (G, R), for every image
        workspace = anchors.new_empty((2, max_num_gt * num_anchors), dtype=dtype)
        labels = torch.empty((num_images, num_anchors), dtype=torch.int64, device=anchors.device)
        matched = torch.empty_like(labels)
        if grid_sizes is None:
            from_grid, grid_anchors = None, anchors
        else:
            to_grid, from_grid = grid_order(grid_sizes, anchors.device)
            grid_anchors = anchors.index_select(0, to_grid)

        def in_anchor_order(values: Tensor, out: Tensor) -> None:
            if from_grid is None:
                out.copy_(values)
            else:
                torch.index_select(values, 0, from_grid, out=out)

        boxes = [target.boxes.float() for target in targets]
        boxes.append(anchors.new_zeros((1, 4), dtype=torch.float32))
        zero_box, first = sum(len(b) for b in boxes[:-1]), 0
        for target, size, labels_i, matched_i in zip(targets, image_sizes, labels, matched):
            labels_m, best = self._match(anchors, grid_anchors, target, size, grid_sizes, workspace)
            in_anchor_order(labels_m, labels_i)
            if best is None:
                matched_i.fill_(zero_box)
            else:
                in_anchor_order(best, matched_i)
                matched_i.add_(first)
            first += target.boxes.shape[0]
        return labels, matched, torch.cat(boxes)

    def _match(
        self,
        anchors: Tensor,
        grid_anchors: Tensor,
        targets: Targets,
        image_size: tuple[int, int],
        grid_sizes: GridSizes | None,
        workspace: Tensor,
    ) -> tuple[Tensor, Tensor | None]:
        """Labels (R,) and each anchor's matched box, an index into ``targets.boxes`` (R,), or
        None when there are no boxes; both in the order of ``grid_anchors``: ``anchors`` in grid
        order given ``grid_sizes`` (see grid_box_iou), else ``anchors``."""
        inside = self._inside(grid_anchors, image_size)
        num_gt = targets.boxes.shape[0]
        if num_gt == 0:
            return torch.where(inside, NEGATIVE, IGNORE), None
        gt_boxes = targets.boxes.float()
        num_anchors = anchors.shape[0]
        iou, scratch = workspace[:, : num_gt * num_anchors].view(2, num_gt, num_anchors)
        if grid_sizes is None:
            iou = box_iou(gt_boxes, anchors)  # (G, R)
        else:
            grid_box_iou(anchors, gt_boxes, grid_sizes, out=iou, scratch=scratch)
        if targets.num_crowd:
            iou.masked_fill_(targets.iscrowd[:, None], -1.0)
        if self.allowed_border >= 0:
            iou.masked_fill_(~inside, -1.0)
        max_iou, best = _max_and_first_argmax(iou, scratch)
        positive = (max_iou >= self.fg_iou_thresh) | _is_best_anchor(iou, scratch)
        negative = inside & (max_iou < self.bg_iou_thresh)
        if self.clobber_positives:
            positive = positive & ~negative
        else:
            negative = negative & ~positive
        if targets.num_crowd:
            negative = negative & ~self._in_crowd(grid_anchors, targets)
        return torch.where(positive, POSITIVE, torch.where(negative, NEGATIVE, IGNORE)), best

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
    """``iou.max(dim=0)`` of a (G, R) matrix: the max of every column and the first row at it.

    torch.max with indices is a scalar loop; these vectorised passes take a fraction of its
    time. A column holding NaN has max NaN at its first NaN, the first entry not below +inf (an
    IoU is never +inf).
    """
    max_iou = iou.amax(dim=0)  # (R,)
    col_max = torch.where(max_iou.isnan(), torch.inf, max_iou)
    keys = torch.lt(iou, col_max, out=scratch)  # 1.0 below the max
    # g * 2**-23 and 1 + g * 2**-23 are exact for G <= 2**23: the smallest key is the first
    # row at the max
    fraction = torch.arange(iou.shape[0], dtype=iou.dtype, device=iou.device) * 2.0**-23
    first = keys.add_(fraction[:, None]).amin(dim=0)
    return max_iou, (first * 2.0**23).long()


def _is_best_anchor(iou: Tensor, scratch: Tensor) -> Tensor:
    """(R,) anchors among the best of some box (ties included) of a (G, R) IoU matrix.

    A box that overlaps no anchor has no best anchor. The comparison writes floats, not bools:
    it vectorises, and a sum of 0/1 floats (exact) is many times faster than ``any`` of bools.
    """
    best_per_gt = iou.amax(dim=1)  # (G,)
    # a box that overlaps no anchor: compare with an impossible IoU
    best_per_gt = torch.where(best_per_gt > 0, best_per_gt, 2.0)
    hits = torch.eq(iou, best_per_gt[:, None], out=scratch)
    return hits.sum(dim=0) > 0


def grid_order(grid_sizes: GridSizes, device: torch.device) -> tuple[Tensor, Tensor]:
    """The (R,) permutations between anchor order, per level (row h, column w, anchor a) as
    AnchorGenerator lays anchors out, and grid order, per level (anchor a, row h, column w):
    ``to_grid[j]`` is the anchor at grid position j, ``from_grid[i]`` the grid position of
    anchor i."""
    to_grid, from_grid = [], []
    start = 0
    for height, width, num_per_location in grid_sizes:
        count = height * width * num_per_location
        level = torch.arange(start, start + count, device=device)
        to_grid.append(level.view(height, width, num_per_location).permute(2, 0, 1).reshape(-1))
        from_grid.append(level.view(num_per_location, height, width).permute(1, 2, 0).reshape(-1))
        start += count
    return torch.cat(to_grid), torch.cat(from_grid)


def grid_box_iou(
    anchors: Tensor,
    boxes: Tensor,
    grid_sizes: GridSizes,
    out: Tensor | None = None,
    scratch: Tensor | None = None,
) -> Tensor:
    """``box_iou(boxes, anchors[to_grid])`` (G, R), bit for bit, for anchors laid out on grids,
    ``to_grid`` from ``grid_order``: the columns are the anchors in grid order.

    Within a level, ``anchors`` (R, 4) are ordered (row h, column w, anchor a) and an anchor's
    x-coordinates depend only on (w, a), its y-coordinates only on (h, a). The intersection's
    width is thus a small (G, A, Wl) tensor and its height a (G, A, Hl) one, and the full
    matrix, laid out (G, A, Hl, Wl) so that the innermost loop runs along a row of the grid,
    costs four elementwise passes (product, sum of areas, union, ratio) where box_iou takes
    about twelve. Every rounding has box_iou's operands, hence the same bits. ``out`` and
    ``scratch``, (G, R) tensors, receive the IoU and the intersections if given.
    """
    num_anchors = sum(h * w * a for h, w, a in grid_sizes)
    if num_anchors != anchors.shape[0]:
        raise ValueError(
            f"grid sizes {list(grid_sizes)} describe {num_anchors} anchors, not {anchors.shape[0]}"
        )
    num_boxes = boxes.shape[0]
    shape = (num_boxes, num_anchors)
    dtype = torch.promote_types(anchors.dtype, boxes.dtype)
    iou = anchors.new_empty(shape, dtype=dtype) if out is None else out
    inter = anchors.new_empty(shape, dtype=dtype) if scratch is None else scratch
    anchor_area = (anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1])
    gt_area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    start = 0
    for height, width, num_per_location in grid_sizes:
        end = start + height * width * num_per_location
        level_shape = (num_boxes, num_per_location, height, width)
        grid = anchors[start:end].reshape(height, width, num_per_location, 4)
        overlap_x = _overlap(boxes[:, 0::2], grid[0, :, :, 0::2].transpose(0, 1))  # (G, A, Wl)
        overlap_y = _overlap(boxes[:, 1::2], grid[:, 0, :, 1::2].transpose(0, 1))  # (G, A, Hl)
        level_inter = inter[:, start:end].view(level_shape)
        # (G, A, Hl, 1) * (G, A, 1, Wl) -> (G, A, Hl, Wl)
        torch.mul(overlap_y[..., None], overlap_x[:, :, None, :], out=level_inter)
        # box_iou's union, gt area + anchor area - intersection, then the ratio in its place
        # (A, Hl, Wl), made contiguous: a strided operand does not vectorise
        area = anchor_area[start:end].view(height, width, num_per_location).permute(2, 0, 1)
        area = area.contiguous()
        union = torch.add(
            gt_area[:, None, None, None], area, out=iou[:, start:end].view(level_shape)
        )
        union.sub_(level_inter)
        torch.div(level_inter, union, out=union)
        start = end
    return iou


def _overlap(box_span: Tensor, anchor_span: Tensor) -> Tensor:
    """Overlap length of (G, 2) box intervals with (A, L, 2) anchor intervals: (G, A, L)."""
    # contiguous: the ops would lay their outputs out like the (A, L) view of the grid's (L, A)
    # anchors, and the product of the two overlaps only vectorises over a contiguous L
    anchor_span = anchor_span.contiguous()
    low = torch.maximum(box_span[:, None, None, 0], anchor_span[..., 0])
    high = torch.minimum(box_span[:, None, None, 1], anchor_span[..., 1])
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
    labels, matched, gt_boxes = matcher.match_batch_indices(
        anchors, targets, image_sizes, grid_sizes
    )
    chosen_pos, chosen_neg, pos_index, pos_taken = subsample_labels_and_positives(
        labels == POSITIVE, labels == NEGATIVE, batch_size_per_image, positive_fraction, generator
    )
    sampled = torch.where(chosen_pos, POSITIVE, torch.where(chosen_neg, NEGATIVE, IGNORE))
    # only the chosen positives carry targets: encode those (N, P) anchors, not all N x R (each
    # delta is computed from its own anchor and box alone, so the bits are the same)
    gt_index = torch.gather(matched, 1, pos_index).reshape(-1)
    pos_anchors = anchors.index_select(0, pos_index.reshape(-1))
    deltas = box_coder.encode(pos_anchors, gt_boxes.index_select(0, gt_index))
    deltas = deltas.view(pos_index.shape + (4,))  # (N, P, 4)
    # the other slots hold unchosen anchors, whose boxes may be degenerate (inf/NaN deltas)
    deltas.masked_fill_(~pos_taken[..., None], 0.0)
    box_targets = deltas.new_zeros(labels.shape + (4,))
    box_targets.scatter_(1, pos_index[..., None].expand(-1, -1, 4), deltas)
    return AnchorTargets(sampled, box_targets)
