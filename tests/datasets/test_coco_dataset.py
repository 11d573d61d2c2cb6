"""COCODataset: boxes and labels against the raw json, id mapping, crowd and degenerate boxes,
agreement with the VOC reader on the same images, clear errors."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.cocoeval import COCOeval
from torchvision.io import write_jpeg

from frcnn.datasets import (
    SHAPES_CLASSES,
    COCODataset,
    ShapesLayout,
    VOCDataset,
    build_transforms,
)

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")


def _train(shapes: ShapesLayout, **kwargs: object) -> COCODataset:
    return COCODataset(shapes.coco_images("train"), shapes.coco_annotations("train"), **kwargs)


def test_boxes_and_labels_match_the_json(shapes: ShapesLayout) -> None:
    dataset = _train(shapes)
    raw = json.loads(shapes.coco_annotations("train").read_text())
    assert dataset.label_to_category_id == {1: 1, 2: 3, 3: 7, 4: 9}
    assert dataset.class_names == list(SHAPES_CLASSES) and dataset.num_classes == 4
    for index in range(len(dataset)):
        image, targets, info = dataset[index]
        anns = [a for a in raw["annotations"] if a["image_id"] == info.image_id]
        expected = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
        assert targets.boxes.dtype == torch.float32 and targets.labels.dtype == torch.int64
        assert targets.boxes.tolist() == expected
        back = [dataset.label_to_category_id[int(label)] for label in targets.labels]
        assert back == [a["category_id"] for a in anns]
        assert image.dtype == torch.uint8 and image.shape == (3, 96, 96)
        assert info.original_size == info.image_size == (96, 96)


def test_category_mapping_round_trip(shapes: ShapesLayout) -> None:
    dataset = _train(shapes)
    for label, category_id in dataset.label_to_category_id.items():
        assert dataset.category_id_to_label[category_id] == label
    raw = _train(shapes, category_ids_as_labels=True)
    assert raw.category_id_to_label == {1: 1, 3: 3, 7: 7, 9: 9}
    assert raw.class_names == [
        "circle",
        "N/A",
        "square",
        "N/A",
        "N/A",
        "N/A",
        "triangle",
        "N/A",
        "star",
    ]


def test_coco_and_voc_readers_agree(shapes: ShapesLayout) -> None:
    coco = _train(shapes)
    voc = VOCDataset(shapes.voc_root, "train", SHAPES_CLASSES, keep_difficult=True)
    assert len(coco) == len(voc) == 12
    assert coco.image_aspect_ratios() == voc.image_aspect_ratios() == [1.0] * 12
    for index in range(len(coco)):
        coco_image, coco_targets, coco_info = coco[index]
        voc_image, voc_targets, voc_info = voc[index]
        assert coco_info.file_name == voc_info.file_name + ".jpg"
        assert torch.equal(coco_image, voc_image)
        # VOC stores integers 1-based inclusive; allow its one-pixel rounding.
        assert torch.allclose(coco_targets.boxes, voc_targets.boxes, atol=1.0)
        assert torch.equal(coco_targets.labels, voc_targets.labels)


def test_empty_images_kept_unless_filtered(shapes: ShapesLayout) -> None:
    dataset = _train(shapes)
    assert len(dataset) == 12
    empty = [i for i in range(len(dataset)) if len(dataset[i][1]) == 0]
    assert empty == [3]
    assert dataset[3][1].boxes.shape == (0, 4)
    filtered = _train(shapes, filter_empty=True)
    assert len(filtered) == 11 and dataset.image_ids[3] not in filtered.image_ids


def test_transforms_resize_boxes_and_info(shapes: ShapesLayout) -> None:
    plain = _train(shapes)
    resized = _train(shapes, transforms=build_transforms([64], 200, 0.0, is_train=False))
    image, targets, info = resized[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.uint8
    assert info.original_size == (96, 96) and info.image_size == (64, 64)
    torch.testing.assert_close(targets.boxes, plain[0][1].boxes * (64 / 96))


def _tiny_coco(tmp_path: Path, annotations: list[dict]) -> tuple[Path, Path]:
    images = tmp_path / "images"
    images.mkdir()
    write_jpeg(torch.zeros(3, 10, 20, dtype=torch.uint8), str(images / "x.jpg"))
    data = {
        "images": [{"id": 42, "file_name": "x.jpg", "width": 20, "height": 10}],
        "annotations": annotations,
        "categories": [{"id": 5, "name": "thing"}],
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return images, path


def test_crowd_kept_and_degenerate_dropped_with_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    images, path = _tiny_coco(
        tmp_path,
        [
            {"id": 1, "image_id": 42, "category_id": 5, "bbox": [1, 2, 3, 4]},
            {"id": 2, "image_id": 42, "category_id": 5, "bbox": [0, 0, 10, 5], "iscrowd": 1},
            {"id": 3, "image_id": 42, "category_id": 5, "bbox": [4, 4, 0, 3]},
        ],
    )
    with caplog.at_level(logging.WARNING):
        dataset = COCODataset(images, path)
    assert "ann.json" in caplog.text and "annotation id 3" in caplog.text
    _, targets, info = dataset[0]
    assert targets.boxes.tolist() == [[1, 2, 4, 6], [0, 0, 10, 5]]
    assert targets.iscrowd.tolist() == [False, True]
    assert targets.labels.tolist() == [1, 1]
    assert info.image_id == 42 and info.file_name == "x.jpg"
    assert dataset.image_aspect_ratios() == [2.0]


def test_filter_empty_drops_crowd_only_images(tmp_path: Path) -> None:
    crowd = {"id": 1, "image_id": 42, "category_id": 5, "bbox": [0, 0, 10, 5], "iscrowd": 1}
    images, path = _tiny_coco(tmp_path, [crowd])
    assert len(COCODataset(images, path)) == 1
    assert len(COCODataset(images, path, filter_empty=True)) == 0


def test_ground_truth_evaluates_to_perfect_ap(shapes: ShapesLayout) -> None:
    """The COCO object handed to the evaluator works with pycocotools as is."""
    gt = _train(shapes).coco_gt()
    detections = [dict(ann, score=1.0) for ann in gt.dataset["annotations"]]
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(gt, gt.loadRes(detections), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert np.isclose(evaluator.stats[0], 1.0)


def test_missing_paths_name_the_config_key(shapes: ShapesLayout, tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match="nope.json.*data.train.annotations"):
        COCODataset(shapes.coco_images("train"), missing, config_prefix="data.train")
    with pytest.raises(FileNotFoundError, match="no_images.*data.test.images"):
        COCODataset(
            tmp_path / "no_images", shapes.coco_annotations("val"), config_prefix="data.test"
        )


def test_malformed_json_names_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"images": [],\n "annotations": [}')
    with pytest.raises(ValueError, match=r"broken.json.*line 2, column 18"):
        COCODataset(tmp_path, path)


def test_bad_records_are_named(tmp_path: Path) -> None:
    images, path = _tiny_coco(
        tmp_path, [{"id": 7, "image_id": 42, "category_id": 99, "bbox": [1, 2, 3, 4]}]
    )
    with pytest.raises(ValueError, match="annotation #0 \\(id 7\\).*category_id 99"):
        COCODataset(images, path)
    path.write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match="not a COCO annotation file"):
        COCODataset(images, path)
