"""Range, choice and cross-field checks (frcnn.config.checks, through validate and the loader)."""

from __future__ import annotations

import dataclasses

import pytest

from frcnn.config import Config, ConfigError, validate, with_overrides


def _problems(*overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        with_overrides(Config(), list(overrides))
    return str(info.value)


def test_the_defaults_are_valid():
    validate(Config())


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["model.rpn.objectness=tanh"],
            "'model.rpn.objectness' in --opts: got 'tanh'; allowed: softmax, sigmoid",
        ),
        (["model.rpn.fg_iou_thresh=1.2"], "'model.rpn.fg_iou_thresh' in --opts: must be in [0, 1]"),
        (
            ["model.rpn.bg_iou_thresh=0.8"],
            "'model.rpn.bg_iou_thresh' in --opts: must be <= "
            "model.rpn.fg_iou_thresh (0.7), got 0.8",
        ),
        (["model.rpn.positive_fraction=-0.1"], "must be in [0, 1], got -0.1"),
        (["model.rpn.batch_size_per_image=0"], "'model.rpn.batch_size_per_image' in --opts"),
        (["model.rpn.post_nms_topk_test=0"], "'model.rpn.post_nms_topk_test' in --opts"),
        (
            ["model.roi_heads.bg_iou_thresh_lo=0.6"],
            "'model.roi_heads.bg_iou_thresh_lo' in --opts:"
            " must be <= model.roi_heads.bg_iou_thresh_hi (0.5)",
        ),
        (
            ["model.roi_heads.fg_iou_thresh=0.4"],
            "'model.roi_heads.bg_iou_thresh_hi': must be <= model.roi_heads.fg_iou_thresh (0.4)",
        ),
        (["model.roi_heads.box_head=mlp3"], "allowed: mlp2, vgg_fc, res5"),
        (["model.roi_heads.pooler=max"], "allowed: align, pool"),
        (["model.roi_heads.roi_align_kernel=cuda"], "allowed: torchvision, grid_sample, sparse"),
        (
            ["model.roi_heads.roi_align_kernel=grid_sample", "model.roi_heads.pooler=pool"],
            "grid_sample computes RoIAlign, but model.roi_heads.pooler is 'pool'",
        ),
        (
            ["model.roi_heads.roi_align_kernel=grid_sample", "model.roi_heads.sampling_ratio=0"],
            "grid_sample needs a fixed model.roi_heads.sampling_ratio >= 1, got 0",
        ),
        (
            ["model.roi_heads.roi_align_kernel=sparse", "model.roi_heads.pooler=pool"],
            "sparse computes RoIAlign, but model.roi_heads.pooler is 'pool'",
        ),
        (
            ["model.roi_heads.roi_align_kernel=sparse", "model.roi_heads.sampling_ratio=0"],
            "sparse needs a fixed model.roi_heads.sampling_ratio >= 1, got 0",
        ),
        (["model.roi_heads.bbox_reg_weights=[10, 10, 5]"], "needs 4 values > 0"),
        (["model.roi_heads.box_head=res5"], "'res5' continues the resnet50_c4 or resnet101_c4"),
        (["model.backbone.name=resnet51_fpn"], "got 'resnet51_fpn'; allowed: small, vgg16,"),
        (["model.backbone.norm=sync_bn"], "allowed: frozen_bn, bn, gn"),
        (["model.backbone.trainable_layers=6"], "must be in 0..5 for 'resnet50_fpn', got 6"),
        (["model.num_classes=0"], "'model.num_classes' in --opts: must be >= 1, got 0"),
        (["model.pixel_std=[0.2, 0, 0.2]"], "every value must be > 0"),
        (["model.pixel_mean=[0.5]"], "needs 3 values (R, G, B)"),
        (
            ["model.anchors.aspect_ratios=[[1.0], [2.0]]"],
            "one per level of model.anchors.sizes (5 levels), got 2 lists",
        ),
        (["model.anchors.sizes=[[32], [64], [128], [256], []]"], "non-empty lists of values > 0"),
        (
            ["model.anchors.aspect_ratios=[[1], [1], [1], [1], [0.5, 2]]"],
            "same number of anchors per location",
        ),
        (["model.anchors.allowed_border=-2"], "must be -1 (keep every anchor) or >= 0"),
        (["model.backbone.name=vgg16"], "backbone 'vgg16' gives 1 feature map(s)"),
        (["solver.max_iter=0"], "'solver.max_iter' in --opts: must be >= 1, got 0"),
        (["solver.ims_per_batch=0"], "'solver.ims_per_batch' in --opts: must be >= 1"),
        (["solver.base_lr=0"], "'solver.base_lr' in --opts: must be > 0, got 0.0"),
        (["solver.momentum=1"], "must be in [0, 1), got 1.0"),
        (["solver.optimizer=adam"], "allowed: sgd, adamw"),
        (["solver.lr_schedule=poly"], "allowed: step, cosine"),
        (["solver.amp=fp32"], "allowed: off, fp16, bf16"),
        (["solver.steps=[70000, 60000]"], "'solver.steps' in --opts: must increase strictly"),
        (["solver.steps=[60000, 90000]"], "lie in (0, solver.max_iter=90000)"),
        (
            ["solver.max_iter=100"],
            "'solver.steps': must increase strictly and lie in "
            "(0, solver.max_iter=100), got [60000, 80000]",
        ),
        (["solver.warmup_factor=2"], "'solver.warmup_factor' in --opts: must be in [0, 1]"),
        (
            ["data.train.format=yolo"],
            "'data.train.format' in --opts: got 'yolo'; allowed: coco, voc",
        ),
        (
            ["data.test.format=voc"],
            "'model.num_classes': is 80 but data.test has no class_names (the 20 PASCAL classes)",
        ),
        (["data.train.class_names=[cat, dog, cat]"], "repeated: ['cat']"),
        (["data.check=maybe"], "allowed: lenient, strict, off"),
        (["data.flip_prob=1.5"], "'data.flip_prob' in --opts: must be in [0, 1]"),
        (["data.min_size=[]"], "needs one or more sizes >= 1"),
        (["data.num_workers=-1"], "must be >= 0, got -1"),
        (
            ["test.evaluators=[coco, lvis]"],
            "'test.evaluators[1]' in --opts: got 'lvis'; allowed: coco, voc07, voc",
        ),
        (["test.evaluators=[coco, coco]"], "each evaluator must appear once"),
        (["device=gpu"], "allowed: auto, cpu, cuda, cuda:N"),
        (["seed=-1"], "'seed' in --opts: must be in [0, 2**32)"),
    ],
)
def test_each_invalid_value_is_named_with_what_is_allowed(overrides, expected):
    assert expected in _problems(*overrides)


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.anchors.aspect_ratios=[[0.5, 1, 2]]"],
        ["model.anchors.aspect_ratios=[[1], [1], [1], [1], [2]]"],
        [
            "model.backbone.name=vgg16",
            "model.anchors.sizes=[[128, 256, 512]]",
            "model.roi_heads.box_head=vgg_fc",
        ],
        [
            "model.backbone.name=resnet50_c4",
            "model.anchors.sizes=[[32, 64, 128, 256, 512]]",
            "model.roi_heads.box_head=res5",
        ],
        ["solver.lr_schedule=cosine", "solver.max_iter=100"],  # steps only matter for `step`
        ["solver.max_iter=100", "solver.steps=[]"],
        ["data.train.format=voc", "model.num_classes=20"],
        ["data.train.format=voc", "data.train.class_names=[a, b]", "model.num_classes=2"],
        ["model.rpn.fg_iou_thresh=0.5", "model.rpn.bg_iou_thresh=0.5"],
        ["device=cuda:3", "model.anchors.allowed_border=0"],
    ],
)
def test_valid_combinations_pass(overrides):
    with_overrides(Config(), overrides)


def test_nan_is_reported_once_as_not_finite():
    message = _problems("model.rpn.nms_thresh=.nan")
    assert message == "'model.rpn.nms_thresh' in --opts: must be a finite number, got nan"


def test_every_range_problem_is_listed_in_one_error():
    message = _problems("solver.max_iter=0", "model.rpn.nms_thresh=2", "solver.amp=fp8")
    assert message.startswith("4 problems in the config:")  # max_iter=0 also breaks steps
    for key in ("solver.max_iter", "model.rpn.nms_thresh", "solver.amp", "solver.steps"):
        assert f"  - '{key}'" in message


def test_validate_checks_a_config_built_in_code():
    solver = dataclasses.replace(Config().solver, base_lr=-1.0)
    with pytest.raises(ConfigError) as info:
        validate(dataclasses.replace(Config(), solver=solver))
    assert str(info.value) == "'solver.base_lr': must be > 0, got -1.0"
