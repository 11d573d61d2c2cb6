"""What every evaluator shares: collecting detections per image, and merging across processes.

Distributed use: each process calls ``update`` on its own images, the engine gathers
``evaluator.state()`` from every rank (``torch.distributed.all_gather_object``; the state is a
plain list of numpy arrays, so it pickles cheaply) and rank 0 calls ``merge(states)`` then
``evaluate()``. Detections are kept one entry per ``image_id``: merging a state twice, or the
repeated images a ``DistributedSampler`` pads its last batch with, changes nothing.

Images are evaluated over the set given to ``update`` (as detectron2 does), so evaluating a
prefix of the test set scores that prefix; an image given with empty ``Detections`` counts as a
miss of all its objects. If ``update`` was never called, every ground-truth image is evaluated
as if nothing had been detected.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Collection, Iterable, Sequence

import numpy as np

from frcnn.evaluation.records import to_numpy
from frcnn.structures import Detections

logger = logging.getLogger(__name__)

# (image_id, boxes (D, 4) float32 x1y1x2y2, scores (D,) float32, labels (D,) int64 in 1..K)
ImagePredictions = tuple[int, np.ndarray, np.ndarray, np.ndarray]


class Evaluator(ABC):
    """Collects detections; subclasses implement ``evaluate() -> dict``."""

    def __init__(self, known_image_ids: Collection[int], num_classes: int) -> None:
        self._known_image_ids = frozenset(int(image_id) for image_id in known_image_ids)
        self._num_classes = num_classes
        self._predictions: dict[int, ImagePredictions] = {}

    def reset(self) -> None:
        self._predictions = {}

    def update(self, image_ids: Sequence[int], detections: Sequence[Detections]) -> None:
        """Record the detections of a batch; boxes in original-image pixels, labels in 1..K."""
        if len(image_ids) != len(detections):
            raise ValueError(
                f"update() got {len(image_ids)} image ids but {len(detections)} Detections; "
                "pass one Detections per image id"
            )
        for image_id, detection in zip(image_ids, detections):
            self._add(_to_predictions(int(image_id), detection))

    def state(self) -> list[ImagePredictions]:
        """This process's detections, picklable, in the order of their image ids."""
        return [self._predictions[image_id] for image_id in sorted(self._predictions)]

    def merge(self, states: Iterable[list[ImagePredictions]]) -> None:
        """Add the states gathered from other processes (this process's own may be included)."""
        for state in states:
            for predictions in state:
                self._add(predictions)

    def __len__(self) -> int:
        """Number of distinct images seen so far."""
        return len(self._predictions)

    @abstractmethod
    def evaluate(self) -> dict:
        """Metrics in percent, with one or more ``per_class*`` dicts of class name -> AP."""

    def _evaluated_image_ids(self) -> list[int]:
        return sorted(self._predictions or self._known_image_ids)

    def _add(self, predictions: ImagePredictions) -> None:
        image_id, boxes, scores, labels = predictions
        if image_id not in self._known_image_ids:
            raise ValueError(
                f"detections for image_id {image_id}, which is not in the ground truth this "
                "evaluator was built from; build it from the same split as the data loader"
            )
        bad = labels[(labels < 1) | (labels > self._num_classes)]
        if bad.size:
            raise ValueError(
                f"image_id {image_id}: detection label {int(bad[0])} is outside "
                f"1..{self._num_classes}; Detections labels must be contiguous 1..K"
            )
        self._predictions[image_id] = predictions


def _to_predictions(image_id: int, detections: Detections) -> ImagePredictions:
    boxes = to_numpy(detections.boxes, np.float32).reshape(-1, 4)
    scores = to_numpy(detections.scores, np.float32).reshape(-1)
    labels = to_numpy(detections.labels, np.int64).reshape(-1)
    if not (boxes.shape[0] == scores.shape[0] == labels.shape[0]):
        raise ValueError(
            f"image_id {image_id}: Detections has {boxes.shape[0]} boxes, {scores.shape[0]} "
            f"scores and {labels.shape[0]} labels; they must have the same length"
        )
    finite = np.isfinite(boxes).all(axis=1) & np.isfinite(scores)
    if not finite.all():
        # A diverged model should not crash the evaluation at the end of a long run.
        logger.warning(
            "image_id %d: dropped %d detections with NaN or inf boxes or scores",
            image_id,
            int((~finite).sum()),
        )
    return image_id, boxes[finite], scores[finite], labels[finite]
