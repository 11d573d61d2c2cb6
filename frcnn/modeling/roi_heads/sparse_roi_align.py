"""RoIAlign as products with its sparse weight matrix (a speed setting,
``model.roi_heads.roi_align_kernel: sparse``): the forward as ``embedding_bag`` sums, the
backward as sparse-matrix products.

Shapes: k images, M RoIs, Ch channels, H x W the feature map, P x P the pooled size, s the
sampling ratio (s x s points per bin), B = M * P * P bins, E = 4 s^2 entries per bin.

RoIAlign is linear in the features, with the same weights for every channel: the pooled value of
bin b in channel c is sum over pixels q of S[b, q] * feature[c, q], where row b of S holds the
bilinear weights of the bin's s x s samples divided by s * s. Each row has E entries (pixel,
weight); they are computed once per RoI and bin rather than once per channel, as torchvision's
CPU kernels do, which then add one scalar at a time on one thread.

- Forward: with the map as (k * H * W, Ch) pixel rows (a view of a channels_last map), bin b's
  pooled vector is the weighted sum of its E rows: ``embedding_bag`` in "sum" mode with
  per-sample weights, whose kernel adds whole rows of channels at a time. Its (B, Ch) output is
  returned as it is, an (M, Ch, P, P) tensor laid out channels_last: transposed into
  torchvision's layout it would cost more than the pooling (a quick-start batch: 60 MB
  rearranged). At inference the 2-MLP box head flattens such a tensor in its memory order and
  permutes its first layer's weight to match (box_heads.py); any other consumer sees an
  ordinary tensor.
- Backward: one image's feature gradient is the product S^T G, G (B, Ch) the gradient of its
  RoIs' bins; S^T is built as a CSR matrix (a row per pixel, its bins in their order), and
  PyTorch's sparse-dense product computes it on all cores.

The weights follow torchvision's ``bilinear_interpolate`` (forward) and
``bilinear_interpolate_gradient`` (backward), which agree: a sample more than one pixel outside
the map (or NaN) has none; within that pixel its coordinate is clamped to the map; on the last
row or column both neighbours are the edge. They are separable: a sample's weight on pixel
(y, x) is a y-weight times an x-weight, so each axis is computed once per RoI and bin. Entries of
zero weight stay in the matrix (pointing at pixel 0 of the axis) so that every bin has the same
number, E, and nothing depends on the data's values: no count is read on the host. Every sum
runs over its entries in a fixed order, so results are deterministic; they equal torchvision's
to float rounding (the sums run in another order), not bitwise. One difference stays: a sample
outside the map contributes 0 times a value (the forward: pixel 0's feature; the backward: its
bin's gradient), so a NaN or inf there reaches the result, which torchvision's skipped sample
keeps out.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

# channels per sparse product: the dense operands are (B, chunk) and (H * W, chunk) copies
CHANNEL_CHUNK = 64

_BETA_NOTE = re.escape("Sparse CSR tensor support is in beta state")
_beta_note_taken = False


def _take_beta_note() -> None:
    """PyTorch warns once per process, on the first CSR tensor, that the layout is in beta: that
    says nothing to the user of a pooler (this use of it is tested here). So the first CSR
    tensor is made here, with that warning filtered, and the filters are restored (a filter set
    for the process would be dropped by anyone who restores theirs, as pytest does)."""
    global _beta_note_taken
    if _beta_note_taken:
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_BETA_NOTE, category=UserWarning)
        empty = torch.zeros(0, dtype=torch.int64)
        crow = torch.zeros(2, dtype=torch.int64)
        torch.sparse_csr_tensor(crow, empty, empty.float(), (1, 1), check_invariants=False)
    _beta_note_taken = True


def axis_weights(
    start: Tensor, length: Tensor, size: int, sampling_ratio: int, limit: int
) -> tuple[Tensor, Tensor]:
    """RoIs' ``start`` (M,) and ``length`` (M,) along one axis, in feature pixels -> the pixel
    indices (M, P, 2s) along that axis of each bin's samples' two neighbours, and their
    bilinear weights (M, P, 2s): torchvision's rules for a map ``limit`` pixels long."""
    bin_size = length / size
    step = torch.arange(size * sampling_ratio, device=start.device, dtype=start.dtype)
    bins = torch.div(step, sampling_ratio, rounding_mode="floor")
    within = (step - bins * sampling_ratio + 0.5) / sampling_ratio
    position = start[:, None] + bins * bin_size[:, None] + within * bin_size[:, None]  # (M, Ps)
    inside = (position >= -1.0) & (position <= limit)  # False for NaN too
    position = position.clamp(min=0.0)
    low = position.floor()
    last = low >= limit - 1
    low = torch.where(last, torch.full_like(low, limit - 1), low)
    position = torch.where(last, low, position)
    high = torch.where(last, low, low + 1)
    fraction = position - low
    weights = torch.stack([1.0 - fraction, fraction], dim=-1)  # (M, Ps, 2)
    weights = torch.where(inside[..., None], weights, torch.zeros_like(weights))
    index = torch.stack([low, high], dim=-1)
    index = torch.where(inside[..., None], index, torch.zeros_like(index)).long()
    return index.reshape(-1, size, 2 * sampling_ratio), weights.reshape(
        -1, size, 2 * sampling_ratio
    )


