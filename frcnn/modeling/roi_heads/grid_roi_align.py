"""RoIAlign as bilinear grid sampling: torchvision's ``roi_align`` computed with PyTorch's
vectorised ``grid_sample`` kernels (a speed setting, ``model.roi_heads.roi_align_kernel``).

Shapes: k images, M RoIs, Ch channels, H x W the feature map, P x P the pooled size, s the
sampling ratio (s x s points per bin), Ps = P * s.

RoIAlign (Mask R-CNN) averages, in each of a RoI's P x P bins, s x s bilinear samples of the
feature map. Those sample points form a regular grid per RoI, so the pooled rows are
``grid_sample`` of the RoIs' images at those points, averaged over s x s blocks. torchvision's CPU
backward recomputes each sample's bilinear weights for every channel, one scalar at a time;
``grid_sample``'s CPU backward works on vectors of points, several times faster.

torchvision's edge rules are kept: a sample more than one pixel outside the map counts as 0, one
within that pixel reads the edge (its coordinate is clamped), and the bin still divides by
s * s. The clamped coordinates meet ``grid_sample``'s own interpolation, with zero padding for
the far-out points. The coordinates pass through grid_sample's [-1, 1] normalisation, so the
results agree with torchvision's to float rounding (about 1e-6 of the features' range), not
bitwise. An adaptive sampling ratio (0: ceil(RoI size / P) points per bin, different for every
RoI) has no fixed grid and is not offered.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# grid_sample's enum values for mode="bilinear", padding_mode="zeros"
_BILINEAR, _ZEROS = 0, 0
# a normalised coordinate whose four neighbours all lie outside the map: the sample reads 0
_OUTSIDE = -3.0


def sampling_grid(
    boxes: Tensor,
    scale: float,
    size: int,
    sampling_ratio: int,
    aligned: bool,
    height: int,
    width: int,
) -> Tensor:
    """``boxes`` (M, 4) in image pixels -> (M, Ps, Ps, 2) grid_sample coordinates (x, y) in
    [-1, 1] of each RoI's sample points, row-major over (bin row, sample row) x (bin column,
    sample column), as torchvision's RoIAlign places them."""
    offset = 0.5 if aligned else 0.0
    corners = boxes * scale - offset  # (M, 4) in feature pixels, pixel centres at integers
    extent = corners[:, 2:] - corners[:, :2]  # (M, 2) width, height
    if not aligned:
        extent = extent.clamp(min=1.0)  # legacy RoIAlign: RoIs at least one pixel
    bin_size = extent / size
    steps = torch.arange(size * sampling_ratio, device=boxes.device, dtype=boxes.dtype)
    steps = (steps + 0.5) / sampling_ratio  # (Ps,) in bins
    points = corners[:, None, :2] + steps[None, :, None] * bin_size[:, None, :]  # (M, Ps, 2)
    # per axis with Python bounds: a tensor of (W, H) made here would be a host-to-device copy
    axes = []
    for axis, limit in ((0, width), (1, height)):
        values = points[..., axis]  # (M, Ps)
        # torchvision: a point beyond [-1, W] (or NaN) reads 0; within, it is clamped to the map
        inside = (values >= -1.0) & (values <= limit)
        values = values.clamp(min=0.0, max=limit - 1)
        axes.append(((2 * values + 1) / limit - 1, inside))  # grid_sample, align_corners=False
    (x, inside_x), (y, inside_y) = axes
    x = x[:, None, :].expand(-1, x.shape[1], -1)  # (M, Ps) -> (M, Ps rows, Ps columns)
    y = y[:, :, None].expand(-1, -1, y.shape[1])
    valid = inside_x[:, None, :] & inside_y[:, :, None]  # (M, Ps, Ps)
    grid = torch.stack([x, y], dim=-1)  # (M, Ps, Ps, 2)
    return torch.where(valid[..., None], grid, torch.full_like(grid, _OUTSIDE))


def equal_count_runs(counts: Sequence[int]) -> list[tuple[int, int, int, int]]:
    """RoIs per image -> (first_image, end_image, first_roi, end_roi) of each run of consecutive
    images with the same non-zero count: one grid_sample call pools a run at once."""
    runs: list[tuple[int, int, int, int]] = []
    first_roi = 0
    for image, count in enumerate(counts):
        if count and runs and runs[-1][1] == image and counts[image - 1] == count:
            first, _, start, _ = runs[-1]
            runs[-1] = (first, image + 1, start, first_roi + count)
        elif count:
            runs.append((image, image + 1, first_roi, first_roi + count))
        first_roi += count
    return runs


