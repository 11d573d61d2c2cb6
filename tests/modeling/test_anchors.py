"""AnchorGenerator against torchvision's AnchorGenerator: same anchors, same order."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TorchvisionAnchors
from torchvision.models.detection.image_list import ImageList as TorchvisionImageList

from frcnn.modeling.anchors import AnchorGenerator, cell_anchors

CPU = torch.device("cpu")
RATIOS = (0.5, 1.0, 2.0)


def _torchvision_anchors(sizes, aspect_ratios, image_size, feature_sizes) -> torch.Tensor:
    generator = TorchvisionAnchors(tuple(map(tuple, sizes)), tuple(map(tuple, aspect_ratios)))
    images = TorchvisionImageList(torch.zeros(1, 3, *image_size), [tuple(image_size)])
    features = [torch.zeros(1, 1, h, w) for h, w in feature_sizes]
    return generator(images, features)[0]


CASES = {
    # torchvision's FPN: five levels, one size each, strides 4..64
    "fpn": (
        [[32], [64], [128], [256], [512]],
        [RATIOS] * 5,
        (128, 192),
        [(32, 48), (16, 24), (8, 12), (4, 6), (2, 3)],
    ),
    # jwyang's VGG16: one level at stride 16, scales 8/16/32 x ratios 0.5/1/2
    "vgg16": ([[128, 256, 512]], [RATIOS], (224, 160), [(14, 10)]),
    # torchvision's mobilenet_v3_large_fpn: three levels of five sizes
    "mobilenet": (
        [[32, 64, 128, 256, 512]] * 3,
        [RATIOS] * 3,
        (320, 448),
        [(10, 14), (5, 7), (3, 4)],
    ),
    # a padded size the feature maps do not divide: strides come from integer division
    "uneven": ([[40, 80]], [[0.25, 1.0]], (100, 150), [(7, 10)]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_anchors_equal_torchvision(name):
    sizes, ratios, image_size, feature_sizes = CASES[name]
    ours = AnchorGenerator(sizes, ratios)(image_size, feature_sizes, CPU)
    theirs = _torchvision_anchors(sizes, ratios, image_size, feature_sizes)
    expected_count = sum(h * w for h, w in feature_sizes) * len(sizes[0]) * len(ratios[0])
    assert ours.shape == (expected_count, 4)
    assert torch.equal(ours, theirs)  # element for element: the order is part of the contract


def test_one_ratio_list_serves_every_level():
    sizes, ratios, image_size, feature_sizes = CASES["fpn"]
    shared = AnchorGenerator(sizes, [RATIOS])(image_size, feature_sizes, CPU)
    per_level = AnchorGenerator(sizes, ratios)(image_size, feature_sizes, CPU)
    assert torch.equal(shared, per_level)


def test_cell_anchors_hand_case():
    # ratio 0.5 (h/w) of size 16: w = 16 * sqrt(2) = 22.6, h = 11.3 -> corners rounded
    anchors = cell_anchors([16], [0.5, 1.0])
    expected = torch.tensor([[-11.0, -6.0, 11.0, 6.0], [-8.0, -8.0, 8.0, 8.0]])
    assert torch.equal(anchors, expected)


def test_first_location_and_stride_by_hand():
    generator = AnchorGenerator([[16]], [[1.0]])
    anchors = generator((64, 96), [(4, 3)], CPU)  # strides 16 (rows) and 32 (columns)
    assert anchors.shape == (12, 4)
    assert torch.equal(anchors[0], torch.tensor([-8.0, -8.0, 8.0, 8.0]))
    assert torch.equal(anchors[1], torch.tensor([24.0, -8.0, 40.0, 8.0]))  # next column
    assert torch.equal(anchors[3], torch.tensor([-8.0, 8.0, 8.0, 24.0]))  # next row


def test_num_anchors_per_location():
    assert AnchorGenerator([[32], [64]], [RATIOS]).num_anchors_per_location == [3, 3]
    assert AnchorGenerator([[128, 256, 512]], [RATIOS]).num_anchors_per_location == [9]


def test_cache_returns_the_same_tensor_for_the_same_sizes():
    generator = AnchorGenerator([[32], [64]], [RATIOS])
    first = generator((64, 64), [(16, 16), (8, 8)], CPU)
    again = generator((64, 64), [(16, 16), (8, 8)], CPU)
    other = generator((96, 64), [(24, 16), (12, 8)], CPU)
    assert again is first
    assert other is not first
    assert other.shape[0] == (24 * 16 + 12 * 8) * 3
    assert generator((64, 64), [(16, 16), (8, 8)], CPU) is first


def test_mismatched_level_count_raises_a_clear_error():
    generator = AnchorGenerator([[32], [64], [128]], [RATIOS])
    with pytest.raises(ValueError, match=r"3 feature levels.*gives 2.*model\.anchors\.sizes"):
        generator((64, 64), [(16, 16), (8, 8)], CPU)


def test_mismatched_aspect_ratio_lists_raise():
    with pytest.raises(ValueError, match="aspect ratios"):
        AnchorGenerator([[32], [64], [128]], [RATIOS, RATIOS])
