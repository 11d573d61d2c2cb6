"""Balanced sampling (subsample_labels, and sample_slots: the same draw as slot indices) and
the per-image slot filling after a batch-wide NMS (scatter_top_per_image): counts, subsets,
independence of rows, hand-computed placements."""

from __future__ import annotations

import pytest
import torch

from frcnn.modeling.sampling import (
    sample_slots,
    subsample_labels,
    subsample_labels_and_positives,
)
from frcnn.modeling.topk_per_image import scatter_top_per_image


def _masks(kinds: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of 'p' (positive), 'n' (negative), '.' (neither) -> two (N, R) masks."""
    positive = torch.tensor([[c == "p" for c in row] for row in kinds])
    negative = torch.tensor([[c == "n" for c in row] for row in kinds])
    return positive, negative


ROWS = [
    "pppppppppp" + "nnnnnnnnnn" + "....",  # more positives than the quota
    "pp........" + "nnnnnnnnnn" + "nnnn",  # few positives: negatives fill the rest
    "pp........" + "nnn......." + "....",  # too few negatives too: fewer than the batch
    "..........." + "nnnnnnnnnnnnn",  # no positives
    "pppppppppppppppppppppppp",  # no negatives
    "........................",  # nothing usable
]


@pytest.mark.parametrize("batch_size, fraction", [(8, 0.5), (10, 0.25), (30, 0.5), (5, 0.5)])
def test_counts_subsets_and_disjointness(batch_size, fraction):
    positive, negative = _masks(ROWS)
    generator = torch.Generator().manual_seed(0)
    chosen_pos, chosen_neg = subsample_labels(positive, negative, batch_size, fraction, generator)
    quota = int(batch_size * fraction)
    for row in range(len(ROWS)):
        num_pos_available = int(positive[row].sum())
        num_neg_available = int(negative[row].sum())
        expected_pos = min(num_pos_available, quota)
        expected_neg = min(batch_size - expected_pos, num_neg_available)
        assert int(chosen_pos[row].sum()) == expected_pos, row
        assert int(chosen_neg[row].sum()) == expected_neg, row
    assert not (chosen_pos & ~positive).any()
    assert not (chosen_neg & ~negative).any()
    assert not (chosen_pos & chosen_neg).any()


@pytest.mark.parametrize("batch_size, fraction", [(8, 0.5), (30, 0.5), (8, 0.0)])
def test_positive_slots_hold_the_chosen_positives_first(batch_size, fraction):
    positive, negative = _masks(ROWS)
    chosen_pos, chosen_neg = subsample_labels(
        positive, negative, batch_size, fraction, torch.Generator().manual_seed(4)
    )
    *masks, index, taken = subsample_labels_and_positives(
        positive, negative, batch_size, fraction, torch.Generator().manual_seed(4)
    )
    assert torch.equal(masks[0], chosen_pos) and torch.equal(masks[1], chosen_neg)
    assert index.shape == taken.shape == (len(ROWS), min(int(batch_size * fraction), 24))
    for row in range(len(ROWS)):
        count = int(chosen_pos[row].sum())
        assert taken[row].tolist() == [True] * count + [False] * (index.shape[1] - count)
        assert set(index[row, :count].tolist()) == set(chosen_pos[row].nonzero()[:, 0].tolist())
        assert len(set(index[row].tolist())) == index.shape[1]  # distinct slots
        assert not chosen_pos[row, index[row, count:]].any()


def test_hand_counts_of_a_256_batch():
    # 300 positives, 5000 negatives, 100 ignored: 128 positives, 128 negatives
    positive = torch.zeros(1, 5400, dtype=torch.bool)
    negative = torch.zeros(1, 5400, dtype=torch.bool)
    positive[0, :300] = True
    negative[0, 300:5300] = True
    chosen_pos, chosen_neg = subsample_labels(positive, negative, 256, 0.5)
    assert int(chosen_pos.sum()) == 128
    assert int(chosen_neg.sum()) == 128


def test_each_row_counts_only_its_own_candidates():
    # the same row gets the same counts whatever the rows beside it hold
    positive, negative = _masks(ROWS)
    for row in range(len(ROWS)):
        alone = subsample_labels(positive[row : row + 1], negative[row : row + 1], 8, 0.5)
        batched = subsample_labels(positive, negative, 8, 0.5)
        assert int(alone[0].sum()) == int(batched[0][row].sum())
        assert int(alone[1].sum()) == int(batched[1][row].sum())


def test_sampling_is_uniform_among_candidates():
    # 4000 independent rows of 4 positives / 6 negatives, quota 2 + 3: every positive is chosen
    # with probability 1/2 and every negative with probability 1/2
    positive, negative = _masks(["ppppnnnnnn"] * 4000)
    generator = torch.Generator().manual_seed(0)
    chosen_pos, chosen_neg = subsample_labels(positive, negative, 5, 0.4, generator)
    frequency = (chosen_pos | chosen_neg).float().mean(dim=0)
    torch.testing.assert_close(frequency, torch.full((10,), 0.5), atol=0.04, rtol=0)
    # rows are independent draws, not one draw repeated
    assert len({tuple(row.tolist()) for row in chosen_pos[:50]}) > 1


def test_generator_makes_sampling_reproducible():
    positive, negative = _masks(ROWS)
    first = subsample_labels(positive, negative, 8, 0.5, torch.Generator().manual_seed(3))
    again = subsample_labels(positive, negative, 8, 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@pytest.mark.parametrize("batch_size, fraction", [(8, 0.5), (10, 0.25), (30, 0.5), (5, 0.5)])
def test_slots_hold_the_same_draw_as_the_masks(batch_size, fraction):
    """sample_slots takes the candidates subsample_labels marks (same generator state), puts
    each row's positives first and its negatives next, each in candidate order, and fills the
    rest with unchosen ones."""
    positive, negative = _masks(ROWS)
    chosen_pos, chosen_neg = subsample_labels(
        positive, negative, batch_size, fraction, torch.Generator().manual_seed(1)
    )
    index, is_pos, is_neg = sample_slots(
        positive, negative, batch_size, fraction, torch.Generator().manual_seed(1)
    )
    num_slots = min(batch_size, len(ROWS[0]))
    assert index.shape == is_pos.shape == is_neg.shape == (len(ROWS), num_slots)
    for row in range(len(ROWS)):
        num_pos, num_neg = int(chosen_pos[row].sum()), int(chosen_neg[row].sum())
        assert is_pos[row].tolist() == [True] * num_pos + [False] * (num_slots - num_pos)
        expected_neg = [False] * num_pos + [True] * num_neg
        assert is_neg[row].tolist() == expected_neg + [False] * (num_slots - len(expected_neg))
        slots = index[row].tolist()
        assert len(set(slots)) == num_slots  # no candidate twice
        # the same candidates, each kind in candidate order
        assert slots[:num_pos] == torch.nonzero(chosen_pos[row]).flatten().tolist()
        taken_neg = slots[num_pos : num_pos + num_neg]
        assert taken_neg == torch.nonzero(chosen_neg[row]).flatten().tolist()
        for candidate in slots[num_pos + num_neg :]:  # fillers: never a chosen candidate
            assert not chosen_pos[row, candidate] and not chosen_neg[row, candidate]


def test_scatter_top_per_image_hand_case():
    # entries of images 0 and 1 interleaved; 2 (= num_images) marks entries not to keep
    image_of_kept = torch.tensor([1, 0, 2, 1, 0, 2, 1, 1, 0])
    scores = torch.tensor([0.9, 0.8, 0.75, 0.7, 0.6, 0.55, 0.5, 0.4, 0.3])
    boxes = torch.arange(9 * 4, dtype=torch.float32).reshape(9, 4)
    filled, (placed_scores, placed_boxes) = scatter_top_per_image(
        image_of_kept, 2, 2, scores, boxes
    )
    assert filled.tolist() == [[True, True], [True, True]]
    # k = 2 cuts image 0 after entries 1, 4 and image 1 after entries 0, 3
    assert torch.equal(placed_scores, scores[torch.tensor([[1, 4], [0, 3]])])
    assert torch.equal(placed_boxes, torch.stack([boxes[[1, 4]], boxes[[0, 3]]]))


def test_scatter_top_per_image_leaves_empty_slots_zero():
    image_of_kept = torch.tensor([2, 0, 2, 0, 2])  # image 1 keeps nothing, image 2 exists
    values = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    labels = torch.tensor([7, 8, 9, 10, 11])
    filled, (placed, placed_labels) = scatter_top_per_image(image_of_kept, 3, 3, values, labels)
    assert filled.tolist() == [[True, True, False], [False, False, False], [True, True, True]]
    assert placed.tolist() == [[4.0, 2.0, 0.0], [0.0, 0.0, 0.0], [5.0, 3.0, 1.0]]
    assert placed_labels.dtype == torch.int64
    assert placed_labels.tolist() == [[8, 10, 0], [0, 0, 0], [7, 9, 11]]


def test_scatter_top_per_image_with_nothing_kept():
    filled, (placed,) = scatter_top_per_image(
        torch.zeros(0, dtype=torch.int64), 2, 4, torch.zeros(0, 4)
    )
    assert filled.shape == (2, 4) and not filled.any()
    assert placed.shape == (2, 4, 4) and not placed.any()