def _run_grid(grid: Tensor, first_roi: int, end_roi: int, images: int) -> tuple[int, Tensor]:
    """A run's RoIs per image and its grid, each image's RoIs stacked as one tall grid:
    (n*c, Ps, Ps, 2) -> (n, c*Ps, Ps, 2)."""
    per_image, steps = (end_roi - first_roi) // images, grid.shape[1]
    return per_image, grid[first_roi:end_roi].reshape(images, per_image * steps, steps, 2)


def grid_roi_align(
    feature: Tensor,
    grid: Tensor,
    counts: Sequence[int],
    size: int,
    sampling_ratio: int,
) -> Tensor:
    """``feature`` (k, Ch, H, W), ``grid`` (M, Ps, Ps, 2) from sampling_grid for the RoIs of the
    k images in order, ``counts`` (k,) RoIs per image -> pooled (M, Ch, P, P)."""
    rows = []
    for first_image, end_image, first_roi, end_roi in equal_count_runs(counts):
        images = end_image - first_image
        per_image, run_grid = _run_grid(grid, first_roi, end_roi, images)
        sampled = torch.grid_sampler_2d(
            feature[first_image:end_image], run_grid, _BILINEAR, _ZEROS, False
        )  # (n, Ch, c*Ps, Ps)
        if sampling_ratio > 1:
            sampled = F.avg_pool2d(sampled, sampling_ratio)  # (n, Ch, c*P, P): s x s means
        channels = sampled.shape[1]
        # (n, Ch, c*P, P) -> (n, Ch, c, P, P) -> (n, c, Ch, P, P) -> (n*c, Ch, P, P)
        sampled = sampled.reshape(images, channels, per_image, size, size).transpose(1, 2)
        rows.append(sampled.reshape(images * per_image, channels, size, size))
    if not rows:
        return feature.new_zeros((0, feature.shape[1], size, size))
    return rows[0] if len(rows) == 1 else torch.cat(rows)


def grid_roi_align_backward(
    grad_rows: Tensor,
    feature: Tensor,
    grid: Tensor,
    counts: Sequence[int],
    size: int,
    sampling_ratio: int,
) -> Tensor:
    """The gradient of grid_roi_align's rows ``grad_rows`` (M, Ch, P, P) with respect to
    ``feature`` (k, Ch, H, W) -> (k, Ch, H, W)."""
    runs = equal_count_runs(counts)
    channels, steps = feature.shape[1], size * sampling_ratio
    pieces = []
    for first_image, end_image, first_roi, end_roi in runs:
        images = end_image - first_image
        per_image, run_grid = _run_grid(grid, first_roi, end_roi, images)
        grad = grad_rows[first_roi:end_roi]
        # (n*c, Ch, P, P) -> (n, c, Ch, P, P) -> (n, Ch, c, P, P) -> (n, Ch, c*P, P)
        grad = grad.reshape(images, per_image, channels, size, size).transpose(1, 2)
        grad = grad.reshape(images, channels, per_image * size, size)
        if sampling_ratio > 1:  # each mean's gradient, shared by its s x s samples
            grad = grad[:, :, :, None, :, None] / sampling_ratio**2
            grad = grad.expand(-1, -1, -1, sampling_ratio, -1, sampling_ratio)
            grad = grad.reshape(images, channels, per_image * steps, steps)
        grad_feature, _ = torch.ops.aten.grid_sampler_2d_backward(
            grad.contiguous(),
            feature[first_image:end_image],
            run_grid,
            _BILINEAR,
            _ZEROS,
            False,
            [True, False],
        )
        pieces.append(grad_feature)
    if len(runs) == 1 and runs[0][:2] == (0, feature.shape[0]):
        return pieces[0]  # one run covers every image: its gradient is the whole one
    whole = torch.zeros_like(feature)  # images without RoIs keep zeros
    for (first_image, end_image, _, _), piece in zip(runs, pieces):
        whole[first_image:end_image] = piece
    return whole
