"""Per-image records exchanged between datasets, model and evaluators.

Boxes are float32 (x1, y1, x2, y2) in the pixel coordinates of the image the record belongs to.
Labels are contiguous: 1..K for the K foreground classes, 0 is background.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

# Anchor and RoI labels used by the target layers.
POSITIVE = 1
NEGATIVE = 0
IGNORE = -1


@dataclass
class Targets:
    """Ground truth of one image: ``boxes`` (G, 4) float32, ``labels`` (G,) int64 in 1..K,
    ``iscrowd`` (G,) bool. Crowd boxes are never positives; their area is ignored."""

    boxes: Tensor
    labels: Tensor
    iscrowd: Optional[Tensor] = None  # noqa: UP045
    # how many crowd boxes there are, known on the host so the model can skip crowd handling
    # without waiting for the device; counted when the record is made (in the data loader)
    num_crowd: Optional[int] = None  # noqa: UP045

    def __post_init__(self) -> None:
        if self.iscrowd is None:
            self.iscrowd = torch.zeros(
                self.labels.shape, dtype=torch.bool, device=self.labels.device
            )
        if self.num_crowd is None:
            self.num_crowd = int(self.iscrowd.sum())
        if not (self.boxes.shape[0] == self.labels.shape[0] == self.iscrowd.shape[0]):
            raise ValueError(
                f"Targets: boxes {tuple(self.boxes.shape)}, labels {tuple(self.labels.shape)} and "
                f"iscrowd {tuple(self.iscrowd.shape)} must describe the same number of objects"
            )

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def to(self, device: torch.device | str) -> Targets:
        return Targets(
            self.boxes.to(device, non_blocking=True),
            self.labels.to(device, non_blocking=True),
            self.iscrowd.to(device, non_blocking=True),  # type: ignore[union-attr]
            self.num_crowd,
        )

    @staticmethod
    def empty(device: torch.device | str = "cpu") -> Targets:
        return Targets(
            torch.zeros((0, 4), dtype=torch.float32, device=device),
            torch.zeros((0,), dtype=torch.int64, device=device),
            torch.zeros((0,), dtype=torch.bool, device=device),
        )


@dataclass
class Detections:
    """Detections of one image: ``boxes`` (D, 4) float32, ``scores`` (D,), ``labels`` (D,) int64
    in 1..K, sorted by decreasing score."""

    boxes: Tensor
    scores: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def to(self, device: torch.device | str) -> Detections:
        return Detections(self.boxes.to(device), self.scores.to(device), self.labels.to(device))


@dataclass
class ImageInfo:
    """Where an image came from and how the transforms resized it.

    ``image_id`` is the dataset's own id (COCO ``id``; for VOC the index in the image set),
    ``original_size`` and ``image_size`` are (height, width) before and after the transforms.
    """

    image_id: int
    file_name: str
    original_size: tuple[int, int]
    image_size: tuple[int, int]
