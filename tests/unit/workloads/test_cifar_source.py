"""Index sampling and the fixed class-balanced subsets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batchscope.errors import UsageError
from batchscope.workloads.cifar_source import balanced_subset, sample_indices


def test_batches_within_the_dataset_have_no_repeats():
    generator = torch.Generator().manual_seed(0)
    indices = sample_indices(100, 100, generator)
    assert sorted(indices.tolist()) == list(range(100))
    assert len(set(sample_indices(1000, 64, generator).tolist())) == 64


def test_batches_beyond_the_dataset_repeat_each_example_evenly():
    counts = np.bincount(
        sample_indices(10, 25, torch.Generator().manual_seed(1)).numpy(), minlength=10
    )
    assert counts.sum() == 25 and counts.min() >= 2 and counts.max() <= 3


def test_sampling_follows_the_generator_only():
    first = sample_indices(500, 32, torch.Generator().manual_seed(3))
    torch.manual_seed(123)  # the global RNG must not matter
    assert torch.equal(first, sample_indices(500, 32, torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "8"])
def test_bad_batch_size(bad):
    with pytest.raises(UsageError, match="batch_size"):
        sample_indices(10, bad, torch.Generator())


def test_balanced_subset_is_balanced_sorted_and_fixed():
    labels = np.repeat(np.arange(10), 100)  # sorted by class, like the archive
    subset = balanced_subset(labels, 250)
    assert len(set(subset.tolist())) == 250 and np.all(np.diff(subset) > 0)
    counts = np.bincount(labels[subset], minlength=10)
    assert counts.tolist() == [25] * 10
    assert np.array_equal(subset, balanced_subset(labels, 250))
    assert np.bincount(labels[balanced_subset(labels, 13)], minlength=10).max() == 2


def test_balanced_subset_with_uneven_classes():
    labels = np.array([0] * 3 + [1] * 50)
    counts = np.bincount(labels[balanced_subset(labels, 20)])
    assert counts.tolist() == [3, 17]  # the small class is used up, the rest fills in
