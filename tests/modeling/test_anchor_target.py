"""Anchor-target semantics on hand-computed cases (IoUs worked out in the comments)."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import box_iou

from frcnn.modeling.anchors import AnchorGenerator
from frcnn.modeling.rpn import AnchorMatcher, anchor_targets, rpn_loss_box
from frcnn.modeling.rpn.anchor_target import _max_and_first_argmax, grid_box_iou, grid_order
from frcnn.structures import IGNORE, NEGATIVE, POSITIVE, BoxCoder, Targets

POS, NEG, IGN = POSITIVE, NEGATIVE, IGNORE
IMAGE = (300, 300)


def _targets(boxes, crowd=None) -> Targets:
    boxes_t = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    labels = torch.ones(boxes_t.shape[0], dtype=torch.int64)
    iscrowd = None if crowd is None else torch.tensor(crowd, dtype=torch.bool)
    return Targets(boxes_t, labels, iscrowd)


def _labels(anchors, targets, **kwargs) -> list[int]:
    labels, _ = AnchorMatcher(**kwargs)(torch.tensor(anchors, dtype=torch.float32), targets, IMAGE)
    return labels.tolist()


def test_iou_thresholds() -> None:
    gt = _targets([[0, 0, 10, 10]])  # area 100
    anchors = [
        [0, 0, 10, 10],  # IoU 1
        [0, 0, 10, 12],  # 100 / 120 = 0.83
        [0, 0, 10, 7],  # 70 / 100 = 0.7: positive at the threshold (>=)
        [0, 0, 10, 20],  # 100 / 200 = 0.5: between, ignored
        [0, 0, 10, 3],  # 30 / 100 = 0.3: not below 0.3, ignored
        [0, 0, 10, 40],  # 100 / 400 = 0.25: negative
        [50, 50, 60, 60],  # 0: negative
    ]
    assert _labels(anchors, gt) == [POS, POS, POS, IGN, IGN, NEG, NEG]


def test_best_anchor_rule_includes_ties() -> None:
    gt = _targets([[100, 100, 110, 110]])
    anchors = [
        [100, 100, 110, 120],  # IoU 0.5, best (tied)
        [100, 90, 110, 110],  # IoU 0.5, best (tied)
        [100, 100, 110, 130],  # IoU 1/3: ignored
        [150, 150, 160, 160],  # 0: negative
    ]
    assert _labels(anchors, gt) == [POS, POS, IGN, NEG]


def test_best_anchor_below_bg_threshold_and_clobbering() -> None:
    gt = _targets([[200, 200, 210, 210]])
    anchors = [[200, 200, 210, 250], [0, 0, 10, 10]]  # IoU 100 / 500 = 0.2 (its best), 0
    assert _labels(anchors, gt) == [POS, NEG]
    assert _labels(anchors, gt, clobber_positives=True) == [NEG, NEG]


def test_no_overlap_at_all_makes_no_positive() -> None:
    # the best IoU of this box is 0: no anchor becomes positive by the best-anchor rule
    assert _labels([[0, 0, 10, 10], [20, 20, 30, 30]], _targets([[100, 100, 110, 110]])) == [
        NEG,
        NEG,
    ]


def test_border_filter() -> None:
    gt = _targets([[0, 250, 10, 260]])
    anchors = [
        [-2, 250, 10, 260],  # crosses the left border; IoU 100 / 120 = 0.83
        [0, 250, 10, 275],  # inside; IoU 100 / 250 = 0.4
        [290, 290, 300, 300],  # touches the corner: inside (continuous coordinates)
        [295, 0, 305, 10],  # crosses the right border
    ]
    # allowed_border 0 (the paper, jwyang): crossing anchors ignored and never "best"
    assert _labels(anchors, gt, allowed_border=0) == [IGN, POS, NEG, IGN]
    # a tolerance of 5 px keeps the crossing anchors
    assert _labels(anchors, gt, allowed_border=5) == [POS, IGN, NEG, NEG]
    # -1 keeps every anchor (torchvision)
    assert _labels(anchors, gt, allowed_border=-1) == [POS, IGN, NEG, NEG]


def test_crowd_boxes_are_never_positive_and_their_area_is_ignored() -> None:
    targets = _targets([[0, 0, 100, 100], [200, 200, 220, 220]], crowd=[True, False])
    anchors = [
        [0, 0, 100, 100],  # IoU 1 with the crowd box only: ignored, not positive
        [10, 10, 50, 50],  # inside the crowd box (IoA 1): ignored instead of negative
        [80, 80, 120, 120],  # IoA 400 / 1600 = 0.25 with the crowd box: negative
        [200, 200, 220, 220],  # the real object: positive
    ]
    assert _labels(anchors, targets) == [IGN, IGN, NEG, POS]


def test_empty_ground_truth_every_valid_anchor_negative_and_zero_box_loss() -> None:
    anchors = torch.tensor(
        [[0, 0, 10, 10], [-20, 0, 10, 10], [100, 100, 200, 200]], dtype=torch.float32
    )
    empty = Targets.empty()
    labels, _ = AnchorMatcher(allowed_border=0)(anchors, empty, IMAGE)
    assert labels.tolist() == [NEG, IGN, NEG]
    generator = AnchorGenerator([[32.0, 64.0]], [[0.5, 1.0, 2.0]])
    grid = generator((64, 64), [(8, 8)], torch.device("cpu"))
    result = anchor_targets(grid, [empty, empty], [(64, 64), (64, 64)], AnchorMatcher(), BoxCoder())
    assert (result.labels != POSITIVE).all()
    assert ((result.labels == NEGATIVE).sum(dim=1) == 256).all()
    deltas = torch.randn(2, grid.shape[0], 4, requires_grad=True)
    loss = rpn_loss_box(deltas, result.box_targets, result.labels, beta=1.0 / 9.0)
    loss.backward()
    assert loss.item() == 0.0
    assert (deltas.grad == 0).all()


def test_sampling_counts() -> None:
    generator = AnchorGenerator([[16.0]], [[1.0]])
    anchors = generator((160, 160), [(40, 40)], torch.device("cpu"))  # 1600 anchors, stride 4
    # one huge box covering half the image: hundreds of positives
    many = Targets(torch.tensor([[0.0, 0.0, 160.0, 80.0]]), torch.tensor([1]))
    few = Targets(torch.tensor([[40.0, 40.0, 56.0, 56.0]]), torch.tensor([1]))
    result = anchor_targets(anchors, [many, few], [(160, 160)] * 2, AnchorMatcher(), BoxCoder())
    num_pos = (result.labels == POSITIVE).sum(dim=1).tolist()
    num_neg = (result.labels == NEGATIVE).sum(dim=1).tolist()
    assert num_pos[0] == 128 and num_neg[0] == 128  # capped at half of 256
    assert 1 <= num_pos[1] < 10 and num_pos[1] + num_neg[1] == 256
    positive_targets = result.box_targets[result.labels == POSITIVE]
    assert positive_targets.abs().sum() > 0
    assert (result.box_targets[result.labels != POSITIVE] == 0).all()


def test_box_targets_encode_the_matched_box() -> None:
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    gt = Targets(torch.tensor([[1.0, 2.0, 11.0, 12.0]]), torch.tensor([3]))  # IoU 72 / 128
    result = anchor_targets(anchors, [gt], [IMAGE], AnchorMatcher(), BoxCoder())
    assert result.labels.tolist() == [[POSITIVE]]  # best anchor of the box
    # dx = (6 - 5) / 10, dy = (7 - 5) / 10, dw = dh = log(10 / 10)
    torch.testing.assert_close(result.box_targets[0, 0], torch.tensor([0.1, 0.2, 0.0, 0.0]))


def test_box_targets_equal_encoding_every_anchor_then_masking() -> None:
    """Only the chosen positives are encoded: the result must be, bit for bit, every anchor
    encoded against its matched box with the others zeroed (degenerate boxes, which encode to
    inf/NaN, and an image without boxes included)."""
    generator = AnchorGenerator([[16.0, 32.0], [64.0]], [[0.5, 1.0, 2.0]])
    feature_sizes = [(24, 24), (12, 12)]
    anchors = generator((96, 96), feature_sizes, torch.device("cpu"))
    grid = generator.grid_sizes(feature_sizes)
    g = torch.Generator().manual_seed(3)
    boxes = _awkward_boxes(g, 30, (96, 96))  # with zero-width and zero-height boxes
    targets = [Targets(boxes, torch.ones(len(boxes), dtype=torch.int64)), Targets.empty()]
    targets.append(_targets([[8, 8, 40, 40], [50, 20, 90, 60]]))
    sizes = [(96, 96)] * 3
    matcher, coder = AnchorMatcher(), BoxCoder((1.0, 1.0, 1.0, 1.0))
    for grid_sizes in (grid, None):
        result = anchor_targets(
            anchors,
            targets,
            sizes,
            matcher,
            coder,
            32,
            0.5,
            torch.Generator().manual_seed(0),
            grid_sizes,
        )
        labels, matched = matcher.match_batch(anchors, targets, sizes, grid_sizes)
        dense = coder.encode(anchors, matched)
        assert not torch.isfinite(dense).all()  # degenerate matched boxes
        expected = dense.masked_fill(result.labels[..., None] != POSITIVE, 0.0)
        assert torch.equal(result.box_targets, expected)
        positives = (result.labels == POSITIVE).sum(dim=1).tolist()
        assert positives[0] == 16 and positives[1] == 0 and 0 < positives[2] < 16
        assert ((labels == POSITIVE).sum(dim=1)[0] > 16).all()  # the cap was applied


def test_a_thousand_ground_truth_boxes() -> None:
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(1000, 2, generator=g) * 450
    wh = 8 + torch.rand(1000, 2, generator=g) * 120
    boxes = torch.cat([xy, (xy + wh).clamp(max=512)], dim=1)
    targets = Targets(boxes, torch.randint(1, 5, (1000,), generator=g))
    generator = AnchorGenerator([[32.0], [64.0], [128.0], [256.0], [512.0]], [[0.5, 1.0, 2.0]])
    sizes = [(128, 128), (64, 64), (32, 32), (16, 16), (8, 8)]
    anchors = generator((512, 512), sizes, torch.device("cpu"))
    labels, matched = AnchorMatcher()(anchors, targets, (512, 512))
    positives = labels == POSITIVE
    # no cap on the number of boxes: the best-anchor rule reaches boxes far past jwyang's 20
    matched_ids = {tuple(b) for b in matched[positives].tolist()}
    assert len(matched_ids) > 900
    assert torch.isfinite(matched).all()
    result = anchor_targets(anchors, [targets], [(512, 512)], AnchorMatcher(), BoxCoder())
    assert (result.labels == POSITIVE).sum() == 128


# ------------------------------------------------------------------------- grid IoU, fast path
# grid_box_iou must give torchvision's box_iou bit for bit: the best-anchor rule compares IoUs for
# exact equality, so one rounding difference can move a tied positive.


def _awkward_boxes(generator: torch.Generator, count: int, size: tuple[int, int]) -> torch.Tensor:
    """Random boxes, some partly outside the image, plus zero-width, zero-height and point boxes
    and a few copies of anchor-like boxes (exact ties)."""
    height, width = size
    low = torch.rand(count, 2, generator=generator) * torch.tensor([width, height]) - 20
    extent = torch.rand(count, 2, generator=generator) * torch.tensor([width, height]) / 2
    boxes = torch.cat([low, low + extent + 1], dim=1)
    degenerate = torch.tensor(
        [[30.0, 40.0, 30.0, 90.0], [10.0, 25.0, 60.0, 25.0], [50.0, 50.0, 50.0, 50.0]]
    )
    anchor_like = torch.tensor([[-8.0, -8.0, 8.0, 8.0], [24.0, 8.0, 56.0, 40.0]])
    return torch.cat([boxes, degenerate, anchor_like])


def test_grid_iou_equals_box_iou_on_one_level() -> None:
    generator = AnchorGenerator([[16.0, 32.0, 64.0, 128.0]], [[0.5, 1.0, 2.0]])
    image_size, feature_sizes = (256, 256), [(32, 32)]
    anchors = generator(image_size, feature_sizes, torch.device("cpu"))
    boxes = _awkward_boxes(torch.Generator().manual_seed(0), 60, image_size)
    grid = generator.grid_sizes(feature_sizes)
    to_grid, from_grid = grid_order(grid, anchors.device)
    iou = grid_box_iou(anchors, boxes, grid)
    assert torch.equal(iou, box_iou(boxes, anchors[to_grid]))
    assert torch.equal(iou[:, from_grid], box_iou(boxes, anchors))
    assert torch.equal(iou[:, from_grid].T, box_iou(anchors, boxes))  # either argument order
    assert (iou == 1).any() and (iou == 0).any()  # the exact cases are really exercised


def test_grid_order_puts_each_level_in_anchor_row_column_order() -> None:
    # two levels: (H, W, A) = (2, 3, 2) and (1, 2, 3); anchor order is (h, w, a) per level
    to_grid, from_grid = grid_order([(2, 3, 2), (1, 2, 3)], torch.device("cpu"))
    # grid position (a, h, w) of level 0 holds anchor (h * 3 + w) * 2 + a
    assert to_grid[:12].tolist() == [0, 2, 4, 6, 8, 10, 1, 3, 5, 7, 9, 11]
    assert to_grid[12:].tolist() == [12, 15, 13, 16, 14, 17]
    assert torch.equal(to_grid[from_grid], torch.arange(18))
    assert torch.equal(from_grid[to_grid], torch.arange(18))


def test_grid_iou_equals_box_iou_on_fpn_levels_of_a_padded_image() -> None:
    generator = AnchorGenerator([[32.0], [64.0], [128.0], [256.0], [512.0]], [[0.5, 1.0, 2.0]])
    # non-square, and strides that do not divide the padded size (torchvision's floor rule)
    image_size = (200, 328)
    feature_sizes = [(50, 82), (25, 41), (13, 21), (7, 11), (4, 6)]
    anchors = generator(image_size, feature_sizes, torch.device("cpu"))
    grid = generator.grid_sizes(feature_sizes)
    to_grid, _ = grid_order(grid, anchors.device)
    for seed in range(3):
        boxes = _awkward_boxes(torch.Generator().manual_seed(seed), 40, image_size)
        iou = grid_box_iou(anchors, boxes, grid)
        assert torch.equal(iou, box_iou(boxes, anchors[to_grid]))
    # the scratch and output tensors AnchorMatcher passes give the same result
    out, scratch = torch.full((2, boxes.shape[0], anchors.shape[0]), float("nan"))
    assert grid_box_iou(anchors, boxes, grid, out=out, scratch=scratch) is out
    assert torch.equal(out, box_iou(boxes, anchors[to_grid]))


def test_grid_iou_rejects_grid_sizes_that_do_not_describe_the_anchors() -> None:
    generator = AnchorGenerator([[32.0]], [[0.5, 1.0, 2.0]])
    anchors = generator((64, 64), [(4, 4)], torch.device("cpu"))
    with pytest.raises(ValueError, match="describe 36 anchors, not 48"):
        grid_box_iou(anchors, torch.tensor([[0.0, 0.0, 8.0, 8.0]]), [(3, 4, 3)])


def test_max_and_first_argmax_equal_torch_max_with_ties_and_nan() -> None:
    g = torch.Generator().manual_seed(0)
    iou = (torch.randint(0, 4, (200, 7), generator=g) / 4).float()  # many tied maxima
    iou[:, 3] = -1.0  # a masked (crowd) column
    iou[5, 2] = float("nan")  # torch.max takes the first NaN of a row
    iou[6, [1, 4]] = float("nan")
    iou[7] = 0.0  # overlaps nothing
    expected_max, expected_index = iou.max(dim=1)
    # the matcher's (G, R) layout: one row per box
    iou = iou.T.contiguous()
    max_iou, index = _max_and_first_argmax(iou, torch.empty_like(iou))
    assert torch.equal(max_iou.isnan(), expected_max.isnan())
    assert torch.equal(max_iou.nan_to_num(-9.0), expected_max.nan_to_num(-9.0))
    assert torch.equal(index, expected_index)
    assert index[5] == 2 and index[6] == 1


def test_tied_anchor_matches_the_first_box() -> None:
    # the anchor has IoU 0.5 with both boxes; as with torch.max, the first one is its match
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    gt = _targets([[0, -10, 10, 10], [0, 0, 10, 20]])
    labels, matched = AnchorMatcher()(anchors, gt, IMAGE)
    assert labels.tolist() == [POS]
    assert matched.tolist() == [[0.0, -10.0, 10.0, 10.0]]


@pytest.mark.parametrize(
    "matcher",
    [
        AnchorMatcher(),
        AnchorMatcher(allowed_border=0.0, clobber_positives=True),
        AnchorMatcher(fg_iou_thresh=0.5, bg_iou_thresh=0.4, allowed_border=8.0),
    ],
)
def test_anchor_targets_with_grid_sizes_equal_without(matcher: AnchorMatcher) -> None:
    anchor_generator = AnchorGenerator([[24.0, 48.0], [64.0], [128.0]], [[0.5, 1.0, 2.0]])
    padded, feature_sizes = (96, 160), [(24, 40), (12, 20), (6, 10)]
    anchors = anchor_generator(padded, feature_sizes, torch.device("cpu"))
    grid = anchor_generator.grid_sizes(feature_sizes)
    g = torch.Generator().manual_seed(1)
    sizes = [(96, 160), (80, 150), (96, 120), (90, 160)]
    crowd_boxes = torch.cat([_awkward_boxes(g, 5, sizes[2]), torch.tensor([[0.0, 0.0, 60, 50]])])
    targets = [
        Targets(_awkward_boxes(g, 25, sizes[0]), torch.ones(30, dtype=torch.int64)),
        Targets.empty(),
        Targets(
            crowd_boxes,
            torch.ones(11, dtype=torch.int64),
            torch.tensor([False] * 7 + [True, False, False, True]),
        ),
        _targets([[10, 20, 40, 44]]),
    ]

    def run(grid_sizes):
        sampling = torch.Generator().manual_seed(2)
        return anchor_targets(
            anchors, targets, sizes, matcher, BoxCoder(), 64, 0.5, sampling, grid_sizes
        )

    fast, reference = run(grid), run(None)
    assert torch.equal(fast.labels, reference.labels)
    assert torch.equal(fast.box_targets, reference.box_targets)
    assert (fast.labels == POSITIVE).sum(dim=1).tolist()[1] == 0
    assert ((fast.labels == POSITIVE).sum(dim=1) > 0).sum() == 3
    # and the per-image matcher agrees with the batched one
    for target, size, labels in zip(targets, sizes, fast.labels):
        alone, _ = matcher(anchors, target, size, grid)
        assert torch.equal(alone, matcher(anchors, target, size)[0])
        assert ((alone == POSITIVE) | ~(labels == POSITIVE)).all()
