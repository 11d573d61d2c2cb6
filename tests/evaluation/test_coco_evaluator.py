"""COCOEvaluator against pycocotools' COCOeval run directly on the same detections."""

from __future__ import annotations

import contextlib
import copy
import io
import math

import numpy as np
import pytest
import torch
from pycocotools.cocoeval import COCOeval

from frcnn.evaluation import COCO_METRICS, COCOEvaluator, coco_from_records
from frcnn.structures import Detections


def _reference(coco_gt, detections, label_to_category_id, image_ids=None):
    """COCOeval on results written by hand from the detections: (stats[:6] in %, precision)."""
    results = []
    for image_id, det in detections.items():
        for box, score, label in zip(det.boxes.tolist(), det.scores.tolist(), det.labels.tolist()):
            x1, y1, x2, y2 = box
            results.append(
                {
                    "image_id": image_id,
                    "category_id": label_to_category_id[label],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": score,
                }
            )
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(results), "bbox")
        if image_ids is not None:
            coco_eval.params.imgIds = image_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    stats = [value * 100 if value >= 0 else math.nan for value in coco_eval.stats[:6]]
    return stats, coco_eval.eval["precision"]


def _evaluator(coco_gt, coco_classes, detections=None):
    class_names, mapping = coco_classes
    evaluator = COCOEvaluator(coco_gt, mapping, list(class_names))
    if detections is not None:
        evaluator.update(list(detections), list(detections.values()))
    return evaluator


def _assert_close(actual: float, expected: float) -> None:
    assert (math.isnan(actual) and math.isnan(expected)) or actual == pytest.approx(
        expected, abs=1e-9
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_pycocotools_on_random_detections(
    coco_gt, coco_classes, make_random_detections, seed
):
    detections = make_random_detections(coco_gt, seed)
    metrics = _evaluator(coco_gt, coco_classes, detections).evaluate()
    stats, precision = _reference(copy.deepcopy(coco_gt), detections, coco_classes[1])
    for name, expected in zip(COCO_METRICS, stats):
        _assert_close(metrics[name], expected)
    assert 0 < metrics["AP"] < 100  # the fixture is neither trivial nor hopeless
    # precision axes: (IoU, recall, category in sorted id order, area "all", maxDets 100)
    for k, name in enumerate(coco_classes[0]):
        values = precision[:, :, k, 0, -1]
        _assert_close(metrics["per_class"][name], float(values[values > -1].mean()) * 100)


def test_subset_of_images_is_evaluated_like_cocoeval_restricted_to_it(
    coco_gt, coco_classes, make_random_detections
):
    detections = {k: v for k, v in make_random_detections(coco_gt, 3).items() if k in (3, 7)}
    metrics = _evaluator(coco_gt, coco_classes, detections).evaluate()
    stats, _ = _reference(copy.deepcopy(coco_gt), detections, coco_classes[1], image_ids=[3, 7])
    for name, expected in zip(COCO_METRICS, stats):
        _assert_close(metrics[name], expected)


def _perfect_detections(coco_gt, coco_classes) -> dict[int, Detections]:
    category_to_label = {v: k for k, v in coco_classes[1].items()}
    detections = {}
    for image_id in coco_gt.getImgIds():
        anns = [a for a in coco_gt.imgToAnns[image_id] if not a["iscrowd"]]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)])
        labels = torch.tensor([category_to_label[a["category_id"]] for a in anns])
        detections[image_id] = Detections(
            boxes.reshape(-1, 4).float(), torch.ones(len(anns)), labels.long()
        )
    return detections


def test_perfect_detections_give_100(coco_gt, coco_classes):
    metrics = _evaluator(coco_gt, coco_classes, _perfect_detections(coco_gt, coco_classes))
    result = metrics.evaluate()
    for name in COCO_METRICS:
        assert result[name] == pytest.approx(100.0)
    assert result["per_class"] == pytest.approx({name: 100.0 for name in coco_classes[0]})


