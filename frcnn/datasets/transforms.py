"""Detection transforms on torchvision.transforms.v2 and its box types.

The resize follows torchvision's GeneralizedRCNNTransform exactly (scale rule, output size,
bilinear without antialiasing), so a model trained here sees the images a torchvision model
would. Randomness comes from torch's global RNG; the training loader seeds it per sample.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

# torchvision's own flip already maps XYXY boxes to (W - x2, y1, W - x1, y2) and draws from torch's
# global RNG, which is all detection needs.
RandomHorizontalFlip = v2.RandomHorizontalFlip


def resized_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """(height, width) after scaling the short side to ``min_size``, the long one to at most
    ``max_size``.

    torchvision resizes with ``interpolate(scale_factor=s, recompute_scale_factor=True)``, whose
    output size is ``floor(size * s)`` computed in double precision; the same arithmetic here
    gives the same sizes.
    """
    scale = min(min_size / min(height, width), max_size / max(height, width))
    return math.floor(float(height) * scale), math.floor(float(width) * scale)


class ResizeShortestEdge(v2.Transform):
    """Resize so the short side is one of ``min_sizes`` (drawn at random when several) and the
    long side at most ``max_size``; boxes are scaled with the image."""

    def __init__(self, min_sizes: Sequence[int] | int, max_size: int) -> None:
        super().__init__()
        sizes = [int(min_sizes)] if isinstance(min_sizes, int) else [int(s) for s in min_sizes]
        if not sizes or min(sizes) <= 0 or max_size <= 0:
            raise ValueError(
                f"ResizeShortestEdge needs positive sizes, got min_sizes={min_sizes!r}, "
                f"max_size={max_size!r}"
            )
        self.min_sizes = sizes
        self.max_size = int(max_size)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        sized = [x for x in flat_inputs if isinstance(x, (tv_tensors.Image, torch.Tensor))]
        height, width = F.get_size(sized[0])
        if len(self.min_sizes) == 1:
            min_size = self.min_sizes[0]
        else:
            min_size = self.min_sizes[int(torch.randint(len(self.min_sizes), ()))]
        return {"size": list(resized_size(height, width, min_size, self.max_size))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(
            F.resize,
            inpt,
            size=params["size"],
            interpolation=v2.InterpolationMode.BILINEAR,
            antialias=False,
        )


def build_transforms(
    min_sizes: Sequence[int] | int, max_size: int, flip_prob: float, is_train: bool
) -> v2.Compose:
    """Training: multi-scale resize and horizontal flip. Testing: resize to the last of
    ``min_sizes`` (torchvision's choice in eval mode), no flip."""
    sizes = [min_sizes] if isinstance(min_sizes, int) else list(min_sizes)
    if not is_train:
        return v2.Compose([ResizeShortestEdge(sizes[-1:], max_size)])
    steps: list[v2.Transform] = [ResizeShortestEdge(sizes, max_size)]
    if flip_prob > 0:
        steps.append(RandomHorizontalFlip(flip_prob))
    return v2.Compose(steps)
