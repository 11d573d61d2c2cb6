"""A generated detection dataset of filled shapes, written in both COCO and VOC layouts.

Layout under ``root`` (``data/shapes`` by default)::

    coco/train/*.jpg, coco/val/*.jpg, coco/annotations/{train,val}.json
    VOCdevkit/VOCshapes/Annotations/*.xml, JPEGImages/*.jpg, ImageSets/Main/{train,val,trainval}.txt

Each image is square, on a noisy gradient background, with zero to six shapes of random colour and
size (about 12 px to half the image). Shapes may overlap, but every shape keeps at least half of
its pixels visible. A box is the tight pixel box of the whole drawn shape. The same seed gives
byte-identical files: every image draws from its own generator seeded by (seed, split, index).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torchvision.io import encode_jpeg

from frcnn.datasets.common import mix_seed

SHAPES_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star")
# Deliberately not 1..K, so readers always exercise the category id <-> label mapping.
SHAPES_CATEGORY_IDS: tuple[int, ...] = (1, 3, 7, 9)
SPLITS: tuple[str, ...] = ("train", "val")

MAX_OBJECTS = 6
MIN_OBJECT_SIZE = 12.0
# VOC marks a shape difficult when the longer side of its box is shorter than this.
DIFFICULT_BELOW = 16
# Image i of a split has no object when i % EMPTY_PERIOD == EMPTY_PHASE: 5 % of the images.
EMPTY_PERIOD = 20
EMPTY_PHASE = 3
MIN_VISIBLE_FRACTION = 0.5
MIN_COLOUR_CONTRAST = 0.25
JPEG_QUALITY = 95
MARKER = ".complete.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ShapeObject:
    """One drawn shape: ``box`` is (x1, y1, x2, y2) in integer pixels, x2/y2 exclusive."""

    class_index: int
    box: tuple[int, int, int, int]

    @property
    def difficult(self) -> bool:
        x1, y1, x2, y2 = self.box
        return max(x2 - x1, y2 - y1) < DIFFICULT_BELOW


@dataclass(frozen=True)
class ShapesLayout:
    """Paths of a generated shapes dataset."""

    root: Path

    def coco_images(self, split: str) -> Path:
        return self.root / "coco" / split

    def coco_annotations(self, split: str) -> Path:
        return self.root / "coco" / "annotations" / f"{split}.json"

    @property
    def voc_root(self) -> Path:
        return self.root / "VOCdevkit" / "VOCshapes"


def _image_seed(seed: int, split: str, index: int) -> int:
    return mix_seed(seed, SPLITS.index(split), index)


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=gen))


def _randint(gen: torch.Generator, low: int, high: int) -> int:
    """An integer in [low, high)."""
    return int(torch.randint(low, high, (), generator=gen))


def _polygon_mask(px: Tensor, py: Tensor, vertices: Tensor) -> Tensor:
    """Even-odd point-in-polygon test of every pixel centre against a (V, 2) vertex list."""
    x1, y1 = vertices[:, 0, None, None], vertices[:, 1, None, None]
    nxt = vertices.roll(-1, dims=0)
    x2, y2 = nxt[:, 0, None, None], nxt[:, 1, None, None]
    straddles = (y1 > py) != (y2 > py)
    # Horizontal edges never straddle, so their division by zero is masked out below.
    x_cross = x1 + (py - y1) * (x2 - x1) / (y2 - y1)
    crossings = (straddles & (px < x_cross)).sum(dim=0)
    return crossings % 2 == 1


def _regular_vertices(cx: float, cy: float, radii: list[float], angle: float) -> Tensor:
    """Vertices at evenly spaced angles, cycling through ``radii`` (two radii make a star)."""
    count = len(radii)
    theta = angle + torch.arange(count, dtype=torch.float64) * (2 * math.pi / count)
    radius = torch.tensor(radii, dtype=torch.float64)
    return torch.stack((cx + radius * torch.cos(theta), cy + radius * torch.sin(theta)), dim=1)


def shape_mask(
    class_index: int,
    cx: float,
    cy: float,
    radius: float,
    angle: float,
    x0: int,
    y0: int,
    height: int,
    width: int,
) -> Tensor:
    """Boolean (height, width) mask of a shape over the window whose top-left pixel is (x0, y0).

    A pixel belongs to the shape when its centre (x + 0.5, y + 0.5) does. ``radius`` is the
    circumradius; ``angle`` (radians) rotates the polygons.
    """
    ys = torch.arange(y0, y0 + height, dtype=torch.float64)[:, None] + 0.5
    xs = torch.arange(x0, x0 + width, dtype=torch.float64)[None, :] + 0.5
    name = SHAPES_CLASSES[class_index]
    if name == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= radius**2
    if name == "square":
        vertices = _regular_vertices(cx, cy, [radius] * 4, angle)
    elif name == "triangle":
        vertices = _regular_vertices(cx, cy, [radius] * 3, angle)
    else:
        vertices = _regular_vertices(cx, cy, [radius, 0.45 * radius] * 5, angle)
    return _polygon_mask(xs, ys, vertices)


def _background(gen: torch.Generator, size: int) -> Tensor:
    """(3, size, size) float image: a random colour with a random linear gradient."""
    base = torch.rand(3, 1, 1, generator=gen, dtype=torch.float32)
    direction = _uniform(gen, 0.0, 2 * math.pi)
    amplitude = torch.rand(3, 1, 1, generator=gen, dtype=torch.float32) * 0.4 - 0.2
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size - 0.5
    ramp = math.cos(direction) * coords[None, :] + math.sin(direction) * coords[:, None]
    return base + amplitude * ramp[None]


def _contrasting_colour(gen: torch.Generator, local_mean: Tensor) -> Tensor:
    """A random colour far enough from the background under the shape to be visible."""
    colour = torch.rand(3, generator=gen, dtype=torch.float32)
    for _ in range(20):
        if (colour - local_mean).abs().mean() >= MIN_COLOUR_CONTRAST:
            break
        colour = torch.rand(3, generator=gen, dtype=torch.float32)
    return colour


class _Canvas:
    """An image being drawn, with the index of the shape owning each pixel (-1: background)."""

    def __init__(self, gen: torch.Generator, size: int) -> None:
        self.gen = gen
        self.size = size
        self.image = _background(gen, size)
        self.owner = torch.full((size, size), -1, dtype=torch.int64)
        self.pixel_counts = torch.zeros(0, dtype=torch.int64)
        self.visible = torch.zeros(0, dtype=torch.int64)
        self.objects: list[ShapeObject] = []

    def try_place(self) -> None:
        """Draw one random shape unless it would hide more than half of an earlier one."""
        class_index, mask, x0, y0 = self._sample_shape()
        if not bool(mask.any()):
            return
        visible = self.visible - self._pixels_lost(mask, x0, y0)
        if bool((visible < self.pixel_counts * MIN_VISIBLE_FRACTION).any()):
            return
        height, width = mask.shape
        window = (slice(y0, y0 + height), slice(x0, x0 + width))
        region = self.image[:, window[0], window[1]]
        colour = _contrasting_colour(self.gen, region[:, mask].mean(dim=1))
        self.image[:, window[0], window[1]] = torch.where(mask, colour[:, None, None], region)
        self.owner[window][mask] = len(self.objects)
        rows = mask.any(dim=1).nonzero()[:, 0]
        cols = mask.any(dim=0).nonzero()[:, 0]
        box = (x0 + int(cols[0]), y0 + int(rows[0]), x0 + int(cols[-1]) + 1, y0 + int(rows[-1]) + 1)
        self.objects.append(ShapeObject(class_index, box))
        count = mask.sum().reshape(1)
        self.pixel_counts = torch.cat((self.pixel_counts, count))
        self.visible = torch.cat((visible, count))

    def _sample_shape(self) -> tuple[int, Tensor, int, int]:
        """A random shape: its class, its mask over a window and the window's top-left pixel."""
        gen, size = self.gen, self.size
        class_index = _randint(gen, 0, len(SHAPES_CLASSES))
        # Log-uniform sizes, so small objects are as common as large ones.
        extent = math.exp(_uniform(gen, math.log(MIN_OBJECT_SIZE), math.log(size / 2)))
        radius = extent / 2
        cx = _uniform(gen, radius, size - radius)
        cy = _uniform(gen, radius, size - radius)
        angle = _uniform(gen, 0.0, 2 * math.pi)
        x0, y0 = max(int(cx - radius) - 1, 0), max(int(cy - radius) - 1, 0)
        x1, y1 = min(int(cx + radius) + 2, size), min(int(cy + radius) + 2, size)
        mask = shape_mask(class_index, cx, cy, radius, angle, x0, y0, y1 - y0, x1 - x0)
        return class_index, mask, x0, y0

    def _pixels_lost(self, mask: Tensor, x0: int, y0: int) -> Tensor:
        """How many visible pixels each earlier shape would lose under ``mask``."""
        height, width = mask.shape
        covered = self.owner[y0 : y0 + height, x0 : x0 + width][mask]
        return torch.bincount(covered[covered >= 0], minlength=len(self.objects))

    def finish(self) -> Tensor:
        """Add per-pixel noise over shapes and background alike; return uint8 (3, H, W)."""
        sigma = _uniform(self.gen, 0.02, 0.10)
        noise = torch.randn(self.image.shape, generator=self.gen, dtype=torch.float32) * sigma
        return ((self.image + noise).clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


def render_image(seed: int, split: str, index: int, size: int) -> tuple[Tensor, list[ShapeObject]]:
    """Draw image ``index`` of ``split``: a uint8 (3, size, size) tensor and its shapes."""
    gen = torch.Generator().manual_seed(_image_seed(seed, split, index))
    canvas = _Canvas(gen, size)
    if index % EMPTY_PERIOD != EMPTY_PHASE:
        for _ in range(_randint(gen, 1, MAX_OBJECTS + 1)):
            canvas.try_place()
    return canvas.finish(), canvas.objects


def _voc_xml(stem: str, size: int, objects: list[ShapeObject]) -> str:
    parts = [
        "<annotation>",
        "  <folder>VOCshapes</folder>",
        f"  <filename>{stem}.jpg</filename>",
        f"  <size><width>{size}</width><height>{size}</height><depth>3</depth></size>",
        "  <segmented>0</segmented>",
    ]
    for obj in objects:
        x1, y1, x2, y2 = obj.box
        parts += [
            "  <object>",
            f"    <name>{SHAPES_CLASSES[obj.class_index]}</name>",
            "    <pose>Unspecified</pose>",
            "    <truncated>0</truncated>",
            f"    <difficult>{int(obj.difficult)}</difficult>",
            # VOC boxes are 1-based and inclusive.
            f"    <bndbox><xmin>{x1 + 1}</xmin><ymin>{y1 + 1}</ymin>"
            f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox>",
            "  </object>",
        ]
    parts.append("</annotation>")
    return "\n".join(parts) + "\n"


def _coco_annotation(ann_id: int, image_id: int, obj: ShapeObject) -> dict:
    x1, y1, x2, y2 = obj.box
    width, height = x2 - x1, y2 - y1
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": SHAPES_CATEGORY_IDS[obj.class_index],
        "bbox": [x1, y1, width, height],
        # There are no masks, so the box area stands in for COCO's segment area.
        "area": width * height,
        "iscrowd": 0,
    }


