"""torchvision's RoIAlign kernels run over a batch as independent jobs, in parallel on a CPU.

Shapes: N images, L feature levels, M RoIs, Ch channels, P x P the pooled size.

torchvision's CPU RoIAlign runs on one thread, and its backward (which recomputes every sample's
bilinear weights for each channel) is six times its forward: a third of a quick-start training
step, a fifth of a ResNet-50-FPN one. So the work is split into jobs that run in parallel on a
CPU (frcnn/modeling/parallel.py); on other devices one after another.

- Forward: the RoIs of different images read different slices of a feature map, so the batch
  splits into jobs, each a range of images on one level (split_jobs): a job pools from
  ``feature[first_image:end_image]`` with its RoIs' image indices shifted to match.
- Backward, torchvision's kernel: RoIAlign's channels are independent, so each job takes a range
  of one level's channels for all of that level's RoIs (channel_jobs). A batch of one or two
  images, whose RoIs sit mostly on one level, splits as well as a large one.
- Backward, the grid_sample kernel (a speed setting, grid_roi_align.py): each forward job owns
  its images' slice of the gradient.
- The sparse kernel (a speed setting, sparse_roi_align.py): the forward jobs as above, each
  pooling with ``embedding_bag`` from its images' pixel rows (the level made channels_last
  once); the backward one sparse-matrix product per (level, image) in the caller's thread, whose
  kernels use every core.

Every RoI is pooled by the same kernel with the same arguments, and with torchvision's kernel
every channel's gradient is accumulated over the level's RoIs in their original order, so the
results are bitwise those of one ``torchvision.ops.roi_align`` call per level, however the work
is split. The grid_sample and sparse kernels' results and gradients equal torchvision's to
float rounding.

Memory and copies: each job's pooled rows are one kernel call's output, and stay that tensor: the
result is a tuple of blocks, one per job, which a row-wise box head takes one by one (its outputs
are small). Nothing copies the pooled features into one tensor, and in the backward each job's
gradient rows arrive as a tensor of their own (the poolers join the blocks for callers that want
one tensor in the RoIs' order). A level whose gradient one job computes takes it as the kernel
returns it. A level split into channel ranges is one new tensor that each job copies its range
into as it finishes, so beside it there is at most one range per worker; a level the grid_sample
kernel splits by images is assembled from its pieces, which exist beside it for that moment.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from frcnn.modeling import parallel
from frcnn.modeling.parallel import run_jobs
from frcnn.modeling.roi_heads.grid_roi_align import (
    grid_roi_align,
    grid_roi_align_backward,
    sampling_grid,
)
from frcnn.modeling.roi_heads.sparse_roi_align import (
    sparse_roi_align,
    sparse_roi_align_backward,
)

# the RoIAlign kernels a pooler can use (model.roi_heads.roi_align_kernel)
KERNELS = ("torchvision", "grid_sample", "sparse")
# the kernels that place a fixed sampling_ratio x sampling_ratio points in every bin
FIXED_RATIO_KERNELS = ("grid_sample", "sparse")
# channel ranges per worker in the torchvision kernel's backward: enough for the workers to
# balance; each job's gradient (a level's images x its channels) is copied into place as it is
# done, so at most one per worker exists beside the level's gradient
CHUNKS_PER_WORKER = 4


@dataclass(frozen=True)
class RoIJob:
    """RoIs ``first_roi:end_roi`` (all from images ``first_image:end_image``, ``counts`` of
    them per image) on ``level``."""

    level: int
    first_image: int
    end_image: int
    first_roi: int
    end_roi: int
    counts: tuple[int, ...]


def split_jobs(rois_per_level_image: Sequence[Sequence[int]], num_workers: int) -> list[RoIJob]:
    """Cut RoIs sorted by (level, image), with the given counts, into jobs of contiguous images
    on one level, about ``1 / num_workers`` of the RoIs each: a job ends at the image boundary
    nearest that share (two images of 490 RoIs each, share 512: a job each, not one of 980).
    Images without RoIs need no job."""
    total = sum(sum(counts) for counts in rois_per_level_image)
    target = max(1, math.ceil(total / max(num_workers, 1)))
    jobs: list[RoIJob] = []
    first_roi = 0

    def close(level: int, first_image: int, end_image: int, counts: Sequence[int]) -> None:
        nonlocal first_roi
        taken = sum(counts[first_image:end_image])
        if taken:
            images = tuple(counts[first_image:end_image])
            jobs.append(RoIJob(level, first_image, end_image, first_roi, first_roi + taken, images))
            first_roi += taken

    for level, counts in enumerate(rois_per_level_image):
        first_image, taken = 0, 0
        for image, count in enumerate(counts):
            if taken and taken + count - target > target - taken:  # nearer without this image
                close(level, first_image, image, counts)
                first_image, taken = image, 0
            taken += count
            if taken >= target:
                close(level, first_image, image + 1, counts)
                first_image, taken = image + 1, 0
        close(level, first_image, len(counts), counts)
    return jobs


def channel_jobs(
    rois_per_level: Sequence[int], channels: Sequence[int], num_workers: int
) -> list[tuple[int, int, int]]:
    """The torchvision kernel's backward jobs, ``(level, first_channel, end_channel)``: the
    kernel on a range of channels for all of a level's RoIs. RoIAlign's channels are
    independent, so every channel's gradient is bitwise the one-call result, however many images
    the level's RoIs come from (a split by images cannot cut a batch of two images' one busy
    level into more than two jobs, nor one image's at all). A level takes about
    ``CHUNKS_PER_WORKER * num_workers`` ranges in proportion to its RoIs, one at least; with one
    worker, one. Largest first, so that the workers finish together."""
    total = sum(rois_per_level)
    jobs = []
    for level, (count, width) in enumerate(zip(rois_per_level, channels)):
        if not count:
            continue
        share = math.ceil(CHUNKS_PER_WORKER * num_workers * count / total)
        pieces = 1 if num_workers < 2 else max(1, min(width, share))
        bounds = [round(i * width / pieces) for i in range(pieces + 1)]
        jobs += [(level, bounds[i], bounds[i + 1]) for i in range(pieces)]
    return sorted(jobs, key=lambda job: -rois_per_level[job[0]] * (job[2] - job[1]))


def roi_align_blocks(
    features: Sequence[Tensor],
    scales: Sequence[float],
    rois: Tensor,
    jobs: Sequence[RoIJob],
    output_size: int,
    sampling_ratio: int,
    aligned: bool,
    kernel: str = "torchvision",
) -> tuple[Tensor, ...]:
    """Pool ``rois`` (M, 5), sorted by (level, image), as ``jobs`` say -> one (rows, Ch, P, P)
    block per job, then one block of zeros for the RoIs after the last job's, if any: the blocks
    in order are the M pooled rows. Differentiable with respect to the features.

    ``kernel``: "torchvision" (``torchvision.ops.roi_align``'s kernels), "grid_sample" (the
    same sampling through PyTorch's grid_sample kernels, grid_roi_align.py: equal to rounding,
    faster on a CPU) or "sparse" (products with RoIAlign's sparse weight matrix: embedding_bag
    forward, sparse-matrix backward, sparse_roi_align.py: equal to rounding, faster on a CPU).
    The last two need a fixed ``sampling_ratio`` >= 1."""
    check_kernel(kernel, sampling_ratio)
    settings = (tuple(scales), tuple(jobs), output_size, sampling_ratio, aligned, kernel)
    return _RoIAlignJobs.apply(rois, settings, *features)


def check_kernel(kernel: str, sampling_ratio: int) -> None:
    """A ValueError for a kernel that is not one of KERNELS or cannot take ``sampling_ratio``."""
    if kernel not in KERNELS:
        raise ValueError(f"RoIAlign kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    if kernel in FIXED_RATIO_KERNELS and sampling_ratio < 1:
        raise ValueError(
            f"the {kernel} RoIAlign kernel needs a fixed sampling_ratio >= 1, got "
            f"{sampling_ratio} (0, adaptive, places a different number of points in every RoI)"
        )


class _RoIAlignJobs(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,  # noqa: ANN001
        rois: Tensor,
        settings: tuple,
        *features: Tensor,
    ) -> tuple[Tensor, ...]:
        scales, jobs, size, sampling_ratio, aligned, kernel = settings
        dtype = features[0].dtype
        # torchvision's autocast rule for RoIAlign: compute in float32 (or float64 if given),
        # return the input's dtype
        compute = torch.promote_types(dtype, torch.float32)
        # torchvision's kernel makes its input contiguous, the sparse kernel reads pixel rows
        # (channels_last): once per level here, not once per job (the features would be
        # copied whole for every job otherwise)
        layout = torch.channels_last if kernel == "sparse" else torch.contiguous_format
        maps = [feature.to(compute).contiguous(memory_format=layout) for feature in features]

        grids: list[Tensor | None] = [None] * len(jobs)  # grid_sample: kept for the backward

        def pool_grid(index: int) -> Tensor:
            job = jobs[index]
            feature = maps[job.level][job.first_image : job.end_image]
            with torch.autocast(feature.device.type, enabled=False):
                grid = sampling_grid(
                    rois[job.first_roi : job.end_roi, 1:].to(compute),
                    scales[job.level],
                    size,
                    sampling_ratio,
                    aligned,
                    feature.shape[-2],
                    feature.shape[-1],
                )
                grids[index] = grid
                return grid_roi_align(feature, grid, job.counts, size, sampling_ratio).to(dtype)

        def pool(index: int) -> Tensor:
            job = jobs[index]
            return torch.ops.torchvision.roi_align(
                maps[job.level][job.first_image : job.end_image],
                _job_rois(rois, job, compute),
                scales[job.level],
                size,
                size,
                sampling_ratio,
                aligned,
            ).to(dtype)

        def pool_sparse(index: int) -> Tensor:
            job = jobs[index]
            job_rois = rois[job.first_roi : job.end_roi]
            with torch.autocast(job_rois.device.type, enabled=False):
                return sparse_roi_align(
                    maps[job.level][job.first_image : job.end_image],
                    job_rois[:, 0].long() - job.first_image,
                    job_rois[:, 1:].to(compute),
                    scales[job.level],
                    size,
                    sampling_ratio,
                    aligned,
                ).to(dtype)

        work = {"grid_sample": pool_grid, "sparse": pool_sparse}.get(kernel, pool)
        blocks = run_jobs(work, len(jobs), maps[0].device)
        pooled_rows = jobs[-1].end_roi if jobs else 0
        if pooled_rows < rois.shape[0] or not blocks:
            rows = rois.shape[0] - pooled_rows
            zeros = torch.empty(  # in the other blocks' layout
                (rows, features[0].shape[1], size, size),
                dtype=features[0].dtype,
                device=features[0].device,
                memory_format=layout,
            ).zero_()
            blocks.append(zeros)
            ctx.mark_non_differentiable(zeros)
        ctx.settings = settings
        if kernel == "grid_sample":
            # grid_sample's backward takes its input (the RPN head's convolution keeps these
            # features for its own backward already: no memory is added)
            ctx.grids = grids
            ctx.save_for_backward(rois, *features)
        else:
            ctx.save_for_backward(rois)
        ctx.shapes = [feature.shape for feature in features]
        ctx.dtypes = [feature.dtype for feature in features]
        ctx.formats = [_memory_format(feature) for feature in features]
        return tuple(blocks)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_blocks: Tensor) -> tuple:  # noqa: ANN001
        rois, *features = ctx.saved_tensors
        compute = torch.promote_types(grad_blocks[0].dtype, torch.float32)
        if ctx.settings[-1] == "grid_sample":
            return (None, None, *_grid_feature_grads(ctx, grad_blocks, features, compute))
        if ctx.settings[-1] == "sparse":
            return (None, None, *_sparse_feature_grads(ctx, grad_blocks, rois, compute))
        return (None, None, *_torchvision_feature_grads(ctx, grad_blocks, rois, compute))


def _grid_feature_grads(ctx, grad_blocks, features, compute) -> list[Tensor | None]:  # noqa: ANN001
    """grid_sample's backward per forward job: each owns its images' slice of its level."""
    _, jobs, size, sampling_ratio, _, _ = ctx.settings

    def backward_grid(index: int) -> Tensor:
        """The gradient of images first_image:end_image of the job's level."""
        job = jobs[index]
        feature = features[job.level][job.first_image : job.end_image]
        with torch.autocast(feature.device.type, enabled=False):
            return grid_roi_align_backward(
                grad_blocks[index].to(compute),
                feature.to(compute).contiguous(),
                ctx.grids[index],
                job.counts,
                size,
                sampling_ratio,
            )

    # no work for levels that need no gradient (frozen features)
    wanted = [i for i, job in enumerate(jobs) if ctx.needs_input_grad[2 + job.level]]
    done = run_jobs(lambda k: backward_grid(wanted[k]), len(wanted), grad_blocks[0].device)
    pieces = dict(zip(wanted, done))
    feature_grads = []
    for level, (shape, dtype, needed) in enumerate(
        zip(ctx.shapes, ctx.dtypes, ctx.needs_input_grad[2:])
    ):
        mine = [i for i, job in enumerate(jobs) if job.level == level]
        whole = len(mine) == 1 and jobs[mine[0]].end_image - jobs[mine[0]].first_image == shape[0]
        if not needed:
            grad = None
        elif whole:
            grad = pieces.pop(mine[0]).to(dtype)  # one job made the level's whole gradient
        else:
            grad = grad_blocks[0].new_zeros(shape, dtype=compute)  # images without RoIs
            for i in mine:  # each piece is freed once copied
                grad[jobs[i].first_image : jobs[i].end_image].copy_(pieces.pop(i))
            grad = grad.to(dtype)
        feature_grads.append(grad)
    return feature_grads


