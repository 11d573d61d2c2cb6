"""Batched equals per-image for the anchor-target, proposal and proposal-target layers and for the
detection postprocess, and no image's output depends on the other images in its batch.

Where a torchvision function does the same job per image (RPN.filter_proposals,
RoIHeads.postprocess_detections) it is the reference for each image.
"""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder as TorchvisionBoxCoder
from torchvision.models.detection.roi_heads import RoIHeads as TorchvisionRoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import box_iou

from frcnn.engine.sync_count import count_host_syncs
from frcnn.modeling import parallel
from frcnn.modeling.anchors import AnchorGenerator
from frcnn.modeling.roi_heads.postprocess import PostprocessSettings, postprocess_detections
from frcnn.modeling.roi_heads.proposal_target import ProposalTargetSettings, sample_proposals
from frcnn.modeling.rpn.anchor_target import AnchorMatcher, anchor_targets
from frcnn.modeling.rpn.proposals import Proposals, ProposalSettings, generate_proposals
from frcnn.structures import IGNORE, NEGATIVE, POSITIVE, BoxCoder, Targets

PADDED_SIZE = (128, 128)
IMAGE_SIZES = [(128, 128), (100, 120), (128, 90)]
# one stride-16 level of 3 sizes x 3 ratios and one stride-32 level: R = 8*8*9 + 4*4*9 = 720
FEATURE_SIZES = [(8, 8), (4, 4)]
ANCHOR_SIZES = [[24, 48, 96], [64, 128, 256]]
RATIOS = [[0.5, 1.0, 2.0]]
NUM_ANCHORS_PER_LEVEL = [8 * 8 * 9, 4 * 4 * 9]
RPN_CODER = BoxCoder((1.0, 1.0, 1.0, 1.0))
RCNN_WEIGHTS = (10.0, 10.0, 5.0, 5.0)


@pytest.fixture(scope="module")
def anchors() -> torch.Tensor:
    generator = AnchorGenerator(ANCHOR_SIZES, RATIOS)
    return generator(PADDED_SIZE, FEATURE_SIZES, torch.device("cpu"))


def _random_boxes(generator: torch.Generator, count: int, size: tuple[int, int]) -> torch.Tensor:
    height, width = size
    x1 = torch.rand(count, generator=generator) * (width - 20)
    y1 = torch.rand(count, generator=generator) * (height - 20)
    w = 10 + torch.rand(count, generator=generator) * (width - x1 - 10)
    h = 10 + torch.rand(count, generator=generator) * (height - y1 - 10)
    return torch.stack([x1, y1, x1 + w, y1 + h], dim=1)


@pytest.fixture(scope="module")
def targets() -> list[Targets]:
    """Three images with 0, 1 and 7 ground-truth boxes, the last one with a crowd box."""
    generator = torch.Generator().manual_seed(0)
    one = Targets(torch.tensor([[20.0, 30.0, 70.0, 90.0]]), torch.tensor([2]))
    seven_boxes = _random_boxes(generator, 6, IMAGE_SIZES[2])
    crowd_box = torch.tensor([[2.0, 64.0, 88.0, 126.0]])
    seven = Targets(
        torch.cat([seven_boxes, crowd_box]),
        torch.tensor([1, 3, 2, 1, 3, 1, 2]),
        torch.tensor([False] * 6 + [True]),
    )
    return [Targets.empty(), one, seven]


# ----------------------------------------------------------------------------- anchor targets


@pytest.mark.parametrize("allowed_border", [-1.0, 0.0])
def test_anchor_targets_batched_equal_per_image(anchors, targets, allowed_border):
    """With a batch larger than R, sampling takes every labelled anchor: nothing random left."""
    matcher = AnchorMatcher(allowed_border=allowed_border)
    big_batch = anchors.shape[0] + 1
    batched = anchor_targets(anchors, targets, IMAGE_SIZES, matcher, RPN_CODER, big_batch, 1.0)
    assert batched.labels.shape == (3, anchors.shape[0])
    assert batched.box_targets.shape == (3, anchors.shape[0], 4)
    for i, (target, size) in enumerate(zip(targets, IMAGE_SIZES)):
        alone = anchor_targets(anchors, [target], [size], matcher, RPN_CODER, big_batch, 1.0)
        assert torch.equal(batched.labels[i], alone.labels[0])
        assert torch.equal(batched.box_targets[i], alone.box_targets[0])
        # and every labelled anchor was taken: the labels are the matcher's
        assert torch.equal(batched.labels[i], matcher(anchors, target, size)[0])
    assert torch.isfinite(batched.box_targets).all()


def test_anchor_targets_content(anchors, targets):
    matcher = AnchorMatcher(allowed_border=0.0)
    big_batch = anchors.shape[0] + 1
    result = anchor_targets(anchors, targets, IMAGE_SIZES, matcher, RPN_CODER, big_batch, 1.0)
    labels, box_targets = result.labels, result.box_targets
    # no ground truth: every anchor inside the image is negative, no box targets
    assert not (labels[0] == POSITIVE).any()
    assert (labels[0] == NEGATIVE).any()
    assert not box_targets[0].any()
    # box targets exist exactly where anchors are positive, and decode onto the ground truth
    positive = labels == POSITIVE
    assert positive[1].any() and positive[2].any()
    assert not box_targets[~positive].any()
    gt_boxes = targets[1].boxes
    decoded = RPN_CODER.decode(box_targets[1][positive[1]], anchors[positive[1]])
    torch.testing.assert_close(decoded, gt_boxes.expand_as(decoded), atol=1e-3, rtol=0)
    # the crowd box is never what a positive anchor is matched to
    crowd = targets[2].boxes[-1]
    decoded = RPN_CODER.decode(box_targets[2][positive[2]], anchors[positive[2]])
    assert not torch.isclose(decoded, crowd, atol=1e-2).all(dim=1).any()


def test_anchor_targets_with_real_sampling(anchors, targets):
    matcher = AnchorMatcher(allowed_border=0.0)
    generator = torch.Generator().manual_seed(0)
    result = anchor_targets(anchors, targets, IMAGE_SIZES, matcher, RPN_CODER, 256, 0.5, generator)
    for i, (target, size) in enumerate(zip(targets, IMAGE_SIZES)):
        before, _ = matcher(anchors, target, size)
        after = result.labels[i]
        # sampling only turns labels into IGNORE
        changed = after != before
        assert (after[changed] == IGNORE).all()
        num_pos = int((before == POSITIVE).sum())
        num_neg = int((before == NEGATIVE).sum())
        expected_pos = min(num_pos, 128)
        assert int((after == POSITIVE).sum()) == expected_pos
        assert int((after == NEGATIVE).sum()) == min(256 - expected_pos, num_neg)
        assert not result.box_targets[i][after != POSITIVE].any()


def test_anchor_targets_of_an_image_do_not_depend_on_its_batch(anchors, targets):
    """Counts per image are the same alone, in the batch, and in another batch."""
    matcher = AnchorMatcher()
    batches = [targets, [targets[2], targets[2], targets[1]], [targets[1]]]
    counts = {}
    for batch in batches:
        sizes = [IMAGE_SIZES[0]] * len(batch)
        result = anchor_targets(anchors, batch, sizes, matcher, RPN_CODER, 64, 0.25)
        for target, labels in zip(batch, result.labels):
            pair = (int((labels == POSITIVE).sum()), int((labels == NEGATIVE).sum()))
            counts.setdefault(id(target), set()).add(pair)
    assert all(len(pairs) == 1 for pairs in counts.values())


def test_anchor_targets_ignore_the_order_of_ground_truth(anchors, targets):
    matcher = AnchorMatcher(allowed_border=0.0)
    big_batch = anchors.shape[0] + 1
    order = torch.tensor([6, 3, 0, 5, 1, 4, 2])
    target = targets[2]
    shuffled = Targets(target.boxes[order], target.labels[order], target.iscrowd[order])
    sizes = IMAGE_SIZES[2:]
    first = anchor_targets(anchors, [target], sizes, matcher, RPN_CODER, big_batch, 1.0)
    second = anchor_targets(anchors, [shuffled], sizes, matcher, RPN_CODER, big_batch, 1.0)
    assert torch.equal(first.labels, second.labels)
    assert torch.equal(first.box_targets, second.box_targets)


def test_anchor_targets_with_only_crowd_ground_truth(anchors):
    crowd = Targets(torch.tensor([[0.0, 0.0, 60.0, 60.0]]), torch.tensor([1]), torch.tensor([True]))
    result = anchor_targets(anchors, [crowd], [PADDED_SIZE], AnchorMatcher(), RPN_CODER)
    assert not (result.labels == POSITIVE).any()
    assert int((result.labels == NEGATIVE).sum()) == 256
    assert not result.box_targets.any()
    # anchors lying inside the crowd region are never negatives
    inside = (anchors[:, :2] >= 0).all(dim=1) & (anchors[:, 2:] <= 60).all(dim=1)
    assert inside.any()
    assert not (result.labels[0][inside] == NEGATIVE).any()


# ----------------------------------------------------------------------------- proposals


def _rpn_outputs(seed: int, num_images: int, num_anchors: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    objectness = torch.randn((num_images, num_anchors), generator=generator) * 3.0
    deltas = torch.randn((num_images, num_anchors, 4), generator=generator) * 0.3
    return objectness, deltas


PROPOSAL_SETTINGS = [
    ProposalSettings(pre_nms_topk=150, post_nms_topk=60, nms_thresh=0.7),
    ProposalSettings(pre_nms_topk=50, post_nms_topk=300, nms_thresh=0.5),
    ProposalSettings(pre_nms_topk=200, post_nms_topk=200, min_size=30.0, score_thresh=0.9),
]


def _valid(proposals: Proposals, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    valid = proposals.valid[i]
    # filled slots come first, in decreasing score
    count = int(valid.sum())
    assert valid[:count].all() and not valid[count:].any()
    scores = proposals.scores[i, :count]
    assert (scores[1:] <= scores[:-1]).all()
    return proposals.boxes[i, :count], scores


@pytest.mark.parametrize("settings", PROPOSAL_SETTINGS)
def test_proposals_batched_equal_per_image(anchors, settings):
    objectness, deltas = _rpn_outputs(0, 3, anchors.shape[0])
    sizes = torch.tensor(IMAGE_SIZES)
    batched = generate_proposals(
        anchors, objectness, deltas, sizes, NUM_ANCHORS_PER_LEVEL, settings, RPN_CODER
    )
    assert batched.boxes.shape == (3, _expected_slots(batched.valid, settings.post_nms_topk), 4)
    for i in range(3):
        alone = _proposals_of_image(i, anchors, objectness, deltas, sizes, settings)
        boxes, scores = _valid(batched, i)
        alone_boxes, alone_scores = _valid(alone, 0)
        assert len(boxes) > 0
        assert torch.equal(boxes, alone_boxes)
        assert torch.equal(scores, alone_scores)
        assert not batched.boxes[i][~batched.valid[i]].any()


def _proposals_of_image(i, anchors, objectness, deltas, sizes, settings) -> Proposals:
    """Image i's proposals, computed alone."""
    one = slice(i, i + 1)
    return generate_proposals(
        anchors,
        objectness[one],
        deltas[one],
        sizes[one],
        NUM_ANCHORS_PER_LEVEL,
        settings,
        RPN_CODER,
    )


def _expected_slots(valid: torch.Tensor, post_nms_topk: int) -> int:
    """post_nms_topk slots, or the most boxes one NMS call kept: a call per worker's range of
    images, each image's kept count read off its filled slots (all of them, while below K)."""
    counts = valid.sum(dim=1).tolist()
    ranges = parallel.image_ranges(len(counts), parallel.num_workers(valid.device))
    most = max(sum(counts[first:end]) for first, end in ranges)
    return max(1, min(post_nms_topk, most))  # an image at K: its call's count is at least K


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_proposal_slots_shrink_to_what_nms_kept(anchors, monkeypatch, workers):
    """When NMS keeps fewer boxes than post_nms_topk, the slots shrink to the largest NMS call's
    count (known on the host, no read), so that the box head never runs on slots no image
    fills; every image keeps all of its proposals."""
    monkeypatch.setattr(parallel, "num_workers", lambda device: workers)
    settings = ProposalSettings(pre_nms_topk=50, post_nms_topk=10_000, nms_thresh=0.5)
    objectness, deltas = _rpn_outputs(0, 3, anchors.shape[0])
    sizes = torch.tensor(IMAGE_SIZES)
    batched = generate_proposals(
        anchors, objectness, deltas, sizes, NUM_ANCHORS_PER_LEVEL, settings, RPN_CODER
    )
    counts = batched.valid.sum(dim=1).tolist()
    assert batched.boxes.shape[1] == _expected_slots(batched.valid, settings.post_nms_topk)
    if workers == 3:  # an NMS call per image: the slots are exactly the most any image kept
        assert batched.boxes.shape[1] == max(counts)
    # at most 2 x 50 candidates per image: post_nms_topk=100 leaves room to spare
    full = ProposalSettings(pre_nms_topk=50, post_nms_topk=100, nms_thresh=0.5)
    for i in range(3):  # the same boxes as with slots to spare
        alone = _proposals_of_image(i, anchors, objectness, deltas, sizes, full)
        assert torch.equal(_valid(batched, i)[0], _valid(alone, 0)[0])
        assert torch.equal(_valid(batched, i)[1], _valid(alone, 0)[1])


@pytest.mark.parametrize("workers", [1, 2])
def test_proposals_with_nms_per_group_equal_one_call(anchors, monkeypatch, workers):
    """one_call=False (the RPN's choice at inference on a CPU): torchvision's batched_nms per
    job, a kernel call per (image, level) group once a job holds over 1000 candidates, keeps
    the boxes the one call keeps, in the same order."""
    monkeypatch.setattr(parallel, "num_workers", lambda device: workers)
    settings = ProposalSettings(pre_nms_topk=600, post_nms_topk=400, nms_thresh=0.7)
    objectness, deltas = _rpn_outputs(2, 3, anchors.shape[0])  # 720 candidates per image
    sizes = torch.tensor(IMAGE_SIZES)
    results, kernel_calls = [], []
    for one_call in (True, False):
        with count_host_syncs() as syncs:
            results.append(
                generate_proposals(
                    anchors,
                    objectness,
                    deltas,
                    sizes,
                    NUM_ANCHORS_PER_LEVEL,
                    settings,
                    RPN_CODER,
                    one_call=one_call,
                )
            )
        kernel_calls.append(syncs.by_call["torchvision.nms"])
    # one call per job; per group: 3 images x 2 levels in one job of 2160 candidates, or a job
    # of 1440 (4 groups) and one of 720 (under batched_nms's bound: its one shifted call)
    assert kernel_calls == [workers, 6 if workers == 1 else 5]
    one, per_group = results
    assert torch.equal(one.valid, per_group.valid) and one.valid.sum() > 300
    assert torch.equal(one.boxes, per_group.boxes)
    assert torch.equal(one.scores, per_group.scores)


def _torchvision_filter(anchors, objectness, deltas, sizes, settings) -> list[tuple]:
    rpn = RegionProposalNetwork(
        None,
        None,
        0.7,
        0.3,
        256,
        0.5,
        {"training": settings.pre_nms_topk, "testing": settings.pre_nms_topk},
        {"training": settings.post_nms_topk, "testing": settings.post_nms_topk},
        settings.nms_thresh,
        settings.score_thresh,
    )
    rpn.min_size = settings.min_size
    num_images = objectness.shape[0]
    decoded = TorchvisionBoxCoder((1.0, 1.0, 1.0, 1.0)).decode_single(
        deltas.reshape(-1, 4), anchors.repeat(num_images, 1)
    )
    boxes, scores = rpn.filter_proposals(
        decoded.view(num_images, -1, 4), objectness, sizes, NUM_ANCHORS_PER_LEVEL
    )
    return list(zip(boxes, scores))


@pytest.mark.parametrize("settings", PROPOSAL_SETTINGS)
def test_proposals_equal_torchvision_filter_proposals(anchors, settings):
    objectness, deltas = _rpn_outputs(1, 3, anchors.shape[0])
    ours = generate_proposals(
        anchors,
        objectness,
        deltas,
        torch.tensor(IMAGE_SIZES),
        NUM_ANCHORS_PER_LEVEL,
        settings,
        RPN_CODER,
    )
    reference = _torchvision_filter(anchors, objectness, deltas, IMAGE_SIZES, settings)
    for i, (ref_boxes, ref_scores) in enumerate(reference):
        boxes, scores = _valid(ours, i)
        torch.testing.assert_close(boxes, ref_boxes, atol=1e-4, rtol=0)
        torch.testing.assert_close(scores, ref_scores, atol=1e-6, rtol=0)


def test_proposals_of_an_image_ignore_the_other_images(anchors):
    settings = PROPOSAL_SETTINGS[0]
    objectness, deltas = _rpn_outputs(2, 3, anchors.shape[0])
    other_objectness, other_deltas = _rpn_outputs(3, 1, anchors.shape[0])
    sizes = torch.tensor(IMAGE_SIZES)
    first = generate_proposals(
        anchors, objectness, deltas, sizes, NUM_ANCHORS_PER_LEVEL, settings, RPN_CODER
    )
    # image 1 replaced by another one (with boxes reaching further, too)
    objectness[1] = other_objectness[0]
    deltas[1] = other_deltas[0] * 3.0
    sizes[1] = torch.tensor([128, 128])
    second = generate_proposals(
        anchors, objectness, deltas, sizes, NUM_ANCHORS_PER_LEVEL, settings, RPN_CODER
    )
    assert not torch.equal(first.boxes[1], second.boxes[1])
    for i in (0, 2):
        assert torch.equal(first.valid[i], second.valid[i])
        assert torch.equal(first.boxes[i], second.boxes[i])
        assert torch.equal(first.scores[i], second.scores[i])


def test_an_image_without_surviving_proposals(anchors):
    objectness, deltas = _rpn_outputs(4, 2, anchors.shape[0])
    objectness[1] = -20.0  # every score under the threshold
    settings = ProposalSettings(pre_nms_topk=100, post_nms_topk=30, score_thresh=0.5)
    sizes = torch.tensor(IMAGE_SIZES[:2])
    proposals = generate_proposals(
        anchors, objectness, deltas, sizes, NUM_ANCHORS_PER_LEVEL, settings, RPN_CODER
    )
    assert int(proposals.valid[0].sum()) == 30
    assert not proposals.valid[1].any()
    assert not proposals.boxes[1].any() and not proposals.scores[1].any()


# ----------------------------------------------------------------------------- proposal targets


def _proposals(seed: int, num_slots: int = 40) -> Proposals:
    """Random proposals around the ground truth of ``targets`` and elsewhere, some slots empty."""
    generator = torch.Generator().manual_seed(seed)
    boxes = torch.stack([_random_boxes(generator, num_slots, size) for size in IMAGE_SIZES])
    valid = torch.ones(3, num_slots, dtype=torch.bool)
    valid[0, 30:] = False
    valid[2, 35:] = False
    boxes = boxes.masked_fill(~valid[..., None], 0.0)
    return Proposals(boxes, torch.rand(3, num_slots, generator=generator), valid)


def _jittered(target: Targets, generator: torch.Generator) -> torch.Tensor:
    """Boxes close to the ground truth, so that some proposals are foreground."""
    return target.boxes + torch.randn(target.boxes.shape, generator=generator) * 3.0


@pytest.fixture(scope="module")
def proposals(targets) -> Proposals:
    result = _proposals(5)
    generator = torch.Generator().manual_seed(6)
    result.boxes[1, :1] = _jittered(targets[1], generator)
    result.boxes[2, :7] = _jittered(targets[2], generator)
    return result


def _filled_rows(samples, i: int) -> list[tuple[float, ...]]:
    """The set of (box, label, target) rows of an image's filled slots, in a canonical order."""
    filled = samples.labels[i] != IGNORE
    rows = torch.cat(
        [
            samples.boxes[i][filled],
            samples.labels[i][filled, None].float(),
            samples.box_targets[i][filled],
        ],
        dim=1,
    )
    return sorted(tuple(row) for row in rows.tolist())


def _slice(proposals: Proposals, i: int) -> Proposals:
    return Proposals(
        proposals.boxes[i : i + 1], proposals.scores[i : i + 1], proposals.valid[i : i + 1]
    )


def test_sample_proposals_batched_equal_per_image(proposals, targets):
    settings = ProposalTargetSettings(batch_size_per_image=1000, positive_fraction=0.5)
    coder = BoxCoder(RCNN_WEIGHTS)
    batched = sample_proposals(proposals, targets, settings, coder)
    for i, target in enumerate(targets):
        alone = sample_proposals(_slice(proposals, i), [target], settings, coder)
        rows = _filled_rows(batched, i)
        assert rows == _filled_rows(alone, 0)
        # every valid proposal and every usable ground-truth box was taken
        num_usable_gt = int((~target.iscrowd).sum())
        assert len(rows) == int(proposals.valid[i].sum()) + num_usable_gt


def test_sampled_rois_labels_and_targets(proposals, targets):
    settings = ProposalTargetSettings(batch_size_per_image=1000, positive_fraction=0.5)
    samples = sample_proposals(proposals, targets, settings, BoxCoder(RCNN_WEIGHTS))
    reference_coder = TorchvisionBoxCoder(RCNN_WEIGHTS)
    for i, target in enumerate(targets):
        filled = samples.labels[i] != IGNORE
        boxes, labels = samples.boxes[i][filled], samples.labels[i][filled]
        box_targets = samples.box_targets[i][filled]
        usable = ~target.iscrowd
        gt_boxes, gt_labels = target.boxes[usable], target.labels[usable]
        if len(gt_boxes) == 0:
            assert (labels == 0).all() and not box_targets.any()
            continue
        # every usable gt box is a sampled RoI, labelled with its own class
        for box, label in zip(gt_boxes, gt_labels):
            same = (boxes == box).all(dim=1)
            assert same.any() and (labels[same] == label).all()
        # foreground RoIs carry the label and the torchvision-encoded target of their best gt
        iou = box_iou(boxes, gt_boxes)
        best_iou, best = iou.max(dim=1)
        foreground = labels > 0
        assert torch.equal(foreground, best_iou >= 0.5)
        assert torch.equal(labels[foreground], gt_labels[best[foreground]])
        expected = reference_coder.encode_single(gt_boxes[best[foreground]], boxes[foreground])
        torch.testing.assert_close(box_targets[foreground], expected, atol=1e-5, rtol=1e-5)
        assert not box_targets[~foreground].any()
        # foreground RoIs come first
        assert (samples.labels[i][: int(foreground.sum())] > 0).all()
        # crowd boxes are never appended (unfilled slots may hold anything: they are ignored)
        for crowd_box in target.boxes[target.iscrowd]:
            assert not (boxes == crowd_box).all(dim=1).any()


def test_sample_proposals_with_real_sampling(proposals, targets):
    settings = ProposalTargetSettings(batch_size_per_image=16, positive_fraction=0.25)
    generator = torch.Generator().manual_seed(0)
    samples = sample_proposals(proposals, targets, settings, BoxCoder(RCNN_WEIGHTS), generator)
    assert samples.labels.shape == (3, 16)
    everything = sample_proposals(
        proposals, targets, ProposalTargetSettings(batch_size_per_image=1000), BoxCoder()
    )
    for i in range(3):
        labels = samples.labels[i]
        num_fg = int((labels > 0).sum())
        assert num_fg <= 4
        assert int((labels != IGNORE).sum()) == 16  # enough background to fill the batch
        assert (labels[:num_fg] > 0).all()
        # each sampled row is one of the candidates, with the same label
        candidates = {
            (tuple(b), int(lab))
            for b, lab in zip(everything.boxes[i].tolist(), everything.labels[i].tolist())
        }
        for box, label in zip(samples.boxes[i].tolist(), labels.tolist()):
            assert (tuple(box), label) in candidates
    assert int((samples.labels[2] > 0).sum()) == 4  # image 2 has more than 4 foreground RoIs


def test_sample_proposals_ignore_the_order_of_ground_truth(proposals, targets):
    settings = ProposalTargetSettings(batch_size_per_image=1000, positive_fraction=0.5)
    coder = BoxCoder(RCNN_WEIGHTS)
    order = torch.tensor([6, 3, 0, 5, 1, 4, 2])
    target = targets[2]
    shuffled = Targets(target.boxes[order], target.labels[order], target.iscrowd[order])
    first = sample_proposals(_slice(proposals, 2), [target], settings, coder)
    second = sample_proposals(_slice(proposals, 2), [shuffled], settings, coder)
    assert _filled_rows(first, 0) == _filled_rows(second, 0)


def test_sample_proposals_with_nothing_to_sample():
    empty = Proposals(torch.zeros(2, 5, 4), torch.zeros(2, 5), torch.zeros(2, 5, dtype=torch.bool))
    crowd_only = Targets(
        torch.tensor([[0.0, 0.0, 50, 50]]), torch.tensor([1]), torch.tensor([True])
    )
    for batch in ([Targets.empty(), Targets.empty()], [crowd_only, Targets.empty()]):
        samples = sample_proposals(empty, batch, ProposalTargetSettings(), BoxCoder())
        assert (samples.labels == IGNORE).all()
        assert not samples.box_targets.any()


# ----------------------------------------------------------------------------- postprocess


def _head_outputs(seed: int, num_images: int, num_slots: int, num_classes: int):
    generator = torch.Generator().manual_seed(seed)
    class_logits = torch.randn((num_images, num_slots, num_classes + 1), generator=generator) * 2
    box_deltas = torch.randn((num_images, num_slots, 4 * (num_classes + 1)), generator=generator)
    return class_logits, box_deltas


def test_postprocess_batched_equal_per_image_and_torchvision(proposals):
    num_classes = 4
    settings = PostprocessSettings(score_thresh=0.05, nms_thresh=0.5, detections_per_image=25)
    class_logits, box_deltas = _head_outputs(0, 3, proposals.boxes.shape[1], num_classes)
    sizes = torch.tensor(IMAGE_SIZES)
    coder = BoxCoder(RCNN_WEIGHTS)
    batched = postprocess_detections(
        class_logits, box_deltas, proposals.boxes, proposals.valid, sizes, settings, coder
    )
    reference = TorchvisionRoIHeads(
        None, None, None, 0.5, 0.5, 512, 0.25, RCNN_WEIGHTS, 0.05, 0.5, 25
    )
    assert len(batched) == 3
    for i in range(3):
        alone = postprocess_detections(
            class_logits[i : i + 1],
            box_deltas[i : i + 1],
            proposals.boxes[i : i + 1],
            proposals.valid[i : i + 1],
            sizes[i : i + 1],
            settings,
            coder,
        )[0]
        assert len(batched[i]) > 0
        assert torch.equal(batched[i].boxes, alone.boxes)
        assert torch.equal(batched[i].scores, alone.scores)
        assert torch.equal(batched[i].labels, alone.labels)
        valid = proposals.valid[i]
        ref_boxes, ref_scores, ref_labels = reference.postprocess_detections(
            class_logits[i][valid],
            box_deltas[i][valid],
            [proposals.boxes[i][valid]],
            [IMAGE_SIZES[i]],
        )
        torch.testing.assert_close(batched[i].boxes, ref_boxes[0], atol=1e-4, rtol=0)
        torch.testing.assert_close(batched[i].scores, ref_scores[0], atol=1e-6, rtol=0)
        assert torch.equal(batched[i].labels, ref_labels[0])


def test_postprocess_of_an_image_ignores_the_other_images(proposals):
    settings = PostprocessSettings(detections_per_image=10)
    class_logits, box_deltas = _head_outputs(1, 3, proposals.boxes.shape[1], 3)
    sizes = torch.tensor(IMAGE_SIZES)
    coder = BoxCoder(RCNN_WEIGHTS)
    first = postprocess_detections(
        class_logits, box_deltas, proposals.boxes, proposals.valid, sizes, settings, coder
    )
    other_logits, other_deltas = _head_outputs(2, 1, proposals.boxes.shape[1], 3)
    class_logits[0], box_deltas[0] = other_logits[0] * 3, other_deltas[0] * 3
    second = postprocess_detections(
        class_logits, box_deltas, proposals.boxes, proposals.valid, sizes, settings, coder
    )
    assert not torch.equal(first[0].scores, second[0].scores)
    for i in (1, 2):
        assert torch.equal(first[i].boxes, second[i].boxes)
        assert torch.equal(first[i].scores, second[i].scores)
        assert torch.equal(first[i].labels, second[i].labels)


def test_postprocess_drops_boxes_clipped_to_nothing_like_torchvision():
    """Boxes are decoded only for candidates above the score threshold, and the ones clipped
    too small are dropped after that (scored -inf for NMS): the detections are torchvision's,
    with high-scoring boxes outside the image among the candidates."""
    generator = torch.Generator().manual_seed(5)
    num_slots, num_classes, size = 12, 3, (64, 80)
    corner = torch.rand(2, num_slots, 2, generator=generator) * 50
    proposals = torch.cat([corner, corner + 8 + torch.rand(2, num_slots, 2) * 20], dim=-1)
    proposals[:, :4] += torch.tensor([100.0, 0.0, 100.0, 0.0])  # right of both images
    class_logits = torch.randn((2, num_slots, num_classes + 1), generator=generator)
    class_logits[:, :4, 2] = 8.0  # the outside ones score high: they would be detections
    box_deltas = torch.randn((2, num_slots, 4 * (num_classes + 1)), generator=generator) * 0.1
    valid = torch.ones(2, num_slots, dtype=torch.bool)
    valid[1, -2:] = False
    settings = PostprocessSettings(score_thresh=0.05, nms_thresh=0.5, detections_per_image=20)
    coder = BoxCoder(RCNN_WEIGHTS)
    sizes = torch.tensor([size, size])
    ours = postprocess_detections(
        class_logits, box_deltas, proposals, valid, sizes, settings, coder
    )
    reference = TorchvisionRoIHeads(
        None, None, None, 0.5, 0.5, 512, 0.25, RCNN_WEIGHTS, 0.05, 0.5, 20
    )
    for i in range(2):
        ref_boxes, ref_scores, ref_labels = reference.postprocess_detections(
            class_logits[i][valid[i]], box_deltas[i][valid[i]], [proposals[i][valid[i]]], [size]
        )
        assert 0 < len(ours[i]) < int(valid[i].sum()) * num_classes
        torch.testing.assert_close(ours[i].boxes, ref_boxes[0], atol=1e-4, rtol=0)
        torch.testing.assert_close(ours[i].scores, ref_scores[0], atol=1e-6, rtol=0)
        assert torch.equal(ours[i].labels, ref_labels[0])
        widths = ours[i].boxes[:, 2] - ours[i].boxes[:, 0]
        assert (widths >= 1e-2).all()
        assert (ours[i].scores < 0.9).all()  # none of the outside boxes


def test_postprocess_without_detections():
    class_logits = torch.zeros(2, 5, 4)
    class_logits[..., 0] = 20.0  # background everywhere: no score above the threshold
    proposals = torch.tensor([[0.0, 0.0, 20.0, 20.0]]).repeat(2, 5, 1)
    detections = postprocess_detections(
        class_logits,
        torch.zeros(2, 5, 16),
        proposals,
        torch.ones(2, 5, dtype=torch.bool),
        torch.tensor([[64, 64], [64, 64]]),
        PostprocessSettings(),
        BoxCoder(RCNN_WEIGHTS),
    )
    assert len(detections) == 2
    for det in detections:
        assert det.boxes.shape == (0, 4)
        assert det.scores.shape == det.labels.shape == (0,)
