"""The dataset checker: every annotation record and every image header, problems counted by kind.

``check_coco`` and ``check_voc`` read an annotation file (or a VOC image set) and the header of
every image it names, and return a `CheckReport` (per kind of problem: a count and the first
examples with file, image id and annotation id) and the `Fixes` lenient training applies.

Two kinds of verdicts are kept apart on purpose. Problems inside the annotation files are cheap to
find, so ``clean_coco`` / ``clean_voc`` find them again wherever a dataset is built (every rank of
a distributed run) and drop or clip the same records. Problems of the image files (missing,
unreadable, truncated, another size) cost one file read each, so only the checking process reads
them; `Fixes` carries the positions of those images, a few plain values that can be broadcast.

Errors are what cannot be trained on as it is: strict mode fails on the first one, lenient mode
drops or clips it. Notes (crowd boxes, images without objects) are legal everywhere in frcnn and
are only counted.
"""

from __future__ import annotations

import json
import logging
import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from torchvision.io import ImageReadMode, decode_image, read_file

from frcnn.datasets.common import config_hint, require_path
from frcnn.datasets.voc import _DECLARATION, VOCAnnotation, read_image_set

logger = logging.getLogger(__name__)

MAX_EXAMPLES = 5
# Boxes may overhang the border by float round-off; past this many pixels they are clipped.
BORDER_TOLERANCE = 0.01
# A JPEG normally ends with its end-of-image marker; only files where it is not in this many
# trailing bytes (data appended after the image, or truncation) are scanned in full.
_JPEG_TAIL = 4096
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_STANDALONE = {0x01, *range(0xD0, 0xD8)}
_JPEG_SOF = {*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC}


@dataclass(frozen=True)
class ProblemKind:
    name: str
    description: str
    error: bool  # strict mode fails on it; lenient mode applies `lenient`
    lenient: str


KINDS: dict[str, ProblemKind] = {
    kind.name: kind
    for kind in (
        ProblemKind(
            "malformed_file",
            "annotation file missing, unreadable, or not valid JSON / XML",
            True,
            "drops the image (VOC); a COCO file must be fixed",
        ),
        ProblemKind(
            "malformed_record", "record lacks a field or holds a wrong type", True, "drops it"
        ),
        ProblemKind("duplicate_image_id", "image id seen before", True, "keeps the first"),
        ProblemKind(
            "duplicate_annotation_id", "annotation id seen before", True, "keeps the first"
        ),
        ProblemKind(
            "unknown_image_id", "annotation of an image id not in 'images'", True, "drops it"
        ),
        ProblemKind(
            "unknown_category",
            "category id not in 'categories' / VOC class name not in the class list",
            True,
            "drops the annotation",
        ),
        ProblemKind(
            "invalid_image_size",
            "image width / height missing, zero or negative in the annotations",
            True,
            "drops the image",
        ),
        ProblemKind("missing_image", "image file not found", True, "drops the image"),
        ProblemKind(
            "unreadable_image", "image file cannot be read or decoded", True, "drops the image"
        ),
        ProblemKind(
            "truncated_image", "image file ends before its image data", True, "drops the image"
        ),
        ProblemKind(
            "size_mismatch",
            "image size in the annotations differs from the image file's",
            True,
            "drops the image",
        ),
        ProblemKind("non_finite_box", "NaN or infinite box coordinate", True, "drops the box"),
        ProblemKind(
            "degenerate_box", "box with zero or negative width or height", True, "drops the box"
        ),
        ProblemKind("box_outside_image", "box wholly outside the image", True, "drops the box"),
        ProblemKind(
            "box_partly_outside", "box partly outside the image", True, "clips it to the image"
        ),
        ProblemKind(
            "crowd_box",
            "crowd annotation (iscrowd=1)",
            False,
            "keeps it: never a positive, its region is ignored",
        ),
        ProblemKind(
            "empty_image", "image without objects", False, "keeps it: all anchors background"
        ),
    )
}


