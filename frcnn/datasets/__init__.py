"""Detection datasets (COCO json, PASCAL VOC, generated shapes), transforms and data loaders."""

from frcnn.datasets.coco import COCODataset, load_coco
from frcnn.datasets.common import DatasetItem, read_image
from frcnn.datasets.loader import (
    Batch,
    InferenceSampler,
    TrainingSampler,
    build_test_loader,
    build_train_loader,
    collate,
)
from frcnn.datasets.shapes import (
    SHAPES_CATEGORY_IDS,
    SHAPES_CLASSES,
    ShapesLayout,
    ensure_shapes,
    generate_shapes,
)
from frcnn.datasets.transforms import (
    RandomHorizontalFlip,
    ResizeShortestEdge,
    build_transforms,
    resized_size,
)
from frcnn.datasets.voc import VOC_CLASSES, VOCDataset

__all__ = [
    "SHAPES_CATEGORY_IDS",
    "SHAPES_CLASSES",
    "VOC_CLASSES",
    "Batch",
    "COCODataset",
    "DatasetItem",
    "InferenceSampler",
    "RandomHorizontalFlip",
    "ResizeShortestEdge",
    "ShapesLayout",
    "TrainingSampler",
    "VOCDataset",
    "build_test_loader",
    "build_train_loader",
    "build_transforms",
    "collate",
    "ensure_shapes",
    "generate_shapes",
    "load_coco",
    "read_image",
    "resized_size",
]
