"""Tiny datasets shared by the dataset tests: a generated shapes set and a hand-written VOC set."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.io import write_jpeg

from frcnn.datasets.shapes import ShapesLayout, ensure_shapes

NUM_TRAIN = 12
NUM_VAL = 6
IMAGE_SIZE = 96

# Two annotated images (40 x 30): "a" holds a dog and a difficult cat, "b" nothing.
TINY_VOC_XML = {
    "a": """<annotation>
  <filename>a.jpg</filename>
  <size><width>40</width><height>30</height><depth>3</depth></size>
  <object><name>dog</name><difficult>0</difficult>
    <bndbox><xmin>1</xmin><ymin>2</ymin><xmax>10</xmax><ymax>12</ymax></bndbox></object>
  <object><name>cat</name><difficult>1</difficult>
    <bndbox><xmin>5</xmin><ymin>5</ymin><xmax>20</xmax><ymax>25</ymax></bndbox></object>
</annotation>
""",
    "b": """<annotation>
  <filename>b.jpg</filename>
  <size><width>40</width><height>30</height><depth>3</depth></size>
</annotation>
""",
}


@pytest.fixture(scope="session")
def shapes_sizes() -> dict[str, int]:
    """How the shared shapes set was generated."""
    return {"num_train": NUM_TRAIN, "num_val": NUM_VAL, "image_size": IMAGE_SIZE}


@pytest.fixture(scope="session")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> ShapesLayout:
    root = tmp_path_factory.mktemp("data") / "shapes"
    return ensure_shapes(root, NUM_TRAIN, NUM_VAL, IMAGE_SIZE, seed=0)


@pytest.fixture
def tiny_voc(tmp_path: Path) -> Path:
    """A VOC year folder with the two images of TINY_VOC_XML in image set "trainval"."""
    root = tmp_path / "VOC2007"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    for stem, xml in TINY_VOC_XML.items():
        (root / "Annotations" / f"{stem}.xml").write_text(xml)
        write_jpeg(
            torch.zeros(3, 30, 40, dtype=torch.uint8), str(root / "JPEGImages" / f"{stem}.jpg")
        )
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("a\nb\n")
    return root