@dataclass(frozen=True)
class Problem:
    """One finding; ``image_id`` is the COCO id or the VOC stem, ``annotation_id`` the COCO id or
    the VOC object's index in its file."""

    kind: str
    file: str
    image_id: int | str | None = None
    annotation_id: int | str | None = None
    detail: str = ""
    line: int | None = None
    column: int | None = None

    def describe(self) -> str:
        where = self.file
        if self.line is not None:
            where += f" line {self.line}, column {self.column}"
        if self.image_id is not None:
            where += f" image {self.image_id}"
        if self.annotation_id is not None:
            where += f" annotation {self.annotation_id}"
        return f"{where}: {self.detail}"

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if v is not None}


@dataclass
class CheckReport:
    """Every problem of one dataset, in the order found; counts and examples per kind."""

    name: str
    num_images: int = 0
    num_annotations: int = 0
    problems: list[Problem] = field(default_factory=list)
    kept_images: int = 0
    kept_annotations: int = 0
    clipped_boxes: int = 0
    usable: bool = True  # False when not even lenient mode can train on it

    def add(self, kind: str, file: str | os.PathLike, **details: Any) -> None:
        if kind not in KINDS:
            raise KeyError(f"unknown problem kind {kind!r}")
        self.problems.append(Problem(kind, str(file), **details))

    def counts(self) -> dict[str, int]:
        """Problems per kind, in the order of `KINDS`; kinds not found are left out."""
        found = [p.kind for p in self.problems]
        return {kind: found.count(kind) for kind in KINDS if kind in found}

    def examples(self, kind: str, limit: int = MAX_EXAMPLES) -> list[Problem]:
        return [p for p in self.problems if p.kind == kind][:limit]

    @property
    def first_error(self) -> Problem | None:
        return next((p for p in self.problems if KINDS[p.kind].error), None)

    def format(self) -> str:
        """The report as a person reads it: per kind, the count and the first examples."""
        lines = [
            f"Dataset check of {self.name}: {self.num_images} images, "
            f"{self.num_annotations} annotations"
        ]
        for kind, count in self.counts().items():
            info = KINDS[kind]
            label = "error" if info.error else "note"
            lines.append(f"  {kind}: {count} ({info.description}; {label}, lenient {info.lenient})")
            lines += [f"    {p.describe()}" for p in self.examples(kind)]
            if count > MAX_EXAMPLES:
                lines.append(f"    ... and {count - MAX_EXAMPLES} more")
        if not self.problems:
            lines.append("  no problems found")
        lines.append(f"  {self.lenient_summary()}")
        return "\n".join(lines)

    def lenient_summary(self) -> str:
        if not self.usable:
            return "lenient mode cannot train on it: nothing usable is left"
        return (
            f"lenient mode trains on {self.kept_images} of {self.num_images} images and "
            f"{self.kept_annotations} of {self.num_annotations} annotations "
            f"({self.clipped_boxes} boxes clipped)"
        )

    def strict_message(self) -> str:
        """Why strict mode refuses the data, naming the first problem."""
        first = self.first_error
        if first is None:
            return f"{self.name}: no errors"
        count = self.counts()[first.kind]
        return (
            f"{self.name}: {first.kind} ({KINDS[first.kind].description}): {first.describe()}; "
            f"{count} problem(s) of this kind and {len(self.problems)} in all. Fix the data, or "
            "set data.check=lenient to drop or clip what cannot be trained on "
            "(tools/check_dataset.py lists everything)"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "num_images": self.num_images,
            "num_annotations": self.num_annotations,
            "counts": self.counts(),
            "kept_images": self.kept_images,
            "kept_annotations": self.kept_annotations,
            "clipped_boxes": self.clipped_boxes,
            "usable": self.usable,
            "problems": [p.to_dict() for p in self.problems],
        }


