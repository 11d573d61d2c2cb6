"""A batch of differently sized images padded into one tensor, with the true sizes kept."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class ImageList:
    """``tensor`` is (N, C, H, W), zero padded at the bottom and right; ``image_sizes`` holds each
    image's (height, width) before padding."""

    tensor: Tensor
    image_sizes: list[tuple[int, int]]
    _sizes: Optional[Tensor] = None  # noqa: UP045

    def sizes_tensor(self) -> Tensor:
        """(N, 2) int64 tensor of (height, width) on the batch's device, made once per batch.

        The copy goes through pinned memory without blocking, so the host does not wait for the
        work already queued on a GPU."""
        if self._sizes is None:
            sizes = torch.tensor(self.image_sizes, dtype=torch.int64)
            if self.tensor.device.type == "cuda":
                sizes = sizes.pin_memory()
            self._sizes = sizes.to(self.tensor.device, non_blocking=True)
        return self._sizes


def batch_images(
    images: list[Tensor], size_divisibility: int = 0, pad_value: float = 0.0
) -> ImageList:
    """Pad (C, Hi, Wi) images to a common (C, H, W), H and W rounded up to ``size_divisibility``."""
    if not images:
        raise ValueError("batch_images needs at least one image")
    sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
    max_h = max(h for h, _ in sizes)
    max_w = max(w for _, w in sizes)
    if size_divisibility > 1:
        max_h = -(-max_h // size_divisibility) * size_divisibility
        max_w = -(-max_w // size_divisibility) * size_divisibility
    padded = [
        F.pad(img, (0, max_w - img.shape[-1], 0, max_h - img.shape[-2]), value=pad_value)
        for img in images
    ]
    return ImageList(torch.stack(padded), sizes)