def test_no_detections_give_zero_without_crashing(coco_gt, coco_classes):
    empty = Detections(torch.zeros((0, 4)), torch.zeros(0), torch.zeros(0, dtype=torch.long))
    evaluator = _evaluator(coco_gt, coco_classes)
    evaluator.update(coco_gt.getImgIds(), [empty] * len(coco_gt.getImgIds()))
    assert evaluator.results() == []
    result = evaluator.evaluate()
    for name in COCO_METRICS:
        assert result[name] == 0.0
    assert result["per_class"] == {name: 0.0 for name in coco_classes[0]}
    assert "Average Precision" in evaluator.summary
    # never updated at all: every ground-truth image counts as missed
    assert _evaluator(coco_gt, coco_classes).evaluate()["AP"] == 0.0


def test_category_ids_with_gaps_are_mapped_back(coco_gt, coco_classes):
    # one exact detection of the toothbrush (label 3 -> category 90) in image 3
    detections = {
        3: Detections(
            torch.tensor([[200.0, 10.0, 225.0, 30.0]]), torch.tensor([0.9]), torch.tensor([3])
        )
    }
    evaluator = _evaluator(coco_gt, coco_classes, detections)
    (result,) = evaluator.results()
    assert result["category_id"] == 90
    assert result["bbox"] == pytest.approx([200.0, 10.0, 25.0, 20.0])
    assert result["image_id"] == 3 and result["score"] == pytest.approx(0.9)
    per_class = evaluator.evaluate()["per_class"]
    # image 3 only: person and car have gt there but no detections
    assert per_class == {"person": 0.0, "car": 0.0, "toothbrush": pytest.approx(100.0)}


def test_distributed_states_merge_to_the_single_process_result(
    coco_gt, coco_classes, make_random_detections
):
    detections = make_random_detections(coco_gt, 4)
    single = _evaluator(coco_gt, coco_classes, detections).evaluate()
    ranks = [_evaluator(coco_gt, coco_classes) for _ in range(2)]
    ids = list(detections)
    ranks[0].update(ids[0::2], [detections[i] for i in ids[0::2]])
    # a DistributedSampler pads rank 1 with a repeat of rank 0's first image
    ranks[1].update(ids[1::2] + ids[:1], [detections[i] for i in ids[1::2] + ids[:1]])
    ranks[0].merge([rank.state() for rank in ranks])
    assert len(ranks[0]) == len(ids)
    merged = ranks[0].evaluate()
    for name in COCO_METRICS:
        _assert_close(merged[name], single[name])


def test_coco_from_records_matches_a_hand_written_json(
    coco_gt, coco_classes, make_random_detections
):
    # the same ground truth as records, with labels 1..3 as category ids
    class_names, mapping = coco_classes
    category_to_label = {v: k for k, v in mapping.items()}
    records = []
    for image in coco_gt.dataset["images"]:
        anns = coco_gt.imgToAnns[image["id"]]
        records.append(
            {
                "image_id": image["id"],
                "height": image["height"],
                "width": image["width"],
                "boxes": [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)],
                "labels": [category_to_label[a["category_id"]] for a in anns],
                "iscrowd": [bool(a["iscrowd"]) for a in anns],
            }
        )
    built = coco_from_records(records, class_names)
    assert sorted(built.getCatIds()) == [1, 2, 3]
    assert [c["name"] for c in built.loadCats([1, 2, 3])] == list(class_names)
    identity = {label: label for label in mapping}
    detections = make_random_detections(coco_gt, 5)
    ours = COCOEvaluator(built, identity, list(class_names))
    ours.update(list(detections), list(detections.values()))
    stats, _ = _reference(copy.deepcopy(coco_gt), detections, mapping)
    for name, expected in zip(COCO_METRICS, stats):
        _assert_close(ours.evaluate()[name], expected)