def bin_weights(
    boxes: Tensor,
    scale: float,
    size: int,
    sampling_ratio: int,
    aligned: bool,
    height: int,
    width: int,
    first_pixel: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``boxes`` (M, 4) in image pixels -> the pixel index y * W + x (M, P * P, 4s^2) and the
    weight (same shape) of every entry of each bin's row of S, bins row-major as RoIAlign's
    output. ``first_pixel`` (M,), if given, is added to each RoI's indices (its image's first
    row in a batch's pixel rows)."""
    offset = 0.5 if aligned else 0.0
    corners = boxes * scale - offset
    extent = corners[:, 2:] - corners[:, :2]  # (M, 2) width, height
    if not aligned:
        extent = extent.clamp(min=1.0)  # legacy RoIAlign: RoIs at least one pixel
    rows, row_weights = axis_weights(corners[:, 1], extent[:, 1], size, sampling_ratio, height)
    columns, column_weights = axis_weights(corners[:, 0], extent[:, 0], size, sampling_ratio, width)
    row_start = rows * width
    if first_pixel is not None:
        row_start = row_start + first_pixel[:, None, None]
    index = _outer(torch.add, row_start, columns)
    weight = _outer(torch.mul, row_weights, column_weights / sampling_ratio**2)
    return index.reshape(boxes.shape[0], size * size, -1), weight.reshape(
        boxes.shape[0], size * size, -1
    )


def _outer(op, rows: Tensor, columns: Tensor) -> Tensor:  # noqa: ANN001
    """``op`` of every bin row's entries (M, P, 2s) with every bin column's (M, P, 2s) -> (M, P,
    P, 2s, 2s). With s = 1 the entries' axes are two long, and a broadcast over them innermost
    runs at a fifth of the speed of one op per entry pair over (M, P, P), each written into its
    place: the same values."""
    if rows.shape[-1] != 2:
        return op(rows[:, :, None, :, None], columns[:, None, :, None, :])
    num_rois, size = rows.shape[:2]
    dtype = torch.promote_types(rows.dtype, columns.dtype)
    out = rows.new_empty((num_rois, size, size, 2, 2), dtype=dtype)
    for a in (0, 1):
        for b in (0, 1):
            op(rows[:, :, None, a], columns[:, None, :, b], out=out[..., a, b])
    return out


def transposed_matrix(index: Tensor, weight: Tensor, pixels: int) -> Tensor:
    """One image's entries (B, E) from bin_weights -> S^T as a (pixels, B) CSR matrix: each
    pixel's row lists its bins in order (duplicates, where two samples share a pixel, are kept
    as separate entries)."""
    _take_beta_note()
    per_bin = index.shape[1]
    flat = index.reshape(-1)
    order_index, order = torch.sort(flat, stable=True)
    bounds = torch.arange(pixels + 1, device=flat.device, dtype=flat.dtype)
    crow = torch.searchsorted(order_index, bounds)  # no bincount: its size would read the max
    bins = torch.div(order, per_bin, rounding_mode="floor")
    return torch.sparse_csr_tensor(
        crow, bins, weight.reshape(-1)[order], (pixels, index.shape[0]), check_invariants=False
    )


def sparse_roi_align(
    feature: Tensor,
    image: Tensor,
    boxes: Tensor,
    scale: float,
    size: int,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    """RoIAlign of ``boxes`` (M, 4), RoI i on image ``image[i]`` (M,) of ``feature`` (k, Ch,
    H, W) -> (M, Ch, P, P), laid out channels_last. ``feature`` is best channels_last (its pixel
    rows are then a view; any other layout is copied into them)."""
    num_images, channels, height, width = feature.shape
    rows = feature.permute(0, 2, 3, 1).reshape(num_images * height * width, channels)
    first_pixel = image * (height * width)
    index, weight = bin_weights(
        boxes, scale, size, sampling_ratio, aligned, height, width, first_pixel
    )
    pooled = torch.nn.functional.embedding_bag(
        index.reshape(-1, index.shape[-1]),
        rows,
        mode="sum",
        per_sample_weights=weight.reshape(-1, weight.shape[-1]),
    )  # (B, Ch)
    return pooled.view(boxes.shape[0], size, size, channels).permute(0, 3, 1, 2)


def sparse_roi_align_backward(
    grad_rows: Tensor,
    boxes: Tensor,
    counts: Sequence[int],
    scale: float,
    size: int,
    sampling_ratio: int,
    aligned: bool,
    out: Tensor,
) -> None:
    """Write the feature gradient of RoIAlign's rows ``grad_rows`` (M, Ch, P, P) into ``out``
    (k, Ch, H, W), contiguous or channels_last: the RoIs ``boxes`` (M, 4) belong to the k images
    in order, ``counts[i]`` of them to image i. Images without RoIs are left as they are."""
    _, channels, height, width = out.shape
    pixels = height * width
    # channels_last: each image is a (H * W, Ch) matrix, the products' own layout
    pixel_rows = not out.is_contiguous()
    index, weight = bin_weights(boxes, scale, size, sampling_ratio, aligned, height, width)
    first = 0
    for image, count in enumerate(counts):
        if not count:
            continue
        end = first + count
        matrix = transposed_matrix(
            index[first:end].reshape(count * size * size, -1),
            weight[first:end].reshape(count * size * size, -1),
            pixels,
        )
        for first_channel in range(0, channels, CHANNEL_CHUNK):
            end_channel = min(first_channel + CHANNEL_CHUNK, channels)
            # (count, chunk, P, P) -> (count * P * P, chunk): the bins' gradients as rows
            grad = grad_rows[first:end, first_channel:end_channel].permute(0, 2, 3, 1)
            grad = grad.reshape(count * size * size, end_channel - first_channel)
            product = matrix @ grad  # (H * W, chunk)
            if pixel_rows:
                target = out[image].permute(1, 2, 0).view(pixels, channels)
                target[:, first_channel:end_channel].copy_(product)
            else:
                target = out[image, first_channel:end_channel].view(-1, pixels)
                target.copy_(product.t())
        first = end
