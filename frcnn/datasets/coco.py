"""COCO-format detection datasets read through pycocotools.

Category ids (COCO's 1..90 with gaps, or anything else) are mapped to contiguous labels 1..K in
increasing id order; ``label_to_category_id`` maps them back when writing results.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from frcnn.datasets.common import (
    DatasetItem,
    Transforms,
    config_hint,
    make_item,
    read_image,
    require_path,
)

logger = logging.getLogger(__name__)

# Degenerate boxes are listed one by one up to this count, then summarised.
_MAX_LISTED_WARNINGS = 10


def _load_json(path: Path, hint: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path}: not valid JSON (line {error.lineno}, column {error.colno}: {error.msg}); "
            f"fix the file or point {hint} at another one"
        ) from None
    if not isinstance(data, dict) or "images" not in data or "categories" not in data:
        raise ValueError(
            f"{path}: not a COCO annotation file (a JSON object with 'images', 'annotations' "
            f"and 'categories' is expected); check {hint}"
        )
    data.setdefault("annotations", [])
    return data


def _check_annotations(data: dict[str, Any], path: Path) -> None:
    """Fail early, naming the record, on what would otherwise crash deep inside training."""
    for position, image in enumerate(data["images"]):
        if "id" not in image or "file_name" not in image:
            raise ValueError(f"{path}: image #{position} lacks 'id' or 'file_name'")
    image_ids = {image["id"] for image in data["images"]}
    category_ids = {category["id"] for category in data["categories"]}
    for position, ann in enumerate(data["annotations"]):
        missing = [k for k in ("id", "image_id", "category_id", "bbox") if k not in ann]
        name = f"{path}: annotation #{position} (id {ann.get('id', '?')})"
        if missing:
            raise ValueError(f"{name} lacks {', '.join(missing)}")
        if not isinstance(ann["bbox"], list) or len(ann["bbox"]) != 4:
            raise ValueError(f"{name}: bbox must be [x, y, width, height], got {ann['bbox']!r}")
        if ann["image_id"] not in image_ids:
            raise ValueError(f"{name} refers to image_id {ann['image_id']}, not in 'images'")
        if ann["category_id"] not in category_ids:
            raise ValueError(
                f"{name} refers to category_id {ann['category_id']}, not in 'categories'"
            )
        # COCOeval reads both; box-only files often leave them out.
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(ann["bbox"][2]) * float(ann["bbox"][3]))


def load_coco(
    annotation_file: str | os.PathLike,
    hint: str = "data.test.annotations",
    prepare: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> COCO:
    """A pycocotools COCO object for ``annotation_file``, with clear errors on bad files.
    ``prepare`` edits the parsed json first (the dataset checker's lenient fixes)."""
    path = Path(annotation_file)
    require_path(path, "file", "COCO annotation file", hint)
    data = _load_json(path, hint)
    if prepare is not None:
        data = prepare(data)
    _check_annotations(data, path)
    coco = COCO()
    coco.dataset = data
    # pycocotools prints progress to stdout; keep the training log clean.
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class COCODataset(Dataset):
    """Images of ``images_dir`` annotated by the COCO json ``annotation_file``.

    Items are ``(image, targets, info)`` (see ``frcnn.datasets.common.DatasetItem``); crowd
    annotations are kept with ``iscrowd`` set; boxes with zero width or height are dropped with a
    warning. ``filter_empty`` drops images without a usable non-crowd box (for training).
    ``category_ids_as_labels`` uses the raw category ids as labels (torchvision's layout).
    ``prepare`` edits the parsed json first (``frcnn.datasets.check.clean_coco``: lenient fixes).
    """

    def __init__(
        self,
        images_dir: str | os.PathLike,
        annotation_file: str | os.PathLike,
        transforms: Transforms | None = None,
        filter_empty: bool = False,
        category_ids_as_labels: bool = False,
        *,
        config_prefix: str | None = None,
        prepare: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        self.images_dir = Path(images_dir)
        self.annotation_file = Path(annotation_file)
        self.transforms = transforms
        hint = config_hint(config_prefix, "annotations")
        self.coco = load_coco(self.annotation_file, hint, prepare)
        require_path(
            self.images_dir, "dir", "COCO image folder", config_hint(config_prefix, "images")
        )
        self._set_label_mapping(category_ids_as_labels)
        image_ids = sorted(self.coco.imgs)
        annotations = self._collect_annotations(image_ids)
        if filter_empty:
            keep = [i for i, (_, _, crowd) in enumerate(annotations) if (~crowd).any()]
            image_ids = [image_ids[i] for i in keep]
            annotations = [annotations[i] for i in keep]
        self.image_ids: list[int] = image_ids
        self._annotations = annotations

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _set_label_mapping(self, category_ids_as_labels: bool) -> None:
        """Labels 1..K in increasing category id order, or the category ids themselves
        (torchvision's 91-logit COCO layout, where unused ids are named "N/A")."""
        category_ids = sorted(self.coco.cats)
        if category_ids_as_labels:
            if category_ids and category_ids[0] <= 0:
                raise ValueError(
                    f"{self.annotation_file}: category id {category_ids[0]} cannot be a label "
                    "(0 is background); set data.category_ids_as_labels=false"
                )
            labels = category_ids
            names = ["N/A"] * (max(category_ids, default=0))
        else:
            labels = list(range(1, len(category_ids) + 1))
            names = [""] * len(category_ids)
        for label, cat_id in zip(labels, category_ids):
            names[label - 1] = str(self.coco.cats[cat_id]["name"])
        self.category_id_to_label = dict(zip(category_ids, labels))
        self.label_to_category_id = dict(zip(labels, category_ids))
        # class_names[label - 1] is the name of label ``label``.
        self.class_names: list[str] = names

    def _collect_annotations(
        self, image_ids: list[int]
    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per image: boxes (G, 4) float32 XYXY, labels (G,) int64, iscrowd (G,) bool."""
        per_image = []
        dropped = 0
        for image_id in image_ids:
            boxes, labels, crowd = [], [], []
            for ann in self.coco.imgToAnns.get(image_id, []):
                x, y, w, h = (float(v) for v in ann["bbox"])
                # a NaN or infinite coordinate passes a w > 0 test and would poison the losses
                if not (w > 0 and h > 0 and all(map(math.isfinite, (x, y, w, h)))):
                    dropped += 1
                    if dropped <= _MAX_LISTED_WARNINGS:
                        logger.warning(
                            "%s: dropping annotation id %s of image %s: degenerate or "
                            "non-finite bbox %s",
                            self.annotation_file,
                            ann["id"],
                            self.coco.imgs[image_id].get("file_name", image_id),
                            ann["bbox"],
                        )
                    continue
                boxes.append((x, y, x + w, y + h))
                labels.append(self.category_id_to_label[ann["category_id"]])
                crowd.append(bool(ann.get("iscrowd", 0)))
            per_image.append(
                (
                    np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                    np.asarray(labels, dtype=np.int64),
                    np.asarray(crowd, dtype=bool),
                )
            )
        if dropped > _MAX_LISTED_WARNINGS:
            logger.warning("%s: %d degenerate boxes dropped in all", self.annotation_file, dropped)
        return per_image

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> DatasetItem:
        image_id = self.image_ids[index]
        file_name = str(self.coco.imgs[image_id]["file_name"])
        image = read_image(self.images_dir / file_name)
        boxes, labels, crowd = self._annotations[index]
        return make_item(
            image,
            torch.from_numpy(boxes),
            torch.from_numpy(labels),
            torch.from_numpy(crowd),
            self.transforms,
            image_id,
            file_name,
        )

    def coco_gt(self) -> COCO:
        """The pycocotools ground truth, for the COCO evaluator."""
        return self.coco

    def records(self) -> list[dict[str, Any]]:
        """Evaluation ground truth of every image (for the VOC evaluator), crowd boxes flagged.

        Each record: ``image_id``, ``height``, ``width``, ``boxes`` (G, 4) float32 in original
        pixels, ``labels`` (G,) int64, ``iscrowd`` (G,) bool.
        """
        return [
            {
                "image_id": image_id,
                "height": int(self.coco.imgs[image_id].get("height", 0)),
                "width": int(self.coco.imgs[image_id].get("width", 0)),
                "boxes": torch.from_numpy(boxes.copy()),
                "labels": torch.from_numpy(labels.copy()),
                "iscrowd": torch.from_numpy(crowd.copy()),
            }
            for image_id, (boxes, labels, crowd) in zip(self.image_ids, self._annotations)
        ]

    def image_aspect_ratios(self) -> list[float]:
        """Width / height of every image, from the json (no decoding)."""
        ratios = []
        for image_id in self.image_ids:
            record = self.coco.imgs[image_id]
            if not record.get("width") or not record.get("height"):
                raise ValueError(
                    f"{self.annotation_file}: image id {image_id} has no width/height; add them "
                    "or set data.aspect_ratio_grouping=false"
                )
            ratios.append(float(record["width"]) / float(record["height"]))
        return ratios
