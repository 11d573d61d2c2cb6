"""The dataset checker (issue 4, test 1).

Fixture datasets (broken_data.py) hold every problem kind; the checker must report each with the
right count and location, lenient mode must train on the rest with finite losses, strict mode
must refuse the data naming the first problem. Image headers are checked against torchvision's
decoder and on every truncation point of small files.
"""

from __future__ import annotations

import json
import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from broken_data import (
    CLASS_NAMES,
    COCO_EXPECTED,
    COCO_FIRST_ERROR,
    COCO_KEPT_ANNOTATIONS,
    COCO_KEPT_IMAGES,
    MALFORMED_XML,
    VOC_EXPECTED,
    VOC_KEPT_POSITIONS,
    jpeg_bytes,
    png_bytes,
    progressive_jpeg,
    random_image,
    write_broken_coco,
    write_broken_voc,
)
from PIL import Image
from tooling import run_tool, tiny_overrides
from torchvision.io import decode_image, read_file

from frcnn.datasets import COCODataset, VOCDataset
from frcnn.datasets.check import (
    KINDS,
    CheckReport,
    ImageFileProblem,
    check_coco,
    check_voc,
    clean_coco,
    clean_voc,
    read_image_size,
)

QUICKSTART = "configs/quickstart.yaml"
IMAGE_FILE_KINDS = {"missing_image", "unreadable_image", "truncated_image", "size_mismatch"}


def _locations(report: CheckReport, kind: str) -> list[tuple[object, object]]:
    return [(p.image_id, p.annotation_id) for p in report.problems if p.kind == kind]


def test_every_kind_is_covered_by_the_fixtures() -> None:
    assert set(COCO_EXPECTED) | set(VOC_EXPECTED) | {"malformed_file"} == set(KINDS)


def test_coco_checker_reports_each_kind_with_count_and_location(tmp_path: Path) -> None:
    images_dir, annotations = write_broken_coco(tmp_path)
    report = check_coco(images_dir, annotations).report
    assert report.counts() == {kind: len(where) for kind, where in COCO_EXPECTED.items()}
    for kind, where in COCO_EXPECTED.items():
        assert _locations(report, kind) == where, kind
    for problem in report.problems:
        if problem.kind in IMAGE_FILE_KINDS:
            assert Path(problem.file).parent == images_dir, problem
        else:
            assert problem.file == str(annotations), problem
    files = {p.kind: Path(p.file).name for p in report.problems if p.kind in IMAGE_FILE_KINDS}
    assert files["missing_image"] == "missing.jpg" and files["size_mismatch"] == "big.jpg"
    assert {Path(p.file).name for p in report.problems if p.kind == "truncated_image"} == {
        "truncated.jpg",
        "t.png",
    }
    assert (report.first_error.kind, report.first_error.image_id) == COCO_FIRST_ERROR
    assert (report.num_images, report.num_annotations) == (16, 23)
    assert (report.kept_images, report.kept_annotations) == (8, 8) and report.usable
    text = report.format()
    for kind, where in COCO_EXPECTED.items():
        assert f"  {kind}: {len(where)} (" in text
    assert "image 1 annotation 2: box [80.0, 70.0, 110.0, 90.0]" in text


def test_coco_lenient_dataset_trains_on_what_is_left(tmp_path: Path) -> None:
    images_dir, annotations = write_broken_coco(tmp_path)
    result = check_coco(images_dir, annotations)
    cleaned = clean_coco(json.loads(annotations.read_text()), result.fixes)
    assert [image["id"] for image in cleaned["images"]] == COCO_KEPT_IMAGES
    assert [ann["id"] for ann in cleaned["annotations"]] == COCO_KEPT_ANNOTATIONS
    assert cleaned["annotations"][1]["bbox"] == [80.0, 70.0, 16.0, 20.0]  # clipped at 96
    with pytest.raises(ValueError, match="annotations.json"):
        COCODataset(images_dir, annotations)  # without the fixes the reader refuses the file
    dataset = COCODataset(images_dir, annotations, prepare=lambda d: clean_coco(d, result.fixes))
    assert dataset.image_ids == COCO_KEPT_IMAGES
    for index in range(len(dataset)):
        image, targets, info = dataset[index]
        assert torch.isfinite(targets.boxes).all()
        assert (targets.boxes[:, 2:] > targets.boxes[:, :2]).all()
        assert (targets.boxes >= 0).all() and (targets.boxes <= 96).all()
        assert image.shape[-2:] == (96, 96)


