"""Benchmark frcnn against torchvision's FasterRCNN: same architecture, same hyperparameters, same
weights, same generated inputs, measured alternately in one run.

    python tools/benchmark.py --arch quickstart --batch 8 --size 256 --gt-boxes 6 --iters 5

Rows (medians): training step (forward + backward + SGD step), inference per image, peak memory
of a training step (CPU: RSS growth of a fresh subprocess per side, glibc's mmap threshold fixed
unless --malloc default; CUDA: max_memory_allocated),
and the anchor-target, proposal, proposal-target and post-processing stages alone (--stage-iters
rounds each).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN as TVFasterRCNN
from torchvision.models.detection import fasterrcnn_resnet50_fpn
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.ops import MultiScaleRoIAlign

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from frcnn.build import build_model  # noqa: E402
from frcnn.config import load_config  # noqa: E402
from frcnn.config.schema import ModelConfig  # noqa: E402
from frcnn.engine.sync_count import count_host_syncs  # noqa: E402
from frcnn.modeling import backbones  # noqa: E402
from frcnn.modeling.backbones.fold_bn import fold_frozen_batch_norm  # noqa: E402
from frcnn.modeling.faster_rcnn import FasterRCNN  # noqa: E402
from frcnn.modeling.roi_heads import postprocess_detections, sample_proposals  # noqa: E402
from frcnn.modeling.roi_heads.roi_align_jobs import KERNELS  # noqa: E402
from frcnn.modeling.rpn import anchor_targets, generate_proposals  # noqa: E402
from frcnn.modeling.weight_import import convert_torchvision_state_dict, freeze_batch_norm  # noqa: E402
from frcnn.structures import Targets  # noqa: E402

CONFIGS = {
    "quickstart": (ROOT / "configs" / "quickstart.yaml", ["model.rpn.objectness=sigmoid"]),
    "resnet50_fpn": (ROOT / "configs" / "torchvision" / "fasterrcnn_resnet50_fpn.yaml", []),
}
ROW_NAMES = [
    "train step",
    "inference per image",
    "peak memory (train step)",
    "anchor-target",
    "proposal layer",
    "proposal-target",
    "post-processing",
]
SIDES = ("frcnn", "torchvision")
# glibc's initial mmap threshold; setting it also stops glibc from raising it as tensors are freed
MMAP_THRESHOLD = 128 * 1024
MALLOC_CHOICES = ("fixed", "default")
LR = 1e-5  # tiny: the weights barely drift, so both sides keep doing the same work


@dataclass
class Inputs:
    images_uint8: list[Tensor]
    images_float: list[Tensor]
    targets: list[Targets]
    target_dicts: list[dict[str, Tensor]]


# ------------------------------------------------------------------------------------ arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=sorted(CONFIGS), default="quickstart")
    parser.add_argument("--batch", type=int, default=None, help="default: 8 / 2 (resnet50_fpn)")
    parser.add_argument("--size", type=int, default=None, help="default: 256 / 512")
    parser.add_argument("--gt-boxes", type=int, default=6)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--stage-iters",
        type=int,
        default=50,
        help="timed rounds of each stage line (default: 50; the stages take milliseconds, and "
        "a median of a few such calls on a shared CPU moves by more than the gaps it measures)",
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--amp",
        choices=["off", "bf16", "fp16"],
        default="off",
        help="autocast for the train step and inference lines, the same on both sides (the "
        "stage lines run in float32 either way)",
    )
    parser.add_argument(
        "--channels-last",
        choices=["off", "frcnn", "both"],
        default="off",
        help="channels_last memory format: frcnn's model.channels_last switch (frcnn), or the "
        "same on both sides (both)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="frcnn only (model.compile: torch.compile its backbone, RPN head and box head; "
        "torchvision's FasterRCNN has no such switch); the compiling calls fall in --warmup",
    )
    parser.add_argument(
        "--fold-bn",
        action="store_true",
        help="frcnn only (model.fold_frozen_bn: each frozen batch norm folded into the "
        "convolution before it; architectures with frozen batch norm only)",
    )
    parser.add_argument(
        "--roi-align-kernel",
        choices=KERNELS,
        default="torchvision",
        help="frcnn only (model.roi_heads.roi_align_kernel): RoIAlign on torchvision's kernels, "
        "on PyTorch's grid_sample kernels, or as products with its sparse weight matrix "
        "(embedding_bag forward, sparse-matrix backward; the last two equal to float rounding; "
        "the architecture's sampling ratio must be >= 1)",
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory row")
    parser.add_argument(
        "--malloc",
        choices=MALLOC_CHOICES,
        default=MALLOC_CHOICES[0],
        help="CPU peak memory: run both sides' memory processes with glibc's mmap threshold "
        f"fixed at {MMAP_THRESHOLD} bytes (fixed: freed tensors leave the RSS at once, so it "
        "follows the memory in use), or with glibc's defaults (default: the RSS also holds "
        "what malloc keeps for reuse, which moved between identical runs by up to 25 %%)",
    )
    parser.add_argument(
        "--sync-batches",
        type=_batch_list,
        default=[2, 8],
        help="batch sizes at which to count host syncs in one training step (default: 2,8)",
    )
    parser.add_argument("--_memory-only", dest="memory_only", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    default_batch, default_size = (8, 256) if args.arch == "quickstart" else (2, 512)
    args.batch = default_batch if args.batch is None else args.batch
    args.size = default_size if args.size is None else args.size
    if args.compile and args.warmup < 1:
        parser.error("--compile needs --warmup >= 1: the compiling first call must not be timed")
    _check_args(parser, args)
    return args


def _batch_list(text: str) -> list[int]:
    try:
        batches = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected batch sizes like 2,8, got {text!r}") from None
    if any(batch < 1 for batch in batches):
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1, got {text!r}")
    return batches


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    bounds = {"batch": 1, "size": 32, "gt_boxes": 0, "iters": 1, "warmup": 0, "stage_iters": 1}
    for name, low in bounds.items():
        if getattr(args, name) < low:
            flag = "--" + name.replace("_", "-")
            parser.error(f"{flag} must be >= {low}, got {getattr(args, name)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here; use --device cpu or auto")
    if args.fold_bn:
        path, overrides = CONFIGS[args.arch]
        norm = load_config(path, overrides).model.backbone.norm
        if norm != "frozen_bn":
            parser.error(
                f"--fold-bn: --arch {args.arch} trains its batch norm ({norm}); "
                "only frozen batch norm folds"
            )
    if args.json is not None and not args.json.parent.is_dir():
        parser.error(f"--json {args.json}: folder {args.json.parent} does not exist")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ------------------------------------------------------------------------------------ models


def build_pair(args: argparse.Namespace, device: torch.device) -> tuple[FasterRCNN, nn.Module]:
    """frcnn and torchvision with the same architecture, torchvision's weights copied to frcnn."""
    path, overrides = CONFIGS[args.arch]
    cfg = load_config(path, overrides).model
    torch.manual_seed(args.seed)
    if args.arch == "quickstart":
        theirs = _torchvision_like(cfg, args.size)
    else:
        theirs = _torchvision_resnet50_fpn(cfg, args.size)
    # frcnn's speed setting: the same RoIAlign, on other kernels (torchvision keeps its own)
    roi_heads = dataclasses.replace(cfg.roi_heads, roi_align_kernel=args.roi_align_kernel)
    ours = build_model(dataclasses.replace(cfg, roi_heads=roi_heads))
    state = convert_torchvision_state_dict(theirs.state_dict(), cfg.rpn.objectness)
    result = ours.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys, result
    _freeze_like(ours, theirs)
    if args.fold_bn:
        fold_frozen_batch_norm(ours)
    ours.to(device)
    theirs.to(device)
    if args.channels_last != "off":
        ours.channels_last = True
        ours.to(memory_format=torch.channels_last)
    if args.channels_last == "both":
        theirs.to(memory_format=torch.channels_last)
    if args.compile:
        ours.compile_static_modules()
    return ours, theirs


