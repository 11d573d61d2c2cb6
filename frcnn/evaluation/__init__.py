"""Evaluators: COCO box AP through pycocotools, PASCAL VOC AP (07 11-point and area), tables.

Both evaluators take detections per image (``image_id`` plus ``frcnn.structures.Detections`` in
original-image pixels, labels 1..K) through ``update``; see ``evaluator`` for distributed use and
``records`` for the generic ground-truth format.
"""

from frcnn.evaluation.coco import COCO_METRICS, COCOEvaluator, coco_from_records
from frcnn.evaluation.evaluator import Evaluator, ImagePredictions
from frcnn.evaluation.records import GroundTruthRecord, ImageGroundTruth, parse_records
from frcnn.evaluation.table import format_metrics_table, format_per_class_table, format_results
from frcnn.evaluation.voc import (
    VOCEvaluator,
    average_precision_11_point,
    average_precision_area,
    match_detections,
    precision_recall,
)

__all__ = [
    "COCO_METRICS",
    "COCOEvaluator",
    "Evaluator",
    "GroundTruthRecord",
    "ImageGroundTruth",
    "ImagePredictions",
    "VOCEvaluator",
    "average_precision_11_point",
    "average_precision_area",
    "coco_from_records",
    "format_metrics_table",
    "format_per_class_table",
    "format_results",
    "match_detections",
    "parse_records",
    "precision_recall",
]