@dataclass(frozen=True)
class Fixes:
    """The image-file verdicts of a check: positions (in COCO's ``images`` list or the VOC image
    set) of the images lenient mode drops, and the record counts they refer to."""

    format: str
    drop_images: frozenset[int]
    num_images: int


@dataclass
class CheckResult:
    report: CheckReport
    fixes: Fixes


class DatasetCheckError(ValueError):
    """Strict mode found an error, or lenient mode found nothing it can train on."""


# ---------------------------------------------------------------------------------- boxes


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_box(
    box: Sequence[float], width: float, height: float
) -> tuple[str | None, tuple[float, float, float, float] | None]:
    """The problem kind of an XYXY box in a ``width`` x ``height`` image (None if fine) and the
    box lenient mode keeps (None: dropped)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        return "non_finite_box", None
    if not (x2 > x1 and y2 > y1):
        return "degenerate_box", None
    if x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
        return "box_outside_image", None
    tol = BORDER_TOLERANCE
    if x1 < -tol or y1 < -tol or x2 > width + tol or y2 > height + tol:
        clipped = (max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height)))
        return "box_partly_outside", clipped
    return None, (x1, y1, x2, y2)


def _box_detail(kind: str, box: Sequence[float], width: float, height: float) -> str:
    shown = [round(float(v), 3) if math.isfinite(float(v)) else float(v) for v in box]
    if kind == "degenerate_box":
        return f"box {shown} (x1, y1, x2, y2) has no area"
    if kind == "non_finite_box":
        return f"box {shown} (x1, y1, x2, y2) has a NaN or infinite coordinate"
    where = "wholly outside" if kind == "box_outside_image" else "partly outside"
    return f"box {shown} (x1, y1, x2, y2) is {where} the {width:g}x{height:g} image"


# --------------------------------------------------------------------------- image headers


class ImageFileProblem(Exception):
    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


def _read_exact(f: BinaryIO, count: int, what: str) -> bytes:
    data = f.read(count)
    if len(data) < count:
        raise ImageFileProblem("truncated_image", f"file ends inside the {what}")
    return data


def _jpeg_size(f: BinaryIO, file_size: int) -> tuple[int, int]:
    """Walk the JPEG segments up to the start of scan; check the end-of-image marker."""
    position, size = 2, None
    while True:
        f.seek(position)
        marker = _read_exact(f, 2, "JPEG headers")
        if marker[0] != 0xFF:
            raise ImageFileProblem("unreadable_image", f"corrupt JPEG marker at byte {position}")
        code = marker[1]
        if code == 0xFF or code in _JPEG_STANDALONE:
            position += 1 if code == 0xFF else 2
            continue
        if code == 0xD9:
            raise ImageFileProblem("unreadable_image", "JPEG ends before any image data")
        length = int.from_bytes(_read_exact(f, 2, "JPEG headers"), "big")
        if length < 2 or position + 2 + length > file_size:
            raise ImageFileProblem("truncated_image", f"JPEG segment at byte {position} cut off")
        if code in _JPEG_SOF:
            header = _read_exact(f, 5, "JPEG frame header")
            size = int.from_bytes(header[1:3], "big"), int.from_bytes(header[3:5], "big")
        position += 2 + length
        if code == 0xDA:
            break
    if size is None or min(size) <= 0:
        raise ImageFileProblem("unreadable_image", "JPEG without a usable frame header")
    if not _has_jpeg_end(f, position, file_size):
        raise ImageFileProblem("truncated_image", "JPEG image data ends without its end marker")
    return size


def _has_jpeg_end(f: BinaryIO, scan_start: int, file_size: int) -> bool:
    # Entropy-coded data never holds 0xFFD9 (0xFF is stuffed), so any after the scan is the end.
    f.seek(max(scan_start, file_size - _JPEG_TAIL))
    if b"\xff\xd9" in f.read():
        return True
    f.seek(scan_start)
    return b"\xff\xd9" in f.read()


def _png_size(f: BinaryIO, file_size: int) -> tuple[int, int]:
    """IHDR gives the size; chunk lengths must lead to IEND inside the file."""
    f.seek(8)
    header = _read_exact(f, 16, "PNG header")
    if header[4:8] != b"IHDR":
        raise ImageFileProblem("unreadable_image", "PNG without an IHDR chunk")
    width, height = int.from_bytes(header[8:12], "big"), int.from_bytes(header[12:16], "big")
    position = 8
    while True:
        f.seek(position)
        chunk = _read_exact(f, 8, "PNG chunks")
        end = position + 12 + int.from_bytes(chunk[:4], "big")
        if end > file_size:
            raise ImageFileProblem("truncated_image", f"PNG chunk at byte {position} cut off")
        if chunk[4:8] == b"IEND":
            break
        position = end
    if width <= 0 or height <= 0:
        raise ImageFileProblem("unreadable_image", f"PNG of size {width}x{height}")
    return height, width


def read_image_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image file from its header, with the file's structure checked to
    its end (JPEG and PNG without decoding; other formats are decoded). Raises
    `ImageFileProblem` with kind missing_image, unreadable_image or truncated_image."""
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if head.startswith(b"\xff\xd8"):
                return _jpeg_size(f, file_size)
            if head == _PNG_SIGNATURE:
                return _png_size(f, file_size)
    except FileNotFoundError:
        raise ImageFileProblem("missing_image", "image file not found") from None
    except OSError as error:
        raise ImageFileProblem("unreadable_image", f"cannot read: {error}") from None
    if not head:
        raise ImageFileProblem("unreadable_image", "empty file")
    try:
        image = decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
    except RuntimeError:
        detail = "not a JPEG, PNG, GIF or WebP image torchvision can decode"
        raise ImageFileProblem("unreadable_image", detail) from None
    return int(image.shape[-2]), int(image.shape[-1])


