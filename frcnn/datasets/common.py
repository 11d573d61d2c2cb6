"""What the COCO and VOC readers share: image decoding, transforms, the item they return."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_image, read_file

from frcnn.structures import ImageInfo, Targets

# A dataset item: uint8 (3, H, W) RGB image after the transforms, its targets in the transformed
# image's pixels, and where it came from.
DatasetItem = tuple[Tensor, Targets, ImageInfo]
# Called as transforms(image, boxes) with a tv_tensors.Image and tv_tensors.BoundingBoxes (XYXY).
Transforms = Callable[[tv_tensors.Image, tv_tensors.BoundingBoxes], Any]

_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """Hash integers to a 63-bit seed (splitmix64 steps), so nearby inputs give unrelated seeds."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = ((state ^ (value & _MASK64)) * 0xBF58476D1CE4E5B9) & _MASK64
        state = ((state ^ (state >> 27)) * 0x94D049BB133111EB) & _MASK64
        state ^= state >> 31
    return state & ((1 << 63) - 1)


def config_hint(config_prefix: str | None, key: str) -> str:
    """The config key a user should fix, e.g. ``data.train.images``."""
    if config_prefix:
        return f"{config_prefix}.{key}"
    return f"data.train.{key} or data.test.{key}"


def require_path(path: Path, kind: str, what: str, hint: str) -> None:
    """Raise FileNotFoundError unless ``path`` is a file (``kind="file"``) or a folder."""
    exists = path.is_file() if kind == "file" else path.is_dir()
    if not exists:
        raise FileNotFoundError(f"{what} not found: {path} (check {hint})")


def read_image(path: Path) -> Tensor:
    """Decode an image file to a uint8 (3, H, W) RGB tensor with torchvision.io."""
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        return decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
    except RuntimeError as error:
        raise RuntimeError(f"could not decode image {path}: {error}") from error


def make_item(
    image: Tensor,
    boxes: Tensor,
    labels: Tensor,
    iscrowd: Tensor,
    transforms: Transforms | None,
    image_id: int,
    file_name: str,
) -> DatasetItem:
    """Apply ``transforms`` to an image and its (G, 4) XYXY boxes and pack the item."""
    height, width = int(image.shape[-2]), int(image.shape[-1])
    if transforms is not None:
        wrapped_boxes = tv_tensors.BoundingBoxes(
            boxes, format=tv_tensors.BoundingBoxFormat.XYXY, canvas_size=(height, width)
        )
        out_image, out_boxes = transforms(tv_tensors.Image(image), wrapped_boxes)
        image = out_image.as_subclass(Tensor)
        boxes = out_boxes.as_subclass(Tensor)
    targets = Targets(
        boxes.to(torch.float32).reshape(-1, 4),
        labels.to(torch.int64),
        iscrowd.to(torch.bool),
    )
    info = ImageInfo(
        image_id=int(image_id),
        file_name=file_name,
        original_size=(height, width),
        image_size=(int(image.shape[-2]), int(image.shape[-1])),
    )
    return image, targets, info
