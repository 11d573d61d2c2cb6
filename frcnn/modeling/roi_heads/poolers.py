"""RoI feature extraction with torchvision's kernels: RoIAlign or RoIPool on one level, and
RoIAlign over the FPN levels with each box on the level its size picks (FPN paper, eq. 1), as
torchvision's MultiScaleRoIAlign does. RoIAlign can run on PyTorch's grid_sample kernels instead
(``kernel="grid_sample"``, grid_roi_align.py), the same values to rounding, or take its gradient
from sparse-matrix products (``kernel="sparse"``, sparse_roi_align.py).

Shapes: N images, S RoIs per image, L levels, Ch channels, P x P the pooled size.

RoIAlign runs as jobs of whole images (roi_align_jobs.py), in parallel on a CPU. Over FPN levels
the RoIs are sorted by (level, image) on the device and the per-(level, image) counts are read on
the host once, where MultiScaleRoIAlign reads the size of every level.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import Tensor, nn
from torchvision.ops import roi_pool

from frcnn.modeling import parallel
from frcnn.modeling.roi_heads.roi_align_jobs import check_kernel, roi_align_blocks, split_jobs


class _Pooler(nn.Module):
    """What both poolers share: ``pool_blocks`` (each subclass's) gives the pooled rows as the
    RoIAlign jobs made them, and ``forward`` joins them into one tensor in RoI order."""

    def forward(
        self,
        features: OrderedDict[str, Tensor],
        boxes: Tensor,
        image_sizes: list[tuple[int, int]],
        padded_size: tuple[int, int],
    ) -> Tensor:
        """``boxes`` (N, S, 4) -> pooled (N*S, Ch, P, P), row i from RoI i."""
        blocks, order = self.pool_blocks(features, boxes, image_sizes, padded_size)
        return in_roi_order(order, blocks[0] if len(blocks) == 1 else torch.cat(blocks))[0]


class SingleLevelPooler(_Pooler):
    """Pools from the one feature map of a C4 / VGG16 / small backbone. The map's scale is read
    from its size relative to the padded batch (a power of two), as torchvision does."""

    def __init__(
        self,
        feature_name: str,
        output_size: int,
        kind: str = "align",
        sampling_ratio: int = 0,
        aligned: bool = False,
        kernel: str = "torchvision",
    ) -> None:
        super().__init__()
        if kind not in ("align", "pool"):
            raise ValueError(f"pooler must be 'align' or 'pool', got {kind!r}")
        if kind == "pool" and kernel != "torchvision":
            raise ValueError(f"the {kernel!r} kernel computes RoIAlign; RoIPool has torchvision's")
        check_kernel(kernel, sampling_ratio if kind == "align" else 1)
        self.feature_name = feature_name
        self.output_size = output_size
        self.kind = kind
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.kernel = kernel

    def pool_blocks(
        self,
        features: OrderedDict[str, Tensor],
        boxes: Tensor,
        image_sizes: list[tuple[int, int]],
        padded_size: tuple[int, int],
    ) -> tuple[tuple[Tensor, ...], Tensor | None]:
        """As MultiLevelPooler.pool_blocks; one level, so the rows keep the RoIs' order (None)."""
        feature = features[self.feature_name]
        scale = 2.0 ** round(math.log2(feature.shape[-1] / padded_size[1]))
        # RoI corners stay float32 under autocast: bf16 would round them to whole pixels or worse
        rois = _to_rois(boxes)
        if self.kind == "pool":
            return (roi_pool(feature, rois, self.output_size, scale),), None
        num_images, per_image = boxes.shape[:2]
        jobs = split_jobs([[per_image] * num_images], parallel.num_workers(feature.device))
        blocks = roi_align_blocks(
            [feature],
            [scale],
            rois,  # image by image already
            jobs,
            self.output_size,
            self.sampling_ratio,
            self.aligned,
            self.kernel,
        )
        return blocks, None


class MultiLevelPooler(_Pooler):
    """RoIAlign over the named FPN levels, with torchvision's MultiScaleRoIAlign's level rule:
    level k = floor(canonical_level + log2(sqrt(area) / canonical_scale)), clamped to the levels
    present, the levels' scales read from their sizes relative to the largest image."""

    def __init__(
        self,
        feature_names: list[str],
        output_size: int,
        sampling_ratio: int = 2,
        canonical_scale: int = 224,
        canonical_level: int = 4,
        kernel: str = "torchvision",
    ) -> None:
        super().__init__()
        check_kernel(kernel, sampling_ratio)
        self.kernel = kernel
        self.feature_names = list(feature_names)
        self.output_size = output_size
        self.sampling_ratio = sampling_ratio
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level

    def pool_blocks(
        self,
        features: OrderedDict[str, Tensor],
        boxes: Tensor,
        image_sizes: list[tuple[int, int]],
        padded_size: tuple[int, int],
    ) -> tuple[tuple[Tensor, ...], Tensor | None]:
        """``boxes`` (N, S, 4) -> (blocks, order): the pooled rows (N*S in all) as the RoIAlign
        jobs made them (roi_align_jobs.py), grouped by (level, image), and ``order`` (N*S,): row
        i pools RoI ``order[i]``. The level scales are inferred from the largest image size, as
        torchvision's detector passes it. For callers that take rows in any order (a row-wise
        box head, labels that can follow): no copy of the pooled features is made, forward or
        backward."""
        # like MultiScaleRoIAlign, the named levels the backbone has (MobileNet's FPN has two)
        maps = [feature for name, feature in features.items() if name in self.feature_names]
        largest = max(size[0] for size in image_sizes)
        scales = [2.0 ** round(math.log2(m.shape[-2] / largest)) for m in maps]
        num_images, per_image = boxes.shape[:2]
        num_levels = len(maps)
        flat = boxes.reshape(-1, 4)
        # a non-finite box (diverged ground truth) is not pooled and keeps a zero row, as in
        # MultiScaleRoIAlign (torchvision's kernel would read out of bounds with it)
        levels = torch.where(
            torch.isfinite(flat).all(dim=1), self._levels(flat, scales), num_levels
        )  # (N*S,) in [0, L], L = not pooled: the last rows
        images = torch.arange(num_images, device=boxes.device)[:, None].expand(-1, per_image)
        key = levels * num_images + images.reshape(-1)
        order = torch.argsort(key, stable=True)  # (level, image), each image's RoIs in order
        counts = torch.zeros((num_levels + 1) * num_images, dtype=torch.int64, device=boxes.device)
        counts = counts.scatter_add_(0, key, torch.ones_like(key)).tolist()  # the one host read
        per_level = [counts[i * num_images : (i + 1) * num_images] for i in range(num_levels)]
        jobs = split_jobs(per_level, parallel.num_workers(boxes.device))
        blocks = roi_align_blocks(
            maps,
            scales,
            _to_rois(boxes)[order],
            jobs,
            self.output_size,
            self.sampling_ratio,
            False,
            self.kernel,
        )
        return blocks, order

    def _levels(self, boxes: Tensor, scales: list[float]) -> Tensor:
        """(M, 4) -> (M,) level index, computed as torchvision's LevelMapper does."""
        k_min, k_max = int(-math.log2(scales[0])), int(-math.log2(scales[-1]))
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        size = torch.sqrt(area)
        # + 1e-6 in the boxes' dtype, as LevelMapper adds it (a Python float needs no device copy)
        level = torch.floor(self.canonical_level + torch.log2(size / self.canonical_scale) + 1e-6)
        level = torch.nan_to_num(level, nan=float(k_min))  # NaN boxes: see forward
        return torch.clamp(level, min=k_min, max=k_max).to(torch.int64) - k_min


def in_roi_order(order: Tensor | None, *rows: Tensor) -> tuple[Tensor, ...]:
    """Tensors whose rows were made in ``order`` (row i belongs to RoI order[i]; None: in RoI
    order already) -> the same rows in RoI order."""
    if order is None:
        return rows
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.shape[0], device=order.device)
    return tuple(values[inverse] for values in rows)


def _to_rois(boxes: Tensor) -> Tensor:
    """(N, S, 4) -> (N*S, 5) rows of (image index, x1, y1, x2, y2)."""
    num_images, num_rois = boxes.shape[:2]
    index = torch.arange(num_images, device=boxes.device, dtype=boxes.dtype)
    index = index[:, None, None].expand(num_images, num_rois, 1)
    return torch.cat([index, boxes], dim=-1).reshape(-1, 5)
