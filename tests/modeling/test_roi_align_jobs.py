"""The RoI poolers split into jobs (image ranges forward, channel ranges backward) give
torchvision's results bitwise, forward and backward, however many jobs run."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign, roi_align

from frcnn.config.checks import ROI_ALIGN_KERNELS
from frcnn.engine.sync_count import count_host_syncs
from frcnn.modeling import parallel
from frcnn.modeling.roi_heads import MultiLevelPooler, SingleLevelPooler
from frcnn.modeling.roi_heads.roi_align_jobs import (
    CHUNKS_PER_WORKER,
    FIXED_RATIO_KERNELS,
    KERNELS,
    RoIJob,
    channel_jobs,
    split_jobs,
)


def _boxes(num_images: int, per_image: int, size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    corner = torch.rand(num_images, per_image, 2, generator=generator) * size
    extent = torch.rand(num_images, per_image, 2, generator=generator) * size * 0.7 + 1.0
    boxes = torch.cat([corner, corner + extent], dim=-1)
    boxes[0, 0] = torch.tensor([-5.0, -3.0, size + 9.0, size + 4.0])  # crossing the border
    boxes[-1, -1] = 0.0  # an empty slot
    return boxes


def _pool_both(
    names: list[str],
    features: OrderedDict,
    references: OrderedDict,
    boxes: torch.Tensor,
    image_sizes: list[tuple[int, int]],
    padded: tuple[int, int],
) -> None:
    """MultiLevelPooler on ``features`` and MultiScaleRoIAlign on ``references``: the same pooled
    values, then the backward of one random gradient through both."""
    expected = MultiScaleRoIAlign(names, 7, 2)(references, list(boxes.unbind(0)), image_sizes)
    pooled = MultiLevelPooler(names, 7, 2)(features, boxes, image_sizes, padded)
    assert torch.equal(pooled, expected)
    grad = torch.randn_like(expected)
    expected.backward(grad)
    pooled.backward(grad)


@pytest.fixture(params=[1, 2, 3], ids=lambda w: f"{w}-workers")
def workers(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(parallel, "num_workers", lambda device: request.param)
    return request.param


def test_split_jobs_covers_every_roi_once_in_order() -> None:
    counts = [[3, 0, 5, 2], [0, 0, 0, 0], [1, 4, 0, 0]]
    for num_workers in (1, 2, 3, 7, 100):
        jobs = split_jobs(counts, num_workers)
        assert jobs[0].first_roi == 0 and jobs[-1].end_roi == 15
        for previous, job in zip(jobs, jobs[1:]):
            assert job.first_roi == previous.end_roi
        for job in jobs:
            level_counts = counts[job.level][job.first_image : job.end_image]
            assert sum(level_counts) == job.end_roi - job.first_roi > 0
            assert job.counts == tuple(level_counts)
    assert split_jobs(counts, 1) == [
        RoIJob(0, 0, 4, 0, 10, (3, 0, 5, 2)),
        RoIJob(2, 0, 4, 10, 15, (1, 4, 0, 0)),
    ]
    assert split_jobs([[0, 0]], 2) == []


def test_split_jobs_ends_a_job_at_the_image_boundary_nearest_its_share() -> None:
    # a share of 512: the two busy images make a job each, not one of 980 (no parallel work)
    jobs = split_jobs([[492, 488], [43, 0]], 2)
    assert [(j.level, j.first_image, j.end_image) for j in jobs] == [
        (0, 0, 1),
        (0, 1, 2),
        (1, 0, 2),
    ]
    # nearer with the next image: 300 + 300 is 88 over the share of 512, 300 alone 212 under
    jobs = split_jobs([[300, 300, 100, 100, 124]], 2)
    assert [(j.first_image, j.end_image) for j in jobs] == [(0, 2), (2, 5)]


def test_channel_jobs_cover_every_needed_channel_once() -> None:
    rois, channels = [980, 43, 0, 1], [256, 256, 256, 128]
    for workers in (2, 3, 8):
        jobs = channel_jobs(rois, channels, workers)
        for level, (count, width) in enumerate(zip(rois, channels)):
            ranges = sorted((first, end) for lvl, first, end in jobs if lvl == level)
            if not count:
                assert not ranges
                continue
            assert ranges[0][0] == 0 and ranges[-1][1] == width
            assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(ranges, ranges[1:]))
        busy = [job for job in jobs if job[0] == 0]
        # the busy level is spread in proportion to its share of the RoIs
        assert len(busy) == math.ceil(CHUNKS_PER_WORKER * workers * 980 / 1024) > workers
        assert sum(job[0] == 3 for job in jobs) == 1  # a level of one RoI is one job
        work = [rois[level] * (end - first) for level, first, end in jobs]
        assert work == sorted(work, reverse=True)  # largest first
    # one worker (an accelerator, or one CPU thread): a job per level, the kernel's own tensor
    assert channel_jobs(rois, channels, 1) == [(0, 0, 256), (1, 0, 256), (3, 0, 128)]


@pytest.mark.parametrize("num_images", [1, 2])
def test_one_busy_image_backward_in_channel_ranges_equals_torchvision(
    workers: int, num_images: int
) -> None:
    """A batch of one or two images, nearly all RoIs on one level: the backward splits that
    level's channels between the workers and must still give torchvision's gradient bitwise."""
    torch.manual_seed(0)
    boxes = _boxes(num_images, 30, 64, seed=4)
    feature = torch.randn(num_images, 9, 8, 8, requires_grad=True)
    reference = feature.detach().clone().requires_grad_(True)
    image_index = torch.arange(float(num_images)).repeat_interleave(30)[:, None]
    rois = torch.cat([image_index, boxes.reshape(-1, 4)], 1)
    expected = roi_align(reference, rois, 7, 0.125, 2, aligned=False)
    pooler = SingleLevelPooler("f", 7, "align", sampling_ratio=2)
    pooled = pooler(OrderedDict(f=feature), boxes, [(64, 64)] * num_images, (64, 64))
    assert torch.equal(pooled, expected)
    grad = torch.randn_like(expected)
    expected.backward(grad)
    pooled.backward(grad)
    assert torch.equal(feature.grad, reference.grad)


def test_single_level_equals_torchvision_forward_and_backward(workers: int) -> None:
    torch.manual_seed(0)
    boxes = _boxes(3, 17, 64, seed=1)
    feature = torch.randn(3, 5, 8, 8, requires_grad=True)
    reference = feature.detach().clone().requires_grad_(True)
    rois = torch.cat([torch.arange(3.0).repeat_interleave(17)[:, None], boxes.reshape(-1, 4)], 1)
    expected = roi_align(reference, rois, 7, 0.125, 2, aligned=True)
    pooler = SingleLevelPooler("f", 7, "align", sampling_ratio=2, aligned=True)
    pooled = pooler(OrderedDict(f=feature), boxes, [(64, 64)] * 3, (64, 64))
    assert torch.equal(pooled, expected)
    grad = torch.randn_like(expected)
    expected.backward(grad)
    pooled.backward(grad)
    assert torch.equal(feature.grad, reference.grad)


def test_multi_level_equals_multiscale_roi_align(workers: int) -> None:
    torch.manual_seed(0)
    image_sizes = [(256, 192), (240, 256)]
    boxes = _boxes(2, 40, 240, seed=2)
    boxes[1, :5] *= 0.05  # small boxes: the lowest level
    names = ["0", "1", "2", "3"]
    features = OrderedDict(
        (name, torch.randn(2, 4, 64 // 2**i, 64 // 2**i, requires_grad=True))
        for i, name in enumerate(names)
    )
    features["pool"] = torch.randn(2, 4, 4, 4)  # not a pooled level, as in torchvision's FPN
    references = OrderedDict(
        (k, v.detach().clone().requires_grad_(True)) for k, v in features.items()
    )
    _pool_both(names, features, references, boxes, image_sizes, (256, 256))
    for name in names:
        assert torch.equal(features[name].grad, references[name].grad), name


def test_bf16_features_pool_in_float32_like_torchvisions_autocast() -> None:
    boxes = _boxes(2, 5, 64, seed=3)
    feature = torch.randn(2, 3, 8, 8).bfloat16()
    pooled = SingleLevelPooler("f", 7, "align", 2)(OrderedDict(f=feature), boxes, [], (64, 64))
    rois = torch.cat([torch.arange(2.0).repeat_interleave(5)[:, None], boxes.reshape(-1, 4)], 1)
    expected = roi_align(feature.float(), rois, 7, 0.125, 2).bfloat16()
    assert pooled.dtype == torch.bfloat16
    assert torch.equal(pooled, expected)


@pytest.mark.parametrize("num_images", [1, 4])
def test_multi_level_pooling_reads_the_host_once(num_images: int) -> None:
    names = ["0", "1", "2", "3"]
    features = OrderedDict(
        (n, torch.randn(num_images, 2, 32 >> i, 32 >> i)) for i, n in enumerate(names)
    )
    boxes = _boxes(num_images, 30, 128, seed=4)
    with count_host_syncs() as syncs:
        MultiLevelPooler(names, 7, 2)(features, boxes, [(128, 128)] * num_images, (128, 128))
    assert syncs.total == 1, syncs
    with count_host_syncs() as syncs:
        MultiScaleRoIAlign(names, 7, 2)(features, list(boxes.unbind(0)), [(128, 128)] * num_images)
    assert syncs.total >= len(names), syncs  # the reference reads every level's size


@pytest.mark.parametrize("kernel", KERNELS)
def test_no_kernels_backward_reads_the_host(workers: int, kernel: str) -> None:
    """Forward and backward together read the host once: the pooler's per-(level, image)
    counts; the backward's work follows the counts the host already has."""
    names = ["0", "1", "2", "3"]
    features = OrderedDict(
        (n, torch.randn(2, 2, 32 >> i, 32 >> i, requires_grad=True)) for i, n in enumerate(names)
    )
    boxes = _boxes(2, 30, 128, seed=4)
    pooler = MultiLevelPooler(names, 7, 2, kernel=kernel)
    with count_host_syncs() as syncs:
        pooler(features, boxes, [(128, 128)] * 2, (128, 128)).sum().backward()
    assert syncs.total == 1, syncs
    assert all(feature.grad is not None for feature in features.values())
    assert features["0"].grad.abs().sum() > 0  # the backward ran


