"""The sparse RoIAlign kernel against torchvision's RoIAlign: pooled values (sparse_roi_align)
and feature gradients (sparse_roi_align_backward) with boxes inside, across and beyond the map,
degenerate and NaN boxes, images without RoIs."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import roi_align

from frcnn.modeling.roi_heads.sparse_roi_align import (
    bin_weights,
    sparse_roi_align,
    sparse_roi_align_backward,
    transposed_matrix,
)


def _case(dtype: torch.dtype, counts: list[int], seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    num_images, height, width = len(counts), 9, 13
    feature = torch.randn(num_images, 5, height, width, dtype=dtype, generator=generator)
    total = sum(counts)
    corner = torch.rand(total, 2, dtype=dtype, generator=generator) * 70 - 10
    extent = torch.rand(total, 2, dtype=dtype, generator=generator) * 40
    boxes = torch.cat([corner, corner + extent], 1)
    boxes[0] = torch.tensor([-30.0, -30.0, -5.0, -2.0])  # beyond the map: no gradient
    boxes[1] = torch.tensor([5.0, 5.0, 5.0, 5.0])  # zero size
    boxes[2] = torch.tensor([40.0, 20.0, 70.0, 45.0])  # across the right and bottom edges
    index = torch.repeat_interleave(torch.arange(num_images, dtype=dtype), torch.tensor(counts))
    return feature, boxes, torch.cat([index[:, None], boxes], 1)


def _reference_grad(feature, rois, grad_seed: int, sampling_ratio: int, aligned: bool):
    reference = feature.clone().requires_grad_(True)
    pooled = roi_align(reference, rois, 4, 0.25, sampling_ratio, aligned)
    generator = torch.Generator().manual_seed(grad_seed)
    grad = torch.randn(pooled.shape, dtype=pooled.dtype, generator=generator)
    (expected,) = torch.autograd.grad(pooled, reference, grad)
    return grad, expected


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("sampling_ratio", [1, 2, 3])
@pytest.mark.parametrize("aligned", [False, True])
def test_equals_torchvision_roi_align_backward(dtype, tol, sampling_ratio: int, aligned: bool):
    counts = [2, 0, 3, 3]
    feature, boxes, rois = _case(dtype, counts)
    grad, expected = _reference_grad(feature, rois, 1, sampling_ratio, aligned)
    out = torch.full_like(feature, 7.0)
    sparse_roi_align_backward(grad, boxes, counts, 0.25, 4, sampling_ratio, aligned, out)
    with_rois = [0, 2, 3]
    torch.testing.assert_close(out[with_rois], expected[with_rois], rtol=0, atol=tol)
    assert torch.all(out[1] == 7.0)  # an image without RoIs is left as it was
    assert expected[0].abs().sum() > 0 and expected[2:].abs().sum() > 0  # the case has work


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("sampling_ratio", [1, 2, 3])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
def test_pools_torchvision_roi_align_values(dtype, tol, sampling_ratio, aligned, layout) -> None:
    counts = [2, 0, 3, 3]
    feature, boxes, rois = _case(dtype, counts)
    expected = roi_align(feature, rois, 4, 0.25, sampling_ratio, aligned)
    image = rois[:, 0].long()
    pooled = sparse_roi_align(
        feature.contiguous(memory_format=layout), image, boxes, 0.25, 4, sampling_ratio, aligned
    )
    assert pooled.dtype == dtype and pooled.shape == expected.shape
    # the embedding_bag rows as they are: (M, Ch, P, P) laid out (M, P, P, Ch)
    assert pooled.is_contiguous(memory_format=torch.channels_last) and not pooled.is_contiguous()
    torch.testing.assert_close(pooled, expected, rtol=0, atol=tol)
    assert torch.all(pooled[0] == 0) and pooled[2:].abs().sum() > 0  # beyond the map: zeros


def test_pooled_values_are_deterministic_and_a_nan_box_pools_zeros() -> None:
    feature, boxes, rois = _case(torch.float32, [6])
    boxes[1] = float("nan")
    image = torch.zeros(6, dtype=torch.int64)
    first = sparse_roi_align(feature, image, boxes, 0.25, 4, 2, False)
    second = sparse_roi_align(feature, image, boxes, 0.25, 4, 2, False)
    assert torch.equal(first, second)
    assert torch.all(first[1] == 0)


def test_is_deterministic_and_nan_box_takes_no_gradient() -> None:
    feature, boxes, rois = _case(torch.float32, [6])
    boxes[1] = float("nan")
    grad = torch.randn(6, 5, 4, 4)
    first, second = torch.empty_like(feature), torch.empty_like(feature)
    sparse_roi_align_backward(grad, boxes, [6], 0.25, 4, 2, False, first)
    sparse_roi_align_backward(grad, boxes, [6], 0.25, 4, 2, False, second)
    assert torch.equal(first, second)
    only_nan = torch.zeros_like(grad)
    only_nan[1] = 1.0
    sparse_roi_align_backward(only_nan, boxes, [6], 0.25, 4, 2, False, first)
    assert torch.all(first == 0)


def test_bin_weights_sum_to_the_share_of_samples_inside() -> None:
    """Each bin's weights sum to the fraction of its s x s samples that read the map (bilinear
    weights sum to 1 per sample): 1 inside, 0 beyond, between across the edge."""
    boxes = torch.tensor([[8.0, 8.0, 30.0, 24.0], [-40.0, -40.0, -8.0, -8.0], [-8, 10, 8, 20.0]])
    index, weight = bin_weights(boxes, 0.25, 4, 2, True, 9, 13)
    sums = weight.sum(-1)  # (M, P * P)
    torch.testing.assert_close(sums[0], torch.ones(16))
    assert torch.all(sums[1] == 0)
    # x from -2.5 to 1.5 pixels: the bins' samples at -2.25, -1.75 | -1.25, -0.75 | ... read
    # the map (within one pixel of it) none, one, both, both
    assert torch.equal(sums[2].reshape(4, 4), torch.tensor([0.0, 0.5, 1.0, 1.0]).expand(4, 4))
    assert index.min() >= 0 and index.max() < 9 * 13
    matrix = transposed_matrix(index[0], weight[0], 9 * 13).to_dense()  # (pixels, bins)
    torch.testing.assert_close(matrix.sum(0), torch.ones(16))
