"""The generated shapes dataset: determinism, content, shape rasterisation, safe first use."""

from __future__ import annotations

import json
import math
import multiprocessing
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from frcnn.datasets.shapes import (
    MARKER,
    SHAPES_CATEGORY_IDS,
    SHAPES_CLASSES,
    ShapesLayout,
    ensure_shapes,
    generate_shapes,
    shape_mask,
)

# torchvision 0.29 deprecates torchvision.io's codecs in favour of TorchCodec; they still work.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path: Path) -> None:
    generate_shapes(tmp_path / "a", 4, 2, 64, seed=5)
    generate_shapes(tmp_path / "b", 4, 2, 64, seed=5)
    generate_shapes(tmp_path / "c", 4, 2, 64, seed=6)
    a, b, c = (_files(tmp_path / name) for name in "abc")
    assert len(a) == 2 * 6 + 6 + 2 + 3  # jpg in both layouts, xml, 2 json, 3 image sets
    assert a == b
    assert a.keys() == c.keys()
    jpgs = [k for k in a if k.endswith(".jpg")]
    assert all(a[k] != c[k] for k in jpgs)


def _coco(layout: ShapesLayout, split: str) -> dict:
    return json.loads(layout.coco_annotations(split).read_text())


def test_coco_layout_content(shapes: ShapesLayout, shapes_sizes: dict[str, int]) -> None:
    size = shapes_sizes["image_size"]
    data = _coco(shapes, "train")
    assert [c["id"] for c in data["categories"]] == list(SHAPES_CATEGORY_IDS) == [1, 3, 7, 9]
    assert [c["name"] for c in data["categories"]] == list(SHAPES_CLASSES)
    assert len(data["images"]) == shapes_sizes["num_train"]
    assert len(_coco(shapes, "val")["images"]) == shapes_sizes["num_val"]
    per_image = {img["id"]: 0 for img in data["images"]}
    for ann in data["annotations"]:
        per_image[ann["image_id"]] += 1
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and x + w <= size and y + h <= size
        # Polygons are inscribed in a circle of diameter 12..size/2, so a rotated square's
        # box can be as small as 12 / sqrt(2).
        assert 12 / math.sqrt(2) - 1 <= max(w, h) <= size / 2 + 1
        assert ann["iscrowd"] == 0 and ann["area"] == w * h
    counts = list(per_image.values())
    assert counts[3] == 0  # one image in twenty is empty, starting with the fourth
    assert sum(c == 0 for c in counts) == 1
    assert all(1 <= c <= 6 for i, c in enumerate(counts) if i != 3)
    for img in data["images"]:
        assert (shapes.coco_images("train") / img["file_name"]).is_file()


def test_voc_layout_marks_small_objects_difficult(
    shapes: ShapesLayout, shapes_sizes: dict[str, int]
) -> None:
    main = shapes.voc_root / "ImageSets" / "Main"
    train = main.joinpath("train.txt").read_text().split()
    val = main.joinpath("val.txt").read_text().split()
    assert train == [f"train_{i:06d}" for i in range(shapes_sizes["num_train"])]
    assert main.joinpath("trainval.txt").read_text().split() == train + val
    difficult_seen = 0
    for stem in train:
        root = ET.parse(shapes.voc_root / "Annotations" / f"{stem}.xml").getroot()
        for obj in root.iter("object"):
            box = obj.find("bndbox")
            xmin, ymin, xmax, ymax = (
                int(box.find(t).text) for t in ("xmin", "ymin", "xmax", "ymax")
            )
            assert xmin >= 1 and ymin >= 1  # 1-based
            longer = max(xmax - xmin + 1, ymax - ymin + 1)
            difficult = obj.find("difficult").text == "1"
            assert difficult == (longer < 16)
            difficult_seen += difficult
        assert (shapes.voc_root / "JPEGImages" / f"{stem}.jpg").read_bytes() == (
            shapes.coco_images("train") / f"{stem}.jpg"
        ).read_bytes()
    assert difficult_seen > 0


