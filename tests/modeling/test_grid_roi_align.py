"""grid_roi_align against torchvision.ops.roi_align: values and feature gradients, with boxes
inside, across and beyond the map, degenerate and NaN boxes, images without RoIs."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import roi_align

from frcnn.modeling.roi_heads.grid_roi_align import (
    equal_count_runs,
    grid_roi_align,
    grid_roi_align_backward,
    sampling_grid,
)


def _case(dtype: torch.dtype, counts: list[int], seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    num_images, height, width = len(counts), 9, 13
    feature = torch.randn(num_images, 5, height, width, dtype=dtype, generator=generator)
    total = sum(counts)
    corner = torch.rand(total, 2, dtype=dtype, generator=generator) * 70 - 10
    extent = torch.rand(total, 2, dtype=dtype, generator=generator) * 40
    boxes = torch.cat([corner, corner + extent], 1)
    boxes[0] = torch.tensor([-30.0, -30.0, -5.0, -2.0])  # beyond the map: reads 0
    boxes[1] = torch.tensor([5.0, 5.0, 5.0, 5.0])  # zero size
    boxes[2] = torch.tensor([40.0, 20.0, 70.0, 45.0])  # across the right and bottom edges
    index = torch.repeat_interleave(torch.arange(num_images, dtype=dtype), torch.tensor(counts))
    return feature, boxes, torch.cat([index[:, None], boxes], 1), (height, width)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("sampling_ratio", [1, 2, 3])
@pytest.mark.parametrize("aligned", [False, True])
def test_equals_torchvision_roi_align(dtype, tol, sampling_ratio: int, aligned: bool) -> None:
    counts = [2, 0, 3, 3]
    feature, boxes, rois, (height, width) = _case(dtype, counts)
    reference = feature.clone().requires_grad_(True)
    expected = roi_align(reference, rois, 4, 0.25, sampling_ratio, aligned)
    grad = torch.randn_like(expected)
    (expected_grad,) = torch.autograd.grad(expected, reference, grad)
    grid = sampling_grid(boxes, 0.25, 4, sampling_ratio, aligned, height, width)
    pooled = grid_roi_align(feature, grid, counts, 4, sampling_ratio)
    feature_grad = grid_roi_align_backward(grad, feature, grid, counts, 4, sampling_ratio)
    assert pooled.shape == expected.shape and feature_grad.shape == feature.shape
    torch.testing.assert_close(pooled, expected, rtol=0, atol=tol)
    torch.testing.assert_close(feature_grad, expected_grad, rtol=0, atol=tol)
    assert torch.all(pooled[0] == 0)  # the box beyond the map
    assert torch.all(feature_grad[1] == 0)  # the image without RoIs


def test_nan_box_reads_zero_and_takes_no_gradient() -> None:
    feature, boxes, _, (height, width) = _case(torch.float32, [3])
    boxes[1] = float("nan")
    grid = sampling_grid(boxes, 0.25, 4, 2, False, height, width)
    pooled = grid_roi_align(feature, grid, [3], 4, 2)
    assert torch.all(pooled[1] == 0) and torch.isfinite(pooled).all()
    grad = torch.zeros_like(pooled)
    grad[1] = 1.0
    assert torch.all(grid_roi_align_backward(grad, feature, grid, [3], 4, 2) == 0)


def test_equal_count_runs() -> None:
    assert equal_count_runs([3, 3, 5, 0, 2, 2]) == [(0, 2, 0, 6), (2, 3, 6, 11), (4, 6, 11, 15)]
    assert equal_count_runs([0, 0]) == []
    assert equal_count_runs([4, 0, 4]) == [(0, 1, 0, 4), (2, 3, 4, 8)]
