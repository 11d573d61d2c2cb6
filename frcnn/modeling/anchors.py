"""Anchor generation, cached per feature-map size.

Shapes: L feature levels, A anchors per location (len(sizes) * len(aspect_ratios) of its level),
Hl x Wl the size of level l, R = sum over levels of Hl * Wl * A anchors per image.
Anchors are ordered level by level, then row-major over locations, then by anchor: the order
the RPN head's outputs are flattened in (see rpn/head.py).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor, nn

CACHE_SIZE = 16


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> Tensor:
    """Anchors centred on (0, 0) for one location: (A, 4), ordered ratio-major, size-minor.

    An aspect ratio is height / width; each anchor keeps the area size**2. Corners are rounded to
    whole pixels, as torchvision does, so that its pretrained RPN weights see the same anchors.
    """
    scales = torch.as_tensor(sizes, dtype=torch.float32)
    ratios = torch.as_tensor(aspect_ratios, dtype=torch.float32)
    h_ratios = torch.sqrt(ratios)
    w_ratios = 1.0 / h_ratios
    widths = (w_ratios[:, None] * scales[None, :]).reshape(-1)
    heights = (h_ratios[:, None] * scales[None, :]).reshape(-1)
    return (torch.stack([-widths, -heights, widths, heights], dim=1) / 2).round()


class AnchorGenerator(nn.Module):
    """Anchors for every location of every feature level.

    ``sizes[l]`` and ``aspect_ratios[l]`` describe level l (one ratio list may serve all levels).
    jwyang's VGG16 anchors are ``sizes=[[128, 256, 512]]`` (scales 8/16/32 at stride 16) with
    ``aspect_ratios=[[0.5, 1, 2]]``; torchvision's FPN anchors are one size per level.
    """

    def __init__(
        self, sizes: Sequence[Sequence[float]], aspect_ratios: Sequence[Sequence[float]]
    ) -> None:
        super().__init__()
        if len(aspect_ratios) == 1:
            aspect_ratios = list(aspect_ratios) * len(sizes)
        if len(aspect_ratios) != len(sizes):
            raise ValueError(
                f"anchors: {len(sizes)} levels of sizes but {len(aspect_ratios)} lists of aspect "
                "ratios; give one list for all levels or one per level"
            )
        self.cell_anchors = [cell_anchors(s, r) for s, r in zip(sizes, aspect_ratios)]
        # multi-scale training meets many padded sizes: keep the most recent few
        self._cache: OrderedDict[tuple, Tensor] = OrderedDict()

    @property
    def num_anchors_per_location(self) -> list[int]:
        return [int(c.shape[0]) for c in self.cell_anchors]

    def grid_sizes(self, feature_sizes: Sequence[tuple[int, int]]) -> list[tuple[int, int, int]]:
        """(Hl, Wl, A) of every level: the layout the anchors of ``forward`` are laid out in."""
        return [(h, w, a) for (h, w), a in zip(feature_sizes, self.num_anchors_per_location)]

    def forward(
        self,
        image_size: tuple[int, int],
        feature_sizes: Sequence[tuple[int, int]],
        device: torch.device,
    ) -> Tensor:
        """Anchors (R, 4) for a padded batch of ``image_size`` (H, W) and its feature-map sizes.

        A level's stride is ``image_size // feature_size`` per axis (torchvision's rule, kept so
        its weights transfer); the anchors depend only on sizes, so they are cached.
        """
        if len(feature_sizes) != len(self.cell_anchors):
            raise ValueError(
                f"anchors are configured for {len(self.cell_anchors)} feature levels but the "
                f"backbone gives {len(feature_sizes)}; "
                "set model.anchors.sizes to one list per level"
            )
        key = (tuple(image_size), tuple(tuple(s) for s in feature_sizes), str(device))
        anchors = self._cache.get(key)
        if anchors is not None:
            self._cache.move_to_end(key)
        else:
            anchors = torch.cat(
                [
                    self._grid_anchors(cell, size, image_size, device)
                    for cell, size in zip(self.cell_anchors, feature_sizes)
                ]
            )
            self._cache[key] = anchors
            if len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return anchors

    @staticmethod
    def _grid_anchors(
        cell: Tensor,
        feature_size: tuple[int, int],
        image_size: tuple[int, int],
        device: torch.device,
    ) -> Tensor:
        height, width = feature_size
        stride_y = image_size[0] // height
        stride_x = image_size[1] // width
        shift_x = torch.arange(width, dtype=torch.float32, device=device) * stride_x
        shift_y = torch.arange(height, dtype=torch.float32, device=device) * stride_y
        shift_y, shift_x = torch.meshgrid(shift_y, shift_x, indexing="ij")
        shifts = torch.stack([shift_x, shift_y, shift_x, shift_y], dim=-1).reshape(-1, 1, 4)
        # (H*W, 1, 4) + (1, A, 4) -> (H*W, A, 4) -> (H*W*A, 4)
        return (shifts + cell.to(device).reshape(1, -1, 4)).reshape(-1, 4)
