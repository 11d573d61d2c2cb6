"""Anchor-target semantics on hand-computed cases (IoUs worked out in the comments)."""

from __future__ import annotations

import torch

from frcnn.modeling.anchors import AnchorGenerator
from frcnn.modeling.rpn import AnchorMatcher, anchor_targets, rpn_loss_box
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
