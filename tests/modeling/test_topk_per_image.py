"""NMS over ranges of images: how the batch is cut into calls, and that the cut does not change
which boxes survive."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import batched_nms

from frcnn.modeling import parallel, topk_per_image
from frcnn.modeling.topk_per_image import MAX_CANDIDATES_PER_CALL, call_ranges, nms_per_group


def test_a_cpu_call_per_thread_whatever_the_candidate_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(parallel, "num_workers", lambda device: 2)
    cpu = torch.device("cpu")
    assert call_ranges(8, 10**6, cpu) == [(0, 4), (4, 8)]
    assert call_ranges(1, 10, cpu) == [(0, 1)]


def test_gpu_calls_hold_at_most_the_cap() -> None:
    cuda = torch.device("cuda")  # only the device type is read: no GPU needed
    assert call_ranges(8, 600, cuda) == [(0, 8)]  # the quick start: one call
    per_image = 8800  # R50-FPN at 800 x 1333: 4 x 2000 + P6
    ranges = call_ranges(8, per_image, cuda)
    assert ranges == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert all((end - first) * per_image <= MAX_CANDIDATES_PER_CALL for first, end in ranges)
    assert call_ranges(3, 3 * MAX_CANDIDATES_PER_CALL, cuda) == [(0, 1), (1, 2), (2, 3)]
    assert call_ranges(0, 100, cuda) == []


@pytest.mark.parametrize("one_call", [True, False])
def test_capped_calls_keep_the_same_boxes(monkeypatch: pytest.MonkeyPatch, one_call: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    num_images, per_image = 5, 60
    corner = torch.rand(num_images, per_image, 2, generator=generator) * 100
    boxes = torch.cat([corner, corner + 5 + torch.rand(num_images, per_image, 2) * 40], -1)
    scores = torch.rand(num_images, per_image, generator=generator)
    levels = torch.randint(0, 3, (num_images, per_image), generator=generator)
    groups = torch.arange(num_images)[:, None] * 3 + levels
    usable = torch.rand(num_images, per_image, generator=generator) > 0.2
    whole = nms_per_group(boxes, scores, groups, usable, 0.5, one_call)
    # a GPU-like cap of two images per call
    monkeypatch.setattr(topk_per_image, "_candidate_cap", lambda device: 2 * per_image)
    assert len(call_ranges(num_images, per_image, boxes.device)) >= 3
    capped = nms_per_group(boxes, scores, groups, usable, 0.5, one_call)
    # the contract: the same boxes, each image's in the same (decreasing score) order
    for image in range(num_images):
        mine = [kept[kept // per_image == image] for kept in (capped, whole)]
        assert mine[0].numel() > 0 and torch.equal(mine[0], mine[1]), image
    # and both are torchvision's batched_nms over the usable boxes
    flat = torch.nonzero(usable.reshape(-1)).squeeze(1)
    expected = flat[
        batched_nms(
            boxes.reshape(-1, 4)[flat].double(),
            scores.reshape(-1)[flat].double(),
            groups.reshape(-1)[flat],
            0.5,
        )
    ]
    assert torch.equal(torch.sort(capped).values, torch.sort(expected).values)