def _torchvision_like(cfg: ModelConfig, size: int) -> nn.Module:
    """torchvision's FasterRCNN around the quick start's small backbone, setting for setting."""
    backbone = backbones.small_backbone(cfg.backbone.channels, cfg.backbone.norm)
    rpn, roi = cfg.rpn, cfg.roi_heads
    anchors = TVAnchorGenerator(
        tuple(tuple(int(s) for s in level) for level in cfg.anchors.sizes),
        tuple(tuple(r) for r in cfg.anchors.aspect_ratios) * len(cfg.anchors.sizes),
    )
    resolution = roi.pooler_resolution
    pooler = MultiScaleRoIAlign([backbone.feature_name], resolution, roi.sampling_ratio)
    head = TwoMLPHead(backbone.out_channels * resolution**2, roi.representation_size)
    model = TVFasterRCNN(
        backbone,
        num_classes=None,
        min_size=size,
        max_size=size,
        image_mean=list(cfg.pixel_mean),
        image_std=list(cfg.pixel_std),
        rpn_anchor_generator=anchors,
        **_rpn_kwargs(cfg),
        box_roi_pool=pooler,
        box_head=head,
        box_predictor=FastRCNNPredictor(roi.representation_size, cfg.num_classes + 1),
        box_score_thresh=roi.score_thresh,
        box_nms_thresh=roi.nms_thresh,
        box_detections_per_img=roi.detections_per_image,
        box_fg_iou_thresh=roi.fg_iou_thresh,
        box_bg_iou_thresh=roi.bg_iou_thresh_hi,
        box_batch_size_per_image=roi.batch_size_per_image,
        box_positive_fraction=roi.positive_fraction,
        bbox_reg_weights=tuple(roi.bbox_reg_weights),
    )
    model.rpn.min_size = rpn.min_size  # torchvision hard-codes 1e-3; the quick start uses 1 px
    return model


