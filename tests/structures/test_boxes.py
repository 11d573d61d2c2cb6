"""Box math against torchvision (BoxCoder, box_iou, clip_boxes_to_image) and hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder as TorchvisionBoxCoder
from torchvision.ops import box_iou, clip_boxes_to_image

from frcnn.structures import BoxCoder, batch_images, batched_box_iou, box_ioa, clip_boxes

WEIGHTS = [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0), (2.0, 3.0, 0.5, 7.0)]


@pytest.mark.parametrize("weights", WEIGHTS)
def test_encode_decode_round_trip(random_boxes, weights):
    reference = random_boxes(64)
    target = random_boxes(64)
    coder = BoxCoder(weights)
    decoded = coder.decode(coder.encode(reference, target), reference)
    torch.testing.assert_close(decoded, target, atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("weights", WEIGHTS)
def test_encode_matches_torchvision(random_boxes, weights):
    anchors = random_boxes(100)
    gt = random_boxes(100)
    ours = BoxCoder(weights).encode(anchors, gt)
    # torchvision's argument order: (boxes to reach, reference boxes)
    theirs = TorchvisionBoxCoder(weights).encode_single(gt, anchors)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("num_classes", [1, 3])
def test_decode_matches_torchvision(random_boxes, weights, num_classes):
    generator = torch.Generator().manual_seed(1)
    reference = random_boxes(50)
    deltas = torch.randn((50, 4 * num_classes), generator=generator) * 2.0
    ours = BoxCoder(weights).decode(deltas, reference)
    theirs = TorchvisionBoxCoder(weights).decode_single(deltas, reference)
    assert ours.shape == (50, 4 * num_classes)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_decode_clamps_huge_size_deltas():
    reference = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    deltas = torch.tensor([[0.0, 0.0, 1e4, 1e4]])  # exp(1e4) is inf in float32
    boxes = BoxCoder().decode(deltas, reference)
    assert torch.isfinite(boxes).all()
    # width clamped to 16 * exp(log(1000 / 16)) = 1000 around the centre (8, 8)
    torch.testing.assert_close(boxes, torch.tensor([[-492.0, -492.0, 508.0, 508.0]]))


def test_decode_clamp_applies_after_the_weights():
    reference = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    # dw / ww = 100 is clamped, dh / wh = log(2) is not
    boxes = coder.decode(torch.tensor([[0.0, 0.0, 500.0, 5.0 * math.log(2.0)]]), reference)
    torch.testing.assert_close(boxes, torch.tensor([[-492.0, -8.0, 508.0, 24.0]]))


def test_decode_of_class_specific_deltas_keeps_leading_dims(random_boxes):
    reference = random_boxes(2, 5)
    deltas = torch.randn((2, 5, 4 * 7), generator=torch.Generator().manual_seed(2))
    boxes = BoxCoder((10.0, 10.0, 5.0, 5.0)).decode(deltas, reference)
    assert boxes.shape == (2, 5, 28)
    # class c of RoI (i, j) is the class-agnostic decode of its own 4 deltas
    single = BoxCoder((10.0, 10.0, 5.0, 5.0)).decode(deltas[1, 3, 8:12], reference[1, 3])
    torch.testing.assert_close(boxes[1, 3, 8:12], single)


def test_decode_is_float32_for_half_inputs(random_boxes):
    reference = random_boxes(8).to(torch.bfloat16)
    deltas = torch.zeros((8, 4), dtype=torch.bfloat16)
    coder = BoxCoder()
    assert coder.decode(deltas, reference).dtype == torch.float32
    assert coder.encode(reference, reference).dtype == torch.float32


def test_decode_with_a_gradient_equals_the_decode_without(random_boxes):
    """decode writes its corners in place when no gradient is wanted and stacks them when one
    is: the same boxes, and the gradient of the stacked form flows to the deltas."""
    reference = random_boxes(6, 5)
    deltas = torch.randn((6, 5, 12), generator=torch.Generator().manual_seed(3))
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    with torch.no_grad():
        plain = coder.decode(deltas, reference)
    wanted = deltas.clone().requires_grad_()
    traced = coder.decode(wanted, reference)
    assert traced.requires_grad and torch.equal(traced.detach(), plain)
    traced[..., 0].sum().backward()
    # class 0's x1 = cx - w/2: d x1 / d dx = ref_w / wx, d x1 / d dw = -(w/2) / ww < 0, and
    # nothing from its dy, dh or the other classes' deltas
    ref_w = reference[..., 2] - reference[..., 0]
    torch.testing.assert_close(wanted.grad[..., 0], ref_w / 10.0)
    assert (wanted.grad[..., 2] < 0).all()
    assert not wanted.grad[..., 1].any() and not wanted.grad[..., 3:].any()


def test_decode_leaves_its_inputs_alone_and_broadcasts_both_ways(random_boxes):
    """The no-gradient decode works in place in its own temporaries only, and a reference that
    broadcasts past the deltas (one set of deltas for several reference sets) still decodes."""
    reference = random_boxes(3, 5)
    deltas = torch.randn((5, 8), generator=torch.Generator().manual_seed(4))
    kept_deltas, kept_reference = deltas.clone(), reference.clone()
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    boxes = coder.decode(deltas, reference)  # (5, 8) against (3, 5, 4) -> (3, 5, 8)
    assert torch.equal(deltas, kept_deltas) and torch.equal(reference, kept_reference)
    assert boxes.shape == (3, 5, 8)
    for i in range(3):
        assert torch.equal(boxes[i], coder.decode(deltas, reference[i]))
    expected = TorchvisionBoxCoder((10.0, 10.0, 5.0, 5.0)).decode_single(deltas, reference[1])
    torch.testing.assert_close(boxes[1], expected)


def test_box_coder_rejects_wrong_number_of_weights():
    with pytest.raises(ValueError, match="4 weights"):
        BoxCoder((1.0, 1.0, 1.0))


def test_batched_box_iou_equals_torchvision_on_flat_sets(random_boxes):
    boxes1 = random_boxes(13)
    boxes2 = random_boxes(17)
    torch.testing.assert_close(batched_box_iou(boxes1, boxes2), box_iou(boxes1, boxes2))


def test_batched_box_iou_equals_torchvision_per_image(random_boxes):
    boxes1 = random_boxes(3, 11)
    boxes2 = random_boxes(3, 6)
    iou = batched_box_iou(boxes1, boxes2)
    assert iou.shape == (3, 11, 6)
    assert (iou > 0).any()  # the sets overlap somewhere, so the comparison means something
    for i in range(3):
        torch.testing.assert_close(iou[i], box_iou(boxes1[i], boxes2[i]))


def test_box_iou_hand_case():
    boxes1 = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    boxes2 = torch.tensor([[5.0, 0.0, 15.0, 10.0], [0.0, 0.0, 10.0, 10.0], [20.0, 20, 30, 30]])
    # 50 / (100 + 100 - 50) = 1/3; identical boxes 1; disjoint 0
    expected = torch.tensor([[1.0 / 3.0, 1.0, 0.0]])
    torch.testing.assert_close(batched_box_iou(boxes1, boxes2), expected)


def test_degenerate_boxes_have_zero_iou_not_nan():
    point = torch.tensor([[[5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 10.0, 0.0]]])  # (1, 2, 4)
    others = torch.tensor([[[5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 10.0, 10.0]]])
    iou = batched_box_iou(point, others)
    assert not torch.isnan(iou).any()
    assert torch.equal(iou, torch.zeros(1, 2, 2))


def test_box_ioa_hand_case():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [2.0, 2.0, 4.0, 4.0], [3.0, 3.0, 3.0, 8.0]])
    regions = torch.tensor([[5.0, 0.0, 20.0, 10.0], [0.0, 0.0, 100.0, 100.0]])
    # half of box 0 lies in region 0, all of it in region 1; box 1 is inside region 1 only;
    # box 2 has no area, so 0 rather than NaN
    expected = torch.tensor([[0.5, 1.0], [0.0, 1.0], [0.0, 0.0]])
    torch.testing.assert_close(box_ioa(boxes, regions), expected)


def test_clip_boxes_with_int_size():
    boxes = torch.tensor([[-5.0, -3.0, 100.0, 60.0], [10.0, 20.0, 30.0, 40.0]])
    clipped = clip_boxes(boxes, (50, 80))  # (height, width)
    expected = torch.tensor([[0.0, 0.0, 80.0, 50.0], [10.0, 20.0, 30.0, 40.0]])
    torch.testing.assert_close(clipped, expected)
    torch.testing.assert_close(clipped, clip_boxes_to_image(boxes, (50, 80)))


def test_clip_boxes_with_per_image_size_tensor(random_boxes):
    boxes = random_boxes(3, 20) - 40.0  # some corners negative, some past the image
    sizes = torch.tensor([[60, 90], [150, 40], [200, 200]])  # (N, 2) of (height, width)
    clipped = clip_boxes(boxes, sizes[:, None, :])
    assert clipped.shape == boxes.shape
    for i in range(3):
        expected = clip_boxes_to_image(boxes[i], tuple(sizes[i].tolist()))
        torch.testing.assert_close(clipped[i], expected)
    assert not torch.equal(clipped, boxes)


def test_clip_boxes_leaves_its_input_alone_and_passes_gradients(random_boxes):
    boxes = (random_boxes(4, 10) - 40.0).requires_grad_()
    before = boxes.detach().clone()
    clipped = clip_boxes(boxes, torch.tensor([[60, 90]] * 4)[:, None, :])
    assert torch.equal(boxes.detach(), before)
    clipped.sum().backward()
    # gradient 1 where a coordinate is inside the image, 0 where it was clipped
    limits = torch.tensor([90.0, 60.0, 90.0, 60.0])
    inside = (before > 0) & (before < limits)
    assert inside.any() and (~inside).any()
    assert torch.equal(boxes.grad, inside.float())


def test_clip_one_box_per_image_with_an_n_by_2_size_tensor():
    boxes = torch.tensor([[-5.0, -3.0, 100.0, 60.0], [-5.0, -3.0, 100.0, 60.0]])
    sizes = torch.tensor([[50, 80], [70, 30]])
    expected = torch.tensor([[0.0, 0.0, 80.0, 50.0], [0.0, 0.0, 30.0, 60.0]])
    torch.testing.assert_close(clip_boxes(boxes, sizes), expected)


def test_batch_images_pads_to_multiple_of_32_and_keeps_sizes():
    images = [torch.rand(3, 50, 70), torch.rand(3, 64, 33)]
    batch = batch_images(images, size_divisibility=32)
    assert batch.tensor.shape == (2, 3, 64, 96)
    assert batch.image_sizes == [(50, 70), (64, 33)]
    assert torch.equal(batch.tensor[0, :, :50, :70], images[0])
    assert torch.equal(batch.tensor[1, :, :64, :33], images[1])
    assert batch.tensor[0, :, 50:].abs().sum() == 0
    assert batch.tensor[1, :, :, 33:].abs().sum() == 0
    assert torch.equal(batch.sizes_tensor(), torch.tensor([[50, 70], [64, 33]]))


def test_batch_images_without_divisibility_and_with_pad_value():
    batch = batch_images([torch.ones(1, 5, 7), torch.ones(1, 6, 3)], pad_value=-1.0)
    assert batch.tensor.shape == (2, 1, 6, 7)
    assert batch.tensor[1, 0, 0, 3:].eq(-1.0).all()
    with pytest.raises(ValueError):
        batch_images([])
