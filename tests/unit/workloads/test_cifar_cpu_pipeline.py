"""The per-sample CPU input pipeline (what the throughput probe compares make_batch with)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from batchscope.errors import UsageError
from batchscope.workloads.augment import Normaliser
from batchscope.workloads.cpu_pipeline import AugmentedCifar, per_sample_loader


def _data(count: int = 20):
    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, (count, 32, 32, 3), dtype=np.uint8)
    return images, np.arange(count, dtype=np.int64)


def _is_crop_of(sample: np.ndarray, image: np.ndarray) -> bool:
    padded = np.zeros((40, 40, 3), dtype=np.uint8)
    padded[4:36, 4:36] = image
    for top, left in itertools.product(range(9), repeat=2):
        crop = padded[top : top + 32, left : left + 32]
        if np.array_equal(sample, crop) or np.array_equal(sample, crop[:, ::-1]):
            return True
    return False


def test_each_sample_is_a_crop_of_its_own_image():
    images, labels = _data()
    dataset = AugmentedCifar(images, labels, seed=0)
    for index in range(len(dataset)):
        tensor, label = dataset[index]
        assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.float32
        pixels = Normaliser().invert(tensor[None])[0].numpy()
        assert label == index and _is_crop_of(pixels, images[index])


def test_loader_is_endless_and_reshuffles():
    images, labels = _data(20)
    loader = per_sample_loader(images, labels, 8, torch.device("cpu"))
    batches = list(itertools.islice(loader, 6))  # 2 full batches per epoch, 3 epochs
    assert all(b[0].shape == (8, 3, 32, 32) and b[1].shape == (8,) for b in batches)
    first_epoch = torch.cat([b[1] for b in batches[:2]]).tolist()
    assert len(set(first_epoch)) == 16
    assert first_epoch != torch.cat([b[1] for b in batches[2:4]]).tolist()


def test_channels_last_batches():
    images, labels = _data(8)
    batch, _ = next(per_sample_loader(images, labels, 4, torch.device("cpu"), channels_last=True))
    assert batch.is_contiguous(memory_format=torch.channels_last)


def test_batch_larger_than_the_data_is_refused():
    images, labels = _data(5)
    with pytest.raises(UsageError, match="batch_size=6"):
        per_sample_loader(images, labels, 6, torch.device("cpu"))
