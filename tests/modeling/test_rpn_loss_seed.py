"""rpn_loss_cls / rpn_loss_box against the seed's formulation (jwyang/faster-rcnn.pytorch, as the
write-up in shared/seeds describes it), computed here from the same raw head outputs in the seed's
own layout: (b, 2A, h, w) scores viewed as (b, 2, A*h, w), labels in (b, A, h, w) order, -1 dropped
with ne(-1).nonzero() + index_select, F.cross_entropy; smooth-L1 with sigma=3 and inside/outside
weights. The one deliberate difference: outside weights use each image's own count of sampled
anchors (the seed's code uses the last image's count for all, a bug DESIGN.md tells us not to copy).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from frcnn.modeling.rpn import RPNHead, rpn_loss_box, rpn_loss_cls, rpn_losses

A, H, W = 9, 5, 7


def _seed_loss_cls(raw_scores: torch.Tensor, seed_labels: torch.Tensor) -> torch.Tensor:
    b = raw_scores.shape[0]
    # the seed's reshape layer: (b, 2A, h, w) -> (b, 2, A*h, w)
    score_reshape = raw_scores.view(b, 2, -1, raw_scores.shape[3])
    rpn_cls_score = score_reshape.permute(0, 2, 3, 1).contiguous().view(b, -1, 2)
    rpn_label = seed_labels.view(b, -1)
    rpn_keep = rpn_label.view(-1).ne(-1).nonzero().view(-1)
    rpn_cls_score = torch.index_select(rpn_cls_score.view(-1, 2), 0, rpn_keep)
    rpn_label = torch.index_select(rpn_label.view(-1), 0, rpn_keep).long()
    return F.cross_entropy(rpn_cls_score, rpn_label)


def _seed_smooth_l1(pred, targets, inside_w, outside_w, sigma: float = 3.0) -> torch.Tensor:
    sigma_2 = sigma**2
    in_box_diff = inside_w * (pred - targets)
    abs_in_box_diff = torch.abs(in_box_diff)
    smooth_sign = (abs_in_box_diff < 1.0 / sigma_2).detach().float()
    in_loss_box = torch.pow(in_box_diff, 2) * (sigma_2 / 2.0) * smooth_sign + (
        abs_in_box_diff - (0.5 / sigma_2)
    ) * (1.0 - smooth_sign)
    loss_box = outside_w * in_loss_box
    for dim in (3, 2, 1):
        loss_box = loss_box.sum(dim)
    return loss_box.mean()


def _seed_box_weights(seed_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, A, h, w) labels -> inside / outside weights in the seed's (b, 4A, h, w) layout."""
    b = seed_labels.shape[0]
    inside = (seed_labels == 1).float()
    outside = torch.zeros_like(inside)
    for i in range(b):
        num_examples = (seed_labels[i] >= 0).sum().float()
        outside[i][seed_labels[i] == 1] = 1.0 / num_examples
        outside[i][seed_labels[i] == 0] = 1.0 / num_examples

    def expand(w: torch.Tensor) -> torch.Tensor:
        # (b, A, h, w) -> (b, h, w, A, 4) -> (b, 4A, h, w): channel = anchor * 4 + coordinate
        return (
            w.permute(0, 2, 3, 1)[..., None]
            .expand(-1, -1, -1, -1, 4)
            .reshape(b, H, W, A * 4)
            .permute(0, 3, 1, 2)
        )

    return expand(inside), expand(outside)


def _random_case(seed: int, num_images: int = 3):
    g = torch.Generator().manual_seed(seed)
    raw_scores = torch.randn(num_images, 2 * A, H, W, generator=g, dtype=torch.float64).float()
    raw_deltas = torch.randn(num_images, 4 * A, H, W, generator=g) * 0.5
    # labels in frcnn's anchor order (image, y, x, anchor): random 1 / 0 / -1
    labels = torch.randint(-1, 2, (num_images, H * W * A), generator=g)
    labels[0, :] = torch.where(labels[0] == 1, 0, labels[0])  # image 0: no ground truth
    if num_images > 1:
        labels[1, : H * W * A // 2] = -1  # image 1: many ignored anchors
    targets = torch.randn(num_images, H * W * A, 4, generator=g) * 0.3
    targets = torch.where((labels == 1)[..., None], targets, torch.zeros_like(targets))
    return raw_scores, raw_deltas, labels, targets


def _to_seed_layout(labels: torch.Tensor, targets: torch.Tensor):
    b = labels.shape[0]
    seed_labels = labels.view(b, H, W, A).permute(0, 3, 1, 2).contiguous()  # (b, A, h, w)
    seed_targets = targets.view(b, H, W, A * 4).permute(0, 3, 1, 2).contiguous()
    return seed_labels, seed_targets


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rpn_losses_equal_the_seed_formulation(seed: int) -> None:
    raw_scores, raw_deltas, labels, targets = _random_case(seed)
    head = RPNHead(8, A, "softmax")
    logits, deltas = head.flatten([raw_scores], [raw_deltas])
    seed_labels, seed_targets = _to_seed_layout(labels, targets)
    inside, outside = _seed_box_weights(seed_labels)

    expected_cls = _seed_loss_cls(raw_scores, seed_labels)
    expected_box = _seed_smooth_l1(raw_deltas, seed_targets, inside, outside)
    ours_cls = rpn_loss_cls(logits, labels)
    ours_box = rpn_loss_box(deltas, targets, labels, beta=1.0 / 9.0)
    assert abs(ours_cls.item() - expected_cls.item()) < 1e-6
    assert abs(ours_box.item() - expected_box.item()) < 1e-6
    assert ours_box.item() > 0


def test_box_loss_of_an_image_without_ground_truth_is_exactly_zero() -> None:
    raw_scores, raw_deltas, labels, targets = _random_case(0, num_images=1)
    head = RPNHead(8, A, "softmax")
    _, deltas = head.flatten([raw_scores], [raw_deltas])
    assert (labels != 1).all()
    assert rpn_loss_box(deltas, targets, labels, beta=1.0 / 9.0).item() == 0.0


def test_all_anchors_ignored_gives_zero_not_nan() -> None:
    logits = torch.randn(2, 30, 2, requires_grad=True)
    labels = torch.full((2, 30), -1)
    loss = rpn_loss_cls(logits, labels)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()


def test_sigmoid_logit_equals_softmax_pair_zero_x() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 50, 1, generator=g)
    labels = torch.randint(-1, 2, (2, 50), generator=g)
    pair = torch.cat([torch.zeros_like(x), x], dim=-1)
    torch.testing.assert_close(
        rpn_loss_cls(x, labels), rpn_loss_cls(pair, labels), atol=1e-6, rtol=0
    )