def _generate_split(layout: ShapesLayout, split: str, count: int, size: int, seed: int) -> None:
    coco_dir = layout.coco_images(split)
    voc = layout.voc_root
    coco_dir.mkdir(parents=True, exist_ok=True)
    images, annotations, stems = [], [], []
    for index in range(count):
        image, objects = render_image(seed, split, index, size)
        stem = f"{split}_{index:06d}"
        jpeg = encode_jpeg(image, quality=JPEG_QUALITY).numpy().tobytes()
        (coco_dir / f"{stem}.jpg").write_bytes(jpeg)
        (voc / "JPEGImages" / f"{stem}.jpg").write_bytes(jpeg)
        (voc / "Annotations" / f"{stem}.xml").write_text(_voc_xml(stem, size, objects))
        image_id = index + 1
        images.append({"id": image_id, "file_name": f"{stem}.jpg", "width": size, "height": size})
        for obj in objects:
            annotations.append(_coco_annotation(len(annotations) + 1, image_id, obj))
        stems.append(stem)
    categories = [
        {"id": cat_id, "name": name, "supercategory": "shape"}
        for cat_id, name in zip(SHAPES_CATEGORY_IDS, SHAPES_CLASSES)
    ]
    coco = {"images": images, "annotations": annotations, "categories": categories}
    layout.coco_annotations(split).write_text(json.dumps(coco))
    (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(s + "\n" for s in stems))