def _sparse_feature_grads(ctx, grad_blocks, rois, compute) -> list[Tensor | None]:  # noqa: ANN001
    """The sparse kernel's backward, job by job in the caller's thread (the sparse products and
    copies run on every core already): each job writes its images' slice of its level."""
    scales, jobs, size, sampling_ratio, aligned, _ = ctx.settings
    needed, formats = ctx.needs_input_grad[2:], ctx.formats
    grads: list[Tensor | None] = [None] * len(ctx.shapes)
    for level, (shape, want) in enumerate(zip(ctx.shapes, needed)):
        if want:  # every image a job pools from is written whole; the others are zeroed below
            # in the feature's layout: a channels_last gradient would be converted back before
            # the channels_last convolution that made the feature takes it
            grads[level] = torch.empty(
                shape, dtype=compute, device=grad_blocks[0].device, memory_format=formats[level]
            )
    written = [set() for _ in ctx.shapes]
    for index, job in enumerate(jobs):
        grad = grads[job.level]
        if grad is None:
            continue
        with torch.autocast(grad.device.type, enabled=False):
            sparse_roi_align_backward(
                grad_blocks[index].to(compute),
                rois[job.first_roi : job.end_roi, 1:].to(compute),
                job.counts,
                scales[job.level],
                size,
                sampling_ratio,
                aligned,
                grad[job.first_image : job.end_image],
            )
        images = range(job.first_image, job.end_image)
        written[job.level].update(i for i, count in zip(images, job.counts) if count)
    feature_grads: list[Tensor | None] = []
    for grad, dtype, images in zip(grads, ctx.dtypes, written):
        if grad is not None:
            for image in sorted(set(range(grad.shape[0])) - images):
                grad[image].zero_()
            grad = grad.to(dtype)
        feature_grads.append(grad)
    return feature_grads


