"""Batching: collate into a ``Batch``, samplers for training and testing, data loaders.

Training reproducibility rests on two choices. The sample order is a pure function of
(seed, epoch, rank), so resuming at batch k replays exactly the stream an uninterrupted run would
have seen. Each sample also carries its own augmentation seed, derived from (seed, epoch,
position), so the images do not depend on which worker loaded them or how many workers exist.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset

from frcnn.datasets.common import DatasetItem, mix_seed
from frcnn.structures import ImageInfo, Targets

# A training sample: (dataset index, seed of its augmentation).
SampleKey = tuple[int, int]


@dataclass
class Batch:
    """Images (uint8 (3, Hi, Wi), not padded: the model pads), their targets and infos."""

    images: list[Tensor]
    targets: list[Targets]
    infos: list[ImageInfo]

    def __len__(self) -> int:
        return len(self.images)

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            [image.to(device, non_blocking=True) for image in self.images],
            [targets.to(device) for targets in self.targets],
            self.infos,
        )

    def pin_memory(self) -> Batch:
        """Called by the DataLoader when ``pin_memory`` is on."""
        return Batch(
            [image.pin_memory() for image in self.images],
            [_pin_targets(targets) for targets in self.targets],
            self.infos,
        )


def _pin_targets(targets: Targets) -> Targets:
    assert targets.iscrowd is not None  # set by Targets.__post_init__
    return Targets(
        targets.boxes.pin_memory(), targets.labels.pin_memory(), targets.iscrowd.pin_memory()
    )


def collate(batch: Sequence[DatasetItem]) -> Batch:
    """Keep images as a list: they differ in size until the model pads them."""
    return Batch(
        images=[item[0] for item in batch],
        targets=[item[1] for item in batch],
        infos=[item[2] for item in batch],
    )


class TrainingSampler:
    """An infinite stream of batches of ``SampleKey`` for one process.

    Every epoch shuffles all indices with a generator seeded by (seed, epoch); rank r takes
    positions r, r + world_size, ... of that permutation, so the ranks see disjoint images. With
    ``group_ids`` (0 for w/h >= 1, 1 otherwise, say) a batch only holds images of one group;
    images wait in their group's bucket until it fills, as in torchvision's GroupedBatchSampler.
    ``start_iter=k`` starts at batch k of that same stream; the skipped batches cost index
    arithmetic only.
    """

    def __init__(
        self,
        size: int,
        images_per_batch: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        group_ids: Sequence[int] | None = None,
        start_iter: int = 0,
    ) -> None:
        if size < world_size or size <= 0:
            raise ValueError(f"TrainingSampler: {size} images cannot feed {world_size} processes")
        if images_per_batch <= 0 or not 0 <= rank < world_size or start_iter < 0:
            raise ValueError(
                f"TrainingSampler: bad images_per_batch={images_per_batch}, rank={rank}, "
                f"world_size={world_size} or start_iter={start_iter}"
            )
        if group_ids is not None and len(group_ids) != size:
            raise ValueError(f"TrainingSampler: {len(group_ids)} group ids for {size} images")
        self.size = size
        self.images_per_batch = images_per_batch
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.group_ids = list(group_ids) if group_ids is not None else None
        self.start_iter = start_iter

    def _positions(self) -> Iterator[tuple[int, int, int]]:
        """(index, epoch, position in the epoch's permutation), forever."""
        for epoch in itertools.count():
            generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
            permutation = torch.randperm(self.size, generator=generator).tolist()
            for position in range(self.rank, self.size, self.world_size):
                yield permutation[position], epoch, position

    def _raw_batches(self) -> Iterator[list[tuple[int, int, int]]]:
        positions = self._positions()
        if self.group_ids is None:
            while True:
                yield list(itertools.islice(positions, self.images_per_batch))
        buckets: dict[int, list[tuple[int, int, int]]] = {}
        for entry in positions:
            bucket = buckets.setdefault(self.group_ids[entry[0]], [])
            bucket.append(entry)
            if len(bucket) == self.images_per_batch:
                yield bucket[:]
                bucket.clear()

    def __iter__(self) -> Iterator[list[SampleKey]]:
        for raw in itertools.islice(self._raw_batches(), self.start_iter, None):
            yield [(index, mix_seed(self.seed, epoch, position)) for index, epoch, position in raw]


class InferenceSampler:
    """Indices 0..size-1 split into ``world_size`` contiguous, disjoint shards in order."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"InferenceSampler: rank {rank} outside world size {world_size}")
        self.begin = size * rank // world_size
        self.end = size * (rank + 1) // world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.begin, self.end))

    def __len__(self) -> int:
        return self.end - self.begin


class _SeededSamples(Dataset):
    """Runs each sample's transforms under its own seed, restoring the RNG afterwards so the
    caller's random state (the main process's when num_workers=0) is untouched."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: SampleKey) -> DatasetItem:
        index, sample_seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            return self.dataset[index]


def aspect_ratio_groups(dataset: Dataset) -> list[int]:
    """0 for images with width / height >= 1, 1 for the others."""
    ratios = getattr(dataset, "image_aspect_ratios", None)
    if ratios is None:
        raise TypeError(
            f"{type(dataset).__name__} has no image_aspect_ratios(); aspect-ratio grouping needs "
            "it (or set data.aspect_ratio_grouping=false)"
        )
    return [0 if ratio >= 1.0 else 1 for ratio in ratios()]


def build_train_loader(
    dataset: Dataset,
    images_per_batch: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 2,
    start_iter: int = 0,
    aspect_ratio_grouping: bool = True,
) -> DataLoader:
    """An endless loader of ``Batch`` of ``images_per_batch`` images (this process's share)."""
    sampler = TrainingSampler(
        len(dataset),  # type: ignore[arg-type]
        images_per_batch,
        seed=seed,
        rank=rank,
        world_size=world_size,
        group_ids=aspect_ratio_groups(dataset) if aspect_ratio_grouping else None,
        start_iter=start_iter,
    )
    return DataLoader(
        _SeededSamples(dataset),
        batch_sampler=sampler,  # type: ignore[arg-type]
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(mix_seed(seed, rank)),
    )


def build_test_loader(
    dataset: Dataset,
    images_per_batch: int = 1,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 2,
) -> DataLoader:
    """This process's shard of the test set, in order, each image exactly once."""
    sampler = InferenceSampler(len(dataset), rank, world_size)  # type: ignore[arg-type]
    return DataLoader(
        dataset,
        batch_sampler=BatchSampler(sampler, images_per_batch, drop_last=False),  # type: ignore[arg-type]
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )
