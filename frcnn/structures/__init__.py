"""Leaf package: box math, image batches and the per-image data records."""

from frcnn.structures.boxes import (
    BoxCoder,
    batched_box_iou,
    box_ioa,
    clip_boxes,
    scale_boxes,
)
from frcnn.structures.image_list import ImageList, batch_images
from frcnn.structures.instances import (
    IGNORE,
    NEGATIVE,
    POSITIVE,
    Detections,
    ImageInfo,
    Targets,
)

__all__ = [
    "IGNORE",
    "NEGATIVE",
    "POSITIVE",
    "BoxCoder",
    "Detections",
    "ImageInfo",
    "ImageList",
    "Targets",
    "batch_images",
    "batched_box_iou",
    "box_ioa",
    "clip_boxes",
    "scale_boxes",
]
