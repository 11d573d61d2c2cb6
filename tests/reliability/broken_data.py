"""Fixture datasets holding every problem kind the dataset checker knows, with what it must find.

In a module of its own (not conftest.py): every test folder has a conftest.py, and importing from
one by name would pick whichever was imported last.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from torchvision.io import encode_jpeg, encode_png

SIZE = 96
# the generated shapes set's categories, so the quick-start model (4 classes) trains on it
CATEGORIES = [
    {"id": 1, "name": "circle"},
    {"id": 3, "name": "square"},
    {"id": 7, "name": "triangle"},
    {"id": 9, "name": "star"},
]
CLASS_NAMES = ["circle", "square", "triangle", "star"]


def random_image(seed: int, height: int = SIZE, width: int = SIZE) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)


def jpeg_bytes(seed: int, height: int = SIZE, width: int = SIZE) -> bytes:
    return encode_jpeg(random_image(seed, height, width), quality=90).numpy().tobytes()


def png_bytes(seed: int, height: int = SIZE, width: int = SIZE) -> bytes:
    return encode_png(random_image(seed, height, width)).numpy().tobytes()


def progressive_jpeg(path: Path, height: int, width: int) -> None:
    pixels = random_image(7, height, width).permute(1, 2, 0).numpy()
    Image.fromarray(pixels).save(path, "JPEG", progressive=True, quality=80)


def _ann(ann_id: int, image_id: int, bbox: list, category_id: int = 1, **extra: object) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox, **extra}


def _image(image_id: int, file_name: str, size: int = SIZE) -> dict:
    return {"id": image_id, "file_name": file_name, "width": size, "height": size}


# kind -> [(image id, annotation id)] the checker must report, in the order found
COCO_EXPECTED: dict[str, list[tuple[object, object]]] = {
    "duplicate_image_id": [(6, None)],
    "invalid_image_size": [(11, None)],
    "malformed_record": [(None, None), (12, 16)],
    "box_partly_outside": [(1, 2)],
    "box_outside_image": [(2, 3)],
    "non_finite_box": [(2, 4), (2, 7)],
    "degenerate_box": [(2, 5), (2, 6)],
    "crowd_box": [(4, 8)],
    "unknown_category": [(5, 10)],
    "duplicate_annotation_id": [(12, 14)],
    "unknown_image_id": [(999, 15)],
    "empty_image": [(3, None)],
    "missing_image": [(7, None)],
    "unreadable_image": [(8, None)],
    "truncated_image": [(9, None), (14, None)],
    "size_mismatch": [(10, None)],
}
# image records left for training, and annotations (ann 2 clipped to the image)
COCO_KEPT_IMAGES = [1, 2, 3, 4, 5, 6, 12, 13]
COCO_KEPT_ANNOTATIONS = [1, 2, 8, 9, 11, 12, 14, 20]
COCO_FIRST_ERROR = ("duplicate_image_id", 6)


def write_broken_coco(root: Path) -> tuple[Path, Path]:
    """A COCO image folder and json with every problem kind of COCO_EXPECTED."""
    images_dir = root / "images"
    images_dir.mkdir(parents=True)
    for seed, name in enumerate(["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg", "f.jpg", "g.jpg"]):
        (images_dir / name).write_bytes(jpeg_bytes(seed))
    (images_dir / "f2.jpg").write_bytes(jpeg_bytes(20))
    (images_dir / "h.png").write_bytes(png_bytes(21))
    (images_dir / "garbage.jpg").write_bytes(b"not an image at all")
    whole = jpeg_bytes(22)
    (images_dir / "truncated.jpg").write_bytes(whole[: len(whole) * 3 // 5])
    whole_png = png_bytes(23)
    (images_dir / "t.png").write_bytes(whole_png[: len(whole_png) // 2])
    (images_dir / "big.jpg").write_bytes(jpeg_bytes(24))  # 96 x 96, the json says 128 x 128
    (images_dir / "zero.jpg").write_bytes(jpeg_bytes(25))
    images = [
        _image(1, "a.jpg"),
        _image(2, "b.jpg"),
        _image(3, "c.jpg"),
        _image(4, "d.jpg"),
        _image(5, "e.jpg"),
        _image(6, "f.jpg"),
        _image(6, "f2.jpg"),
        _image(7, "missing.jpg"),
        _image(8, "garbage.jpg"),
        _image(9, "truncated.jpg"),
        _image(10, "big.jpg", 128),
        {"id": 11, "file_name": "zero.jpg", "width": 0, "height": SIZE},
        {"file_name": "no_id.jpg", "width": SIZE, "height": SIZE},
        _image(12, "g.jpg"),
        _image(13, "h.png"),
        _image(14, "t.png"),
    ]
    nan, inf = float("nan"), float("inf")
    annotations = [
        _ann(1, 1, [10, 10, 30, 30]),
        _ann(2, 1, [80, 70, 30, 20], 3),
        _ann(3, 2, [200, 10, 10, 10]),
        _ann(4, 2, [nan, 5, 10, 10]),
        _ann(5, 2, [5, 5, 0, 10]),
        _ann(6, 2, [5, 5, 10, -3]),
        _ann(7, 2, [20, 20, inf, 10]),
        _ann(8, 4, [0, 0, 50, 50], iscrowd=1),
        _ann(9, 4, [40, 40, 20, 20], 7),
        _ann(10, 5, [1, 1, 20, 20], 42),
        _ann(11, 5, [1, 1, 20, 20], 9),
        _ann(12, 6, [30, 30, 40, 40]),
        _ann(13, 7, [5, 5, 10, 10]),
        _ann(14, 12, [5, 5, 30, 30]),
        _ann(14, 12, [50, 50, 10, 10]),
        _ann(15, 999, [5, 5, 10, 10]),
        {"id": 16, "image_id": 12, "category_id": 1},
        _ann(17, 8, [5, 5, 10, 10]),
        _ann(18, 9, [5, 5, 10, 10]),
        _ann(19, 10, [5, 5, 10, 10]),
        _ann(20, 13, [10, 20, 30, 40], 3),
        _ann(21, 14, [5, 5, 10, 10]),
        _ann(22, 11, [5, 5, 10, 10]),
    ]
    path = root / "annotations.json"
    # json writes NaN and Infinity literals, which Python's and pycocotools' readers accept
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES})
    )
    return images_dir, path


def _voc_object(name: str, box: tuple[str, str, str, str] | None) -> str:
    bndbox = ""
    if box is not None:
        tags = ("xmin", "ymin", "xmax", "ymax")
        bndbox = "<bndbox>" + "".join(f"<{t}>{v}</{t}>" for t, v in zip(tags, box)) + "</bndbox>"
    return f"<object><name>{name}</name><difficult>0</difficult>{bndbox}</object>"


def _voc_xml(objects: list[str], size: tuple[int, int] | None = (SIZE, SIZE)) -> str:
    size_xml = ""
    if size is not None:
        size_xml = (
            f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>"
        )
    return "<annotation>\n" + size_xml + "\n" + "\n".join(objects) + "\n</annotation>\n"


MALFORMED_XML = "<annotation>\n  <size><width>96</width>\n</annotation>\n"

VOC_XML = {
    "ok": _voc_xml(
        [
            _voc_object("circle", ("1", "1", "20", "20")),
            _voc_object("square", ("60", "50", "120", "90")),
        ]
    ),
    "bad_boxes": _voc_xml(
        [
            _voc_object("circle", ("nan", "1", "20", "20")),
            _voc_object("circle", ("50", "5", "40", "20")),
            _voc_object("star", ("200", "5", "220", "20")),
            _voc_object("dog", ("1", "1", "20", "20")),
            _voc_object("circle", None),
            _voc_object("triangle", ("11", "11", "40", "40")),
        ]
    ),
    "empty": _voc_xml([]),
    "broken": MALFORMED_XML,
    "doctype": '<!DOCTYPE a [<!ENTITY x "y">]>\n' + _voc_xml([]),
    "nosize": _voc_xml([_voc_object("circle", ("1", "1", "20", "20"))], size=None),
    "zerosize": _voc_xml([_voc_object("circle", ("1", "1", "20", "20"))], size=(0, SIZE)),
    "missing": _voc_xml([_voc_object("circle", ("1", "1", "20", "20"))]),
    "mismatch": _voc_xml([_voc_object("circle", ("1", "1", "20", "20"))], size=(128, 128)),
}
VOC_IMAGE_SET = ["ok", "bad_boxes", "empty", "broken", "doctype", "nosize", "zerosize"]
VOC_IMAGE_SET += ["missing", "mismatch", "ok", "no_xml"]
VOC_EXPECTED: dict[str, list[tuple[object, object]]] = {
    "box_partly_outside": [("ok", 1)],
    "non_finite_box": [("bad_boxes", 0)],
    "degenerate_box": [("bad_boxes", 1)],
    "box_outside_image": [("bad_boxes", 2)],
    "unknown_category": [("bad_boxes", 3)],
    "malformed_record": [("bad_boxes", 4), ("nosize", None)],
    "empty_image": [("empty", None)],
    "malformed_file": [("broken", None), ("doctype", None), ("no_xml", None)],
    "invalid_image_size": [("zerosize", None)],
    "duplicate_image_id": [("ok", None)],
    "missing_image": [("missing", None)],
    "size_mismatch": [("mismatch", None)],
}
# image-set positions left for training: ok, bad_boxes, empty
VOC_KEPT_POSITIONS = [0, 1, 2]


def write_broken_voc(root: Path) -> Path:
    """A VOC year folder with image set "train" holding every problem kind of VOC_EXPECTED."""
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    for seed, (stem, xml) in enumerate(VOC_XML.items()):
        (root / "Annotations" / f"{stem}.xml").write_text(xml)
        if stem != "missing":
            (root / "JPEGImages" / f"{stem}.jpg").write_bytes(jpeg_bytes(seed))
    (root / "ImageSets" / "Main" / "train.txt").write_text("\n".join(VOC_IMAGE_SET) + "\n")
    return root