def _rpn_kwargs(cfg: ModelConfig) -> dict:
    rpn = cfg.rpn
    return {
        "rpn_pre_nms_top_n_train": rpn.pre_nms_topk_train,
        "rpn_pre_nms_top_n_test": rpn.pre_nms_topk_test,
        "rpn_post_nms_top_n_train": rpn.post_nms_topk_train,
        "rpn_post_nms_top_n_test": rpn.post_nms_topk_test,
        "rpn_nms_thresh": rpn.nms_thresh,
        "rpn_fg_iou_thresh": rpn.fg_iou_thresh,
        "rpn_bg_iou_thresh": rpn.bg_iou_thresh,
        "rpn_batch_size_per_image": rpn.batch_size_per_image,
        "rpn_positive_fraction": rpn.positive_fraction,
        "rpn_score_thresh": rpn.score_thresh,
    }


def _torchvision_resnet50_fpn(cfg: ModelConfig, size: int) -> nn.Module:
    model = fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=91, min_size=size, max_size=size
    )
    freeze_batch_norm(model)
    # random init makes torchvision train every stage; frcnn's config freezes the lowest ones
    trainable = tuple(f"layer{5 - i}" for i in range(1, cfg.backbone.trainable_layers + 1))
    for name, parameter in model.backbone.body.named_parameters():
        if not name.startswith(trainable):
            parameter.requires_grad_(False)
    return model


def _freeze_like(ours: nn.Module, theirs: nn.Module) -> None:
    """Both sides must train the same parameters, or the backward passes differ in work."""
    frozen = {n for n, p in theirs.named_parameters() if not p.requires_grad}
    for name, parameter in ours.named_parameters():
        if name.replace("rpn.head.conv.", "rpn.head.conv.0.0.") in frozen:
            parameter.requires_grad_(False)
    count = [sum(p.numel() for p in m.parameters() if p.requires_grad) for m in (ours, theirs)]
    assert count[0] == count[1], f"trainable parameters differ: frcnn {count[0]}, tv {count[1]}"


# ------------------------------------------------------------------------------------ inputs


def make_inputs(args: argparse.Namespace, num_classes: int, device: torch.device) -> Inputs:
    generator = torch.Generator().manual_seed(args.seed)
    size, count = args.size, args.gt_boxes
    images = [
        torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=generator)
        for _ in range(args.batch)
    ]
    targets, dicts = [], []
    for _ in images:
        corners = torch.rand(count, 2, 2, generator=generator) * size
        low, high = corners.amin(dim=1), corners.amax(dim=1)
        high = torch.maximum(high, low + 4.0).clamp(max=size)  # at least 4 px wide and tall
        low = torch.minimum(low, high - 4.0)
        boxes = torch.cat([low, high], dim=1).to(device)
        labels = torch.randint(1, num_classes + 1, (count,), generator=generator).to(device)
        targets.append(Targets(boxes, labels))
        dicts.append({"boxes": boxes, "labels": labels})
    images = [image.to(device) for image in images]
    return Inputs(images, [image.float() / 255.0 for image in images], targets, dicts)