def test_gradients_match_the_seed_formulation() -> None:
    raw_scores, raw_deltas, labels, targets = _random_case(4)
    seed_labels, seed_targets = _to_seed_layout(labels, targets)
    inside, outside = _seed_box_weights(seed_labels)
    head = RPNHead(8, A, "softmax")

    ours_scores = raw_scores.clone().requires_grad_()
    ours_deltas = raw_deltas.clone().requires_grad_()
    logits, deltas = head.flatten([ours_scores], [ours_deltas])
    (rpn_loss_cls(logits, labels) + rpn_loss_box(deltas, targets, labels, 1.0 / 9.0)).backward()

    seed_scores = raw_scores.clone().requires_grad_()
    seed_deltas = raw_deltas.clone().requires_grad_()
    seed_total = _seed_loss_cls(seed_scores, seed_labels) + _seed_smooth_l1(
        seed_deltas, seed_targets, inside, outside
    )
    seed_total.backward()
    torch.testing.assert_close(ours_scores.grad, seed_scores.grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours_deltas.grad, seed_deltas.grad, atol=1e-6, rtol=0)


@pytest.mark.parametrize("extra", [0, 7])
def test_losses_on_the_gathered_sampled_anchors_equal_the_seed_formulation(extra: int) -> None:
    """The training path's rpn_losses(max_sampled_per_image=K) computes both losses on each image's
    K gathered anchors: values and gradients must still be the seed's, with K exactly the largest
    per-image count of sampled anchors and with room to spare."""
    raw_scores, raw_deltas, labels, targets = _random_case(5)
    seed_labels, seed_targets = _to_seed_layout(labels, targets)
    inside, outside = _seed_box_weights(seed_labels)
    k = int((labels != -1).sum(dim=1).max()) + extra
    assert k < labels.shape[1]  # the gathered path is taken
    head = RPNHead(8, A, "softmax")

    ours_scores = raw_scores.clone().requires_grad_()
    ours_deltas = raw_deltas.clone().requires_grad_()
    logits, deltas = head.flatten([ours_scores], [ours_deltas])
    ours = rpn_losses(logits, deltas, labels, targets, 1.0 / 9.0, max_sampled_per_image=k)
    (ours["rpn_loss_cls"] + ours["rpn_loss_box"]).backward()

    seed_scores = raw_scores.clone().requires_grad_()
    seed_deltas = raw_deltas.clone().requires_grad_()
    seed_cls = _seed_loss_cls(seed_scores, seed_labels)
    seed_box = _seed_smooth_l1(seed_deltas, seed_targets, inside, outside)
    (seed_cls + seed_box).backward()
    assert abs(ours["rpn_loss_cls"].item() - seed_cls.item()) < 1e-6
    assert abs(ours["rpn_loss_box"].item() - seed_box.item()) < 1e-6
    torch.testing.assert_close(ours_scores.grad, seed_scores.grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours_deltas.grad, seed_deltas.grad, atol=1e-6, rtol=0)


def test_gathered_losses_of_images_with_nothing_sampled_are_zero_not_nan() -> None:
    logits = torch.randn(2, 30, 1, requires_grad=True)
    deltas = torch.randn(2, 30, 4, requires_grad=True)
    labels = torch.full((2, 30), -1)
    losses = rpn_losses(logits, deltas, labels, torch.zeros(2, 30, 4), max_sampled_per_image=4)
    sum(losses.values()).backward()
    assert [loss.item() for loss in losses.values()] == [0.0, 0.0]
    assert (logits.grad == 0).all() and (deltas.grad == 0).all()


def test_gathered_losses_keep_no_per_anchor_tensor_for_the_backward() -> None:
    """What the gathered path is for: autograd saves (N, K)-sized tensors, never one with a value
    per anchor (gather, for one, would keep its whole input for the backward)."""
    raw_scores, raw_deltas, labels, targets = _random_case(6)
    labels[:, 10:] = -1  # at most 10 sampled anchors per image, as the bound promises
    logits, deltas = RPNHead(8, A, "softmax").flatten(
        [raw_scores.requires_grad_()], [raw_deltas.requires_grad_()]
    )
    saved: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        rpn_losses(logits, deltas, labels, targets, max_sampled_per_image=10)
    num_images, num_anchors = labels.shape
    assert saved and max(saved) <= num_images * 10 * 4 < num_anchors