def _check_image_files(
    report: CheckReport, entries: Iterable[tuple[int, Path, Any, tuple[float, float]]]
) -> frozenset[int]:
    """``entries``: (position, file, image id, (height, width) in the annotations). Returns the
    positions of the images to drop."""
    bad = set()
    for position, path, image_id, expected in entries:
        try:
            actual = read_image_size(path)
        except ImageFileProblem as problem:
            report.add(problem.kind, path, image_id=image_id, detail=problem.detail)
            bad.add(position)
            continue
        if (float(actual[0]), float(actual[1])) != (float(expected[0]), float(expected[1])):
            detail = (
                f"annotations say {expected[1]:g}x{expected[0]:g} (width x height), "
                f"the file is {actual[1]}x{actual[0]}"
            )
            report.add("size_mismatch", path, image_id=image_id, detail=detail)
            bad.add(position)
    return frozenset(bad)


# ------------------------------------------------------------------------------------ COCO


def _read_coco_json(path: Path, report: CheckReport) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as error:
        report.add("malformed_file", path, detail=error.msg, line=error.lineno, column=error.colno)
        return None
    except (OSError, UnicodeDecodeError) as error:
        report.add("malformed_file", path, detail=f"cannot read: {error}")
        return None
    lists = ("images", "categories")
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in lists):
        detail = "not a COCO annotation file: a JSON object with 'images' and 'categories' lists"
        report.add("malformed_file", path, detail=detail)
        return None
    if not isinstance(data.setdefault("annotations", []), list):
        report.add("malformed_file", path, detail="'annotations' is not a list")
        return None
    return data


def _coco_categories(data: dict[str, Any], path: Path, report: CheckReport) -> list[dict]:
    kept = []
    for position, category in enumerate(data["categories"]):
        valid = isinstance(category, dict) and isinstance(category.get("id"), int)
        if not valid or not isinstance(category.get("name"), str):
            detail = f"category #{position} needs an integer 'id' and a string 'name'"
            report.add("malformed_record", path, detail=detail)
            continue
        kept.append(category)
    return kept


