"""PASCAL VOC detection AP: the devkit's matching, with both of its AP definitions.

The algorithm is the classic devkit's (VOCevaldet.m, and py-faster-rcnn's voc_eval.py): per class,
detections in order of decreasing score; a detection is matched to the ground-truth box of its class
and image with the highest IoU; if that IoU exceeds 0.5 it is a true positive the first time that
box is claimed and a false positive (a duplicate) afterwards, unless the box is difficult, in which
case the detection is neither; any other detection is a false positive. Difficult boxes do not
count in the number of positives. Crowd boxes (``iscrowd``) are treated like difficult ones.

Two choices differ from the devkit, on purpose:

- IoU uses continuous coordinates (``w = x2 - x1``), the framework-wide convention, instead of the
  devkit's inclusive-pixel ``w = x2 - x1 + 1``; the loaders already shift VOC's 1-based xml
  coordinates into continuous ones, so the "+1" would only inflate small boxes.
- The 11-point thresholds are exactly k/10. py-faster-rcnn's ``np.arange(0, 1.1, 0.1)`` makes 0.3,
  0.6 and 0.7 a hair larger, so a recall landing exactly on one of them is not counted there.

Classes with no (non-difficult) ground truth among the evaluated images have an undefined AP: NaN,
left out of the mean.

Shapes: D detections of an image, G ground-truth boxes of an image.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from frcnn.evaluation.evaluator import Evaluator
from frcnn.evaluation.records import GroundTruthRecord, ImageGroundTruth, parse_records
from frcnn.structures import batched_box_iou

# Outcome of one detection.
TRUE_POSITIVE = 1
FALSE_POSITIVE = -1
IGNORED = 0


class VOCEvaluator(Evaluator):
    """VOC07 11-point and area-under-curve (VOC2010+) AP, per class and averaged, in percent.

    ``records`` follow ``frcnn.evaluation.records`` and must keep the difficult objects (flagged),
    since matching one is what makes a detection neither right nor wrong.
    """

    def __init__(
        self,
        class_names: Sequence[str],
        records: Sequence[GroundTruthRecord],
        iou_thresh: float = 0.5,
    ) -> None:
        if len(set(class_names)) != len(class_names):
            raise ValueError(f"class_names {list(class_names)} repeat a name; names must be unique")
        images = parse_records(records, len(class_names))
        super().__init__([image.image_id for image in images], len(class_names))
        self.class_names = list(class_names)
        self.iou_thresh = iou_thresh
        self._images = {image.image_id: image for image in images}

    def evaluate(self) -> dict:
        """``{"mAP_07", "mAP", "per_class_07", "per_class"}``; per-class dicts map name -> AP%."""
        scores, labels, outcomes, num_positives = self._match_all()
        per_class_07: dict[str, float] = {}
        per_class: dict[str, float] = {}
        for label, name in enumerate(self.class_names, start=1):
            of_class = labels == label
            per_class_07[name], per_class[name] = _class_ap(
                scores[of_class], outcomes[of_class], int(num_positives[label])
            )
        return {
            "mAP_07": _mean_defined(per_class_07),
            "mAP": _mean_defined(per_class),
            "per_class_07": per_class_07,
            "per_class": per_class,
        }

    def _match_all(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Scores, labels and outcomes of every detection; positives per label (index 0 unused)."""
        scores, labels, outcomes = [], [], []
        num_positives = np.zeros(len(self.class_names) + 1, dtype=np.int64)
        for image_id in self._evaluated_image_ids():
            gt = self._images[image_id]
            ignored = gt.difficult | gt.iscrowd
            num_positives += np.bincount(gt.labels[~ignored], minlength=num_positives.size)
            if image_id not in self._predictions:
                continue
            _, boxes, image_scores, image_labels = self._predictions[image_id]
            order = np.argsort(-image_scores, kind="stable")
            scores.append(image_scores[order])
            labels.append(image_labels[order])
            outcomes.append(
                match_detections(boxes[order], image_labels[order], gt, self.iou_thresh)
            )
        if not scores:
            empty = np.zeros(0)
            return empty, empty.astype(np.int64), empty.astype(np.int64), num_positives
        return (
            np.concatenate(scores),
            np.concatenate(labels),
            np.concatenate(outcomes),
            num_positives,
        )


