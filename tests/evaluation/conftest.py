"""Hand-made ground truths for the evaluator tests."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from frcnn.structures import Detections

# COCO-style category ids with gaps, and the contiguous labels 1..3 that stand for them.
CATEGORY_IDS = (1, 5, 90)
CLASS_NAMES = ("person", "car", "toothbrush")
LABEL_TO_CATEGORY_ID = {1: 1, 2: 5, 3: 90}


def _annotation(ann_id: int, image_id: int, category_id: int, xywh: list[float], crowd: int = 0):
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": xywh,
        "area": xywh[2] * xywh[3],
        "iscrowd": crowd,
    }


def coco_gt_dict() -> dict:
    """Four images; small (< 32^2), medium and large boxes; one crowd region; one empty image."""
    boxes = [
        (3, 1, [10, 10, 20, 20]),  # small
        (3, 1, [50, 40, 60, 80]),  # medium
        (3, 5, [100, 100, 150, 120]),  # large
        (3, 90, [200, 10, 25, 20]),
        (7, 1, [0, 0, 120, 200]),
        (7, 5, [130, 20, 40, 30]),
        (7, 1, [160, 100, 60, 60], 1),  # crowd
        (7, 90, [30, 210, 12, 8]),
        (11, 5, [5, 5, 300, 150]),
        (11, 5, [20, 160, 40, 40]),
    ]
    annotations = [_annotation(index + 1, *entry) for index, entry in enumerate(boxes)]
    images = [
        {"id": 3, "height": 240, "width": 320, "file_name": "a.jpg"},
        {"id": 7, "height": 240, "width": 240, "file_name": "b.jpg"},
        {"id": 11, "height": 200, "width": 320, "file_name": "c.jpg"},
        {"id": 12, "height": 100, "width": 100, "file_name": "empty.jpg"},
    ]
    categories = [
        {"id": category_id, "name": name} for category_id, name in zip(CATEGORY_IDS, CLASS_NAMES)
    ]
    return {"images": images, "annotations": annotations, "categories": categories}


def make_coco(dataset: dict) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


@pytest.fixture
def coco_gt() -> COCO:
    return make_coco(coco_gt_dict())


def random_detections(coco: COCO, seed: int) -> dict[int, Detections]:
    """Jittered copies of the ground truth, some with the wrong class, plus random boxes."""
    rng = np.random.default_rng(seed)
    category_to_label = {v: k for k, v in LABEL_TO_CATEGORY_ID.items()}
    detections = {}
    for image_id in coco.getImgIds():
        image = coco.imgs[image_id]
        gts = coco.imgToAnns[image_id]
        xyxy = np.array(
            [[x, y, x + w, y + h] for x, y, w, h in (g["bbox"] for g in gts)], dtype=np.float64
        )
        labels = [category_to_label[g["category_id"]] for g in gts]
        num_random = int(rng.integers(0, 6))
        corners = rng.uniform(0, [image["width"], image["height"]] * 2, size=(num_random, 4))
        random_boxes = np.concatenate([corners[:, :2], corners[:, :2] + corners[:, 2:] / 3], 1)
        copies = np.repeat(xyxy.reshape(-1, 4), 2, axis=0)
        copies += rng.normal(0, 1, size=copies.shape) * (copies[:, 2:3] - copies[:, 0:1]) / 10
        boxes = np.concatenate([copies, random_boxes]).astype(np.float32)
        copy_labels = np.repeat(labels, 2)
        wrong = rng.random(copy_labels.shape) < 0.2
        copy_labels[wrong] = rng.integers(1, 4, size=int(wrong.sum()))
        all_labels = np.concatenate([copy_labels, rng.integers(1, 4, size=num_random)])
        scores = rng.random(boxes.shape[0]).astype(np.float32)
        order = np.argsort(-scores)
        detections[image_id] = Detections(
            torch.from_numpy(boxes[order]),
            torch.from_numpy(scores[order]),
            torch.from_numpy(all_labels[order].astype(np.int64)),
        )
    return detections


@pytest.fixture
def make_random_detections():
    return random_detections


@pytest.fixture
def coco_classes() -> tuple[tuple[str, ...], dict[int, int]]:
    """Class names and the label -> category id mapping of ``coco_gt``."""
    return CLASS_NAMES, dict(LABEL_TO_CATEGORY_ID)
