"""VOCEvaluator on a hand-checked fixture, and against a literal transcription of the devkit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from frcnn.evaluation import (
    VOCEvaluator,
    average_precision_11_point,
    average_precision_area,
    coco_from_records,
)
from frcnn.structures import Detections

CLASSES = ["cat", "dog"]
CAT, DOG = 1, 2


def _records() -> list[dict]:
    return [
        {
            "image_id": 10,
            "height": 120,
            "width": 120,
            # A, B, D (difficult) are cats; E is a dog
            "boxes": [[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50], [0, 20, 10, 30]],
            "labels": [CAT, CAT, CAT, DOG],
            "difficult": [False, False, True, False],
        },
        {
            "image_id": 20,
            "height": 100,
            "width": 100,
            # C is a cat; F and G (difficult) are dogs
            "boxes": [[0, 0, 20, 20], [50, 50, 70, 70], [0, 40, 10, 50]],
            "labels": [CAT, DOG, DOG],
            "difficult": [False, False, True],
        },
        {"image_id": 30, "height": 50, "width": 50, "boxes": [], "labels": []},
    ]


# (image_id, box, score, label, outcome as the devkit decides it)
FIXTURE_DETECTIONS = [
    (10, [0, 0, 10, 10], 0.9, CAT),  # A, IoU 1: TP
    (10, [1, 0, 10, 10], 0.8, CAT),  # A again, IoU 0.9: duplicate, FP
    (10, [40, 40, 50, 50], 0.7, CAT),  # D is difficult: neither TP nor FP
    (20, [30, 30, 40, 40], 0.6, CAT),  # touches nothing: FP
    (20, [0, 0, 20, 18], 0.5, CAT),  # C, IoU 360/400 = 0.9: TP
    (10, [20, 20, 30, 25], 0.4, CAT),  # B, IoU 50/100 = 0.5 exactly, not > 0.5: FP
    (10, [20, 20, 30, 29], 0.3, CAT),  # B, IoU 0.9, unclaimed so far: TP
    (20, [50, 50, 70, 70], 0.2, CAT),  # on dog F: a cat detection never matches a dog: FP
    (10, [0, 20, 10, 30], 0.95, DOG),  # E: TP
    (20, [0, 40, 10, 50], 0.85, DOG),  # G is difficult: neither
    (20, [0, 41, 10, 50], 0.8, DOG),  # G again: a duplicate on a difficult box is still neither
    (10, [100, 100, 110, 110], 0.7, DOG),  # FP
    (30, [5, 5, 25, 25], 0.65, DOG),  # image without objects: FP
    (20, [55, 50, 70, 70], 0.6, DOG),  # F, IoU 300/400 = 0.75: TP
]

# cat: 3 positives (A, B, C; D is difficult). In score order, ignoring D's detection:
#   TP FP FP TP FP TP FP -> cumulative TP 1 1 1 2 2 3 3, FP 0 1 2 2 3 3 4
#   recall    1/3 1/3 1/3 2/3 2/3 1   1
#   precision 1   1/2 1/3 1/2 2/5 1/2 3/7
#   11-point: r = 0, .1, .2, .3 -> 1; r = .4 ... 1 (7 points) -> 1/2      => 7.5 / 11
#   area: envelope 1 on (0, 1/3], 1/2 on (1/3, 1]: 1/3 + 2/3 * 1/2       => 2/3
# dog: 2 positives (E, F; G is difficult). In score order, ignoring G's two detections:
#   TP FP FP TP -> recall 1/2 1/2 1/2 1, precision 1 1/2 1/3 1/2
#   11-point: r = 0 ... .5 (6 points) -> 1; r = .6 ... 1 (5 points) -> 1/2  => 8.5 / 11
#   area: 1/2 * 1 + 1/2 * 1/2                                           => 3/4
EXPECTED = {
    "per_class_07": {"cat": 100 * 7.5 / 11, "dog": 100 * 8.5 / 11},
    "per_class": {"cat": 100 * 2 / 3, "dog": 100 * 3 / 4},
    "mAP_07": 100 * 8 / 11,
    "mAP": 100 * 17 / 24,
}


def _update(evaluator, rows, image_ids=None) -> None:
    """Feed rows of (image_id, box, score, label); ``image_ids`` may list images without rows."""
    image_ids = list(dict.fromkeys(row[0] for row in rows)) if image_ids is None else image_ids
    detections = []
    for image_id in image_ids:
        mine = [row for row in rows if row[0] == image_id]
        detections.append(
            Detections(
                torch.tensor([row[1] for row in mine], dtype=torch.float32).reshape(-1, 4),
                torch.tensor([row[2] for row in mine], dtype=torch.float32),
                torch.tensor([row[3] for row in mine], dtype=torch.int64),
            )
        )
    evaluator.update(image_ids, detections)


def _assert_matches(result: dict, expected: dict) -> None:
    assert result.keys() == expected.keys()
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-9), key


def test_hand_checked_fixture():
    evaluator = VOCEvaluator(CLASSES, _records())
    _update(evaluator, FIXTURE_DETECTIONS)
    _assert_matches(evaluator.evaluate(), EXPECTED)


def test_result_does_not_depend_on_update_order_or_merging():
    evaluator = VOCEvaluator(CLASSES, _records())
    other = VOCEvaluator(CLASSES, _records())
    _update(evaluator, [row for row in FIXTURE_DETECTIONS if row[0] == 20])
    _update(other, [row for row in FIXTURE_DETECTIONS if row[0] != 20], image_ids=[30, 10])
    evaluator.merge([other.state(), evaluator.state()])
    _assert_matches(evaluator.evaluate(), EXPECTED)


def test_perfect_detections_give_100_and_none_give_0():
    records = _records()
    perfect = VOCEvaluator(CLASSES, records)
    empty = VOCEvaluator(CLASSES, records)
    for record in records:
        boxes = torch.tensor(record["boxes"], dtype=torch.float32).reshape(-1, 4)
        detections = Detections(boxes, torch.ones(len(boxes)), torch.tensor(record["labels"]))
        perfect.update([record["image_id"]], [detections])
        empty.update(
            [record["image_id"]], [Detections(boxes[:0], torch.ones(0), detections.labels[:0])]
        )
    result = perfect.evaluate()
    for key in ("per_class_07", "per_class"):
        assert result[key] == pytest.approx({"cat": 100.0, "dog": 100.0})
    assert result["mAP_07"] == pytest.approx(100.0) and result["mAP"] == pytest.approx(100.0)
    none = empty.evaluate()
    assert none == {
        "mAP_07": 0.0,
        "mAP": 0.0,
        "per_class_07": {"cat": 0.0, "dog": 0.0},
        "per_class": {"cat": 0.0, "dog": 0.0},
    }
    assert VOCEvaluator(CLASSES, records).evaluate()["mAP"] == 0.0  # never updated


def test_class_without_ground_truth_is_nan_and_left_out_of_the_mean():
    evaluator = VOCEvaluator(CLASSES + ["bird"], _records())
    _update(evaluator, FIXTURE_DETECTIONS + [(10, [60, 60, 70, 70], 0.5, 3)])
    result = evaluator.evaluate()
    assert math.isnan(result["per_class"]["bird"]) and math.isnan(result["per_class_07"]["bird"])
    assert result["mAP"] == pytest.approx(EXPECTED["mAP"], abs=1e-9)
    assert result["mAP_07"] == pytest.approx(EXPECTED["mAP_07"], abs=1e-9)


def test_eleven_point_thresholds_are_exact_tenths():
    # 3 of 10 positives found at precision 1, nothing else: recall reaches exactly 0.3, so
    # r = 0, .1, .2, .3 count (4/11); np.arange(0, 1.1, 0.1)'s 0.30000000000000004 would give 3/11.
    recall = np.array([1, 2, 3]) / 10
    precision = np.ones(3)
    assert average_precision_11_point(recall, precision) == pytest.approx(4 / 11, abs=1e-12)
    # area: 0.3 * 1
    assert average_precision_area(recall, precision) == pytest.approx(0.3, abs=1e-12)
    assert average_precision_11_point(np.zeros(0), np.zeros(0)) == 0.0
    assert average_precision_area(np.zeros(0), np.zeros(0)) == 0.0


def _devkit_ap(records, rows, label):
    """A literal transcription of the devkit's per-class loop (continuous-coordinate IoU)."""
    gts = {}
    num_positives = 0
    for record in records:
        keep = [i for i, lab in enumerate(record["labels"]) if lab == label]
        difficult = record.get("difficult", [False] * len(record["labels"]))
        gts[record["image_id"]] = {
            "boxes": np.array([record["boxes"][i] for i in keep], dtype=float).reshape(-1, 4),
            "difficult": [difficult[i] for i in keep],
            "det": [False] * len(keep),
        }
        num_positives += sum(not difficult[i] for i in keep)
    dets = [row for row in rows if row[3] == label]
    dets = sorted(dets, key=lambda row: -row[2])  # sorted() is stable, like our ordering
    tp, fp = np.zeros(len(dets)), np.zeros(len(dets))
    for d, (image_id, box, _, _) in enumerate(dets):
        gt = gts[image_id]
        ovmax, jmax = -np.inf, -1
        if len(gt["boxes"]):
            bbgt = gt["boxes"]
            iw = np.maximum(np.minimum(bbgt[:, 2], box[2]) - np.maximum(bbgt[:, 0], box[0]), 0)
            ih = np.maximum(np.minimum(bbgt[:, 3], box[3]) - np.maximum(bbgt[:, 1], box[1]), 0)
            inters = iw * ih
            union = (
                (box[2] - box[0]) * (box[3] - box[1])
                + (bbgt[:, 2] - bbgt[:, 0]) * (bbgt[:, 3] - bbgt[:, 1])
                - inters
            )
            overlaps = inters / union
            ovmax, jmax = np.max(overlaps), int(np.argmax(overlaps))
        if ovmax > 0.5:
            if not gt["difficult"][jmax]:
                if not gt["det"][jmax]:
                    tp[d] = 1.0
                    gt["det"][jmax] = True
                else:
                    fp[d] = 1.0
        else:
            fp[d] = 1.0
    fp, tp = np.cumsum(fp), np.cumsum(tp)
    rec = tp / float(num_positives)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    ap07 = 0.0
    for t in np.arange(11) / 10:
        ap07 += (np.max(prec[rec >= t]) if np.sum(rec >= t) else 0.0) / 11
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    for i in range(mpre.size - 1, 0, -1):
        mpre[i - 1] = max(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return 100 * ap07, 100 * float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_matches_the_devkit_loop_on_random_detections(seed):
    rng = np.random.default_rng(seed)
    records = []
    rows = []
    for image_id in range(6):
        num_gt = int(rng.integers(0, 6))
        xy = rng.uniform(0, 80, size=(num_gt, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(5, 30, size=(num_gt, 2))], axis=1)
        labels = rng.integers(1, 3, size=num_gt)
        difficult = rng.random(num_gt) < 0.2
        records.append(
            {
                "image_id": image_id,
                "height": 120,
                "width": 120,
                "boxes": boxes.tolist(),
                "labels": labels.tolist(),
                "difficult": difficult.tolist(),
            }
        )
        for box, label in zip(np.repeat(boxes, 3, axis=0), np.repeat(labels, 3)):
            jittered = (box + rng.normal(0, 2, size=4)).astype(np.float32).astype(float)
            flipped = label if rng.random() < 0.8 else 3 - label
            rows.append((image_id, jittered.tolist(), float(rng.random()), int(flipped)))
    evaluator = VOCEvaluator(CLASSES, records)
    _update(evaluator, rows, image_ids=list(range(6)))
    result = evaluator.evaluate()
    for label, name in ((CAT, "cat"), (DOG, "dog")):
        ap07, ap = _devkit_ap(records, rows, label)
        assert result["per_class_07"][name] == pytest.approx(ap07, abs=1e-9)
        assert result["per_class"][name] == pytest.approx(ap, abs=1e-9)
    assert 0 < result["mAP"] < 100


def test_voc_records_also_feed_the_coco_evaluator():
    from frcnn.evaluation import COCOEvaluator

    records = _records()
    evaluator = COCOEvaluator(coco_from_records(records, CLASSES), {1: 1, 2: 2}, CLASSES)
    _update(evaluator, FIXTURE_DETECTIONS)
    result = evaluator.evaluate()
    assert 0 < result["AP50"] < 100


def test_bad_records_name_the_record():
    records = _records()
    records[1]["difficult"] = [False]
    with pytest.raises(ValueError, match=r"records\[1\] \(image_id 20\): 3 boxes but 1 difficult"):
        VOCEvaluator(CLASSES, records)
    records = _records()
    records[2]["image_id"] = 10
    with pytest.raises(ValueError, match="image_id 10 appears twice"):
        VOCEvaluator(CLASSES, records)
