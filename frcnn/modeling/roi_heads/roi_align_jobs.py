"""torchvision's RoIAlign kernels run over a batch as independent jobs, in parallel on a CPU.

Shapes: N images, L feature levels, M RoIs, Ch channels, P x P the pooled size.

torchvision's CPU RoIAlign runs on one thread, and its backward (which recomputes every sample's
bilinear weights for each channel) was a third of a quick-start training step. The RoIs of
different images touch different slices of a feature map, so the batch splits into jobs, each a
range of images on one level: a job pools from ``feature[first_image:end_image]`` with its RoIs'
image indices shifted to match, and in the backward it owns that slice of the gradient. The jobs
run in parallel on a CPU (frcnn/modeling/parallel.py); on other devices one after another.

Every RoI is pooled by the same kernel with the same arguments, and every image's gradient is
accumulated over its RoIs in their original order, so the results are bitwise those of one
``torchvision.ops.roi_align`` call per level, however the work is split. The grid_sample kernel
(a speed setting, grid_roi_align.py) runs as the same jobs; its results equal torchvision's to
float rounding.

Memory and copies: each job's pooled rows are one kernel call's output, and stay that tensor: the
result is a tuple of blocks, one per job, which a row-wise box head takes one by one (its outputs
are small). Nothing copies the pooled features into one tensor, and in the backward each job's
gradient rows arrive as a tensor of their own (the poolers join the blocks for callers that want
one tensor in the RoIs' order). A level whose gradient one job computes takes it as the
kernel returns it; only a level split between jobs is assembled into a new tensor (its pieces
exist beside it for that moment).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from frcnn.modeling.parallel import run_jobs
from frcnn.modeling.roi_heads.grid_roi_align import (
    grid_roi_align,
    grid_roi_align_backward,
    sampling_grid,
)

# the RoIAlign kernels a pooler can use (model.roi_heads.roi_align_kernel)
KERNELS = ("torchvision", "grid_sample")


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
    on one level, about ``1 / num_workers`` of the RoIs each. Images without RoIs need no job."""
    total = sum(sum(counts) for counts in rois_per_level_image)
    target = max(1, math.ceil(total / max(num_workers, 1)))
    jobs: list[RoIJob] = []
    first_roi = 0
    for level, counts in enumerate(rois_per_level_image):
        first_image, taken = 0, 0
        for image, count in enumerate(counts):
            taken += count
            if taken >= target or image == len(counts) - 1:
                if taken:
                    end_roi = first_roi + taken
                    images = tuple(counts[first_image : image + 1])
                    jobs.append(RoIJob(level, first_image, image + 1, first_roi, end_roi, images))
                    first_roi = end_roi
                first_image, taken = image + 1, 0
    return jobs


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

    ``kernel``: "torchvision" (``torchvision.ops.roi_align``'s kernels) or "grid_sample" (the
    same sampling through PyTorch's grid_sample kernels, grid_roi_align.py: equal to rounding,
    faster on a CPU; a fixed ``sampling_ratio`` >= 1 only)."""
    check_kernel(kernel, sampling_ratio)
    settings = (tuple(scales), tuple(jobs), output_size, sampling_ratio, aligned, kernel)
    return _RoIAlignJobs.apply(rois, settings, *features)


def check_kernel(kernel: str, sampling_ratio: int) -> None:
    """A ValueError for a kernel that is not one of KERNELS or cannot take ``sampling_ratio``."""
    if kernel not in KERNELS:
        raise ValueError(f"RoIAlign kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    if kernel == "grid_sample" and sampling_ratio < 1:
        raise ValueError(
            f"the grid_sample RoIAlign kernel needs a fixed sampling_ratio >= 1, got "
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
        # the kernel makes its input contiguous: once per level here, not once per job (a
        # channels_last model's features would be copied whole for every job otherwise)
        maps = [feature.to(compute).contiguous() for feature in features]

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

        work = pool_grid if kernel == "grid_sample" else pool
        blocks = run_jobs(work, len(jobs), maps[0].device)
        pooled_rows = jobs[-1].end_roi if jobs else 0
        if pooled_rows < rois.shape[0] or not blocks:
            rows = rois.shape[0] - pooled_rows
            zeros = features[0].new_zeros((rows, features[0].shape[1], size, size))
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
        return tuple(blocks)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_blocks: Tensor) -> tuple:  # noqa: ANN001
        scales, jobs, size, sampling_ratio, aligned, kernel = ctx.settings
        rois, *features = ctx.saved_tensors
        compute = torch.promote_types(grad_blocks[0].dtype, torch.float32)

        def backward_grid(index: int) -> Tensor:
            """As backward_one, through grid_sample's backward."""
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

        def backward_one(index: int) -> Tensor:
            """The gradient of images first_image:end_image of the job's level."""
            job = jobs[index]
            _, channels, height, width = ctx.shapes[job.level]
            return torch.ops.torchvision._roi_align_backward(
                grad_blocks[index].to(compute),
                _job_rois(rois, job, compute),
                scales[job.level],
                size,
                size,
                job.end_image - job.first_image,
                channels,
                height,
                width,
                sampling_ratio,
                aligned,
            )

        # no work for levels that need no gradient (frozen features)
        wanted = [i for i, job in enumerate(jobs) if ctx.needs_input_grad[2 + job.level]]
        work = backward_grid if kernel == "grid_sample" else backward_one
        done = run_jobs(lambda k: work(wanted[k]), len(wanted), grad_blocks[0].device)
        pieces = dict(zip(wanted, done))
        feature_grads = []
        for level, (shape, dtype, needed) in enumerate(
            zip(ctx.shapes, ctx.dtypes, ctx.needs_input_grad[2:])
        ):
            mine = [i for i, job in enumerate(jobs) if job.level == level]
            whole = (
                len(mine) == 1 and jobs[mine[0]].end_image - jobs[mine[0]].first_image == shape[0]
            )
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
        return (None, None, *feature_grads)


def _job_rois(rois: Tensor, job: RoIJob, compute: torch.dtype) -> Tensor:
    """The job's RoIs in the compute dtype, their image indices counted from its first image."""
    job_rois = rois[job.first_roi : job.end_roi].to(compute)
    if job.first_image == 0:
        return job_rois
    job_rois = job_rois.clone()  # it may be a view of the caller's RoIs
    job_rois[:, 0] -= job.first_image
    return job_rois