def test_coco_from_records_turns_difficult_into_crowd():
    record = {
        "image_id": 1,
        "height": 50,
        "width": 60,
        "boxes": np.array([[0, 0, 10, 20], [5, 5, 25, 15]], dtype=np.float32),
        "labels": torch.tensor([1, 2]),
        "difficult": [False, True],
    }
    built = coco_from_records([record], ["a", "b"])
    anns = sorted(built.dataset["annotations"], key=lambda a: a["id"])
    assert [a["iscrowd"] for a in anns] == [0, 1]
    assert anns[1]["bbox"] == [5.0, 5.0, 20.0, 10.0] and anns[1]["area"] == 200.0
    assert min(a["id"] for a in anns) >= 1


def test_bad_inputs_raise_clear_errors(coco_gt, coco_classes):
    class_names, mapping = coco_classes
    with pytest.raises(ValueError, match="category ids"):
        COCOEvaluator(coco_gt, {1: 1, 2: 5, 3: 91}, list(class_names))
    with pytest.raises(ValueError, match="1..3"):
        COCOEvaluator(coco_gt, {1: 1, 2: 5, 4: 90}, list(class_names))
    evaluator = COCOEvaluator(coco_gt, mapping, list(class_names))
    one = Detections(torch.tensor([[0.0, 0, 5, 5]]), torch.tensor([0.5]), torch.tensor([4]))
    with pytest.raises(ValueError, match="outside 1..3"):
        evaluator.update([3], [one])
    with pytest.raises(ValueError, match="image_id 999"):
        evaluator.update([999], [Detections(one.boxes, one.scores, torch.tensor([1]))])
    with pytest.raises(ValueError, match="2 image ids but 1"):
        evaluator.update([3, 7], [one])
    with pytest.raises(ValueError, match=r"records\[0\] \(image_id 5\).*outside 1..2"):
        coco_from_records(
            [{"image_id": 5, "height": 9, "width": 9, "boxes": [[0, 0, 1, 1]], "labels": [3]}],
            ["a", "b"],
        )


def test_labels_with_gaps_as_in_torchvision_layout(coco_gt):
    """Labels equal to the category ids (1, 5, 90 of 90 labels, the rest unused), as
    data.category_ids_as_labels gives for torchvision's 91-logit models; a detection with an
    unused label counts for nothing, and the numbers equal those of the contiguous layout."""
    names = ["N/A"] * 90
    for category in coco_gt.loadCats(coco_gt.getCatIds()):
        names[category["id"] - 1] = category["name"]
    identity = {cid: cid for cid in coco_gt.getCatIds()}
    gapped = COCOEvaluator(coco_gt, identity, names)
    contiguous_names = [names[cid - 1] for cid in sorted(identity)]
    contiguous = COCOEvaluator(
        coco_gt, {i + 1: cid for i, cid in enumerate(sorted(identity))}, contiguous_names
    )
    to_contiguous = {cid: i + 1 for i, cid in enumerate(sorted(identity))}
    for image_id in coco_gt.getImgIds():
        anns = coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=[image_id], iscrowd=False))
        boxes = torch.tensor(
            [
                [
                    a["bbox"][0],
                    a["bbox"][1],
                    a["bbox"][0] + a["bbox"][2],
                    a["bbox"][1] + a["bbox"][3],
                ]
                for a in anns
            ]
        ).reshape(-1, 4)
        labels = torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)
        scores = torch.linspace(0.9, 0.5, len(anns))
        unused = Detections(
            torch.tensor([[0.0, 0.0, 4.0, 4.0]]), torch.tensor([0.99]), torch.tensor([2])
        )  # label 2: no category 2 in the ground truth
        gapped.update(
            [image_id],
            [
                Detections(
                    torch.cat([boxes, unused.boxes]),
                    torch.cat([scores, unused.scores]),
                    torch.cat([labels, unused.labels]),
                )
            ],
        )
        contiguous.update(
            [image_id], [Detections(boxes, scores, labels.apply_(lambda c: to_contiguous[c]))]
        )
    ours, reference = gapped.evaluate(), contiguous.evaluate()
    for key in ("AP", "AP50", "AP75"):
        assert ours[key] == pytest.approx(reference[key], abs=1e-9)
    assert set(ours["per_class"]) == set(contiguous_names)
