"""Transforms: the resize equals torchvision's GeneralizedRCNNTransform; the flip, by hand."""

from __future__ import annotations

import pytest
import torch
from torchvision import tv_tensors
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from frcnn.datasets import RandomHorizontalFlip, ResizeShortestEdge, build_transforms, resized_size

SIZES = [(375, 500), (500, 333), (97, 1000), (600, 600), (427, 640), (481, 359), (1, 7), (33, 2)]


def _boxes(height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    xy = torch.rand(5, 2, 2, generator=generator) * torch.tensor([width, height])
    return torch.cat((xy.min(dim=1).values, xy.max(dim=1).values), dim=1)


def _ours(image: torch.Tensor, boxes: torch.Tensor, min_size: int, max_size: int):
    height, width = image.shape[-2:]
    return ResizeShortestEdge([min_size], max_size)(
        tv_tensors.Image(image),
        tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
    )


@pytest.mark.parametrize(("min_size", "max_size"), [(600, 1000), (800, 1333), (224, 224)])
def test_resize_matches_torchvision(min_size: int, max_size: int) -> None:
    reference = GeneralizedRCNNTransform(min_size, max_size, [0.0] * 3, [1.0] * 3).eval()
    generator = torch.Generator().manual_seed(0)
    for height, width in SIZES:
        image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)
        boxes = _boxes(height, width, generator)
        expected_images, expected_targets = reference(
            [image.float() / 255], [{"boxes": boxes.clone(), "labels": torch.ones(5)}]
        )
        out_image, out_boxes = _ours(image, boxes, min_size, max_size)
        expected_size = tuple(expected_images.image_sizes[0])
        assert tuple(out_image.shape[-2:]) == expected_size
        assert resized_size(height, width, min_size, max_size) == expected_size
        torch.testing.assert_close(
            out_boxes.as_subclass(torch.Tensor), expected_targets[0]["boxes"]
        )
        # Same bilinear, no antialias: the same pixels up to one level of uint8 rounding.
        h, w = expected_size
        expected_pixels = expected_images.tensors[0, :, :h, :w]
        assert (out_image.float() / 255 - expected_pixels).abs().max() <= 1.01 / 255


def test_multi_scale_draws_every_size_reproducibly() -> None:
    resize = ResizeShortestEdge([50, 60, 70], 1000)
    image = tv_tensors.Image(torch.zeros(3, 20, 30, dtype=torch.uint8))

    def draws() -> list[int]:
        return [int(resize(image).shape[-2]) for _ in range(30)]

    torch.manual_seed(3)
    first = draws()
    torch.manual_seed(3)
    assert draws() == first
    assert set(first) == {50, 60, 70}


def test_flip_hand_case() -> None:
    image = torch.zeros(3, 4, 10, dtype=torch.uint8)
    image[:, :, 0] = 255
    boxes = tv_tensors.BoundingBoxes(
        torch.tensor([[1.0, 2.0, 4.0, 6.0], [0.0, 0.0, 10.0, 4.0]]),
        format="XYXY",
        canvas_size=(4, 10),
    )
    out_image, out_boxes = RandomHorizontalFlip(1.0)(tv_tensors.Image(image), boxes)
    # x -> 10 - x, and x1 / x2 swap roles.
    assert out_boxes.tolist() == [[6.0, 2.0, 9.0, 6.0], [0.0, 0.0, 10.0, 4.0]]
    assert out_image[:, :, 9].eq(255).all() and out_image[:, :, :9].eq(0).all()
    same_image, same_boxes = RandomHorizontalFlip(0.0)(tv_tensors.Image(image), boxes)
    assert torch.equal(same_image, image) and torch.equal(same_boxes, boxes)


def test_build_transforms() -> None:
    image = tv_tensors.Image(torch.zeros(3, 100, 200, dtype=torch.uint8))
    boxes = tv_tensors.BoundingBoxes(
        torch.tensor([[0.0, 0.0, 50.0, 50.0]]), format="XYXY", canvas_size=(100, 200)
    )
    test = build_transforms([40, 50], 1000, 0.5, is_train=False)
    assert len(test.transforms) == 1  # no flip at test time
    for _ in range(5):
        out_image, out_boxes = test(image, boxes)
        assert out_image.shape[-2:] == (50, 100)  # torchvision's eval rule: the last size
        assert out_boxes.tolist() == [[0.0, 0.0, 25.0, 25.0]]
    train = build_transforms([40, 50], 1000, 0.5, is_train=True)
    assert isinstance(train.transforms[-1], RandomHorizontalFlip)
    assert len(build_transforms(40, 1000, 0.0, is_train=True).transforms) == 1
    with pytest.raises(ValueError, match="positive"):
        ResizeShortestEdge([], 1000)
