"""Image panels for TensorBoard: ground truth beside detections, one row per image."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.utils import draw_bounding_boxes, make_grid

from frcnn.structures import Detections, Targets

GT_COLOR = "lime"
DET_COLOR = "red"


def _label_names(labels: Tensor, class_names: Sequence[str] | None) -> list[str]:
    # Labels are 1..K; class_names[0] names label 1.
    if class_names is None:
        return [str(int(label)) for label in labels]
    return [class_names[int(label) - 1] for label in labels]


def draw_boxes(
    image: Tensor,
    boxes: Tensor,
    labels: Tensor,
    scores: Tensor | None,
    color: str,
    class_names: Sequence[str] | None = None,
) -> Tensor:
    """uint8 (3, H, W) with the boxes drawn, captioned with class (and score)."""
    if boxes.shape[0] == 0:
        return image.cpu()  # an image without objects is legal; torchvision would warn
    names = _label_names(labels, class_names)
    if scores is not None:
        names = [f"{name} {float(score):.2f}" for name, score in zip(names, scores, strict=True)]
    boxes = boxes.detach().float().cpu()
    return draw_bounding_boxes(image.cpu(), boxes, labels=names, colors=color, width=2)


def draw_detection_panels(
    images: Sequence[Tensor],
    targets: Sequence[Targets],
    detections: Sequence[Detections],
    class_names: Sequence[str] | None = None,
    score_thresh: float = 0.5,
    max_images: int = 4,
) -> Tensor:
    """One uint8 (3, H, W) grid: for each of the first ``max_images`` images, its ground truth
    (green) on the left and its detections scoring at least ``score_thresh`` (red) on the right.

    Images are uint8 (3, Hi, Wi) and detections in the same pixel coordinates as the targets;
    images of different sizes are zero padded to the largest.
    """
    count = min(len(images), len(targets), len(detections), max_images)
    if count == 0:
        raise ValueError("draw_detection_panels needs at least one image")
    tiles = []
    for image, target, det in zip(images[:count], targets[:count], detections[:count]):
        keep = det.scores >= score_thresh
        tiles.append(draw_boxes(image, target.boxes, target.labels, None, GT_COLOR, class_names))
        tiles.append(
            draw_boxes(
                image, det.boxes[keep], det.labels[keep], det.scores[keep], DET_COLOR, class_names
            )
        )
    height = max(tile.shape[-2] for tile in tiles)
    width = max(tile.shape[-1] for tile in tiles)
    padded = [F.pad(t, (0, width - t.shape[-1], 0, height - t.shape[-2])) for t in tiles]
    return make_grid(torch.stack(padded), nrow=2, padding=2)
