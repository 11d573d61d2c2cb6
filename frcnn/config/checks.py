"""Range, choice and cross-field checks of a typed Config. Imports no torch.

Each check returns (dotted key, what is wrong and what is allowed); the loader adds where the value
came from and raises them all at once, so one run shows every mistake.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

from frcnn.config.schema import (
    AnchorConfig,
    Config,
    DataConfig,
    DatasetConfig,
    ModelConfig,
    ROIHeadsConfig,
    RPNConfig,
    SolverConfig,
    TestConfig,
)

Problem = tuple[str, str]

BACKBONE_NAMES = (
    "small",
    "vgg16",
    "resnet50_c4",
    "resnet101_c4",
    "resnet18_fpn",
    "resnet34_fpn",
    "resnet50_fpn",
    "resnet101_fpn",
    "mobilenet_v3_large_fpn",
)
# feature maps each backbone hands the RPN (torchvision's FPN adds a max-pooled level on top)
FEATURE_LEVELS = {name: 5 for name in BACKBONE_NAMES if name.startswith("resnet")} | {
    "small": 1,
    "vgg16": 1,
    "resnet50_c4": 1,
    "resnet101_c4": 1,
    "mobilenet_v3_large_fpn": 3,
}
NORMS = ("frozen_bn", "bn", "gn")
OBJECTNESS = ("softmax", "sigmoid")
BOX_HEADS = ("mlp2", "vgg_fc", "res5")
POOLERS = ("align", "pool")
ROI_ALIGN_KERNELS = ("torchvision", "grid_sample", "sparse")  # roi_align_jobs.KERNELS, no torch
DATASET_FORMATS = ("coco", "voc")
DATA_CHECKS = ("lenient", "strict", "off")
OPTIMIZERS = ("sgd", "adamw")
LR_SCHEDULES = ("step", "cosine")
AMP_MODES = ("off", "fp16", "bf16")
EVALUATORS = ("coco", "voc07", "voc")
NUM_VOC_CLASSES = 20
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def range_problems(cfg: Config) -> list[Problem]:
    """Every out-of-range value, invalid choice and contradiction in `cfg` (empty when valid)."""
    non_finite: list[Problem] = []
    _non_finite(cfg, "", non_finite)
    out: list[Problem] = []
    _check_run(cfg, out)
    _check_model(cfg.model, out)
    _check_anchors(cfg.model.anchors, out)
    _check_feature_levels(cfg.model, out)
    _check_rpn(cfg.model.rpn, out)
    _check_roi_heads(cfg.model, out)
    _check_data(cfg.data, cfg.model.num_classes, out)
    _check_solver(cfg.solver, out)
    _check_test(cfg.test, out)
    # a NaN fails every range check too; saying it once is enough
    flagged = {key for key, _ in non_finite}
    return non_finite + [(key, text) for key, text in out if key not in flagged]


def _non_finite(value: Any, key: str, out: list[Problem]) -> None:
    if dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            _non_finite(getattr(value, f.name), f"{key}.{f.name}" if key else f.name, out)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _non_finite(item, f"{key}[{i}]", out)
    elif isinstance(value, float) and not math.isfinite(value):
        out.append((key, f"must be a finite number, got {value}"))


def _choice(out: list[Problem], key: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        out.append((key, f"got {value!r}; allowed: {', '.join(allowed)}"))


def _at_least(out: list[Problem], key: str, value: float, low: float) -> None:
    if not value >= low:
        out.append((key, f"must be >= {low}, got {value!r}"))


def _positive(out: list[Problem], key: str, value: float) -> None:
    if not value > 0:
        out.append((key, f"must be > 0, got {value!r}"))


def _fraction(out: list[Problem], key: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        out.append((key, f"must be in [0, 1], got {value!r}"))


def _ordered(out: list[Problem], low: tuple[str, float], high: tuple[str, float]) -> None:
    """Report `low`'s key unless its value is <= `high`'s (an ordering of two thresholds)."""
    if not low[1] <= high[1]:
        out.append((low[0], f"must be <= {high[0]} ({high[1]!r}), got {low[1]!r}"))


def _check_run(cfg: Config, out: list[Problem]) -> None:
    if not 0 <= cfg.seed < 2**32:
        out.append(("seed", f"must be in [0, 2**32), got {cfg.seed}"))
    if not _DEVICE.fullmatch(cfg.device):
        out.append(("device", f"got {cfg.device!r}; allowed: auto, cpu, cuda, cuda:N"))
    if not cfg.output_dir.strip():
        out.append(("output_dir", "must name a folder, got an empty string"))
    _at_least(out, "log_period", cfg.log_period, 1)


def _check_model(model: ModelConfig, out: list[Problem]) -> None:
    _at_least(out, "model.num_classes", model.num_classes, 1)
    for name in ("pixel_mean", "pixel_std"):
        values = getattr(model, name)
        if len(values) != 3:
            out.append((f"model.{name}", f"needs 3 values (R, G, B), got {values!r}"))
    if not all(std > 0 for std in model.pixel_std):
        out.append(("model.pixel_std", f"every value must be > 0, got {model.pixel_std!r}"))
    if model.size_divisibility < 32 or model.size_divisibility % 32:
        # anchors take a level's stride as padded size // map size: exact only when the padded
        # size is a multiple of every backbone stride up to 32
        out.append(
            (
                "model.size_divisibility",
                f"must be a positive multiple of 32, got {model.size_divisibility!r}",
            )
        )
    backbone = model.backbone
    _choice(out, "model.backbone.name", backbone.name, BACKBONE_NAMES)
    _choice(out, "model.backbone.norm", backbone.norm, NORMS)
    if backbone.name == "small" and backbone.norm == "frozen_bn":
        out.append(("model.backbone.norm", "the small backbone trains from scratch: use bn or gn"))
    most = 5 if backbone.name.startswith("resnet") else math.inf
    if not 0 <= backbone.trainable_layers <= most:
        allowed = "in 0..5" if most == 5 else ">= 0"
        out.append(
            (
                "model.backbone.trainable_layers",
                f"must be {allowed} for '{backbone.name}', got {backbone.trainable_layers}",
            )
        )
    _at_least(out, "model.backbone.channels", backbone.channels, 1)


def _check_anchors(anchors: AnchorConfig, out: list[Problem]) -> None:
    key = "model.anchors"
    sizes, ratios = anchors.sizes, anchors.aspect_ratios
    for name, levels in (("sizes", sizes), ("aspect_ratios", ratios)):
        if not levels or not all(levels) or not all(v > 0 for lvl in levels for v in lvl):
            out.append((f"{key}.{name}", f"needs non-empty lists of values > 0, got {levels!r}"))
    if len(ratios) not in (1, len(sizes)):
        out.append(
            (
                f"{key}.aspect_ratios",
                f"give one list for all levels or one per level of {key}.sizes "
                f"({len(sizes)} levels), got {len(ratios)} lists",
            )
        )
    elif sizes and ratios:
        per_level = [len(s) * len(ratios[i % len(ratios)]) for i, s in enumerate(sizes)]
        if len(set(per_level)) > 1:
            out.append(
                (
                    key,
                    "every level needs the same number of anchors per location "
                    f"(sizes x aspect ratios), since one RPN head serves all; got {per_level}",
                )
            )
    if anchors.allowed_border != -1 and not anchors.allowed_border >= 0:
        out.append(
            (
                f"{key}.allowed_border",
                f"must be -1 (keep every anchor) or >= 0, got {anchors.allowed_border!r}",
            )
        )


def _check_feature_levels(model: ModelConfig, out: list[Problem]) -> None:
    levels = FEATURE_LEVELS.get(model.backbone.name)
    sizes = model.anchors.sizes
    if levels is not None and len(sizes) != levels:
        out.append(
            (
                "model.anchors.sizes",
                f"backbone '{model.backbone.name}' gives {levels} feature map(s), so give "
                f"{levels} list(s) of sizes, got {len(sizes)}: {sizes!r}",
            )
        )


def _check_rpn(rpn: RPNConfig, out: list[Problem]) -> None:
    key = "model.rpn"
    _choice(out, f"{key}.objectness", rpn.objectness, OBJECTNESS)
    for name in (
        "fg_iou_thresh",
        "bg_iou_thresh",
        "positive_fraction",
        "crowd_ioa_thresh",
        "nms_thresh",
        "score_thresh",
    ):
        _fraction(out, f"{key}.{name}", getattr(rpn, name))
    _ordered(
        out,
        (f"{key}.bg_iou_thresh", rpn.bg_iou_thresh),
        (f"{key}.fg_iou_thresh", rpn.fg_iou_thresh),
    )
    for name in (
        "batch_size_per_image",
        "pre_nms_topk_train",
        "pre_nms_topk_test",
        "post_nms_topk_train",
        "post_nms_topk_test",
    ):
        _at_least(out, f"{key}.{name}", getattr(rpn, name), 1)
    for name in ("min_size", "smooth_l1_beta", "loss_weight"):
        _at_least(out, f"{key}.{name}", getattr(rpn, name), 0.0)


def _check_roi_heads(model: ModelConfig, out: list[Problem]) -> None:
    heads: ROIHeadsConfig = model.roi_heads
    key = "model.roi_heads"
    _choice(out, f"{key}.box_head", heads.box_head, BOX_HEADS)
    _choice(out, f"{key}.pooler", heads.pooler, POOLERS)
    _choice(out, f"{key}.roi_align_kernel", heads.roi_align_kernel, ROI_ALIGN_KERNELS)
    kernel = heads.roi_align_kernel
    if kernel in ("grid_sample", "sparse"):  # roi_align_jobs.FIXED_RATIO_KERNELS
        if heads.pooler != "align":
            out.append(
                (
                    f"{key}.roi_align_kernel",
                    f"{kernel} computes RoIAlign, but model.roi_heads.pooler is "
                    f"'{heads.pooler}'; use pooler align, or roi_align_kernel torchvision",
                )
            )
        elif not heads.sampling_ratio >= 1:
            out.append(
                (
                    f"{key}.roi_align_kernel",
                    f"{kernel} needs a fixed model.roi_heads.sampling_ratio >= 1, got "
                    f"{heads.sampling_ratio!r} (0 is adaptive); set one (torchvision's detectors "
                    f"use 2), or roi_align_kernel torchvision",
                )
            )
    needs = {"res5": "resnet50_c4 or resnet101_c4", "vgg_fc": "vgg16"}.get(heads.box_head)
    if needs is not None and model.backbone.name not in needs.split(" or "):
        out.append(
            (
                f"{key}.box_head",
                f"'{heads.box_head}' continues the {needs} backbone, but model.backbone.name "
                f"is '{model.backbone.name}'; use mlp2 with this backbone",
            )
        )
    for name in ("representation_size", "pooler_resolution", "batch_size_per_image"):
        _at_least(out, f"{key}.{name}", getattr(heads, name), 1)
    _at_least(out, f"{key}.detections_per_image", heads.detections_per_image, 1)
    for name in (
        "fg_iou_thresh",
        "bg_iou_thresh_hi",
        "bg_iou_thresh_lo",
        "positive_fraction",
        "score_thresh",
        "nms_thresh",
    ):
        _fraction(out, f"{key}.{name}", getattr(heads, name))
    lo, hi, fg = heads.bg_iou_thresh_lo, heads.bg_iou_thresh_hi, heads.fg_iou_thresh
    _ordered(out, (f"{key}.bg_iou_thresh_lo", lo), (f"{key}.bg_iou_thresh_hi", hi))
    _ordered(out, (f"{key}.bg_iou_thresh_hi", hi), (f"{key}.fg_iou_thresh", fg))
    weights = heads.bbox_reg_weights
    if len(weights) != 4 or not all(w > 0 for w in weights):
        out.append((f"{key}.bbox_reg_weights", f"needs 4 values > 0 (x, y, w, h), got {weights!r}"))
    for name in ("smooth_l1_beta", "loss_weight"):
        _at_least(out, f"{key}.{name}", getattr(heads, name), 0.0)


def _check_data(data: DataConfig, num_classes: int, out: list[Problem]) -> None:
    for split in ("train", "test"):
        _check_dataset(getattr(data, split), f"data.{split}", num_classes, out)
    if not data.min_size or not all(size >= 1 for size in data.min_size):
        out.append(("data.min_size", f"needs one or more sizes >= 1, got {data.min_size!r}"))
    for name in ("max_size", "test_min_size", "test_max_size"):
        _at_least(out, f"data.{name}", getattr(data, name), 1)
    _fraction(out, "data.flip_prob", data.flip_prob)
    _at_least(out, "data.num_workers", data.num_workers, 0)
    _choice(out, "data.check", data.check, DATA_CHECKS)
    shapes = data.shapes
    for name in ("num_train", "num_val", "image_size"):
        _at_least(out, f"data.shapes.{name}", getattr(shapes, name), 1)
    _at_least(out, "data.shapes.seed", shapes.seed, 0)


def _check_dataset(dataset: DatasetConfig, key: str, num_classes: int, out: list[Problem]) -> None:
    _choice(out, f"{key}.format", dataset.format, DATASET_FORMATS)
    names = dataset.class_names
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        out.append((f"{key}.class_names", f"each name must appear once, repeated: {repeated}"))
    if dataset.format != "voc":
        return
    count = len(names) or NUM_VOC_CLASSES
    if count != num_classes:
        given = f"{len(names)} class_names" if names else "no class_names (the 20 PASCAL classes)"
        out.append(
            (
                "model.num_classes",
                f"is {num_classes} but {key} has {given}; make them agree",
            )
        )


def _check_solver(solver: SolverConfig, out: list[Problem]) -> None:
    key = "solver"
    _choice(out, f"{key}.optimizer", solver.optimizer, OPTIMIZERS)
    _choice(out, f"{key}.lr_schedule", solver.lr_schedule, LR_SCHEDULES)
    _choice(out, f"{key}.amp", solver.amp, AMP_MODES)
    for name in ("ims_per_batch", "max_iter", "checkpoint_period", "max_bad_steps"):
        _at_least(out, f"{key}.{name}", getattr(solver, name), 1)
    _positive(out, f"{key}.base_lr", solver.base_lr)
    _positive(out, f"{key}.gamma", solver.gamma)
    if not 0.0 <= solver.momentum < 1.0:
        out.append((f"{key}.momentum", f"must be in [0, 1), got {solver.momentum!r}"))
    for name in ("weight_decay", "weight_decay_bias", "bias_lr_factor", "clip_grad_norm"):
        _at_least(out, f"{key}.{name}", getattr(solver, name), 0.0)
    _at_least(out, f"{key}.warmup_iters", solver.warmup_iters, 0)
    _fraction(out, f"{key}.warmup_factor", solver.warmup_factor)
    steps = solver.steps
    if solver.lr_schedule == "step" and (
        not all(0 < step < solver.max_iter for step in steps)
        or any(a >= b for a, b in zip(steps, steps[1:]))
    ):
        out.append(
            (
                f"{key}.steps",
                f"must increase strictly and lie in (0, solver.max_iter={solver.max_iter}), "
                f"got {steps!r}",
            )
        )


def _check_test(test: TestConfig, out: list[Problem]) -> None:
    _at_least(out, "test.eval_period", test.eval_period, 0)
    _at_least(out, "test.ims_per_batch", test.ims_per_batch, 1)
    for i, name in enumerate(test.evaluators):
        _choice(out, f"test.evaluators[{i}]", name, EVALUATORS)
    if len(set(test.evaluators)) != len(test.evaluators):
        out.append(("test.evaluators", f"each evaluator must appear once: {test.evaluators!r}"))
