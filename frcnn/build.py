"""The composition root: Config -> model, data loaders, optimizer, trainer.

Model code takes plain numbers and modules; this is the only place that reads the config to make
them. Implementations are chosen with plain dicts, no registries.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from frcnn.config import ConfigError, config_to_dict
from frcnn.config.schema import Config, ModelConfig
from frcnn.datasets import (
    VOC_CLASSES,
    COCODataset,
    VOCDataset,
    build_test_loader,
    build_train_loader,
    build_transforms,
    ensure_shapes,
)
from frcnn.datasets.check import (
    CheckResult,
    DatasetCheckError,
    Fixes,
    check_coco,
    check_voc,
    clean_coco,
    clean_voc,
    log_report,
)
from frcnn.engine import (
    Trainer,
    build_lr_scheduler,
    build_optimizer,
    draw_detection_panels,
    inference_on_dataset,
    unwrap_model,
)
from frcnn.engine.distributed import get_rank, get_world_size, is_main_process
from frcnn.engine.inference import Evaluator
from frcnn.evaluation import (
    COCOEvaluator,
    VOCEvaluator,
    coco_from_records,
    format_per_class_table,
)
from frcnn.modeling import backbones
from frcnn.modeling.anchors import AnchorGenerator
from frcnn.modeling.backbones.fold_bn import fold_frozen_batch_norm
from frcnn.modeling.faster_rcnn import FasterRCNN
from frcnn.modeling.roi_heads import (
    BoxPredictor,
    MLP2Head,
    MultiLevelPooler,
    PostprocessSettings,
    ProposalTargetSettings,
    ROIHeads,
    SingleLevelPooler,
)
from frcnn.modeling.rpn import RPN, AnchorMatcher, ProposalSettings, RPNHead

logger = logging.getLogger(__name__)

FPN_BACKBONES = {
    "resnet18_fpn": lambda c: backbones.resnet_fpn(18, c.pretrained, c.norm, c.trainable_layers),
    "resnet34_fpn": lambda c: backbones.resnet_fpn(34, c.pretrained, c.norm, c.trainable_layers),
    "resnet50_fpn": lambda c: backbones.resnet_fpn(50, c.pretrained, c.norm, c.trainable_layers),
    "resnet101_fpn": lambda c: backbones.resnet_fpn(101, c.pretrained, c.norm, c.trainable_layers),
    "mobilenet_v3_large_fpn": lambda c: backbones.mobilenet_v3_large_fpn(
        c.pretrained, c.norm, c.trainable_layers
    ),
}
# single-level trunks that bring their own box head (VGG16 fc6/fc7, ResNet res5)
TRUNK_WITH_HEAD = {
    "vgg16": lambda c: backbones.vgg16_backbone(c.pretrained, c.trainable_layers),
    "resnet50_c4": lambda c: backbones.resnet_c4(50, c.pretrained, c.norm, c.trainable_layers),
    "resnet101_c4": lambda c: backbones.resnet_c4(101, c.pretrained, c.norm, c.trainable_layers),
}
SINGLE_LEVEL = {"small": lambda c: backbones.small_backbone(c.channels, c.norm)}
BACKBONE_NAMES = sorted([*FPN_BACKBONES, *TRUNK_WITH_HEAD, *SINGLE_LEVEL])


def build_model(cfg: ModelConfig) -> FasterRCNN:
    backbone, trunk_head = _build_backbone(cfg)
    anchors = AnchorGenerator(cfg.anchors.sizes, cfg.anchors.aspect_ratios)
    if len(set(anchors.num_anchors_per_location)) != 1:
        raise ValueError("model.anchors: every level needs the same number of anchors (one head)")
    head = RPNHead(backbone.out_channels, anchors.num_anchors_per_location[0], cfg.rpn.objectness)
    rpn = _build_rpn(cfg, head, anchors)
    is_fpn = cfg.backbone.name in FPN_BACKBONES
    roi_heads = _build_roi_heads(cfg, backbone, trunk_head, is_fpn)
    model = FasterRCNN(
        backbone,
        rpn,
        roi_heads,
        cfg.pixel_mean,
        cfg.pixel_std,
        cfg.size_divisibility,
        channels_last=cfg.channels_last,
    )
    if cfg.fold_frozen_bn and fold_frozen_batch_norm(model) == 0:
        raise ValueError(
            "model.fold_frozen_bn: no frozen batch norm follows a convolution in this model "
            f"(backbone {cfg.backbone.name!r}, norm {cfg.backbone.norm!r}); it folds "
            "model.backbone.norm=frozen_bn layers only"
        )
    if cfg.channels_last:
        # the weights too: a channels_last input meeting NCHW weights costs a reorder per conv
        # (.to(device) keeps the format)
        model.to(memory_format=torch.channels_last)
    if cfg.compile:
        model.compile_static_modules()
    return model


def _build_backbone(cfg: ModelConfig) -> tuple[nn.Module, nn.Module | None]:
    name = cfg.backbone.name
    if name in FPN_BACKBONES:
        return FPN_BACKBONES[name](cfg.backbone), None
    if name in TRUNK_WITH_HEAD:
        return TRUNK_WITH_HEAD[name](cfg.backbone)
    if name in SINGLE_LEVEL:
        return SINGLE_LEVEL[name](cfg.backbone), None
    raise ValueError(f"unknown model.backbone.name {name!r}; choose one of {BACKBONE_NAMES}")


def _build_rpn(cfg: ModelConfig, head: RPNHead, anchors: AnchorGenerator) -> RPN:
    rpn = cfg.rpn
    matcher = AnchorMatcher(
        rpn.fg_iou_thresh,
        rpn.bg_iou_thresh,
        cfg.anchors.allowed_border,
        rpn.clobber_positives,
        rpn.crowd_ioa_thresh,
    )

    def settings(pre: int, post: int) -> ProposalSettings:
        return ProposalSettings(pre, post, rpn.nms_thresh, rpn.min_size, rpn.score_thresh)

    return RPN(
        head,
        anchors,
        matcher,
        settings(rpn.pre_nms_topk_train, rpn.post_nms_topk_train),
        settings(rpn.pre_nms_topk_test, rpn.post_nms_topk_test),
        rpn.batch_size_per_image,
        rpn.positive_fraction,
        rpn.smooth_l1_beta,
        rpn.loss_weight,
    )


def _build_roi_heads(
    cfg: ModelConfig, backbone: nn.Module, trunk_head: nn.Module | None, is_fpn: bool
) -> ROIHeads:
    roi = cfg.roi_heads
    resolution = roi.pooler_resolution
    if is_fpn:
        if roi.pooler != "align":
            raise ValueError("model.roi_heads.pooler: FPN backbones pool with RoIAlign only")
        pooler: nn.Module = MultiLevelPooler(
            ["0", "1", "2", "3"], resolution, roi.sampling_ratio, kernel=roi.roi_align_kernel
        )
    else:
        pooler = SingleLevelPooler(
            backbone.feature_name,
            resolution,
            roi.pooler,
            roi.sampling_ratio,
            roi.aligned,
            roi.roi_align_kernel,
        )
    if trunk_head is not None and roi.box_head != "mlp2":
        box_head = trunk_head
    else:
        box_head = MLP2Head(backbone.out_channels * resolution**2, roi.representation_size)
    predictor = BoxPredictor(box_head.out_features, cfg.num_classes, roi.class_agnostic_bbox_reg)
    return ROIHeads(
        pooler,
        box_head,
        predictor,
        ProposalTargetSettings(
            roi.fg_iou_thresh,
            roi.bg_iou_thresh_hi,
            roi.bg_iou_thresh_lo,
            roi.batch_size_per_image,
            roi.positive_fraction,
        ),
        PostprocessSettings(roi.score_thresh, roi.nms_thresh, roi.detections_per_image),
        tuple(roi.bbox_reg_weights),
        roi.smooth_l1_beta,
        roi.loss_weight,
    )


# ----------------------------------------------------------------------------------- data


def prepare_data(cfg: Config) -> None:
    """Write the generated shapes dataset when the config asks for it (rank 0 only; the other
    ranks wait at a barrier in the caller)."""
    shapes = cfg.data.shapes
    if shapes.generate:
        ensure_shapes(shapes.root, shapes.num_train, shapes.num_val, shapes.image_size, shapes.seed)


def build_dataset(cfg: Config, split: str, fixes: Fixes | None = None) -> Dataset:
    """The ``train`` or ``test`` dataset of the config with its transforms; with ``fixes`` (from
    `check_data`), without what lenient mode drops and with partly outside boxes clipped."""
    spec = cfg.data.train if split == "train" else cfg.data.test
    is_train = split == "train"
    data = cfg.data
    transforms = build_transforms(
        data.min_size if is_train else [data.test_min_size],
        data.max_size if is_train else data.test_max_size,
        data.flip_prob if is_train else 0.0,
        is_train,
    )
    prefix = f"data.{split}"
    if spec.format == "coco":
        return COCODataset(
            spec.images,
            spec.annotations,
            transforms,
            filter_empty=data.filter_empty and is_train,
            category_ids_as_labels=data.category_ids_as_labels,
            config_prefix=prefix,
            prepare=None if fixes is None else partial(clean_coco, fixes=fixes),
        )
    if spec.format == "voc":
        names = spec.class_names or VOC_CLASSES
        parsed = None
        if fixes is not None:
            parsed = clean_voc(spec.images, spec.annotations, names, fixes, config_prefix=prefix)
        return VOCDataset(
            spec.images,
            spec.annotations,
            spec.class_names or None,
            keep_difficult=data.keep_difficult and is_train,
            transforms=transforms,
            filter_empty=data.filter_empty and is_train,
            config_prefix=prefix,
            parsed=parsed,
        )
    raise ValueError(f"{prefix}.format must be 'coco' or 'voc', got {spec.format!r}")


def check_data(cfg: Config, split: str) -> CheckResult:
    """Run the dataset checker on ``data.<split>``: every annotation and image header."""
    spec = cfg.data.train if split == "train" else cfg.data.test
    prefix = f"data.{split}"
    name = f"{prefix} ({spec.format}: {spec.annotations})"
    if spec.format == "voc":
        names = spec.class_names or VOC_CLASSES
        return check_voc(spec.images, spec.annotations, names, name=name, config_prefix=prefix)
    return check_coco(spec.images, spec.annotations, name=name, config_prefix=prefix)


def check_training_data(cfg: Config, report_file: Path | None = None) -> Fixes | None:
    """The check made when training starts, per ``data.check``: None when off; strict raises
    DatasetCheckError naming the first problem; lenient logs what it drops or clips and returns
    the fixes for `build_dataset` (raising when nothing usable is left). ``report_file`` gets
    every problem found, as JSON."""
    if cfg.data.check == "off":
        return None
    result = check_data(cfg, "train")
    log_report(result.report, cfg.data.check)
    if report_file is not None:
        report_file.write_text(json.dumps(result.report.to_dict(), indent=1, default=str))
    if cfg.data.check == "strict" and result.report.first_error is not None:
        raise DatasetCheckError(result.report.strict_message())
    if not result.report.usable:
        raise DatasetCheckError(f"{result.report.name}: {result.report.lenient_summary()}")
    return result.fixes


def build_evaluators(cfg: Config, dataset: Dataset) -> dict[str, Evaluator]:
    """Fresh evaluators (they accumulate) for ``test.evaluators``: 'coco' gives the ``bbox``
    entry, 'voc' / 'voc07' the ``voc`` entry (one evaluator reports both VOC metrics)."""
    class_names = list(dataset.class_names)
    evaluators: dict[str, Evaluator] = {}
    if "coco" in cfg.test.evaluators:
        if isinstance(dataset, COCODataset):
            evaluators["bbox"] = COCOEvaluator(
                dataset.coco_gt(), dataset.label_to_category_id, class_names
            )
        else:
            gt = coco_from_records(dataset.records(), class_names)
            labels = range(1, len(class_names) + 1)
            evaluators["bbox"] = COCOEvaluator(gt, {i: i for i in labels}, class_names)
    if {"voc", "voc07"} & set(cfg.test.evaluators):
        evaluators["voc"] = VOCEvaluator(class_names, dataset.records())
    return evaluators


def check_num_classes(cfg: Config, dataset: Dataset, split: str) -> None:
    """The model's class count must be the dataset's: a label past it would index outside the
    classifier (a crash on CPU, a device-side assert on CUDA)."""
    if dataset.num_classes != cfg.model.num_classes:
        raise ConfigError(
            f"model.num_classes={cfg.model.num_classes} but data.{split} has "
            f"{dataset.num_classes} classes ({', '.join(dataset.class_names[:8])}"
            f"{', ...' if dataset.num_classes > 8 else ''}); set model.num_classes="
            f"{dataset.num_classes}"
        )


def num_processes_batch(cfg: Config, world_size: int) -> int:
    """Images per process: ``solver.ims_per_batch`` is the total over all processes."""
    total = cfg.solver.ims_per_batch
    if total % world_size:
        raise ValueError(
            f"solver.ims_per_batch={total} must be divisible by the number of processes "
            f"({world_size}); scale base_lr with it (linear scaling rule)"
        )
    return total // world_size


# --------------------------------------------------------------------------------- engine


def build_trainer(
    cfg: Config,
    model: nn.Module,
    device: torch.device,
    output_dir: Path,
    train_fixes: Fixes | None = None,
) -> Trainer:
    """Optimizer, schedule, loaders and evaluation callbacks around an already placed model
    (wrapped in DDP by the caller when several processes run); ``train_fixes`` from
    `check_training_data` apply the lenient fixes to the training set."""
    rank, world_size = get_rank(), get_world_size()
    train_set = build_dataset(cfg, "train", train_fixes)
    check_num_classes(cfg, train_set, "train")
    test_set = build_dataset(cfg, "test")  # one copy for evaluation and the image panels
    per_process = num_processes_batch(cfg, world_size)
    solver = cfg.solver
    optimizer = build_optimizer(
        model,
        solver.optimizer,
        solver.base_lr,
        solver.momentum,
        solver.weight_decay,
        solver.bias_lr_factor,
        solver.weight_decay_bias,
    )
    scheduler = build_lr_scheduler(
        optimizer,
        solver.lr_schedule,
        solver.max_iter,
        solver.steps,
        solver.gamma,
        solver.warmup_iters,
        solver.warmup_factor,
    )

    def train_loader(start_iter: int) -> DataLoader:
        return build_train_loader(
            train_set,
            per_process,
            cfg.seed,
            rank,
            world_size,
            cfg.data.num_workers,
            start_iter,
            cfg.data.aspect_ratio_grouping,
        )

    return Trainer(
        model,
        optimizer,
        scheduler,
        train_loader,
        device=device,
        output_dir=output_dir,
        max_iter=solver.max_iter,
        amp=solver.amp,
        clip_grad_norm=solver.clip_grad_norm,
        checkpoint_period=solver.checkpoint_period,
        eval_period=cfg.test.eval_period,
        evaluate_fn=make_evaluate_fn(cfg, device, test_set),
        visualize_fn=make_visualize_fn(cfg, device, test_set),
        log_period=cfg.log_period,
        max_bad_steps=solver.max_bad_steps,
        config=config_to_dict(cfg),
    )


def make_evaluate_fn(
    cfg: Config, device: torch.device, test_set: Dataset | None = None
) -> Callable[[nn.Module], dict]:
    """Evaluate on the test set (every rank predicts its shard), print per-class tables."""
    if test_set is None:
        test_set = build_dataset(cfg, "test")
    check_num_classes(cfg, test_set, "test")
    loader = build_test_loader(
        test_set, cfg.test.ims_per_batch, get_rank(), get_world_size(), cfg.data.num_workers
    )

    def evaluate(model: nn.Module) -> dict:
        evaluators = build_evaluators(cfg, test_set)
        results = inference_on_dataset(model, loader, evaluators, device, cfg.solver.amp)
        if is_main_process():
            for name, metrics in results.items():
                for key in ("per_class", "per_class_07"):
                    if key in metrics:
                        logger.info("\n%s", format_per_class_table(metrics[key], f"{name} {key}"))
        return results

    return evaluate


def make_visualize_fn(
    cfg: Config, device: torch.device, test_set: Dataset | None = None
) -> Callable[[nn.Module], Tensor | None]:
    """Ground truth beside detections for the first test images, for TensorBoard."""
    if test_set is None:
        test_set = build_dataset(cfg, "test")

    def visualize(model: nn.Module) -> Tensor | None:
        items = [test_set[i] for i in range(min(4, len(test_set)))]
        if not items:
            return None
        module = unwrap_model(model)
        was_training = module.training
        module.eval()
        with torch.inference_mode():
            detections = module([image.to(device) for image, _, _ in items])
        module.train(was_training)
        return draw_detection_panels(
            [image for image, _, _ in items],
            [target for _, target, _ in items],
            [det.to("cpu") for det in detections],
            list(test_set.class_names),
        )

    return visualize


def category_mapping(cfg: Config) -> tuple[list[str], dict[int, int]]:
    """Class names and label -> dataset category id of the test set, for writing results; empty
    when the test annotations are not on this machine (labels are then written as they are)."""
    try:
        dataset = build_dataset(cfg, "test")
    except FileNotFoundError:
        return [], {}
    return list(dataset.class_names), dict(getattr(dataset, "label_to_category_id", {}))