def _coco_image_size(image: dict[str, Any]) -> tuple[float, float] | None:
    height, width = image.get("height"), image.get("width")
    if _is_number(height) and _is_number(width) and height > 0 and width > 0:
        if math.isfinite(height) and math.isfinite(width):
            return float(height), float(width)
    return None


def _coco_images(
    data: dict[str, Any], path: Path, report: CheckReport
) -> tuple[list[dict], list[int], set[Any]]:
    """Kept image records, their positions in ``images``, and every id seen (kept or not)."""
    kept, positions, seen = [], [], set()
    for position, image in enumerate(data["images"]):
        image_id = image.get("id") if isinstance(image, dict) else None
        if not isinstance(image_id, int) or not isinstance(image.get("file_name"), str):
            detail = f"image #{position} needs an integer 'id' and a string 'file_name'"
            report.add("malformed_record", path, image_id=image_id, detail=detail)
            continue
        if image_id in seen:
            detail = f"image #{position} ({image['file_name']}) repeats id {image_id}"
            report.add("duplicate_image_id", path, image_id=image_id, detail=detail)
            continue
        seen.add(image_id)
        if _coco_image_size(image) is None:
            size = f"width {image.get('width')!r}, height {image.get('height')!r}"
            detail = f"{image['file_name']}: {size}; both must be positive numbers"
            report.add("invalid_image_size", path, image_id=image_id, detail=detail)
            continue
        kept.append(image)
        positions.append(position)
    return kept, positions, seen


def _coco_annotation_fields(ann: Any, position: int) -> str | None:
    """What is wrong with the fields of annotation record #``position``, or None."""
    if not isinstance(ann, dict):
        return f"annotation #{position} is not a JSON object"
    missing = [k for k in ("id", "image_id", "category_id", "bbox") if k not in ann]
    if missing:
        return f"annotation #{position} lacks {', '.join(missing)}"
    if not all(isinstance(ann[k], int) for k in ("id", "image_id", "category_id")):
        return f"annotation #{position}: id, image_id and category_id must be integers"
    bbox = ann["bbox"]
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        return f"annotation #{position}: bbox must be [x, y, width, height], got {bbox!r}"
    return None


class _COCOAnnotationPass:
    """The annotation records of a COCO file against its images and categories."""

    def __init__(self, path: Path, report: CheckReport, images: list[dict], seen: set) -> None:
        self.path = path
        self.report = report
        self.sizes = {image["id"]: _coco_image_size(image) for image in images}
        self.all_image_ids = seen
        self.ann_ids: set[Any] = set()
        self.kept: list[dict] = []

    def run(self, annotations: list[Any], category_ids: set[int]) -> list[dict]:
        for position, ann in enumerate(annotations):
            wrong = _coco_annotation_fields(ann, position)
            if wrong is not None:
                ids = {k: ann.get(k) for k in ("image_id", "id")} if isinstance(ann, dict) else {}
                self.report.add(
                    "malformed_record",
                    self.path,
                    image_id=ids.get("image_id"),
                    annotation_id=ids.get("id"),
                    detail=wrong,
                )
                continue
            self._one(ann, position, category_ids)
        return self.kept

    def _add(self, kind: str, ann: dict, detail: str) -> None:
        self.report.add(
            kind, self.path, image_id=ann["image_id"], annotation_id=ann["id"], detail=detail
        )

    def _one(self, ann: dict, position: int, category_ids: set[int]) -> None:
        if ann["id"] in self.ann_ids:
            self._add("duplicate_annotation_id", ann, f"annotation #{position} repeats its id")
            return
        self.ann_ids.add(ann["id"])
        if ann["image_id"] not in self.all_image_ids:
            self._add("unknown_image_id", ann, f"image_id {ann['image_id']} is not in 'images'")
            return
        if ann["image_id"] not in self.sizes:
            return  # its image record was dropped (and reported); the annotation goes with it
        if ann["category_id"] not in category_ids:
            detail = f"category_id {ann['category_id']!r} is not in 'categories'"
            self._add("unknown_category", ann, detail)
            return
        if ann.get("iscrowd", 0):
            self._add("crowd_box", ann, "iscrowd=1")
        height, width = self.sizes[ann["image_id"]]
        x, y, w, h = (float(v) for v in ann["bbox"])
        box = (x, y, x + w, y + h)
        kind, fixed = check_box(box, width, height)
        if kind is not None:
            self._add(kind, ann, _box_detail(kind, box, width, height))
        if fixed is None:
            return
        if kind == "box_partly_outside":
            x1, y1, x2, y2 = fixed
            ann = {**ann, "bbox": [x1, y1, x2 - x1, y2 - y1]}
            self.report.clipped_boxes += 1
        self.kept.append(ann)