def _torchvision_feature_grads(ctx, grad_blocks, rois, compute) -> list[Tensor | None]:  # noqa: ANN001
    """torchvision's backward kernel per (level, channel range) job (channel_jobs): all of the
    level's RoIs, in their order, the images' indices as they are."""
    scales, jobs, size, sampling_ratio, aligned, _ = ctx.settings
    device = grad_blocks[0].device
    blocks = [
        [i for i, job in enumerate(jobs) if job.level == level] for level in range(len(ctx.shapes))
    ]
    # a level's jobs are consecutive: its RoIs are rows first_roi:end_roi
    rows = [
        (jobs[mine[0]].first_roi, jobs[mine[-1]].end_roi) if mine else (0, 0) for mine in blocks
    ]
    needed = ctx.needs_input_grad[2:]
    counts = [end - first if want else 0 for (first, end), want in zip(rows, needed)]
    chunks = channel_jobs(counts, [shape[1] for shape in ctx.shapes], parallel.num_workers(device))
    split = {level for level, first, end in chunks if end - first < ctx.shapes[level][1]}
    # a level split into channel ranges is assembled in place; every channel is written
    grads: dict[int, Tensor] = {
        level: grad_blocks[0].new_empty(ctx.shapes[level], dtype=compute) for level in split
    }

    def backward_chunk(index: int) -> Tensor | None:
        level, first_channel, end_channel = chunks[index]
        pieces = [grad_blocks[i][:, first_channel:end_channel] for i in blocks[level]]
        grad_rows = (pieces[0] if len(pieces) == 1 else torch.cat(pieces)).to(compute)
        num_images, _, height, width = ctx.shapes[level]
        first_roi, end_roi = rows[level]
        grad = torch.ops.torchvision._roi_align_backward(
            grad_rows,
            rois[first_roi:end_roi].to(compute),
            scales[level],
            size,
            size,
            num_images,
            end_channel - first_channel,
            height,
            width,
            sampling_ratio,
            aligned,
        )
        if level not in split:
            return grad  # the level's whole gradient, as the kernel made it
        grads[level][:, first_channel:end_channel].copy_(grad)
        return None

    done = run_jobs(backward_chunk, len(chunks), device)
    for (level, _, _), grad in zip(chunks, done):
        if grad is not None:
            grads[level] = grad
    feature_grads: list[Tensor | None] = []
    for level, (shape, dtype, want) in enumerate(zip(ctx.shapes, ctx.dtypes, needed)):
        if not want:
            feature_grads.append(None)
        elif level in grads:
            feature_grads.append(grads.pop(level).to(dtype))
        else:  # a level no RoI was assigned to
            feature_grads.append(grad_blocks[0].new_zeros(shape, dtype=dtype))
    return feature_grads


def _memory_format(feature: Tensor) -> torch.memory_format:
    """channels_last for a (k, C, H, W) tensor laid out so (and not also contiguous)."""
    if feature.is_contiguous() or not feature.is_contiguous(memory_format=torch.channels_last):
        return torch.contiguous_format
    return torch.channels_last


def _job_rois(rois: Tensor, job: RoIJob, compute: torch.dtype) -> Tensor:
    """The job's RoIs in the compute dtype, their image indices counted from its first image."""
    job_rois = rois[job.first_roi : job.end_roi].to(compute)
    if job.first_image == 0:
        return job_rois
    job_rois = job_rois.clone()  # it may be a view of the caller's RoIs
    job_rois[:, 0] -= job.first_image
    return job_rois