def match_detections(
    boxes: np.ndarray, labels: np.ndarray, gt: ImageGroundTruth, iou_thresh: float = 0.5
) -> np.ndarray:
    """Outcome (D,) of an image's detections, given in order of decreasing score.

    Each detection claims the same-class ground-truth box of highest IoU (the first on ties);
    the first detection to claim a non-difficult box above ``iou_thresh`` is the true positive.
    """
    num_detections = boxes.shape[0]
    if gt.boxes.shape[0] == 0 or num_detections == 0:
        return np.full(num_detections, FALSE_POSITIVE, dtype=np.int64)
    iou = batched_box_iou(
        torch.from_numpy(boxes.astype(np.float64)), torch.from_numpy(gt.boxes)
    ).numpy()  # (D, G)
    iou[labels[:, None] != gt.labels[None, :]] = -1.0
    best_gt = iou.argmax(axis=1)
    hit = iou[np.arange(num_detections), best_gt] > iou_thresh
    on_ignored = hit & (gt.difficult | gt.iscrowd)[best_gt]
    claims = np.flatnonzero(hit & ~on_ignored)
    # np.unique's return_index gives each box's first (highest-scoring) claimant.
    _, first_claims = np.unique(best_gt[claims], return_index=True)
    outcomes = np.where(on_ignored, IGNORED, FALSE_POSITIVE)
    outcomes[claims[first_claims]] = TRUE_POSITIVE
    return outcomes


def precision_recall(
    scores: np.ndarray, outcomes: np.ndarray, num_positives: int
) -> tuple[np.ndarray, np.ndarray]:
    """Recall and precision after each detection, in order of decreasing score.

    Ignored detections stay in the sequence and repeat the previous point, as in the devkit.
    ``num_positives`` must be positive.
    """
    order = np.argsort(-scores, kind="stable")
    true_positives = np.cumsum(outcomes[order] == TRUE_POSITIVE)
    false_positives = np.cumsum(outcomes[order] == FALSE_POSITIVE)
    recall = true_positives / max(num_positives, 1)
    total = np.maximum(true_positives + false_positives, np.finfo(np.float64).eps)
    return recall, true_positives / total


def average_precision_11_point(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC2007: mean over recall r in {0, 0.1, ..., 1} of the best precision at recall >= r."""
    if recall.size == 0:
        return 0.0
    thresholds = np.arange(11) / 10
    best_from = np.maximum.accumulate(precision[::-1])[::-1]  # best precision at index >= i
    first_reaching = np.searchsorted(recall, thresholds, side="left")
    padded = np.append(best_from, 0.0)  # no point reaches the threshold: precision 0
    return float(padded[first_reaching].mean())


def average_precision_area(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC2010+: area under the precision envelope (precision made non-increasing in recall)."""
    recall = np.concatenate([[0.0], recall, [1.0]])
    envelope = np.concatenate([[0.0], precision, [0.0]])
    envelope = np.maximum.accumulate(envelope[::-1])[::-1]
    steps = np.flatnonzero(recall[1:] != recall[:-1])
    return float(np.sum((recall[steps + 1] - recall[steps]) * envelope[steps + 1]))


def _class_ap(scores: np.ndarray, outcomes: np.ndarray, num_positives: int) -> tuple[float, float]:
    """11-point and area AP of one class in percent; NaN without ground truth."""
    if num_positives == 0:
        return math.nan, math.nan
    recall, precision = precision_recall(scores, outcomes, num_positives)
    return (
        100 * average_precision_11_point(recall, precision),
        100 * average_precision_area(recall, precision),
    )


def _mean_defined(per_class: Mapping[str, float]) -> float:
    defined = [value for value in per_class.values() if not math.isnan(value)]
    return sum(defined) / len(defined) if defined else math.nan