# ------------------------------------------------------------------------------------ timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def alternate(
    steps: dict[str, Callable[[], object]], warmup: int, iters: int, device: torch.device
) -> dict[str, float]:
    """Median seconds of each side, the sides taking turns so that drifts hit both alike."""
    times: dict[str, list[float]] = {side: [] for side in steps}
    for iteration in range(warmup + iters):
        for side, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            if iteration >= warmup:
                times[side].append(time.perf_counter() - start)
    return {side: statistics.median(values) for side, values in times.items()}


def autocast(device: torch.device, amp: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def train_steps(
    ours: nn.Module, theirs: nn.Module, inputs: Inputs, device: torch.device, amp: str
) -> dict[str, Callable[[], object]]:
    def make(model: nn.Module, images: list[Tensor], targets: list) -> Callable[[], object]:
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=LR, momentum=0.9)
        scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")

        def step() -> None:
            model.train()
            with autocast(device, amp):
                losses = model(images, targets)
            scaler.scale(sum(losses.values())).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

        return step

    return {
        "frcnn": make(ours, inputs.images_uint8, inputs.targets),
        "torchvision": make(theirs, inputs.images_float, inputs.target_dicts),
    }


def inference_steps(
    ours: nn.Module, theirs: nn.Module, inputs: Inputs, device: torch.device, amp: str
) -> dict[str, Callable[[], object]]:
    def make(model: nn.Module, images: list[Tensor]) -> Callable[[], object]:
        def step() -> object:
            model.eval()
            with torch.inference_mode(), autocast(device, amp):
                return model(images)

        return step

    return {
        "frcnn": make(ours, inputs.images_uint8),
        "torchvision": make(theirs, inputs.images_float),
    }


# ------------------------------------------------------------------------------------ stages


def stage_steps(
    ours: FasterRCNN, theirs: nn.Module, inputs: Inputs
) -> dict[str, dict[str, Callable[[], object]]]:
    """Each stage of both sides fed the same tensors, computed once by the shared weights."""
    ours.train()
    theirs.train()
    with torch.no_grad():
        image_list = ours.preprocess(inputs.images_uint8)
        features = ours.backbone(image_list.tensor)
        feature_list = list(features.values())
        sizes = [tuple(f.shape[-2:]) for f in feature_list]
        anchors = ours.rpn.anchor_generator(
            tuple(image_list.tensor.shape[-2:]), sizes, image_list.tensor.device
        )
        per_location = ours.rpn.anchor_generator.num_anchors_per_location
        num_per_level = [h * w * a for (h, w), a in zip(sizes, per_location)]
        logits, deltas = concat_box_prediction_layers(*theirs.rpn.head(feature_list))
    num_images = len(inputs.images_uint8)
    objectness, deltas = logits.reshape(num_images, -1), deltas.reshape(num_images, -1, 4)
    sizes_tensor = image_list.sizes_tensor()
    proposal_steps = _proposal_steps(
        ours, theirs, (anchors, objectness, deltas, sizes_tensor), num_per_level, image_list
    )
    proposals = proposal_steps["frcnn"]()  # what the proposal-target stage is fed
    stages = {
        "anchor-target": _anchor_target_steps(
            ours, theirs, inputs, anchors, image_list.image_sizes, sizes
        ),
        "proposal layer": proposal_steps,
        "proposal-target": _proposal_target_steps(ours, theirs, inputs, proposals),
    }
    stages["post-processing"] = _postprocess_steps(ours, theirs, features, image_list)
    return stages


def _anchor_target_steps(
    ours, theirs, inputs: Inputs, anchors: Tensor, image_sizes, feature_sizes
) -> dict:
    rpn = ours.rpn
    anchors_per_image = [anchors] * len(inputs.targets)
    grid_sizes = rpn.anchor_generator.grid_sizes(feature_sizes)

    def frcnn() -> object:
        return anchor_targets(
            anchors,
            inputs.targets,
            image_sizes,
            rpn.matcher,
            rpn.box_coder,
            rpn.batch_size_per_image,
            rpn.positive_fraction,
            grid_sizes=grid_sizes,
        )

    def torchvision_side() -> object:
        labels, matched = theirs.rpn.assign_targets_to_anchors(
            anchors_per_image, inputs.target_dicts
        )
        encoded = theirs.rpn.box_coder.encode(matched, anchors_per_image)
        return theirs.rpn.fg_bg_sampler(labels), encoded

    return {"frcnn": frcnn, "torchvision": torchvision_side}