def _coco_pass(data: dict[str, Any], path: Path, report: CheckReport) -> tuple[dict, list[int]]:
    """The annotation file's own problems; returns the cleaned data and, for each kept image
    record, its position in the original ``images`` list."""
    categories = _coco_categories(data, path, report)
    images, positions, seen = _coco_images(data, path, report)
    annotations = _COCOAnnotationPass(path, report, images, seen).run(
        data["annotations"], {c["id"] for c in categories}
    )
    annotated = {
        ann["image_id"]
        for ann in data["annotations"]
        if isinstance(ann, dict) and isinstance(ann.get("image_id"), int)
    }
    for image in images:
        if image["id"] not in annotated:
            report.add("empty_image", path, image_id=image["id"], detail=image["file_name"])
    cleaned = {**data, "categories": categories, "images": images, "annotations": annotations}
    return cleaned, positions


def _drop_coco_images(
    cleaned: dict[str, Any], positions: list[int], drop: frozenset[int]
) -> dict[str, Any]:
    images = [image for image, p in zip(cleaned["images"], positions) if p not in drop]
    ids = {image["id"] for image in images}
    annotations = [ann for ann in cleaned["annotations"] if ann["image_id"] in ids]
    return {**cleaned, "images": images, "annotations": annotations}


def check_coco(
    images_dir: str | os.PathLike,
    annotation_file: str | os.PathLike,
    *,
    check_images: bool = True,
    name: str | None = None,
    config_prefix: str | None = None,
) -> CheckResult:
    """Check a COCO json and (with ``check_images``) the header of every image it names."""
    path, images_dir = Path(annotation_file), Path(images_dir)
    require_path(path, "file", "COCO annotation file", config_hint(config_prefix, "annotations"))
    require_path(images_dir, "dir", "COCO image folder", config_hint(config_prefix, "images"))
    report = CheckReport(name or f"COCO {path} (images in {images_dir})")
    data = _read_coco_json(path, report)
    if data is None:
        report.usable = False
        return CheckResult(report, Fixes("coco", frozenset(), 0))
    report.num_images, report.num_annotations = len(data["images"]), len(data["annotations"])
    cleaned, positions = _coco_pass(data, path, report)
    drop: frozenset[int] = frozenset()
    if check_images:
        entries = [
            (p, images_dir / image["file_name"], image["id"], _coco_image_size(image))
            for image, p in zip(cleaned["images"], positions)
        ]
        drop = _check_image_files(report, entries)
    final = _drop_coco_images(cleaned, positions, drop)
    report.kept_images, report.kept_annotations = len(final["images"]), len(final["annotations"])
    report.usable = bool(final["images"])
    return CheckResult(report, Fixes("coco", drop, report.num_images))


