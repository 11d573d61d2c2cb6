"""VOCDataset: the 1-based inclusive box convention, difficult objects, empty images, records
for the evaluator, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from frcnn.datasets import SHAPES_CLASSES, VOC_CLASSES, ShapesLayout, VOCDataset

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")

DOG = VOC_CLASSES.index("dog") + 1
CAT = VOC_CLASSES.index("cat") + 1


def test_voc_box_convention_and_difficult_left_out(tiny_voc: Path) -> None:
    dataset = VOCDataset(tiny_voc, "trainval")
    assert len(dataset) == 2 and dataset.num_classes == 20
    image, targets, info = dataset[0]
    # xmin=1, ymin=2, xmax=10, ymax=12 (1-based inclusive) -> (0, 1, 10, 12)
    assert targets.boxes.tolist() == [[0.0, 1.0, 10.0, 12.0]]
    assert targets.labels.tolist() == [DOG] and targets.iscrowd.tolist() == [False]
    assert info.image_id == 0 and info.file_name == "a"
    assert info.original_size == info.image_size == (30, 40) and image.shape == (3, 30, 40)
    _, empty, empty_info = dataset[1]
    assert empty.boxes.shape == (0, 4) and empty_info.image_id == 1


def test_keep_difficult(tiny_voc: Path) -> None:
    _, targets, _ = VOCDataset(tiny_voc, keep_difficult=True)[0]
    assert targets.boxes.tolist() == [[0.0, 1.0, 10.0, 12.0], [4.0, 4.0, 20.0, 25.0]]
    assert targets.labels.tolist() == [DOG, CAT]


def test_records_keep_difficult_flagged_in_original_pixels(tiny_voc: Path) -> None:
    records = VOCDataset(tiny_voc).records()
    assert [r["image_id"] for r in records] == [0, 1]
    first = records[0]
    assert (first["height"], first["width"]) == (30, 40)
    assert first["boxes"].dtype == torch.float32
    assert first["boxes"].tolist() == [[0.0, 1.0, 10.0, 12.0], [4.0, 4.0, 20.0, 25.0]]
    assert first["labels"].tolist() == [DOG, CAT]
    assert first["difficult"].tolist() == [False, True]
    assert records[1]["boxes"].shape == (0, 4)


def test_filter_empty_keeps_image_set_indices(tiny_voc: Path) -> None:
    (tiny_voc / "ImageSets" / "Main" / "ba.txt").write_text("b\na\n")
    dataset = VOCDataset(tiny_voc, "ba", filter_empty=True)
    assert len(dataset) == 1 and dataset.image_ids == [1]
    assert dataset[0][2].image_id == 1 and dataset[0][2].file_name == "a"
    assert dataset.image_aspect_ratios() == [40 / 30]


def test_difficult_only_image_is_empty_for_training(tiny_voc: Path) -> None:
    xml = (tiny_voc / "Annotations" / "a.xml").read_text()
    dog_end = xml.index("</object>") + len("</object>")
    (tiny_voc / "Annotations" / "a.xml").write_text(xml[: xml.index("<object>")] + xml[dog_end:])
    assert len(VOCDataset(tiny_voc, filter_empty=True)) == 0
    assert len(VOCDataset(tiny_voc, filter_empty=True, keep_difficult=True)) == 1


def test_shapes_difficult_objects(shapes: ShapesLayout) -> None:
    default = VOCDataset(shapes.voc_root, "train", SHAPES_CLASSES)
    kept = VOCDataset(shapes.voc_root, "train", SHAPES_CLASSES, keep_difficult=True)
    difficult = sum(int(r["difficult"].sum()) for r in default.records())
    assert difficult > 0
    assert (
        sum(len(kept[i][1]) for i in range(len(kept)))
        == sum(len(default[i][1]) for i in range(len(default))) + difficult
    )
    assert len(default) == 12 and len(default[3][1]) == 0  # the empty image stays


def _write_xml(root: Path, text: str) -> None:
    (root / "Annotations" / "a.xml").write_text(text)


def test_doctype_rejected(tiny_voc: Path) -> None:
    _write_xml(
        tiny_voc,
        '<?xml version="1.0"?>\n<!DOCTYPE lol [<!ENTITY lol "lol">]>\n'
        "<annotation>&lol;</annotation>",
    )
    with pytest.raises(ValueError, match=r"a\.xml.*DOCTYPE"):
        VOCDataset(tiny_voc)


def test_malformed_xml_names_file_line_and_column(tiny_voc: Path) -> None:
    _write_xml(tiny_voc, "<annotation>\n  <size><width>4</width>\n</annotation>\n")
    with pytest.raises(ValueError, match=r"a\.xml: malformed XML at line 3, column 2"):
        VOCDataset(tiny_voc)


def test_unknown_class_and_bad_numbers_are_named(tiny_voc: Path) -> None:
    with pytest.raises(
        ValueError, match=r"a\.xml: object #1 has class 'cat'.*data.train.class_names"
    ):
        VOCDataset(tiny_voc, class_names=["dog"], config_prefix="data.train")
    xml = (tiny_voc / "Annotations" / "a.xml").read_text()
    _write_xml(tiny_voc, xml.replace("<xmax>10</xmax>", "<xmax>ten</xmax>"))
    with pytest.raises(
        ValueError, match=r"a\.xml: object #0 \(dog\) <bndbox> has a non-numeric <xmax>"
    ):
        VOCDataset(tiny_voc)


def test_missing_paths_name_the_config_key(tiny_voc: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="VOC2012.*data.train.images"):
        VOCDataset(tmp_path / "VOC2012", config_prefix="data.train")
    with pytest.raises(FileNotFoundError, match="test.txt.*data.test.annotations"):
        VOCDataset(tiny_voc, "test", config_prefix="data.test")
    (tiny_voc / "Annotations" / "b.xml").unlink()
    with pytest.raises(FileNotFoundError, match=r"b\.xml"):
        VOCDataset(tiny_voc)