def _tight_box(mask: torch.Tensor, x0: int = 0, y0: int = 0) -> tuple[int, int, int, int]:
    rows = mask.any(dim=1).nonzero()[:, 0]
    cols = mask.any(dim=0).nonzero()[:, 0]
    return x0 + int(cols[0]), y0 + int(rows[0]), x0 + int(cols[-1]) + 1, y0 + int(rows[-1]) + 1


def test_circle_mask_hand_case() -> None:
    # Pixel centres (x + 0.5, y + 0.5) within 5 of (20, 30): x = 15..24 and y = 25..34.
    mask = shape_mask(SHAPES_CLASSES.index("circle"), 20.0, 30.0, 5.0, 0.0, 0, 0, 64, 64)
    assert _tight_box(mask) == (15, 25, 25, 35)
    # The same shape drawn in a window offset to (10, 20) lands on the same pixels.
    window = shape_mask(SHAPES_CLASSES.index("circle"), 20.0, 30.0, 5.0, 0.0, 10, 20, 20, 20)
    assert torch.equal(window, mask[20:40, 10:30])


def test_axis_aligned_square_mask_hand_case() -> None:
    # Circumradius 10*sqrt(2) at 45 degrees: the square [10, 30] x [10, 30], 400 pixel centres.
    radius = 10 * math.sqrt(2)
    mask = shape_mask(SHAPES_CLASSES.index("square"), 20.0, 20.0, radius, math.pi / 4, 0, 0, 40, 40)
    assert _tight_box(mask) == (10, 10, 30, 30)
    assert int(mask.sum()) == 400


def test_star_is_concave_and_inside_its_circle() -> None:
    star = shape_mask(SHAPES_CLASSES.index("star"), 32.0, 32.0, 30.0, 0.0, 0, 0, 64, 64)
    circle = shape_mask(SHAPES_CLASSES.index("circle"), 32.0, 32.0, 30.0, 0.0, 0, 0, 64, 64)
    assert bool(star[32, 32]) and not bool((star & ~circle).any())
    # Points of a five-pointed star cover well under half of its circumscribed disc.
    assert 0.2 < star.sum() / circle.sum() < 0.5


def test_ensure_shapes_reuses_and_refuses_mismatch(tmp_path: Path) -> None:
    root = tmp_path / "shapes"
    layout = ensure_shapes(root, 2, 1, 48, seed=0)
    marker = root / ".complete.json"
    stamp = marker.stat().st_mtime_ns
    assert ensure_shapes(root, 2, 1, 48, seed=0) == layout
    assert marker.stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="data.shapes.root"):
        ensure_shapes(root, 3, 1, 48, seed=0)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="foreign"):
        ensure_shapes(foreign, 2, 1, 48, seed=0)


def test_a_dataset_renamed_into_place_between_two_looks_is_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race a rank can lose to a peer: its first look finds no marker, the peer's finished
    folder is renamed into place, then the listing finds a full folder. It must take the
    dataset, not report a stranger's folder."""
    root = tmp_path / "shapes"
    layout = ensure_shapes(root, 2, 1, 48, seed=0)
    marker = root / MARKER
    real_is_file = Path.is_file
    looks = []

    def first_look_before_the_rename(path: Path) -> bool:
        if path == marker and not looks:
            looks.append(path)
            return False
        return real_is_file(path)

    monkeypatch.setattr(Path, "is_file", first_look_before_the_rename)
    assert ensure_shapes(root, 2, 1, 48, seed=0) == layout
    assert looks == [marker]


def _ensure_in_child(root: str) -> None:
    # A forked child must not reuse the parent's OpenMP pool (it can deadlock); the DataLoader
    # does the same in its workers.
    torch.set_num_threads(1)
    ensure_shapes(root, 3, 1, 48, seed=1)


def test_ensure_shapes_from_concurrent_processes(tmp_path: Path) -> None:
    root = tmp_path / "shapes"
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_ensure_in_child, args=(str(root),)) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [worker.exitcode for worker in workers] == [0, 0, 0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes"]  # no temporary folder left
    generate_shapes(tmp_path / "reference", 3, 1, 48, seed=1)
    produced = _files(root)
    assert produced.pop(".complete.json")
    assert produced == _files(tmp_path / "reference")
