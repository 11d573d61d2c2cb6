"""Samplers and loaders: deterministic order, disjoint shards, exact resume, and batches that do
not depend on the number of workers."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils.data import Dataset

from frcnn.datasets import (
    Batch,
    COCODataset,
    InferenceSampler,
    ShapesLayout,
    TrainingSampler,
    build_test_loader,
    build_train_loader,
    build_transforms,
)
from frcnn.datasets.common import DatasetItem

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")


def _take(sampler: TrainingSampler, count: int, start: int = 0) -> list:
    return list(itertools.islice(sampler, start, start + count))


def test_training_sampler_is_deterministic() -> None:
    first = _take(TrainingSampler(10, 3, seed=4), 12)
    assert first == _take(TrainingSampler(10, 3, seed=4), 12)
    assert first != _take(TrainingSampler(10, 3, seed=5), 12)
    assert all(len(batch) == 3 for batch in first)


def test_each_epoch_is_a_permutation_and_shards_are_disjoint() -> None:
    single = [key for batch in _take(TrainingSampler(10, 1, seed=1), 20) for key in batch]
    assert sorted(i for i, _ in single[:10]) == list(range(10))
    assert sorted(i for i, _ in single[10:]) == list(range(10))
    assert [i for i, _ in single[:10]] != [i for i, _ in single[10:]]  # reshuffled
    shards = [
        [
            key
            for batch in _take(TrainingSampler(10, 1, seed=1, rank=r, world_size=2), 5)
            for key in batch
        ]
        for r in range(2)
    ]
    assert set(shards[0]).isdisjoint(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(single[:10])  # same images, same seeds


def test_aspect_ratio_grouping_makes_homogeneous_batches() -> None:
    groups = [0, 1, 1, 0, 0, 1, 0, 1, 1, 1, 0]
    batches = _take(TrainingSampler(11, 3, seed=2, group_ids=groups), 20)
    for batch in batches:
        assert len(batch) == 3 and len({groups[i] for i, _ in batch}) == 1
    assert {groups[batch[0][0]] for batch in batches} == {0, 1}


@pytest.mark.parametrize("groups", [None, [0, 1, 1, 0, 0, 1, 0, 1, 1, 1, 0]])
def test_start_iter_gives_the_tail_of_the_stream(groups: list[int] | None) -> None:
    full = TrainingSampler(11, 3, seed=7, rank=1, world_size=2, group_ids=groups)
    resumed = TrainingSampler(11, 3, seed=7, rank=1, world_size=2, group_ids=groups, start_iter=9)
    assert _take(resumed, 6) == _take(full, 6, start=9)


def test_inference_sampler_splits_without_duplicates() -> None:
    shards = [list(InferenceSampler(10, rank, 3)) for rank in range(3)]
    assert shards == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert [len(InferenceSampler(2, rank, 3)) for rank in range(3)] == [0, 1, 1]


def _train_dataset(shapes: ShapesLayout) -> COCODataset:
    transforms = build_transforms([48, 64, 80], 160, 0.5, is_train=True)
    return COCODataset(shapes.coco_images("train"), shapes.coco_annotations("train"), transforms)


def _batches(loader, count: int) -> list[Batch]:
    return list(itertools.islice(iter(loader), count))


def _same(a: list[Batch], b: list[Batch]) -> bool:
    return all(
        x.infos == y.infos
        and all(torch.equal(i, j) for i, j in zip(x.images, y.images))
        and all(torch.equal(s.boxes, t.boxes) for s, t in zip(x.targets, y.targets))
        for x, y in zip(a, b)
    )


def test_loader_batches_do_not_depend_on_workers(shapes: ShapesLayout) -> None:
    dataset = _train_dataset(shapes)
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    serial = _batches(build_train_loader(dataset, 3, seed=11, num_workers=0), 4)
    # The per-sample seeding leaves the caller's RNG where it was.
    assert torch.equal(torch.rand(3), expected_draw)
    parallel = _batches(build_train_loader(dataset, 3, seed=11, num_workers=2), 4)
    assert _same(serial, parallel)
    sizes = {info.image_size for batch in serial for info in batch.infos}
    assert len(sizes) > 1  # the augmentation really varies
    other = _batches(build_train_loader(dataset, 3, seed=12, num_workers=0), 4)
    assert not _same(serial, other)


class _Counting(Dataset):
    def __init__(self, dataset: COCODataset) -> None:
        self.dataset = dataset
        self.calls = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> DatasetItem:
        self.calls += 1
        return self.dataset[index]

    def image_aspect_ratios(self) -> list[float]:
        return self.dataset.image_aspect_ratios()


def test_resume_skips_without_decoding(shapes: ShapesLayout) -> None:
    dataset = _train_dataset(shapes)
    uninterrupted = _batches(build_train_loader(dataset, 2, seed=5, num_workers=0), 7)
    counting = _Counting(dataset)
    resumed = _batches(build_train_loader(counting, 2, seed=5, num_workers=0, start_iter=6), 1)
    assert counting.calls == 2
    assert _same(resumed, uninterrupted[6:])


def test_test_loader_covers_each_image_once(shapes: ShapesLayout) -> None:
    dataset = COCODataset(shapes.coco_images("val"), shapes.coco_annotations("val"))
    seen = []
    for rank in range(2):
        for batch in build_test_loader(dataset, 2, rank=rank, world_size=2, num_workers=0):
            assert isinstance(batch, Batch) and len(batch) <= 2
            seen += [info.image_id for info in batch.infos]
    assert seen == dataset.image_ids
    batch = next(iter(build_test_loader(dataset, 2, num_workers=0))).to("cpu")
    assert batch.images[0].dtype == torch.uint8 and batch.targets[0].boxes.dtype == torch.float32
