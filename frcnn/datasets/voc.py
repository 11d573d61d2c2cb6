"""PASCAL VOC detection datasets in the VOCdevkit layout.

``root`` is a year folder (``data/VOCdevkit/VOC2007``) holding ``Annotations/*.xml``,
``JPEGImages/*.jpg`` and ``ImageSets/Main/<image_set>.txt``. VOC boxes are 1-based and
inclusive; they become continuous coordinates as ``(xmin - 1, ymin - 1, xmax, ymax)``.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from frcnn.datasets.common import (
    DatasetItem,
    Transforms,
    config_hint,
    make_item,
    read_image,
    require_path,
)

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip

# xml.etree expands internal entities, so a crafted file ("billion laughs") can exhaust memory;
# defusedxml is not available, and VOC annotations never declare a DOCTYPE or entities, so any
# file that does is refused before parsing.
_DECLARATION = re.compile(rb"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)


@dataclass(frozen=True)
class VOCAnnotation:
    """One parsed XML file: boxes (G, 4) float32 in continuous original pixels."""

    stem: str
    height: int
    width: int
    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray


def _text(node: ET.Element, tag: str, path: Path, where: str) -> str:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise ValueError(f"{path}: {where} has no <{tag}>")
    return child.text.strip()


def _number(node: ET.Element, tag: str, path: Path, where: str) -> float:
    text = _text(node, tag, path, where)
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{path}: {where} has a non-numeric <{tag}>: {text!r}") from None


def _parse_object(
    obj: ET.Element, number: int, path: Path, class_to_label: dict[str, int], hint: str
) -> tuple[tuple[float, float, float, float], int, bool]:
    where = f"object #{number}"
    name = _text(obj, "name", path, where)
    if name not in class_to_label:
        raise ValueError(
            f"{path}: {where} has class {name!r}, which is not in the class list; "
            f"add it to {hint} or fix the file"
        )
    box = obj.find("bndbox")
    if box is None:
        raise ValueError(f"{path}: {where} ({name}) has no <bndbox>")
    xmin, ymin, xmax, ymax = (
        _number(box, tag, path, f"{where} ({name}) <bndbox>")
        for tag in ("xmin", "ymin", "xmax", "ymax")
    )
    difficult_node = obj.find("difficult")
    difficult = difficult_node is not None and (difficult_node.text or "0").strip() == "1"
    return (xmin - 1.0, ymin - 1.0, xmax, ymax), class_to_label[name], difficult


def parse_voc_xml(path: Path, class_to_label: dict[str, int], hint: str) -> VOCAnnotation:
    """Read one VOC annotation file; errors name the file and, where known, line and column."""
    if not path.is_file():
        raise FileNotFoundError(f"VOC annotation file not found: {path}")
    data = path.read_bytes()
    if _DECLARATION.search(data):
        raise ValueError(f"{path}: DOCTYPE/ENTITY declarations are not allowed in VOC annotations")
    try:
        root = ET.fromstring(data)
    except ET.ParseError as error:
        line, column = error.position
        raise ValueError(f"{path}: malformed XML at line {line}, column {column}") from None
    size = root.find("size")
    if size is None:
        raise ValueError(f"{path}: annotation has no <size>")
    height = int(_number(size, "height", path, "<size>"))
    width = int(_number(size, "width", path, "<size>"))
    if height <= 0 or width <= 0:
        raise ValueError(f"{path}: <size> must be positive, got width {width}, height {height}")
    parsed = [
        _parse_object(obj, number, path, class_to_label, hint)
        for number, obj in enumerate(root.findall("object"))
    ]
    return VOCAnnotation(
        stem=path.stem,
        height=height,
        width=width,
        boxes=np.asarray([p[0] for p in parsed], dtype=np.float32).reshape(-1, 4),
        labels=np.asarray([p[1] for p in parsed], dtype=np.int64),
        difficult=np.asarray([p[2] for p in parsed], dtype=bool),
    )


def read_image_set(root: Path, image_set: str, hint: str) -> list[str]:
    """The image stems listed in ``ImageSets/Main/<image_set>.txt``."""
    path = root / "ImageSets" / "Main" / f"{image_set}.txt"
    require_path(path, "file", f"VOC image set {image_set!r}", hint)
    # Per-class lists carry a second column (1 / -1 / 0); the stem is the first.
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


class VOCDataset(Dataset):
    """A PASCAL VOC image set. Items are ``(image, targets, info)``; ``info.image_id`` is the
    image's index in the image set and ``info.file_name`` its stem.

    Difficult objects are left out of the targets unless ``keep_difficult``; ``records()`` keeps
    them, flagged, for the evaluator. ``filter_empty`` drops images left without objects.
    ``parsed`` (image-set position -> annotation) replaces reading the XML files, e.g. with
    ``frcnn.datasets.check.clean_voc`` (the dataset checker's lenient fixes).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        image_set: str = "trainval",
        class_names: Sequence[str] | None = VOC_CLASSES,
        keep_difficult: bool = False,
        transforms: Transforms | None = None,
        filter_empty: bool = False,
        *,
        config_prefix: str | None = None,
        parsed: Mapping[int, VOCAnnotation] | None = None,
    ) -> None:
        self.root = Path(root)
        self.image_set = image_set
        # class_names[label - 1] is the name of label ``label``.
        self.class_names = list(class_names) if class_names else list(VOC_CLASSES)
        self.keep_difficult = keep_difficult
        self.transforms = transforms
        require_path(self.root, "dir", "VOC year folder", config_hint(config_prefix, "images"))
        stems = read_image_set(self.root, image_set, config_hint(config_prefix, "annotations"))
        class_to_label = {name: i + 1 for i, name in enumerate(self.class_names)}
        names_hint = config_hint(config_prefix, "class_names")
        if parsed is None:
            parsed = {
                i: parse_voc_xml(
                    self.root / "Annotations" / f"{stem}.xml", class_to_label, names_hint
                )
                for i, stem in enumerate(stems)
            }
        annotations = dict(parsed)
        indices = sorted(annotations)
        if filter_empty:
            indices = [i for i in indices if self._kept(annotations[i]).any()]
        self.image_ids: list[int] = indices
        self._annotations = [annotations[i] for i in indices]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _kept(self, ann: VOCAnnotation) -> np.ndarray:
        """Which objects go into the training targets."""
        if self.keep_difficult:
            return np.ones(len(ann.labels), dtype=bool)
        return ~ann.difficult

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> DatasetItem:
        ann = self._annotations[index]
        image = read_image(self.root / "JPEGImages" / f"{ann.stem}.jpg")
        kept = self._kept(ann)
        return make_item(
            image,
            torch.from_numpy(ann.boxes[kept]),
            torch.from_numpy(ann.labels[kept]),
            torch.zeros(int(kept.sum()), dtype=torch.bool),
            self.transforms,
            self.image_ids[index],
            ann.stem,
        )

    def records(self) -> list[dict[str, Any]]:
        """Evaluation ground truth of every image, difficult objects included and flagged.

        Each record: ``image_id``, ``height``, ``width`` (original), ``boxes`` (G, 4) float32 in
        original continuous pixels, ``labels`` (G,) int64, ``difficult`` (G,) bool.
        """
        return [
            {
                "image_id": image_id,
                "height": ann.height,
                "width": ann.width,
                "boxes": torch.from_numpy(ann.boxes.copy()),
                "labels": torch.from_numpy(ann.labels.copy()),
                "difficult": torch.from_numpy(ann.difficult.copy()),
            }
            for image_id, ann in zip(self.image_ids, self._annotations)
        ]

    def image_aspect_ratios(self) -> list[float]:
        """Width / height of every image, from the XML <size> (no decoding)."""
        return [ann.width / ann.height for ann in self._annotations]