def _proposal_steps(ours, theirs, tensors: tuple, num_per_level: list[int], image_list) -> dict:
    anchors, objectness, deltas, sizes_tensor = tensors
    num_images = objectness.shape[0]
    anchors_per_image = [anchors] * num_images

    def frcnn() -> object:
        return generate_proposals(
            anchors,
            objectness,
            deltas,
            sizes_tensor,
            num_per_level,
            ours.rpn.train_settings,
            ours.rpn.box_coder,
        )

    def torchvision_side() -> object:
        boxes = theirs.rpn.box_coder.decode(deltas.reshape(-1, 4), anchors_per_image)
        return theirs.rpn.filter_proposals(
            boxes.view(num_images, -1, 4),
            objectness.reshape(-1, 1),
            image_list.image_sizes,
            num_per_level,
        )

    return {"frcnn": frcnn, "torchvision": torchvision_side}


def _proposal_target_steps(ours, theirs, inputs: Inputs, proposals) -> dict:
    boxes_per_image = [b[v] for b, v in zip(proposals.boxes, proposals.valid)]
    roi = ours.roi_heads

    def frcnn() -> object:
        return sample_proposals(proposals, inputs.targets, roi.sampling, roi.box_coder)

    def torchvision_side() -> object:
        return theirs.roi_heads.select_training_samples(boxes_per_image, inputs.target_dicts)

    return {"frcnn": frcnn, "torchvision": torchvision_side}


def _postprocess_steps(ours, theirs, features, image_list) -> dict:
    """Inference-mode proposals and box-head outputs, as a real forward pass produces them."""
    ours.eval()
    with torch.no_grad():
        proposals, _ = ours.rpn(image_list, list(features.values()))
        padded = tuple(image_list.tensor.shape[-2:])
        pooled = ours.roi_heads.pooler(features, proposals.boxes, image_list.image_sizes, padded)
        logits, box_deltas = ours.roi_heads.box_predictor(ours.roi_heads.box_head(pooled))
    num_images, num_slots = proposals.boxes.shape[:2]
    logits = logits.reshape(num_images, num_slots, -1)
    box_deltas = box_deltas.reshape(num_images, num_slots, -1)
    valid = proposals.valid
    boxes_per_image = [b[v] for b, v in zip(proposals.boxes, valid)]
    roi = ours.roi_heads

    def frcnn() -> object:
        return postprocess_detections(
            logits,
            box_deltas,
            proposals.boxes,
            valid,
            image_list.sizes_tensor(),
            roi.postprocess,
            roi.box_coder,
        )

    def torchvision_side() -> object:
        return theirs.roi_heads.postprocess_detections(
            logits[valid], box_deltas[valid], boxes_per_image, image_list.image_sizes
        )

    return {"frcnn": frcnn, "torchvision": torchvision_side}


# ------------------------------------------------------------------------------------ syncs


def count_syncs(
    args: argparse.Namespace, ours: nn.Module, theirs: nn.Module, device: torch.device
) -> list[dict[str, object]]:
    """Host synchronisations in one training step of each side (after a first step), at each
    batch size of ``--sync-batches``; the calls counted are listed in frcnn/engine/sync_count.py."""
    rows = []
    num_classes = ours.roi_heads.box_predictor.cls_score.out_features - 1
    for batch in args.sync_batches:
        inputs = make_inputs(
            argparse.Namespace(**{**vars(args), "batch": batch}), num_classes, device
        )
        counts = {}
        for side, step in train_steps(ours, theirs, inputs, device, args.amp).items():
            step()
            with count_host_syncs() as syncs:
                step()
            counts[side] = float(syncs.total)
        rows.append(make_row(f"host syncs / step, batch {batch}", counts, "calls"))
    return rows