def clean_coco(data: dict[str, Any], fixes: Fixes) -> dict[str, Any]:
    """What lenient mode trains on: ``data`` (a parsed COCO json) without the records the checker
    drops, partly outside boxes clipped, and without the images ``fixes`` names."""
    if fixes.format != "coco" or len(data.get("images", [])) != fixes.num_images:
        raise DatasetCheckError(
            f"the dataset check was made on another file ({fixes.num_images} images, format "
            f"{fixes.format}); the annotations changed during the run, start it again"
        )
    silent = CheckReport("clean")
    cleaned, positions = _coco_pass(data, Path("annotations"), silent)
    return _drop_coco_images(cleaned, positions, fixes.drop_images)


# ------------------------------------------------------------------------------------- VOC


def _xml_root(path: Path, stem: str, report: CheckReport) -> ET.Element | None:
    try:
        data = path.read_bytes()
    except OSError as error:
        detail = "annotation file not found" if isinstance(error, FileNotFoundError) else str(error)
        report.add("malformed_file", path, image_id=stem, detail=detail)
        return None
    if _DECLARATION.search(data):
        detail = "DOCTYPE/ENTITY declarations are not allowed in VOC annotations"
        report.add("malformed_file", path, image_id=stem, detail=detail)
        return None
    try:
        return ET.fromstring(data)
    except ET.ParseError as error:
        line, column = error.position
        report.add(
            "malformed_file", path, image_id=stem, detail="malformed XML", line=line, column=column
        )
        return None


def _xml_number(node: ET.Element | None, tag: str) -> float | None:
    child = None if node is None else node.find(tag)
    if child is None or child.text is None:
        return None
    try:
        return float(child.text.strip())
    except ValueError:
        return None


def _voc_size(
    root: ET.Element, path: Path, stem: str, report: CheckReport
) -> tuple[int, int] | None:
    size = root.find("size")
    height, width = _xml_number(size, "height"), _xml_number(size, "width")
    if height is None or width is None:
        detail = "no numeric <size><width> and <height>"
        report.add("malformed_record", path, image_id=stem, detail=detail)
        return None
    if not (math.isfinite(height) and math.isfinite(width) and height >= 1 and width >= 1):
        detail = f"<size> width {width:g}, height {height:g}; both must be positive"
        report.add("invalid_image_size", path, image_id=stem, detail=detail)
        return None
    return int(height), int(width)


def _voc_object(
    obj: ET.Element, size: tuple[int, int], classes: dict[str, int]
) -> tuple[tuple[tuple[float, ...], int, bool] | None, str | None, str]:
    """((box, label, difficult) or None when dropped, problem kind or None, detail)."""
    height, width = size
    name_node = obj.find("name")
    name = (name_node.text or "").strip() if name_node is not None else ""
    coords = [_xml_number(obj.find("bndbox"), t) for t in ("xmin", "ymin", "xmax", "ymax")]
    if not name or any(c is None for c in coords):
        return None, "malformed_record", "needs a <name> and numeric <bndbox> xmin ymin xmax ymax"
    if name not in classes:
        return None, "unknown_category", f"class {name!r} is not in the class list"
    xmin, ymin, xmax, ymax = coords
    box = (xmin - 1.0, ymin - 1.0, xmax, ymax)  # 1-based inclusive -> continuous
    kind, fixed = check_box(box, width, height)
    detail = "" if kind is None else _box_detail(kind, box, width, height)
    if fixed is None:
        return None, kind, detail
    difficult_node = obj.find("difficult")
    difficult = difficult_node is not None and (difficult_node.text or "0").strip() == "1"
    return (fixed, classes[name], difficult), kind, detail


def _scan_voc_file(
    path: Path, stem: str, classes: dict[str, int], report: CheckReport
) -> VOCAnnotation | None:
    """One XML file's problems; the annotation lenient mode keeps (None: the image is dropped)."""
    root = _xml_root(path, stem, report)
    size = None if root is None else _voc_size(root, path, stem, report)
    if root is None or size is None:
        return None
    objects = root.findall("object")
    report.num_annotations += len(objects)
    if not objects:
        report.add("empty_image", path, image_id=stem, detail="no <object>")
    kept = []
    for index, obj in enumerate(objects):
        result, kind, detail = _voc_object(obj, size, classes)
        if kind is not None:
            report.add(kind, path, image_id=stem, annotation_id=index, detail=detail)
        if kind == "box_partly_outside":
            report.clipped_boxes += 1
        if result is not None:
            kept.append(result)
    return VOCAnnotation(
        stem=stem,
        height=size[0],
        width=size[1],
        boxes=np.asarray([k[0] for k in kept], dtype=np.float32).reshape(-1, 4),
        labels=np.asarray([k[1] for k in kept], dtype=np.int64),
        difficult=np.asarray([k[2] for k in kept], dtype=bool),
    )


