from __future__ import annotations

import pytest
import torch

from frcnn.engine.visualize import draw_detection_panels
from frcnn.structures import Detections, Targets


def test_panels_ground_truth_left_detections_right() -> None:
    image = torch.zeros(3, 20, 30, dtype=torch.uint8)
    target = Targets(torch.tensor([[2.0, 2.0, 10.0, 10.0]]), torch.tensor([1]))
    dets = Detections(
        torch.tensor([[4.0, 4.0, 12.0, 12.0], [15.0, 15.0, 25.0, 19.0]]),
        torch.tensor([0.9, 0.2]),
        torch.tensor([2, 1]),
    )
    grid = draw_detection_panels(
        [image, image], [target, target], [dets, dets], class_names=["cat", "dog"], max_images=1
    )
    pad = 2  # make_grid's border
    assert grid.dtype == torch.uint8 and grid.shape == (3, 20 + 2 * pad, 2 * 30 + 3 * pad)
    left = grid[:, pad : pad + 20, pad : pad + 30]
    right = grid[:, pad : pad + 20, 2 * pad + 30 : 2 * pad + 60]
    assert left[:, 6, 2].tolist() == [0, 255, 0]  # lime left edge of the ground truth
    assert right[:, 8, 4].tolist() == [255, 0, 0]  # red left edge of the 0.9 detection
    assert right[:, 17, 15].tolist() == [0, 0, 0]  # the 0.2 detection is below threshold
    with pytest.raises(ValueError):
        draw_detection_panels([], [], [])