def test_jobs_run_in_the_callers_grad_and_inference_modes(workers: int) -> None:
    boxes = _boxes(4, 6, 64, seed=5)
    feature = torch.randn(4, 3, 8, 8, requires_grad=True)
    pooler = SingleLevelPooler("f", 7, "align", 2)
    with torch.inference_mode():
        pooled = pooler(OrderedDict(f=feature), boxes, [], (64, 64))
    assert pooled.is_inference() and not pooled.requires_grad
    blocks, _ = pooler.pool_blocks(OrderedDict(f=feature), boxes, [], (64, 64))
    assert len(blocks) == len(split_jobs([[6] * 4], workers))  # a block per job
    for block in blocks:
        assert block.grad_fn is not None and block.grad_fn.name() == "_RoIAlignJobsBackward"
        assert block.grad_fn.next_functions[-1][0].variable is feature  # nothing in between


def test_float64_features_pool_in_float64(workers: int) -> None:
    boxes = _boxes(2, 5, 64, seed=6).double()
    feature = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    reference = feature.detach().clone().requires_grad_(True)
    pooled = SingleLevelPooler("f", 7, "align", 2)(OrderedDict(f=feature), boxes, [], (64, 64))
    rois = torch.cat([torch.arange(2.0).repeat_interleave(5)[:, None], boxes.reshape(-1, 4)], 1)
    expected = roi_align(reference, rois.double(), 7, 0.125, 2)
    assert pooled.dtype == torch.float64 and torch.equal(pooled, expected)
    grad = torch.randn_like(expected)
    pooled.backward(grad)
    expected.backward(grad)
    assert torch.equal(feature.grad, reference.grad)