# ------------------------------------------------------------------------------------ memory


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    """VmHWM: the peak RSS of this process image. (ru_maxrss would not do: Linux carries it over
    exec from the forked parent, so a child of a large benchmark process reports the parent's.)"""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak_rss() -> None:
    """Start VmHWM again from the current RSS (Linux >= 4.0; elsewhere the peak keeps the
    build's, which can only overstate the step's)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def memory_only(args: argparse.Namespace, side: str) -> None:
    """Run in a fresh process: the peak RSS (MB) of one side's training steps (1 + warm-up) over
    the RSS with its model and inputs built: activations, gradients, optimizer state and the
    allocator's and kernel libraries' caches. One process per side, so that neither sees the
    other's memory."""
    device = pick_device(args.device)
    ours, theirs = build_pair(args, device)
    inputs = make_inputs(args, ours.roi_heads.box_predictor.cls_score.out_features - 1, device)
    step = train_steps(ours, theirs, inputs, device, args.amp)[side]
    del ours, theirs  # the step keeps its own model
    if args.compile:
        step()  # the compiler's own memory is not the step's
    gc.collect()
    baseline = _rss_mb()
    _reset_peak_rss()
    for _ in range(1 + args.warmup):
        step()
    print(json.dumps({"peak_mb": _peak_rss_mb() - baseline}))


def measure_memory(
    args: argparse.Namespace, argv: list[str], steps: dict, device: torch.device
) -> dict[str, float]:
    if device.type == "cuda":
        peaks = {}
        for side, step in steps.items():
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            step()
            torch.cuda.synchronize(device)
            peaks[side] = torch.cuda.max_memory_allocated(device) / 2**20
        return peaks
    env = dict(os.environ)
    if args.malloc == "fixed":
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)  # glibc; other libcs ignore it
    peaks = {}
    for side in SIDES:
        command = [sys.executable, str(Path(__file__).resolve()), *argv, "--_memory-only", side]
        done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"memory subprocess for {side} failed:\n{done.stderr[-2000:]}")
        peaks[side] = json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"]
    return peaks


# ------------------------------------------------------------------------------------ report


def hardware(device: torch.device) -> dict[str, object]:
    model = platform.processor() or ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "gpu": gpu,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
    }


def make_row(name: str, values: dict[str, float], unit: str) -> dict[str, object]:
    ours, theirs = values["frcnn"], values["torchvision"]
    ratio = ours / theirs if theirs > 0 else math.nan
    return {"name": name, "frcnn": ours, "torchvision": theirs, "ratio": ratio, "unit": unit}


def format_table(rows: list[dict]) -> str:
    lines = [f"{'name':<26} | {'frcnn':>10} | {'torchvision':>11} | {'ratio':>6} | unit"]
    lines.append("-" * len(lines[0]))
    for row in rows:
        lines.append(
            f"{row['name']:<26} | {row['frcnn']:>10.4g} | {row['torchvision']:>11.4g} | "
            f"{row['ratio']:>6.3f} | {row['unit']}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace, argv: list[str]) -> dict[str, object]:
    device = pick_device(args.device)
    ours, theirs = build_pair(args, device)
    num_classes = ours.roi_heads.box_predictor.cls_score.out_features - 1
    inputs = make_inputs(args, num_classes, device)
    train = train_steps(ours, theirs, inputs, device, args.amp)
    rows = [make_row("train step", alternate(train, args.warmup, args.iters, device), "s")]
    infer = alternate(
        inference_steps(ours, theirs, inputs, device, args.amp), args.warmup, args.iters, device
    )
    per_image = {side: value / args.batch for side, value in infer.items()}
    rows.append(make_row("inference per image", per_image, "s"))
    if not args.no_memory:
        rows.append(
            make_row("peak memory (train step)", measure_memory(args, argv, train, device), "MB")
        )
    for name, steps in stage_steps(ours, theirs, inputs).items():
        times = alternate(steps, max(args.warmup, 1), args.stage_iters, device)
        rows.append(make_row(name, {side: 1000 * t for side, t in times.items()}, "ms"))
    rows.extend(count_syncs(args, ours, theirs, device))
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings.pop("memory_only")
    return {
        "rows": rows,
        "hardware": hardware(device),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "config": {
            **settings,
            "config_file": str(CONFIGS[args.arch][0].relative_to(ROOT)),
            "overrides": CONFIGS[args.arch][1],
            "optimizer": f"SGD lr={LR} momentum=0.9",
        },
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.memory_only:
        memory_only(args, args.memory_only)
        return 0
    result = run(args, argv)
    print(format_table(result["rows"]))
    print(f"hardware: {json.dumps(result['hardware'])}")
    print(f"torch {result['torch']}, torchvision {result['torchvision']}")
    print(f"settings: {json.dumps(result['config'])}")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
