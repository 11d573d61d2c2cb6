"""Typed configuration: the single source of defaults. Imports no torch.

Every field here can be set in a YAML file or with ``--opts section.key=value``. Defaults follow
torchvision's Faster R-CNN where the paper and torchvision agree; the shipped configs under
``configs/`` set what differs (jwyang's VGG16 / C4 settings, detectron2's schedule, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class BackboneConfig:
    # small | vgg16 | resnet50_c4 | resnet101_c4 | resnet18_fpn | resnet34_fpn | resnet50_fpn
    # | resnet101_fpn | mobilenet_v3_large_fpn
    name: str = "resnet50_fpn"
    # local file with torchvision ImageNet weights (a state_dict as torchvision saves it); "" = none
    pretrained: str = ""
    # frozen_bn (pretrained trunks) | bn | gn (trainable, for training from scratch)
    norm: str = "frozen_bn"
    # number of trunk stages left trainable, counted from the top (torchvision's trainable_layers)
    trainable_layers: int = 3
    # width of the small backbone and the FPN's output channels are fixed by the architecture;
    # this sets the small backbone's channels only
    channels: int = 128


@dataclass(frozen=True)
class AnchorConfig:
    # one list of sizes (pixels, sqrt of area) per feature level
    sizes: list[list[float]] = field(
        default_factory=lambda: [[32.0], [64.0], [128.0], [256.0], [512.0]]
    )
    # height / width ratios; one list for all levels, or one list per level
    aspect_ratios: list[list[float]] = field(default_factory=lambda: [[0.5, 1.0, 2.0]])
    # anchors crossing the image border by more than this many pixels are ignored in training;
    # -1 keeps every anchor (torchvision), 0 drops those crossing the border (jwyang, the paper)
    allowed_border: float = -1.0


@dataclass(frozen=True)
class RPNConfig:
    objectness: str = "softmax"  # softmax (2*A channels, the seed's) | sigmoid (A channels)
    fg_iou_thresh: float = 0.7
    bg_iou_thresh: float = 0.3
    clobber_positives: bool = False  # True: a best anchor under bg_iou_thresh stays negative
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    crowd_ioa_thresh: float = 0.7  # anchors this much inside a crowd box are ignored
    pre_nms_topk_train: int = 2000  # per feature level
    pre_nms_topk_test: int = 1000
    post_nms_topk_train: int = 2000  # per image
    post_nms_topk_test: int = 1000
    nms_thresh: float = 0.7
    min_size: float = 1e-3
    score_thresh: float = 0.0
    smooth_l1_beta: float = 1.0 / 9.0  # sigma = 3
    loss_weight: float = 1.0


@dataclass(frozen=True)
class ROIHeadsConfig:
    box_head: str = "mlp2"  # mlp2 | vgg_fc | res5
    representation_size: int = 1024  # mlp2 only
    pooler: str = "align"  # align | pool
    pooler_resolution: int = 7
    sampling_ratio: int = 2
    aligned: bool = False
    # speed setting: RoIAlign on torchvision's kernels; on PyTorch's grid_sample kernels (the
    # same sample points and edge rules, equal to float rounding, a faster backward on a CPU);
    # or sparse: products with RoIAlign's sparse weight matrix, embedding_bag sums forward and
    # sparse-matrix products backward (equal to float rounding, faster still). The last two
    # need pooler align and sampling_ratio >= 1
    roi_align_kernel: str = "torchvision"  # torchvision | grid_sample | sparse
    fg_iou_thresh: float = 0.5
    bg_iou_thresh_hi: float = 0.5
    bg_iou_thresh_lo: float = 0.0
    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    bbox_reg_weights: list[float] = field(default_factory=lambda: [10.0, 10.0, 5.0, 5.0])
    class_agnostic_bbox_reg: bool = False
    smooth_l1_beta: float = 1.0
    loss_weight: float = 1.0
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_image: int = 100


@dataclass(frozen=True)
class ModelConfig:
    num_classes: int = 80
    # RGB mean / std of images scaled to [0, 1] (torchvision's ImageNet statistics)
    pixel_mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    pixel_std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    size_divisibility: int = 32
    # local frcnn checkpoint to start from (e.g. made by tools/convert_weights.py); "" = none
    weights: str = ""
    channels_last: bool = False
    # fold each frozen batch norm into the convolution before it (trainable stages through an
    # autograd function that keeps no copy of the weight; unfolded there under autocast):
    # speed; equal up to rounding (under autocast the folded outputs stay in its dtype);
    # state_dict keys unchanged; needs backbone.norm frozen_bn
    fold_frozen_bn: bool = False
    # torch.compile the backbone, RPN head and box head / predictor (not NMS, not sampling); the
    # first steps pay the compile time, state_dict keys are unchanged
    compile: bool = False
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    roi_heads: ROIHeadsConfig = field(default_factory=ROIHeadsConfig)


@dataclass(frozen=True)
class DatasetConfig:
    format: str = "coco"  # coco | voc
    # COCO: the image folder; VOC: the year folder, e.g. data/VOCdevkit/VOC2007
    images: str = ""
    # COCO: the annotation json; VOC: the image-set name, e.g. trainval
    annotations: str = ""
    # VOC only: class names in label order; empty = the 20 PASCAL classes
    class_names: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ShapesConfig:
    """The generated dataset written to ``root`` on first use when ``generate`` is true."""

    generate: bool = False
    root: str = "data/shapes"
    num_train: int = 400
    num_val: int = 100
    image_size: int = 256
    seed: int = 0


@dataclass(frozen=True)
class DataConfig:
    train: DatasetConfig = field(default_factory=DatasetConfig)
    test: DatasetConfig = field(default_factory=DatasetConfig)
    shapes: ShapesConfig = field(default_factory=ShapesConfig)
    # shortest-side resize: one of min_size is drawn per training image
    min_size: list[int] = field(default_factory=lambda: [800])
    max_size: int = 1333
    test_min_size: int = 800
    test_max_size: int = 1333
    flip_prob: float = 0.5
    keep_difficult: bool = False  # VOC: train on difficult objects too
    # COCO: labels are the category ids themselves (torchvision's 91-logit layout) instead of
    # contiguous 1..K; model.num_classes is then the largest category id
    category_ids_as_labels: bool = False
    filter_empty: bool = False  # drop training images without objects
    aspect_ratio_grouping: bool = True
    num_workers: int = 2
    check: str = "lenient"  # lenient | strict | off: the dataset checker run before training


@dataclass(frozen=True)
class SolverConfig:
    optimizer: str = "sgd"  # sgd | adamw
    # images per iteration summed over all processes; the per-process batch is this / world size
    ims_per_batch: int = 16
    base_lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    bias_lr_factor: float = 1.0
    weight_decay_bias: float = 0.0
    max_iter: int = 90000
    lr_schedule: str = "step"  # step | cosine
    steps: list[int] = field(default_factory=lambda: [60000, 80000])
    gamma: float = 0.1
    warmup_iters: int = 1000
    warmup_factor: float = 0.001
    clip_grad_norm: float = 0.0  # 0 = off
    amp: str = "off"  # off | fp16 | bf16
    checkpoint_period: int = 5000
    max_bad_steps: int = 5  # consecutive non-finite losses before training stops


@dataclass(frozen=True)
class TestConfig:
    eval_period: int = 0  # 0 = only at the end
    evaluators: list[str] = field(default_factory=lambda: ["coco"])  # coco | voc07 | voc
    ims_per_batch: int = 1


@dataclass(frozen=True)
class Config:
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    output_dir: str = "outputs/run"
    log_period: int = 20
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    test: TestConfig = field(default_factory=TestConfig)
