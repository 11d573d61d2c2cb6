"""Ground truth handed to the evaluators, in a form any dataset can produce.

A record describes one image::

    {"image_id": int, "height": int, "width": int,
     "boxes": (G, 4) x1y1x2y2 in original-image pixels, "labels": (G,) in 1..K,
     "iscrowd": (G,) bool (optional), "difficult": (G,) bool (optional)}

Arrays may be numpy arrays, CPU tensors or nested lists. ``parse_records`` checks them once and
turns them into ``ImageGroundTruth`` (float64 boxes, so IoU is computed without float32 rounding).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

import numpy as np
import torch


# NotRequired needs Python 3.11; a total=False subclass keeps the optional keys typed on 3.10.
class _RequiredRecord(TypedDict):
    image_id: int
    height: int
    width: int
    boxes: Any
    labels: Any


class GroundTruthRecord(_RequiredRecord, total=False):
    iscrowd: Any
    difficult: Any
    file_name: str


@dataclass
class ImageGroundTruth:
    """One image's checked ground truth: boxes (G, 4) float64, labels (G,) int64, flags bool."""

    image_id: int
    height: int
    width: int
    boxes: np.ndarray
    labels: np.ndarray
    iscrowd: np.ndarray
    difficult: np.ndarray
    file_name: str = ""


def to_numpy(values: Any, dtype: type | np.dtype) -> np.ndarray:
    """A new array of ``dtype`` from a numpy array, a tensor on any device, or a nested list."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        # numpy has no bfloat16; AMP outputs may carry it.
        values = values.float() if values.dtype == torch.bfloat16 else values
        values = values.numpy()
    return np.array(values, dtype=dtype)


def parse_records(records: Sequence[GroundTruthRecord], num_classes: int) -> list[ImageGroundTruth]:
    """Check every record and convert it; raise ``ValueError`` naming the bad record."""
    parsed = [_parse_record(record, index, num_classes) for index, record in enumerate(records)]
    seen: set[int] = set()
    for index, image in enumerate(parsed):
        if image.image_id in seen:
            raise ValueError(
                f"ground-truth records[{index}]: image_id {image.image_id} appears twice; "
                "give every image one record with a unique image_id"
            )
        seen.add(image.image_id)
    return parsed


def _parse_record(record: GroundTruthRecord, index: int, num_classes: int) -> ImageGroundTruth:
    where = f"ground-truth records[{index}]"
    missing = {"image_id", "height", "width", "boxes", "labels"} - set(record)
    if missing:
        raise ValueError(f"{where}: missing key(s) {sorted(missing)}; see frcnn.evaluation.records")
    where = f"{where} (image_id {record['image_id']})"
    boxes = to_numpy(record["boxes"], np.float64)
    boxes = boxes.reshape(0, 4) if boxes.size == 0 else boxes
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{where}: boxes have shape {boxes.shape}; expected (G, 4) x1y1x2y2")
    labels = to_numpy(record["labels"], np.int64).reshape(-1)
    num_boxes = boxes.shape[0]
    flags = {key: _flags(record.get(key), num_boxes) for key in ("iscrowd", "difficult")}
    sizes = {"labels": labels.shape[0], **{key: flag.shape[0] for key, flag in flags.items()}}
    for key, size in sizes.items():
        if size != num_boxes:
            raise ValueError(f"{where}: {num_boxes} boxes but {size} {key}; give one per box")
    _check_values(where, boxes, labels, num_classes)
    return ImageGroundTruth(
        image_id=int(record["image_id"]),
        height=int(record["height"]),
        width=int(record["width"]),
        boxes=boxes,
        labels=labels,
        iscrowd=flags["iscrowd"],
        difficult=flags["difficult"],
        file_name=str(record.get("file_name", "")),
    )


def _flags(values: Any, num_boxes: int) -> np.ndarray:
    if values is None:
        return np.zeros(num_boxes, dtype=bool)
    return to_numpy(values, bool).reshape(-1)


def _check_values(where: str, boxes: np.ndarray, labels: np.ndarray, num_classes: int) -> None:
    if not np.isfinite(boxes).all():
        raise ValueError(f"{where}: boxes contain NaN or inf; fix the annotation")
    if (boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any():
        raise ValueError(
            f"{where}: a box has x2 < x1 or y2 < y1; boxes must be (x1, y1, x2, y2) in pixels"
        )
    bad = labels[(labels < 1) | (labels > num_classes)]
    if bad.size:
        raise ValueError(
            f"{where}: label {int(bad[0])} is outside 1..{num_classes}; labels are contiguous "
            "1..K (0 is background) in the order of class_names"
        )