def test_malformed_coco_json_names_line_and_column(tmp_path: Path) -> None:
    text = '{"images": [],\n "categories": [}'
    path = tmp_path / "broken.json"
    path.write_text(text)
    with pytest.raises(json.JSONDecodeError) as reference:
        json.loads(text)
    report = check_coco(tmp_path, path).report
    (problem,) = report.problems
    assert problem.kind == "malformed_file" and problem.file == str(path)
    assert (problem.line, problem.column) == (reference.value.lineno, reference.value.colno)
    assert not report.usable and "cannot train" in report.format()


def test_voc_checker_reports_each_kind_with_count_and_location(tmp_path: Path) -> None:
    root = write_broken_voc(tmp_path / "VOC")
    report = check_voc(root, "train", CLASS_NAMES).report
    assert report.counts() == {kind: len(where) for kind, where in VOC_EXPECTED.items()}
    for kind, where in VOC_EXPECTED.items():
        assert _locations(report, kind) == where, kind
    broken = next(p for p in report.problems if p.image_id == "broken")
    with pytest.raises(ET.ParseError) as reference:
        ET.fromstring(MALFORMED_XML)
    assert (broken.line, broken.column) == reference.value.position
    assert broken.file == str(root / "Annotations" / "broken.xml")
    missing = next(p for p in report.problems if p.kind == "missing_image")
    assert missing.file == str(root / "JPEGImages" / "missing.jpg")
    assert report.first_error.kind == "box_partly_outside"


def test_voc_lenient_dataset_trains_on_what_is_left(tmp_path: Path) -> None:
    root = write_broken_voc(tmp_path / "VOC")
    result = check_voc(root, "train", CLASS_NAMES)
    with pytest.raises(ValueError):
        VOCDataset(root, "train", CLASS_NAMES)  # without the fixes the reader refuses the set
    parsed = clean_voc(root, "train", CLASS_NAMES, result.fixes)
    dataset = VOCDataset(root, "train", CLASS_NAMES, parsed=parsed)
    assert dataset.image_ids == VOC_KEPT_POSITIONS
    _, targets, info = dataset[0]
    assert info.file_name == "ok"
    # xmin 60 .. xmax 120 in a 96-pixel image: continuous (59, 49, 120, 90) clipped at 96
    assert targets.boxes.tolist() == [[0, 0, 20, 20], [59, 49, 96, 90]]
    _, targets, _ = dataset[1]
    assert targets.labels.tolist() == [3]  # only the triangle of "bad_boxes" is usable
    assert result.report.kept_annotations == 3


# ------------------------------------------------------------------------- image headers


def _decoded_size(path: Path) -> tuple[int, int]:
    image = decode_image(read_file(str(path)))
    return int(image.shape[-2]), int(image.shape[-1])


