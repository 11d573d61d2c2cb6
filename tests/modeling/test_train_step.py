"""One CPU training step for each backbone family on a tiny input: all four losses finite,
gradients reach the backbone; one step in bf16 autocast on CPU is finite too. Inference returns
Detections in the original image size."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign

import frcnn.modeling.rpn.rpn as rpn_module
from frcnn.build import build_model
from frcnn.config import (
    AnchorConfig,
    BackboneConfig,
    ModelConfig,
    ROIHeadsConfig,
    RPNConfig,
)
from frcnn.modeling import parallel
from frcnn.modeling.rpn import anchor_targets, rpn_losses
from frcnn.structures import Detections, Targets

LOSS_KEYS = {"rpn_loss_cls", "rpn_loss_box", "rcnn_loss_cls", "rcnn_loss_box"}
FPN_SIZES = [[32.0], [64.0], [128.0], [256.0], [512.0]]
SINGLE_SIZES = [[32.0, 64.0, 128.0]]


def tiny_config(
    backbone: str,
    sizes: list[list[float]],
    norm: str = "frozen_bn",
    box_head: str = "mlp2",
    pooler_resolution: int = 7,
    rpn_batch_size: int = 64,
) -> ModelConfig:
    """Few proposals (100 / 50), 16 RoIs per image, a narrow head: a step takes well under 1 s."""
    return ModelConfig(
        num_classes=3,
        backbone=BackboneConfig(name=backbone, norm=norm, trainable_layers=3, channels=32),
        anchors=AnchorConfig(sizes=sizes, aspect_ratios=[[0.5, 1.0, 2.0]]),
        rpn=RPNConfig(
            pre_nms_topk_train=100,
            post_nms_topk_train=50,
            pre_nms_topk_test=100,
            post_nms_topk_test=50,
            batch_size_per_image=rpn_batch_size,
        ),
        roi_heads=ROIHeadsConfig(
            box_head=box_head,
            representation_size=64,
            pooler_resolution=pooler_resolution,
            batch_size_per_image=16,
        ),
    )


FAMILIES = {
    "small": tiny_config("small", [[16.0, 32.0, 64.0]], norm="bn"),
    "vgg16": tiny_config("vgg16", SINGLE_SIZES, box_head="vgg_fc"),
    "resnet50_c4": tiny_config("resnet50_c4", SINGLE_SIZES, box_head="res5", pooler_resolution=4),
    "resnet18_fpn": tiny_config("resnet18_fpn", FPN_SIZES),
    "resnet50_fpn": tiny_config("resnet50_fpn", FPN_SIZES),
    "mobilenet_v3_large_fpn": tiny_config(
        "mobilenet_v3_large_fpn", [[32.0, 64.0, 128.0, 256.0, 512.0]] * 3
    ),
}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _images() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [
        torch.rand(3, 96, 128, generator=generator),
        torch.rand(3, 112, 96, generator=generator),
    ]


def _targets() -> list[Targets]:
    """Image 0 has two objects and a crowd region; image 1 has none."""
    first = Targets(
        torch.tensor([[10.0, 12.0, 60.0, 50.0], [40.0, 30.0, 120.0, 90.0], [0.0, 60.0, 30, 96]]),
        torch.tensor([1, 3, 2]),
        torch.tensor([False, False, True]),
    )
    return [first, Targets.empty()]


def _check_losses(losses: dict[str, torch.Tensor]) -> None:
    assert set(losses) == LOSS_KEYS
    for name, loss in losses.items():
        assert loss.dim() == 0, name
        assert loss.dtype == torch.float32, name
        assert torch.isfinite(loss), name


@pytest.mark.parametrize(
    "family",
    [
        "small",
        pytest.param("vgg16", marks=pytest.mark.slow),
        pytest.param("resnet50_c4", marks=pytest.mark.slow),
        "resnet18_fpn",
        pytest.param("resnet50_fpn", marks=pytest.mark.slow),
        "mobilenet_v3_large_fpn",
    ],
)
def test_one_training_step(family):
    model = build_model(FAMILIES[family]).train()
    losses = model(_images(), _targets())
    _check_losses(losses)
    assert losses["rpn_loss_cls"] > 0 and losses["rcnn_loss_cls"] > 0
    sum(losses.values()).backward()

    backbone_params = dict(model.backbone.named_parameters())
    trainable = {n: p for n, p in backbone_params.items() if p.requires_grad}
    frozen = {n: p for n, p in backbone_params.items() if not p.requires_grad}
    assert trainable
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())
    assert all(p.grad is None for p in frozen.values())
    if family != "small":
        assert frozen, "a torchvision trunk with trainable_layers=3 freezes its first stages"
    # every trainable parameter takes part (DDP needs no find_unused_parameters); a sum is
    # finite only when every element is, and is cheaper than isfinite on VGG's 100M-weight fc6
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None, name
            assert torch.isfinite(parameter.grad.sum()), name


def test_image_without_ground_truth_adds_nothing_to_rpn_loss_box():
    """rpn_loss_box is the mean over images of each image's own normalised sum, so an image without
    objects contributes 0 and halves a two-image batch's loss. Frozen batch norm keeps images
    independent, and a batch larger than the anchor count makes the RPN sampling take every
    anchor (nothing random)."""
    model = build_model(tiny_config("resnet18_fpn", FPN_SIZES, rpn_batch_size=10**6)).train()
    image = _images()[0]
    target = _targets()[0]
    alone = model([image], [target])
    batched = model([image, torch.rand(3, 96, 128)], [target, Targets.empty()])
    assert alone["rpn_loss_box"] > 0
    torch.testing.assert_close(
        batched["rpn_loss_box"], alone["rpn_loss_box"] / 2, rtol=1e-4, atol=1e-7
    )


def test_batch_without_any_ground_truth():
    model = build_model(FAMILIES["small"]).train()
    losses = model(_images(), [Targets.empty(), Targets.empty()])
    _check_losses(losses)
    assert losses["rpn_loss_box"] == 0
    assert losses["rcnn_loss_box"] == 0
    sum(losses.values()).backward()


def test_bf16_autocast_step_on_cpu():
    model = build_model(FAMILIES["small"]).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(_images(), _targets())
    _check_losses(losses)
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_channels_last_trains_like_the_default_format():
    """model.channels_last converts the weights as well as the input batch, and gives the same
    losses and gradients (to float rounding: the convolutions sum in another order)."""
    config = FAMILIES["small"]
    default = build_model(config).train()
    fast = build_model(dataclasses.replace(config, channels_last=True)).train()
    fast.load_state_dict(default.state_dict())
    convs = [m for m in fast.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    torch.manual_seed(1)
    expected = default(_images(), _targets())
    torch.manual_seed(1)
    got = fast(_images(), _targets())
    for name in LOSS_KEYS:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5)
    sum(expected.values()).backward()
    sum(got.values()).backward()
    for (name, a), b in zip(default.named_parameters(), fast.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.parametrize("kernel", ["grid_sample", "sparse"])
def test_roi_align_kernel_trains_like_torchvisions(kernel: str):
    """model.roi_heads.roi_align_kernel: a ResNet-18-FPN step in float64 gives torchvision's
    kernel's losses and gradients to rounding (the same RoIs are sampled: the kernels differ in
    the pooled values by rounding only)."""
    config = FAMILIES["resnet18_fpn"]
    default = build_model(config).double().train()
    heads = dataclasses.replace(config.roi_heads, roi_align_kernel=kernel)
    other = build_model(dataclasses.replace(config, roi_heads=heads)).double().train()
    other.load_state_dict(default.state_dict())
    images = [image.double() for image in _images()]
    losses = []
    for model in (default, other):
        torch.manual_seed(1)
        losses.append(model(images, _targets()))
        sum(losses[-1].values()).backward()
    for name in LOSS_KEYS:
        torch.testing.assert_close(losses[1][name], losses[0][name], rtol=1e-10, atol=1e-12)
    checked = 0
    for (name, a), b in zip(default.named_parameters(), other.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-8, atol=1e-10, msg=name)
            checked += name.startswith("backbone.fpn") or name.startswith("backbone.body")
    assert checked > 0  # the gradients through the pooler reached the backbone


def test_eval_returns_detections_in_original_size():
    model = build_model(FAMILIES["small"]).eval()
    images = _images()  # (96, 128) and (112, 96)
    original_sizes = [(192, 256), (56, 48)]  # the first was halved, the second doubled
    with torch.no_grad():
        plain = model(images)
        rescaled = model(images, original_sizes=original_sizes)
    assert len(plain) == len(rescaled) == 2
    assert sum(len(d) for d in rescaled) > 0
    for det, ref, (height, width), factor in zip(rescaled, plain, original_sizes, (2.0, 0.5)):
        assert isinstance(det, Detections)
        assert det.boxes.shape == (len(det), 4)
        assert det.scores.shape == det.labels.shape == (len(det),)
        assert ((det.labels >= 1) & (det.labels <= 3)).all()
        assert (det.boxes[:, 0::2] >= 0).all() and (det.boxes[:, 0::2] <= width).all()
        assert (det.boxes[:, 1::2] >= 0).all() and (det.boxes[:, 1::2] <= height).all()
        assert (det.scores[1:] <= det.scores[:-1]).all()
        torch.testing.assert_close(det.boxes, ref.boxes * factor)
        assert torch.equal(det.scores, ref.scores)


def test_rpn_losses_on_gathered_samples_equal_the_dense_losses():
    """RPN.losses computes both losses on each image's sampled anchors, gathered up to its
    sampling batch size: the same sample (same seed) taken over every anchor must give the same
    losses and the same gradients."""
    model = build_model(tiny_config("resnet18_fpn", FPN_SIZES, rpn_batch_size=24)).train()
    rpn = model.rpn
    targets = _targets()
    image_list = model.preprocess(_images())
    features = [f.detach().requires_grad_() for f in model.backbone(image_list.tensor).values()]
    logits, deltas = rpn.head.flatten(*rpn.head(features))
    feature_sizes = [tuple(f.shape[-2:]) for f in features]
    anchors = rpn.anchor_generator(tuple(image_list.tensor.shape[-2:]), feature_sizes, "cpu")
    grid_sizes = rpn.anchor_generator.grid_sizes(feature_sizes)
    assert anchors.shape[0] > 10 * rpn.batch_size_per_image  # the gathered path is taken

    torch.manual_seed(7)
    gathered = rpn.losses(anchors, logits, deltas, targets, image_list.image_sizes, grid_sizes)
    gathered_grads = torch.autograd.grad(sum(gathered.values()), features, retain_graph=True)
    torch.manual_seed(7)  # the same sample of anchors
    with torch.no_grad():
        target = anchor_targets(
            anchors,
            targets,
            image_list.image_sizes,
            rpn.matcher,
            rpn.box_coder,
            rpn.batch_size_per_image,
            rpn.positive_fraction,
            grid_sizes=grid_sizes,
        )
    assert ((target.labels != -1).sum(dim=1) <= rpn.batch_size_per_image).all()
    dense = rpn_losses(logits, deltas, target.labels, target.box_targets, rpn.smooth_l1_beta)
    dense_grads = torch.autograd.grad(sum(dense.values()), features)
    assert gathered["rpn_loss_box"] > 0
    torch.testing.assert_close(gathered, dense, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gathered_grads, dense_grads, rtol=1e-5, atol=1e-8)


def test_roi_head_losses_with_grouped_rows_equal_those_in_roi_order(monkeypatch):
    """The FPN pooler returns its rows in blocks grouped by (level, image) and the labels follow
    the rows: the losses and gradients must be those of torchvision's MultiScaleRoIAlign, whose
    rows are in RoI order."""
    model = build_model(tiny_config("resnet18_fpn", FPN_SIZES)).train()
    generator = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 320, 320, generator=generator) for _ in range(2)]
    boxes = torch.tensor([[10.0, 10.0, 40.0, 50.0], [20.0, 30.0, 300.0, 310.0]])  # two levels
    targets = [Targets(boxes, torch.tensor([1, 2])), Targets(boxes[1:] - 15, torch.tensor([3]))]
    pooler = model.roi_heads.pooler
    grouped_pool = pooler.pool_blocks
    orders = []

    def recording(*args):
        blocks, order = grouped_pool(*args)
        orders.append(order)
        assert len(blocks) > 1
        return blocks, order

    def torchvisions(features, boxes, image_sizes, padded_size):
        reference = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
        return (reference(features, list(boxes.unbind(0)), image_sizes),), None

    results = []
    for grouped in (True, False):
        # rows in blocks grouped by level and image, or torchvision's in RoI order
        replacement = recording if grouped else torchvisions
        monkeypatch.setattr(pooler, "pool_blocks", replacement)
        torch.manual_seed(3)  # the same proposals and samples both times
        losses = model(images, targets)
        rcnn = losses["rcnn_loss_cls"] + losses["rcnn_loss_box"]
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(rcnn, params, allow_unused=True)
        results.append((losses, [g for g in grads if g is not None]))
    (grouped_losses, grouped_grads), (ordered_losses, ordered_grads) = results
    assert not torch.equal(orders[0], torch.arange(len(orders[0])))  # the rows did move
    assert grouped_losses["rcnn_loss_box"] > 0
    assert len(grouped_grads) == len(ordered_grads) > len(list(model.roi_heads.parameters()))
    torch.testing.assert_close(grouped_losses, ordered_losses, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grouped_grads, ordered_grads, rtol=1e-5, atol=1e-7)


def test_the_box_head_runs_once_in_training_and_per_block_at_inference(monkeypatch):
    """Training joins the pooler's blocks (one weight gradient per head layer, not one per
    block); inference runs the head on each block (no copy of the pooled features)."""
    monkeypatch.setattr(parallel, "num_workers", lambda device: 2)  # two jobs, two blocks
    model = build_model(FAMILIES["small"])
    calls: list[int] = []
    model.roi_heads.box_head.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    model.train()(_images(), _targets())
    assert len(calls) == 1
    calls.clear()
    with torch.no_grad():
        model.eval()(_images())
    assert len(calls) == 2 and min(calls) > 0


def test_rpn_nms_is_one_call_per_job_in_training_and_per_group_at_cpu_inference(monkeypatch):
    """A training step keeps one NMS call per job (its host syncs stay flat as the batch
    grows, tests/modeling/test_host_syncs.py); inference on a CPU takes batched_nms per job."""
    seen = []
    real = rpn_module.generate_proposals

    def spy(*args, one_call=True, **kwargs):  # noqa: ANN002, ANN003, ANN202
        seen.append(one_call)
        return real(*args, one_call=one_call, **kwargs)

    monkeypatch.setattr(rpn_module, "generate_proposals", spy)
    model = build_model(FAMILIES["small"])
    model.train()
    model(_images(), _targets())
    model.eval()
    with torch.no_grad():
        model(_images())
    assert seen == [True, False]
