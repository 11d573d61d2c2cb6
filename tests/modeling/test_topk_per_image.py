"""NMS over ranges of images: how the batch is cut into calls, and that the cut does not change
which boxes survive."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import batched_nms

from frcnn.engine.sync_count import count_host_syncs
from frcnn.modeling import parallel, topk_per_image
from frcnn.modeling.topk_per_image import call_ranges, gather_flat, nms_per_group, pack_images


def test_a_cpu_call_per_thread_whatever_the_candidate_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(parallel, "num_workers", lambda device: 2)
    assert call_ranges(torch.ones(8, 10**5, dtype=torch.bool)) == [(0, 4), (4, 8)]
    assert call_ranges(torch.ones(1, 10, dtype=torch.bool)) == [(0, 1)]


def test_images_are_packed_under_the_cap() -> None:
    assert pack_images([8800] * 8, 20000) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert pack_images([300, 50000, 10, 10], 20000) == [(0, 1), (1, 2), (2, 4)]
    assert pack_images([0] * 5, 20000) == [(0, 5)]
    assert pack_images([], 20000) == []


def test_gather_flat_reads_views_as_their_flattened_copies() -> None:
    generator = torch.Generator().manual_seed(4)
    base = torch.randn(3, 5, 7, 4, generator=generator)
    index = torch.tensor([0, 6, 34, 104, 3 * 5 * 7 - 1, 6])
    shape = torch.Size((3, 5, 7))
    cases = {
        "contiguous": base,
        "sliced": base[..., 1:3],  # not contiguous
        "expanded": base[:, :1].expand(-1, 5, -1, -1),  # stride 0
        "no trailing dims": base[..., 2],
    }
    for name, values in cases.items():
        expected = values.reshape(-1, *values.shape[3:])[index]
        assert torch.equal(gather_flat(values, index, shape), expected), name


def _candidates(num_images: int, per_image: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    corner = torch.rand(num_images, per_image, 2, generator=generator) * 100
    extent = 5 + torch.rand(num_images, per_image, 2, generator=generator) * 40
    boxes = torch.cat([corner, corner + extent], -1)
    scores = torch.rand(num_images, per_image, generator=generator)
    levels = torch.randint(0, 3, (num_images, per_image), generator=generator)
    groups = torch.arange(num_images)[:, None] * 3 + levels
    usable = torch.rand(num_images, per_image, generator=generator) > 0.2
    return boxes, scores, groups, usable


@pytest.mark.parametrize("one_call", [True, False])
@pytest.mark.parametrize("cap_images", [2, 0.5], ids=["two-images-per-call", "over-the-cap"])
def test_capped_calls_keep_the_same_boxes(
    monkeypatch: pytest.MonkeyPatch, one_call: bool, cap_images: float
) -> None:
    num_images, per_image = 5, 60
    boxes, scores, groups, usable = _candidates(num_images, per_image)
    whole = nms_per_group(boxes, scores, groups, usable, 0.5, one_call)
    # a GPU-like cap: two images' usable candidates per call, or half an image (each image alone,
    # and over the cap: batched_nms)
    cap = int(cap_images * per_image)
    monkeypatch.setattr(topk_per_image, "_candidate_cap", lambda device: cap)
    assert len(call_ranges(usable)) >= 3
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


def test_gpu_like_host_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """One worker (an accelerator): 2 reads for the batch under the cap; above it, one read of
    the per-image counts and 2 per packed call."""
    monkeypatch.setattr(parallel, "num_workers", lambda device: 1)
    boxes, scores, groups, usable = _candidates(6, 50)
    monkeypatch.setattr(topk_per_image, "_candidate_cap", lambda device: 6 * 50)
    with count_host_syncs() as syncs:
        nms_per_group(boxes, scores, groups, usable, 0.5)
    assert syncs.total == 2, syncs
    monkeypatch.setattr(topk_per_image, "_candidate_cap", lambda device: 100)  # 2 images a call
    calls = len(call_ranges(usable))
    assert calls == 3
    with count_host_syncs() as syncs:
        nms_per_group(boxes, scores, groups, usable, 0.5)
    assert syncs.total == 1 + 2 * calls, syncs