def test_header_sizes_agree_with_torchvision(tmp_path: Path) -> None:
    files = {
        "plain.jpg": jpeg_bytes(1, 30, 40),
        "plain.png": png_bytes(2, 50, 20),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    progressive_jpeg(tmp_path / "progressive.jpg", 33, 17)
    pixels = random_image(3, 12, 21).permute(1, 2, 0).numpy()
    Image.fromarray(pixels).save(tmp_path / "image.gif")  # neither JPEG nor PNG: decoded
    # data appended after the JPEG's end, as in phone "motion photos"
    (tmp_path / "appended.jpg").write_bytes(jpeg_bytes(4, 25, 26) + bytes(10_000))
    for name in ("plain.jpg", "plain.png", "progressive.jpg", "image.gif", "appended.jpg"):
        assert read_image_size(tmp_path / name) == _decoded_size(tmp_path / name), name


@pytest.mark.parametrize("kind", ["jpeg", "png"])
def test_every_truncation_is_found(tmp_path: Path, kind: str) -> None:
    data = jpeg_bytes(5, 8, 8) if kind == "jpeg" else png_bytes(5, 8, 8)
    signature = 2 if kind == "jpeg" else 8
    path = tmp_path / "cut"
    for cut in range(1, len(data)):
        path.write_bytes(data[:cut])
        with pytest.raises(ImageFileProblem) as problem:
            read_image_size(path)
        expected = "truncated_image" if cut >= signature else "unreadable_image"
        assert problem.value.kind == expected, cut


def test_missing_empty_and_garbage_files(tmp_path: Path) -> None:
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello")
    cases = {"nope.jpg": "missing_image", "empty.jpg": "unreadable_image"}
    cases["text.jpg"] = "unreadable_image"
    for name, kind in cases.items():
        with pytest.raises(ImageFileProblem) as problem:
            read_image_size(tmp_path / name)
        assert problem.value.kind == kind, name


# ------------------------------------------------------------------------------- the tools


def _broken_overrides(shapes_root: Path, output: Path, broken: Path, max_iter: int = 6) -> list:
    images_dir, annotations = write_broken_coco(broken)
    return [
        *tiny_overrides(shapes_root, output, max_iter=max_iter),
        f"data.train.images={images_dir}",
        f"data.train.annotations={annotations}",
    ]


def test_check_dataset_tool(tmp_path: Path, shapes_root: Path) -> None:
    opts = _broken_overrides(shapes_root, tmp_path / "out", tmp_path / "broken")
    report_file = tmp_path / "report.json"
    args = ["tools/check_dataset.py", "--config", QUICKSTART, "--split", "train"]
    lenient = run_tool([*args, "--json", str(report_file), "--opts", *opts])
    assert lenient.returncode == 0, lenient.stderr[-3000:]
    for kind, where in COCO_EXPECTED.items():
        assert f"  {kind}: {len(where)} (" in lenient.stdout, kind
    (saved,) = json.loads(report_file.read_text()).values()
    assert saved["counts"] == {kind: len(where) for kind, where in COCO_EXPECTED.items()}
    strict = run_tool([*args, "--strict", "--opts", *opts])
    assert strict.returncode == 1
    assert re.search(r"error: .*duplicate_image_id.*annotations\.json image 6", strict.stderr)


def _losses_in_log(log: str) -> list[float]:
    return [float(v) for v in re.findall(r"total_loss (\S+)", log)]


def test_lenient_training_runs_to_the_end(tmp_path: Path, shapes_root: Path) -> None:
    output = tmp_path / "out"
    opts = _broken_overrides(shapes_root, output, tmp_path / "broken", max_iter=6)
    result = run_tool(["tools/train.py", "--config", QUICKSTART, "--opts", *opts, "log_period=1"])
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((output / "dataset_check_train.json").read_text())
    assert saved["counts"] == {kind: len(where) for kind, where in COCO_EXPECTED.items()}
    assert saved["kept_images"] == len(COCO_KEPT_IMAGES)
    log = (output / "log.txt").read_text()
    assert "lenient mode trains on 8 of 16 images" in log
    assert "box_partly_outside: 1" in log
    losses = _losses_in_log(log)
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses), losses
    assert not (output / "bad_batches").exists()
    final = torch.load(output / "checkpoints" / "model_final.pth", weights_only=True)
    assert final["iteration"] == 6
    assert all(torch.isfinite(v).all() for v in final["model"].values())


def test_strict_training_exits_naming_the_first_problem(tmp_path: Path, shapes_root: Path) -> None:
    output = tmp_path / "out"
    opts = _broken_overrides(shapes_root, output, tmp_path / "broken")
    result = run_tool(
        ["tools/train.py", "--config", QUICKSTART, "--opts", *opts, "data.check=strict"]
    )
    assert result.returncode == 2
    first = result.stderr.strip().splitlines()[-1]
    assert first.startswith("error: data.train")
    assert re.search(r"duplicate_image_id .*annotations\.json image 6: image #6", first), first
    assert "Traceback" not in result.stderr
    assert not (output / "checkpoints").exists()
