"""RoI feature extraction with torchvision.ops: RoIAlign or RoIPool on one level, and
MultiScaleRoIAlign over the FPN levels (level of a box from its size, as in the FPN paper).

Shapes: N images, S RoIs per image, Ch channels, P x P the pooled size.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import Tensor, nn
from torchvision.ops import MultiScaleRoIAlign, roi_align, roi_pool


class SingleLevelPooler(nn.Module):
    """Pools from the one feature map of a C4 / VGG16 / small backbone. The map's scale is read
    from its size relative to the padded batch (a power of two), as torchvision does."""

    def __init__(
        self,
        feature_name: str,
        output_size: int,
        kind: str = "align",
        sampling_ratio: int = 0,
        aligned: bool = False,
    ) -> None:
        super().__init__()
        if kind not in ("align", "pool"):
            raise ValueError(f"pooler must be 'align' or 'pool', got {kind!r}")
        self.feature_name = feature_name
        self.output_size = output_size
        self.kind = kind
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    def forward(
        self,
        features: OrderedDict[str, Tensor],
        boxes: Tensor,
        image_sizes: list[tuple[int, int]],
        padded_size: tuple[int, int],
    ) -> Tensor:
        """``boxes`` (N, S, 4) -> pooled (N*S, Ch, P, P)."""
        feature = features[self.feature_name]
        scale = 2.0 ** round(math.log2(feature.shape[-1] / padded_size[1]))
        # RoI corners stay float32 under autocast: bf16 would round them to whole pixels or worse
        rois = _to_rois(boxes)
        if self.kind == "pool":
            return roi_pool(feature, rois, self.output_size, scale)
        return roi_align(feature, rois, self.output_size, scale, self.sampling_ratio, self.aligned)


class MultiLevelPooler(nn.Module):
    """torchvision's MultiScaleRoIAlign over the named FPN levels."""

    def __init__(self, feature_names: list[str], output_size: int, sampling_ratio: int = 2) -> None:
        super().__init__()
        self.pooler = MultiScaleRoIAlign(feature_names, output_size, sampling_ratio)

    def forward(
        self,
        features: OrderedDict[str, Tensor],
        boxes: Tensor,
        image_sizes: list[tuple[int, int]],
        padded_size: tuple[int, int],
    ) -> Tensor:
        """``boxes`` (N, S, 4) -> pooled (N*S, Ch, P, P). The level scales are inferred from the
        largest image size, as torchvision's detector passes it."""
        return self.pooler(features, list(boxes.unbind(0)), image_sizes)


def _to_rois(boxes: Tensor) -> Tensor:
    """(N, S, 4) -> (N*S, 5) rows of (image index, x1, y1, x2, y2)."""
    num_images, num_rois = boxes.shape[:2]
    index = torch.arange(num_images, device=boxes.device, dtype=boxes.dtype)
    index = index[:, None, None].expand(num_images, num_rois, 1)
    return torch.cat([index, boxes], dim=-1).reshape(-1, 5)
