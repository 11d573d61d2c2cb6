"""COCO box AP computed by pycocotools' COCOeval, for any dataset.

A COCO dataset brings its own ``pycocotools.coco.COCO`` ground truth; any other dataset (VOC, the
generated shapes) builds one in memory with ``coco_from_records``. Metrics are reported in percent,
as detectron2 prints them. A metric pycocotools cannot define (it returns -1: no ground truth in
that area range, or of that class) is reported as NaN rather than as a misleading number.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Mapping, Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from frcnn.evaluation.evaluator import Evaluator
from frcnn.evaluation.records import GroundTruthRecord, ImageGroundTruth, parse_records

# The first six entries of COCOeval.stats, in order.
COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def coco_from_records(records: Sequence[GroundTruthRecord], class_names: Sequence[str]) -> COCO:
    """An in-memory COCO ground truth from generic records (see ``frcnn.evaluation.records``).

    Category ids are the labels 1..K, named by ``class_names``. ``area`` is the box area
    (there are no masks). Difficult objects are written as ``iscrowd=1``: COCOeval then neither
    rewards nor punishes detections on them, which is what VOC's "difficult" means. Unlike VOC,
    COCOeval matches a detection to a crowd region by intersection over the detection's area,
    and lets several detections fall on the same region.
    """
    images = parse_records(records, len(class_names))
    categories = [{"id": label, "name": name} for label, name in enumerate(class_names, start=1)]
    dataset = {
        "info": {"description": "built by frcnn.evaluation.coco_from_records"},
        "images": [_image_entry(image) for image in images],
        "categories": categories,
        "annotations": _annotation_entries(images),
    }
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _image_entry(image: ImageGroundTruth) -> dict:
    entry = {"id": image.image_id, "height": image.height, "width": image.width}
    return {**entry, "file_name": image.file_name or str(image.image_id)}


def _annotation_entries(images: Sequence[ImageGroundTruth]) -> list[dict]:
    annotations = []
    for image in images:
        xywh = np.concatenate([image.boxes[:, :2], image.boxes[:, 2:] - image.boxes[:, :2]], 1)
        ignored = image.iscrowd | image.difficult
        for box, label, crowd in zip(xywh.tolist(), image.labels.tolist(), ignored.tolist()):
            annotations.append(
                {
                    # COCOeval marks an unmatched detection with gt id 0: ids must start at 1.
                    "id": len(annotations) + 1,
                    "image_id": image.image_id,
                    "category_id": label,
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": int(crowd),
                }
            )
    return annotations


class COCOEvaluator(Evaluator):
    """Box AP of detections against a COCO ground truth, through pycocotools' COCOeval.

    ``label_to_category_id`` maps every contiguous label 1..K to the dataset's category id (COCO's
    ids have gaps: 1..90); ``class_names[label - 1]`` names label's row of the per-class table.
    Only the mapped categories are evaluated. After ``evaluate()``, ``summary`` holds the 12
    lines pycocotools prints.
    """

    def __init__(
        self,
        coco_gt: COCO,
        label_to_category_id: Mapping[int, int],
        class_names: Sequence[str],
    ) -> None:
        _check_mapping(coco_gt, label_to_category_id, class_names)
        super().__init__(coco_gt.getImgIds(), len(class_names))
        self.coco_gt = coco_gt
        self.label_to_category_id = {int(k): int(v) for k, v in label_to_category_id.items()}
        self.class_names = list(class_names)
        self.summary = ""

    def results(self) -> list[dict]:
        """The detections in COCO's results format (bbox as x, y, w, h), sorted by image id."""
        category_of_label = np.zeros(len(self.class_names) + 1, dtype=np.int64)
        for label, category_id in self.label_to_category_id.items():
            category_of_label[label] = category_id
        results = []
        for image_id, boxes, scores, labels in self.state():
            boxes = boxes.astype(np.float64)
            xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
            categories = category_of_label[labels].tolist()
            for box, score, category_id in zip(xywh.tolist(), scores.tolist(), categories):
                if category_id == 0:
                    continue  # a label with no category (a gap in the ids) can match nothing
                results.append(
                    {"image_id": image_id, "category_id": category_id, "bbox": box, "score": score}
                )
        return results

    def evaluate(self) -> dict:
        """``{"AP", "AP50", "AP75", "APs", "APm", "APl"}`` in percent, plus ``"per_class"``."""
        coco_eval = self._run_cocoeval()
        metrics: dict = {
            name: _percent(float(value)) for name, value in zip(COCO_METRICS, coco_eval.stats)
        }
        metrics["per_class"] = self._per_class_ap(coco_eval)
        return metrics

    def _run_cocoeval(self) -> COCOeval:
        results = self.results()
        output = io.StringIO()
        with contextlib.redirect_stdout(output):
            # loadRes indexes results[0], so no detections at all needs an empty result set.
            coco_dt = self.coco_gt.loadRes(results) if results else _empty_results(self.coco_gt)
            coco_eval = COCOeval(self.coco_gt, coco_dt, iouType="bbox")
            coco_eval.params.imgIds = self._evaluated_image_ids()
            coco_eval.params.catIds = sorted(self.label_to_category_id.values())
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        lines = output.getvalue().splitlines()
        self.summary = "\n".join(line for line in lines if line.lstrip().startswith("Average"))
        return coco_eval

    def _per_class_ap(self, coco_eval: COCOeval) -> dict[str, float]:
        # precision: (IoU thresholds, recall thresholds, categories, area ranges, max dets);
        # area range 0 is "all" and the last max dets is 100, as in the headline AP.
        precision = coco_eval.eval["precision"]
        category_index = {category_id: k for k, category_id in enumerate(coco_eval.params.catIds)}
        per_class = {}
        for label, category_id in sorted(self.label_to_category_id.items()):
            name = self.class_names[label - 1]
            values = precision[:, :, category_index[category_id], 0, -1]
            defined = values[values > -1]
            per_class[name] = float(defined.mean()) * 100 if defined.size else math.nan
        return per_class


def _percent(value: float) -> float:
    return value * 100 if value >= 0 else math.nan


def _empty_results(coco_gt: COCO) -> COCO:
    coco_dt = COCO()
    coco_dt.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "categories": list(coco_gt.dataset.get("categories", [])),
        "annotations": [],
    }
    coco_dt.createIndex()
    return coco_dt


def _check_mapping(
    coco_gt: COCO, label_to_category_id: Mapping[int, int], class_names: Sequence[str]
) -> None:
    """Labels 1..K with K = len(class_names); the mapped labels may leave gaps (torchvision's
    91-label layout keeps COCO's unused ids as labels without a category)."""
    num_classes = len(class_names)
    labels = set(label_to_category_id)
    if not labels or not labels <= set(range(1, num_classes + 1)):
        raise ValueError(
            f"label_to_category_id has labels {sorted(labels)}; they must be labels in "
            f"1..{num_classes} (one per class name)"
        )
    mapped_names = [class_names[label - 1] for label in sorted(labels)]
    if len(set(mapped_names)) != len(mapped_names):
        raise ValueError(f"class_names {mapped_names} repeat a name; names must be unique")
    category_ids = list(label_to_category_id.values())
    unknown = sorted(set(category_ids) - set(coco_gt.getCatIds()))
    if unknown or len(set(category_ids)) != len(category_ids):
        raise ValueError(
            f"label_to_category_id maps to category ids {category_ids}; each must be a distinct "
            f"category of the ground truth (unknown: {unknown}, "
            f"known: {sorted(coco_gt.getCatIds())})"
        )
