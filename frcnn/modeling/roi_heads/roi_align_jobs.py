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
``torchvision.ops.roi_align`` call per level, however the work is split.

Memory: the jobs' own outputs exist beside the pooled result while they run. The forward cuts
each job into calls of at most ``FORWARD_CALL_ELEMENTS`` output elements, so the jobs running at
once hold a few MB, not a copy of the result. The backward keeps each job's gradient as the
kernel returns it: a level whose gradient one job computes takes it as it is, and only a level
split between jobs is assembled into a new tensor (its pieces exist beside it for that moment).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from frcnn.modeling.parallel import run_jobs

# 2**20 elements per forward call (4 MiB in float32): 167 RoIs of 128 channels at 7 x 7, 83 of 256
FORWARD_CALL_ELEMENTS = 2**20


@dataclass(frozen=True)
class RoIJob:
    """RoIs ``first_roi:end_roi`` (all from images ``first_image:end_image``) on ``level``."""

    level: int
    first_image: int
    end_image: int
    first_roi: int
    end_roi: int


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
                    jobs.append(RoIJob(level, first_image, image + 1, first_roi, end_roi))
                    first_roi = end_roi
                first_image, taken = image + 1, 0
    return jobs


def roi_align_jobs(
    features: Sequence[Tensor],
    scales: Sequence[float],
    rois: Tensor,
    order: Tensor | None,
    jobs: Sequence[RoIJob],
    output_size: int,
    sampling_ratio: int,
    aligned: bool,
    zero_fill: bool = False,
) -> Tensor:
    """Pool ``rois`` (M, 5) rows of (image index, x1, y1, x2, y2) from ``features`` (one
    (N, Ch, Hl, Wl) map per level) -> (M, Ch, P, P), in the order of ``rois``. ``jobs`` index the
    RoIs sorted by (level, image): ``rois[order]``, or ``rois`` itself when ``order`` is None.
    ``zero_fill``: some RoIs are in no job, and their rows are zeros. Differentiable with respect
    to the features."""
    settings = (tuple(scales), tuple(jobs), output_size, sampling_ratio, aligned, zero_fill)
    return _RoIAlignJobs.apply(rois, order, settings, *features)


class _RoIAlignJobs(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,  # noqa: ANN001
        rois: Tensor,
        order: Tensor | None,
        settings: tuple,
        *features: Tensor,
    ) -> Tensor:
        scales, jobs, size, sampling_ratio, aligned, zero_fill = settings
        dtype = features[0].dtype
        # torchvision's autocast rule for RoIAlign: compute in float32 (or float64 if given),
        # return the input's dtype
        compute = torch.promote_types(dtype, torch.float32)
        # the kernel makes its input contiguous: once per level here, not once per call (a
        # channels_last model's features would be copied whole for every call otherwise)
        maps = [feature.to(compute).contiguous() for feature in features]
        output_shape = (rois.shape[0], maps[0].shape[1], size, size)
        output = maps[0].new_zeros(output_shape) if zero_fill else maps[0].new_empty(output_shape)
        calls = _forward_calls(jobs, maps[0].shape[1] * size * size)

        def pool(index: int) -> None:
            call = calls[index]
            rows = _rows(order, call)
            pooled = torch.ops.torchvision.roi_align(
                maps[call.level][call.first_image : call.end_image],
                _job_rois(rois, rows, call, compute),
                scales[call.level],
                size,
                size,
                sampling_ratio,
                aligned,
            )
            _put(output, rows, pooled)  # calls own disjoint rows

        run_jobs(pool, len(calls), maps[0].device)
        ctx.settings = settings
        ctx.save_for_backward(rois, order)
        ctx.shapes = [feature.shape for feature in features]
        ctx.dtypes = [feature.dtype for feature in features]
        return output.to(dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor) -> tuple:  # noqa: ANN001
        scales, jobs, size, sampling_ratio, aligned, _ = ctx.settings
        rois, order = ctx.saved_tensors
        compute = torch.promote_types(grad_output.dtype, torch.float32)
        grad_output = grad_output.to(compute)

        def backward_one(index: int) -> Tensor:
            """The gradient of images first_image:end_image of the job's level."""
            job = jobs[index]
            _, channels, height, width = ctx.shapes[job.level]
            rows = _rows(order, job)
            return torch.ops.torchvision._roi_align_backward(
                _take(grad_output, rows),
                _job_rois(rois, rows, job, compute),
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
        wanted = [i for i, job in enumerate(jobs) if ctx.needs_input_grad[3 + job.level]]
        done = run_jobs(lambda k: backward_one(wanted[k]), len(wanted), grad_output.device)
        pieces = dict(zip(wanted, done))
        feature_grads = []
        for level, (shape, dtype, needed) in enumerate(
            zip(ctx.shapes, ctx.dtypes, ctx.needs_input_grad[3:])
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
                grad = grad_output.new_zeros(shape)  # images without RoIs keep zeros
                for i in mine:  # each piece is freed once copied
                    grad[jobs[i].first_image : jobs[i].end_image].copy_(pieces.pop(i))
                grad = grad.to(dtype)
            feature_grads.append(grad)
        return (None, None, None, *feature_grads)


def _forward_calls(jobs: Sequence[RoIJob], elements_per_roi: int) -> list[RoIJob]:
    """``jobs`` cut into RoI ranges of at most FORWARD_CALL_ELEMENTS output elements (at least
    one RoI). A RoI's pooled values do not depend on which call pools it."""
    limit = max(1, FORWARD_CALL_ELEMENTS // max(elements_per_roi, 1))
    return [
        replace(job, first_roi=start, end_roi=min(start + limit, job.end_roi))
        for job in jobs
        for start in range(job.first_roi, job.end_roi, limit)
    ]


def _rows(order: Tensor | None, job: RoIJob) -> slice | Tensor:
    if order is None:
        return slice(job.first_roi, job.end_roi)
    return order[job.first_roi : job.end_roi]


def _take(values: Tensor, rows: slice | Tensor) -> Tensor:
    return values[rows] if isinstance(rows, slice) else values.index_select(0, rows)


def _put(out: Tensor, rows: slice | Tensor, values: Tensor) -> None:
    if isinstance(rows, slice):
        out[rows].copy_(values)
    else:
        out.index_copy_(0, rows, values)


def _job_rois(rois: Tensor, rows: slice | Tensor, job: RoIJob, compute: torch.dtype) -> Tensor:
    """The job's RoIs in the compute dtype, their image indices counted from its first image."""
    job_rois = _take(rois, rows).to(compute)
    if job.first_image == 0:
        return job_rois
    job_rois = job_rois.clone()  # it may be a view of the caller's RoIs
    job_rois[:, 0] -= job.first_image
    return job_rois