def _voc_pass(
    root: Path, image_set: str, stems: list[str], classes: dict[str, int], report: CheckReport
) -> dict[int, VOCAnnotation]:
    """Annotation of every kept position of the image set."""
    set_file = root / "ImageSets" / "Main" / f"{image_set}.txt"
    parsed: dict[int, VOCAnnotation] = {}
    seen: set[str] = set()
    for position, stem in enumerate(stems):
        if stem in seen:
            detail = f"line {position + 1} repeats {stem}"
            report.add("duplicate_image_id", set_file, image_id=stem, detail=detail)
            continue
        seen.add(stem)
        ann = _scan_voc_file(root / "Annotations" / f"{stem}.xml", stem, classes, report)
        if ann is not None:
            parsed[position] = ann
    return parsed


def check_voc(
    root: str | os.PathLike,
    image_set: str,
    class_names: Sequence[str],
    *,
    check_images: bool = True,
    name: str | None = None,
    config_prefix: str | None = None,
) -> CheckResult:
    """Check every XML file of a VOC image set and (with ``check_images``) its image headers."""
    root = Path(root)
    require_path(root, "dir", "VOC year folder", config_hint(config_prefix, "images"))
    stems = read_image_set(root, image_set, config_hint(config_prefix, "annotations"))
    report = CheckReport(name or f"VOC {root} image set {image_set}", num_images=len(stems))
    classes = {class_name: i + 1 for i, class_name in enumerate(class_names)}
    parsed = _voc_pass(root, image_set, stems, classes, report)
    drop: frozenset[int] = frozenset()
    if check_images:
        entries = [
            (p, root / "JPEGImages" / f"{ann.stem}.jpg", ann.stem, (ann.height, ann.width))
            for p, ann in parsed.items()
        ]
        drop = _check_image_files(report, entries)
    kept = [ann for p, ann in parsed.items() if p not in drop]
    report.kept_images = len(kept)
    report.kept_annotations = sum(len(ann.labels) for ann in kept)
    report.usable = bool(kept)
    return CheckResult(report, Fixes("voc", drop, len(stems)))


def clean_voc(
    root: str | os.PathLike,
    image_set: str,
    class_names: Sequence[str],
    fixes: Fixes,
    *,
    config_prefix: str | None = None,
) -> dict[int, VOCAnnotation]:
    """What lenient mode trains on: image-set position -> annotation, without what the checker
    drops, partly outside boxes clipped."""
    stems = read_image_set(Path(root), image_set, config_hint(config_prefix, "annotations"))
    if fixes.format != "voc" or len(stems) != fixes.num_images:
        raise DatasetCheckError(
            f"the dataset check was made on another image set ({fixes.num_images} images, "
            f"format {fixes.format}); it changed during the run, start it again"
        )
    classes = {class_name: i + 1 for i, class_name in enumerate(class_names)}
    parsed = _voc_pass(Path(root), image_set, stems, classes, CheckReport("clean"))
    return {p: ann for p, ann in parsed.items() if p not in fixes.drop_images}


def log_report(report: CheckReport, mode: str) -> None:
    """Log the report: a warning when it holds errors (what lenient mode does about each)."""
    level = logging.WARNING if report.first_error is not None else logging.INFO
    logger.log(level, "%s\n  (data.check=%s)", report.format(), mode)