@contextlib.contextmanager
def _single_threaded() -> Iterator[None]:
    """The tensors are small, so intra-op threads buy nothing; on a busy machine their spinning
    made generation ten times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _check_size(name: str, value: int, minimum: int) -> None:
    if int(value) != value or value < minimum:
        raise ValueError(f"shapes dataset: {name} must be an integer >= {minimum}, got {value!r}")


def generate_shapes(
    root: str | os.PathLike, num_train: int, num_val: int, image_size: int = 256, seed: int = 0
) -> ShapesLayout:
    """Write the shapes dataset into ``root`` (created if needed), overwriting its files."""
    _check_size("num_train", num_train, 0)
    _check_size("num_val", num_val, 0)
    _check_size("image_size", image_size, 2 * int(MIN_OBJECT_SIZE))
    layout = ShapesLayout(Path(root))
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (layout.voc_root / sub).mkdir(parents=True, exist_ok=True)
    (layout.root / "coco" / "annotations").mkdir(parents=True, exist_ok=True)
    with _single_threaded():
        for split, count in zip(SPLITS, (num_train, num_val)):
            _generate_split(layout, split, int(count), int(image_size), int(seed))
    main = layout.voc_root / "ImageSets" / "Main"
    trainval = "".join((main / f"{split}.txt").read_text() for split in SPLITS)
    (main / "trainval.txt").write_text(trainval)
    return layout


def _marker_params(num_train: int, num_val: int, image_size: int, seed: int) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "num_train": int(num_train),
        "num_val": int(num_val),
        "image_size": int(image_size),
        "seed": int(seed),
    }


def _existing_layout(root: Path, params: dict) -> ShapesLayout | None:
    """The finished dataset at ``root`` if it matches ``params``; None if nothing is there."""
    marker = root / MARKER
    if not marker.is_file():
        occupied = root.is_dir() and any(root.iterdir())
        # A concurrent ensure_shapes may have renamed its finished folder into place between
        # the first look and the listing; the rename brings the marker with it, so a second
        # look decides (without it, a rank that lost that race took its peer's dataset for a
        # stranger's folder and failed).
        if not marker.is_file():
            if occupied:
                raise FileExistsError(
                    f"shapes dataset: {root} exists but holds no finished shapes dataset "
                    f"(no {MARKER}); delete it or set data.shapes.root to another folder"
                )
            return None
    found = json.loads(marker.read_text())
    if found != params:
        raise ValueError(
            f"shapes dataset: {root} was generated with {found}, but the config asks for {params}; "
            "delete the folder to regenerate it, or set data.shapes.root to another folder"
        )
    return ShapesLayout(root)


def ensure_shapes(
    root: str | os.PathLike,
    num_train: int = 400,
    num_val: int = 100,
    image_size: int = 256,
    seed: int = 0,
) -> ShapesLayout:
    """Generate the shapes dataset at ``root`` unless it is already there.

    Safe when several processes (torchrun ranks) call it at once: each writes into its own
    temporary folder and renames it into place, which is atomic; the marker file inside is
    written last, so a folder with a marker is always complete.
    """
    root = Path(root)
    params = _marker_params(num_train, num_val, image_size, seed)
    layout = _existing_layout(root, params)
    if layout is not None:
        return layout
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        generate_shapes(tmp, num_train, num_val, image_size, seed)
        (tmp / MARKER).write_text(json.dumps(params))
        try:
            os.rename(tmp, root)
        except OSError:
            # Another process finished first; its copy is identical, so use it.
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    layout = _existing_layout(root, params)
    if layout is None:
        raise RuntimeError(f"shapes dataset: could not create {root}")
    return layout