def test_a_nan_box_does_not_break_multi_level_pooling(workers: int) -> None:
    names = ["0", "1"]
    features = OrderedDict((n, torch.randn(2, 2, 16 >> i, 16 >> i)) for i, n in enumerate(names))
    boxes = _boxes(2, 4, 60, seed=7)
    boxes[1, 2] = float("nan")
    pooled = MultiLevelPooler(names, 7, 2)(features, boxes, [(64, 64)] * 2, (64, 64))
    assert pooled.shape == (8, 2, 7, 7)
    finite = torch.ones(8, dtype=torch.bool)
    finite[6] = False
    safe = boxes.clone()
    safe[1, 2] = 0.0  # torchvision's pooler with the NaN box relies on undefined casts
    expected = MultiScaleRoIAlign(names, 7, 2)(features, list(safe.unbind(0)), [(64, 64)] * 2)
    assert torch.equal(pooled[finite], expected[finite])
    assert torch.equal(pooled[6], torch.zeros(2, 7, 7))


def test_channels_last_and_frozen_levels(workers: int) -> None:
    """channels_last features (a model.channels_last backbone) pool bitwise like contiguous ones,
    and a level that needs no gradient gets none while the others get torchvision's."""
    torch.manual_seed(0)
    names = ["0", "1"]
    image_sizes = [(256, 256)] * 2
    boxes = _boxes(2, 12, 240, seed=8)
    boxes[:, :4] *= 0.2  # small boxes for the lower level, the rest mostly on the upper
    maps = [torch.randn(2, 3, 64 >> i, 64 >> i) for i in range(2)]
    features = OrderedDict(
        [
            ("0", maps[0].contiguous(memory_format=torch.channels_last)),
            ("1", maps[1].clone().requires_grad_(True)),
        ]
    )
    references = OrderedDict([("0", maps[0]), ("1", maps[1].clone().requires_grad_(True))])
    _pool_both(names, features, references, boxes, image_sizes, (256, 256))
    assert features["0"].grad is None
    assert references["1"].grad.abs().sum() > 0  # the upper level got RoIs
    assert torch.equal(features["1"].grad, references["1"].grad)


