"""NMS over the whole batch, groups keyed by image and level (or image and class), then the
first k surviving boxes of every image.

Shapes: N images, B candidate boxes (all images together, image-major), M boxes kept by NMS, k
slots per image.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torchvision.ops import batched_nms, nms

from frcnn.modeling import parallel

# torchvision's NMS kernel on a GPU builds an n x n / 64 word mask (n**2 / 8 bytes) and copies it
# to the host: 50 MB at 20000 candidates, 800 MB at 80000 (R50-FPN training, batch 8). A call
# holds at most this many usable candidates, the bound at which torchvision's batched_nms leaves
# its coordinate trick on CUDA. The CPU kernel keeps no mask and needs no bound.
MAX_CANDIDATES_PER_CALL = 20_000


def nms_per_group(
    boxes: Tensor,
    scores: Tensor,
    groups: Tensor,
    usable: Tensor,
    iou_thresh: float,
    one_call: bool = True,
) -> Tensor:
    """Indices into the B candidates kept by NMS run separately within each group, each image's
    in decreasing score. ``boxes`` (N, ..., 4), ``scores``, ``groups`` and ``usable`` (N, ...);
    unusable candidates (too small, under the score threshold, empty slots) are left out.

    The images are split into one range per worker (one on an accelerator, one per CPU thread,
    see frcnn/modeling/parallel.py), and each range takes one NMS call: its groups' boxes are
    shifted apart along the diagonal, by a multiple of the coordinate span, so that boxes of
    different groups never overlap. The host reads per range are two (the candidate count and
    NMS's result) however many images, levels or classes the range holds. torchvision's
    batched_nms instead loops over the groups above 4000 boxes on CPU (20000 on CUDA) with a read
    per group, and its detector calls it once per image. A range per CPU thread both uses the
    cores and bounds the quadratic cost of the CPU kernel, which compares every kept box with every
    later box of its call, groups or not.

    On a GPU the whole batch is one call while its candidate slots are at most
    MAX_CANDIDATES_PER_CALL. Above that the usable candidates of each image are read (one more
    host read) and packed into calls of at most that many; an image with more on its own goes to
    batched_nms, which loops over its groups there. This bounds the kernel's quadratic mask.

    ``one_call=False`` hands each range's groups to torchvision's batched_nms instead, which
    on a CPU makes one kernel call per group above 1000 boxes (and a host read per group):
    better there when the groups are several and well populated (detections: images x
    classes; proposals at inference: images x levels).
    """
    calls = nms_calls(boxes, scores, groups, usable, iou_thresh, one_call)
    return torch.cat(calls) if calls else usable.new_zeros(0, dtype=torch.int64)


def nms_calls(
    boxes: Tensor,
    scores: Tensor,
    groups: Tensor,
    usable: Tensor,
    iou_thresh: float,
    one_call: bool = True,
) -> list[Tensor]:
    """nms_per_group's result per NMS call, in image order. A call covers a contiguous range of
    whole images and its count is known on the host, so the largest count bounds how many any
    one image kept, without a read."""
    shape = usable.shape

    def pick(candidates: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return tuple(gather_flat(t, candidates, shape) for t in (boxes, scores, groups))

    return nms_calls_of(pick, usable, iou_thresh, one_call)


# maps a call's candidates, flat indices (M,) into usable's shape, to their boxes (M, 4), scores
# (M,) and groups (M,)
Pick = Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]


def nms_calls_of(
    pick: Pick, usable: Tensor, iou_thresh: float, one_call: bool = True
) -> list[Tensor]:
    """nms_calls with the candidates' boxes, scores and groups made by ``pick`` for the usable
    candidates only, e.g. boxes decoded from deltas just for the detections above the score
    threshold rather than for every class of every proposal."""
    num_images = usable.shape[0]
    per_image = usable[0].numel() if num_images else 0
    ranges = call_ranges(usable.reshape(num_images, per_image))
    usable = usable.reshape(-1)
    cap = _candidate_cap(usable.device)

    def nms_one_range(index: int) -> Tensor:
        first, end = (bound * per_image for bound in ranges[index])
        candidates = torch.nonzero(usable[first:end]).squeeze(1) + first
        # (the count is known on the host once nonzero returns: no read of its own)
        within_cap = cap is None or candidates.numel() <= cap
        keep = _nms(*pick(candidates), iou_thresh, one_call and within_cap)
        return candidates.index_select(0, keep)

    return parallel.run_jobs(nms_one_range, len(ranges), usable.device)


def call_ranges(usable: Tensor) -> list[tuple[int, int]]:
    """The image ranges of the NMS calls for ``usable`` (N, S): one per worker
    (parallel.image_ranges); on a GPU, packed by each image's usable count when the batch's S x N
    slots exceed ``_candidate_cap``."""
    num_images, per_image = usable.shape
    ranges = parallel.image_ranges(num_images, parallel.num_workers(usable.device))
    cap = _candidate_cap(usable.device)
    if cap is None or num_images * per_image <= cap:
        return ranges
    counts = usable.sum(dim=1).tolist()  # one host read, only above the cap
    return [
        (first + start, first + end)
        for first, last in ranges
        for start, end in pack_images(counts[first:last], cap)
    ]


def pack_images(counts: list[int], cap: int) -> list[tuple[int, int]]:
    """Contiguous ranges of images whose ``counts`` add up to at most ``cap`` each; an image
    above ``cap`` is a range of its own."""
    ranges: list[tuple[int, int]] = []
    start, total = 0, 0
    for index, count in enumerate(counts):
        if index > start and total + count > cap:
            ranges.append((start, index))
            start, total = index, 0
        total += count
    if counts:
        ranges.append((start, len(counts)))
    return ranges


def _candidate_cap(device: torch.device) -> int | None:
    return None if device.type == "cpu" else MAX_CANDIDATES_PER_CALL


def gather_flat(values: Tensor, flat_index: Tensor, shape: torch.Size) -> Tensor:
    """The entries of ``values`` (*shape, ...) at ``flat_index`` (M,), indices into the
    flattened ``shape``: (M, ...). A contiguous tensor is indexed as a flat view; any other
    (a slice, an expanded view) through its own strides, so that it is never copied whole."""
    if values.is_contiguous():
        return values.reshape(-1, *values.shape[len(shape) :]).index_select(0, flat_index)
    return values[torch.unravel_index(flat_index, shape)]


def _nms(
    boxes: Tensor, scores: Tensor, groups: Tensor, iou_thresh: float, one_call: bool
) -> Tensor:
    """Indices into the candidates' ``boxes`` (M, 4), ``scores`` and ``groups`` (M,) kept by NMS
    within each group."""
    # float64: the shift is up to (number of groups) x (coordinate span), and in float32 its
    # rounding would let one image's result depend on the others in its range
    boxes = boxes.double()
    scores = scores.double()
    if not one_call:
        return batched_nms(boxes, scores, groups, iou_thresh)
    low = boxes.amin() if boxes.numel() else boxes.new_zeros(())
    high = boxes.amax() if boxes.numel() else boxes.new_zeros(())
    shift = groups.double() * (high - low + 1.0)
    return nms(boxes - low + shift[:, None], scores, iou_thresh)


def scatter_top_per_image(
    image_of_kept: Tensor, num_images: int, k: int, *values: Tensor
) -> tuple[Tensor, list[Tensor]]:
    """Place the first ``k`` kept entries of each image into fixed (N, k, ...) slots.

    ``image_of_kept`` (M,) gives each kept entry's image, or ``num_images`` for entries that are not
    to be kept at all; entries are in the order they should fill their image's slots. ``values``
    are (M, ...) tensors to place. Returns the (N, k) mask of filled slots and the placed values
    (zeros where empty). Works on the device without reading any count on the host: a stable sort
    groups entries by image, a cumulative count gives each one its rank in its image, and ranks
    past k are sent to a spill slot that is cut off.
    """
    device = image_of_kept.device
    num_kept = image_of_kept.shape[0]
    image_sorted, order = torch.sort(image_of_kept, stable=True)
    counts = torch.zeros(num_images + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, image_sorted, torch.ones_like(image_sorted))
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(num_kept, device=device) - starts.index_select(0, image_sorted)
    slot = torch.where(rank < k, rank, torch.full_like(rank, k))

    # flat (image, slot) positions: index_fill_ / index_copy_ on flat rows are several times
    # faster than two-index assignment (duplicates only ever land in the spill slots)
    position = image_sorted * (k + 1) + slot
    filled = torch.zeros((num_images + 1, k + 1), dtype=torch.bool, device=device)
    filled.view(-1).index_fill_(0, position, True)
    placed = []
    for value in values:
        out = value.new_zeros((num_images + 1, k + 1, *value.shape[1:]))
        rows = out.view((num_images + 1) * (k + 1), *value.shape[1:])
        rows.index_copy_(0, position, value.index_select(0, order))
        placed.append(out[:num_images, :k])
    return filled[:num_images, :k], placed