def test_blocks_equal_multiscale_roi_align(workers: int) -> None:
    """pool_blocks (what the RoI heads use) returns the rows in blocks grouped by (level, image)
    with the RoI each row pools: row i must be torchvision's row order[i], and a backward through
    the blocks must give torchvision's feature gradients, bitwise. A NaN box is not pooled: its
    zero row comes last, in a block of its own."""
    torch.manual_seed(0)
    image_sizes = [(256, 192), (240, 256)]
    boxes = _boxes(2, 40, 240, seed=9)
    boxes[0, :6] *= 0.05  # small boxes: the lowest level
    boxes[1, 3] = float("nan")
    names = ["0", "1", "2", "3"]
    features = OrderedDict(
        (name, torch.randn(2, 4, 64 // 2**i, 64 // 2**i, requires_grad=True))
        for i, name in enumerate(names)
    )
    references = OrderedDict(
        (k, v.detach().clone().requires_grad_(True)) for k, v in features.items()
    )
    blocks, order = MultiLevelPooler(names, 7, 2).pool_blocks(
        features, boxes, image_sizes, (256, 256)
    )
    assert len(blocks) >= 1 + min(workers, 2) and blocks[-1].shape[0] == 1
    pooled = torch.cat(blocks)
    nan_row = 40 + 3
    safe = boxes.clone()
    safe[1, 3] = 0.0  # torchvision's pooler with the NaN box relies on undefined casts
    expected = MultiScaleRoIAlign(names, 7, 2)(references, list(safe.unbind(0)), image_sizes)
    assert sorted(order.tolist()) == list(range(80))
    assert order[-1] == nan_row and torch.equal(pooled[-1], torch.zeros(4, 7, 7))
    assert torch.equal(pooled[:-1], expected[order[:-1]])
    scales = [2.0**-2, 2.0**-3, 2.0**-4, 2.0**-5]  # 64 / 256 px and down
    levels = MultiLevelPooler(names, 7, 2)._levels(safe.reshape(-1, 4), scales)
    levels_and_images = [  # grouped: the rows' (level, image) never decrease
        (int(levels[i]), i // 40) for i in order[:-1].tolist()
    ]
    assert levels_and_images == sorted(levels_and_images)
    grad = torch.randn_like(expected)
    grad[nan_row] = 0.0
    expected.backward(grad)
    pieces = grad[order].split([len(b) for b in blocks])
    assert not blocks[-1].requires_grad  # the zero row's block
    torch.autograd.backward(blocks[:-1], pieces[:-1])
    for name in names:
        assert torch.equal(features[name].grad, references[name].grad), name


@pytest.mark.parametrize("kernel", FIXED_RATIO_KERNELS)
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [1, 2])
def test_fixed_ratio_kernel_single_level_equals_torchvision(
    workers: int, aligned: bool, sampling_ratio: int, kernel: str
) -> None:
    """kernel="grid_sample" or "sparse" (model.roi_heads.roi_align_kernel) through the jobs:
    torchvision's values and feature gradients to float64 rounding, however many jobs run."""
    boxes = _boxes(3, 17, 64, seed=10).double()
    feature = torch.randn(3, 5, 8, 8, dtype=torch.float64, requires_grad=True)
    reference = feature.detach().clone().requires_grad_(True)
    rois = torch.cat([torch.arange(3.0).repeat_interleave(17)[:, None], boxes.reshape(-1, 4)], 1)
    expected = roi_align(reference, rois.double(), 7, 0.125, sampling_ratio, aligned=aligned)
    pooler = SingleLevelPooler("f", 7, "align", sampling_ratio, aligned, kernel=kernel)
    pooled = pooler(OrderedDict(f=feature), boxes, [(64, 64)] * 3, (64, 64))
    assert pooled.dtype == torch.float64
    torch.testing.assert_close(pooled, expected, rtol=0, atol=1e-12)
    grad = torch.randn_like(expected)
    expected.backward(grad)
    pooled.backward(grad)
    torch.testing.assert_close(feature.grad, reference.grad, rtol=0, atol=1e-12)


def test_sparse_kernel_gives_a_channels_last_feature_a_channels_last_gradient(
    workers: int,
) -> None:
    """The sparse backward writes a channels_last feature's gradient in that layout (the
    convolution that made the feature then takes it without a conversion), with torchvision's
    values to float64 rounding."""
    boxes = _boxes(3, 11, 64, seed=12).double()
    maps = torch.randn(3, 6, 8, 8, dtype=torch.float64)
    feature = maps.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    reference = maps.clone().requires_grad_(True)
    rois = torch.cat([torch.arange(3.0).repeat_interleave(11)[:, None], boxes.reshape(-1, 4)], 1)
    expected = roi_align(reference, rois.double(), 7, 0.125, 2, aligned=True)
    pooler = SingleLevelPooler("f", 7, "align", 2, True, kernel="sparse")
    pooled = pooler(OrderedDict(f=feature), boxes, [(64, 64)] * 3, (64, 64))
    torch.testing.assert_close(pooled, expected, rtol=0, atol=1e-12)
    grad = torch.randn_like(expected)
    expected.backward(grad)
    pooled.backward(grad)
    assert not feature.grad.is_contiguous()
    assert feature.grad.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(feature.grad, reference.grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kernel", FIXED_RATIO_KERNELS)
def test_fixed_ratio_kernel_multi_level_equals_multiscale_roi_align(
    workers: int, kernel: str
) -> None:
    """Over FPN levels, with images that have no RoI on some level, a NaN box (a zero row), a
    channels_last level and a frozen one: MultiScaleRoIAlign's rows and gradients to rounding."""
    torch.manual_seed(0)
    image_sizes = [(256, 192), (240, 256), (256, 256)]
    boxes = _boxes(3, 30, 240, seed=11).double()
    boxes[1, :5] *= 0.05  # small boxes: the lowest level, from one image only
    boxes[2, 7] = float("nan")
    boxes[0, 1:3] = torch.tensor([-150.0, -120.0, 400.0, 380.0])  # big: the top level
    names = ["0", "1", "2", "3"]
    maps = [torch.randn(3, 4, 64 >> i, 64 >> i, dtype=torch.float64) for i in range(4)]
    features = OrderedDict((n, m.clone().requires_grad_(True)) for n, m in zip(names, maps))
    features["1"] = maps[1].contiguous(memory_format=torch.channels_last)  # frozen, strided
    # channels_last and trained, with images that have no RoI there
    features["0"] = maps[0].contiguous(memory_format=torch.channels_last).requires_grad_(True)
    references = OrderedDict((n, m.clone().requires_grad_(n != "1")) for n, m in zip(names, maps))
    pooler = MultiLevelPooler(names, 7, 2, kernel=kernel)
    pooled = pooler(features, boxes, image_sizes, (256, 256))
    safe = boxes.clone()
    safe[2, 7] = 0.0  # torchvision's pooler with the NaN box relies on undefined casts
    expected = MultiScaleRoIAlign(names, 7, 2)(references, list(safe.unbind(0)), image_sizes)
    finite = torch.isfinite(boxes.reshape(-1, 4)).all(dim=1)
    torch.testing.assert_close(pooled[finite], expected[finite], rtol=0, atol=1e-12)
    assert torch.equal(pooled[~finite], torch.zeros(1, 4, 7, 7, dtype=torch.float64))
    grad = torch.randn_like(expected)
    grad[~finite] = 0.0
    expected.backward(grad)
    pooled.backward(grad)
    assert features["1"].grad is None
    for name in ("0", "2", "3"):
        assert references[name].grad.abs().sum() > 0, name  # every level got RoIs
        torch.testing.assert_close(
            features[name].grad, references[name].grad, rtol=0, atol=1e-12, msg=name
        )


@pytest.mark.parametrize("kernel", FIXED_RATIO_KERNELS)
def test_fixed_ratio_kernel_pools_bf16_in_float32(kernel: str) -> None:
    """As torchvision's autocast rule: bf16 features are pooled in float32, returned in bf16
    (within one bf16 rounding of torchvision's float32 result), under autocast too; the
    gradient comes back in bf16."""
    boxes = _boxes(2, 5, 64, seed=12)
    feature = torch.randn(2, 3, 8, 8).bfloat16().requires_grad_(True)
    rois = torch.cat([torch.arange(2.0).repeat_interleave(5)[:, None], boxes.reshape(-1, 4)], 1)
    expected = roi_align(feature.detach().float(), rois, 7, 0.125, 2)
    pooler = SingleLevelPooler("f", 7, "align", 2, kernel=kernel)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pooled = pooler(OrderedDict(f=feature), boxes, [], (64, 64))
    assert pooled.dtype == torch.bfloat16
    torch.testing.assert_close(pooled.float(), expected, rtol=8e-3, atol=1e-5)
    pooled.float().sum().backward()
    assert feature.grad.dtype == torch.bfloat16 and feature.grad.abs().sum() > 0


@pytest.mark.parametrize("kernel", FIXED_RATIO_KERNELS)
def test_fixed_ratio_kernel_refuses_what_it_cannot_compute(kernel: str) -> None:
    assert ROI_ALIGN_KERNELS == KERNELS  # the config's choices are the poolers'
    with pytest.raises(ValueError, match="one of torchvision, grid_sample, sparse, got 'cuda'"):
        SingleLevelPooler("f", 7, "align", 2, kernel="cuda")
    with pytest.raises(ValueError, match=f"the {kernel} .* fixed sampling_ratio >= 1, got 0"):
        MultiLevelPooler(["0"], 7, 0, kernel=kernel)
    with pytest.raises(ValueError, match="RoIPool has torchvision's"):
        SingleLevelPooler("f", 7, "pool", kernel=kernel)
