"""One workload's view of CIFAR-10: which examples it uses, on the CPU and on each device.

Nothing is decoded or copied until first use, so building a workload (and describing it) is
cheap. The decoded arrays are shared per process (`cifar10_data.load_cifar10`); each device gets
one uint8 copy of the split, made the first time a batch is asked for on it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from batchscope.checks import require_int
from batchscope.errors import UsageError
from batchscope.workloads.cifar10_data import load_cifar10

FULL_TRAIN_SIZE = 50_000
FULL_TEST_SIZE = 10_000
# The subset drawn for train_size/test_size is fixed, so every run of a workload sees the
# same examples; it does not depend on any RNG the user controls.
_SUBSET_SEED = 0


def balanced_subset(labels: np.ndarray, size: int, seed: int = _SUBSET_SEED) -> np.ndarray:
    """`size` indices (ascending) with the classes as equally represented as possible.

    Within each class the order is a fixed random permutation; classes are then interleaved
    round-robin (first of every class, then second of every class...) and the first `size`
    taken, so any prefix is class-balanced to within one example."""
    order = np.random.default_rng(seed).permutation(len(labels))
    permuted_labels = labels[order]
    rank_in_class = np.empty(len(order), dtype=np.int64)
    for label in np.unique(permuted_labels):
        members = np.flatnonzero(permuted_labels == label)
        rank_in_class[members] = np.arange(len(members))
    round_robin = np.lexsort((permuted_labels, rank_in_class))
    return np.sort(order[round_robin[:size]])


class CifarSource:
    """The training and test examples of one workload, loaded and uploaded lazily."""

    def __init__(self, archive: Path, train_size: int | None, test_size: int | None) -> None:
        self.archive = archive
        self.train_size = train_size if train_size is not None else FULL_TRAIN_SIZE
        self.test_size = test_size if test_size is not None else FULL_TEST_SIZE
        self._host: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._device: dict[tuple[str, torch.device], tuple[Tensor, Tensor]] = {}

    def host(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(images uint8 NHWC, labels int64) of `split` ("train" or "test") as numpy arrays."""
        if split not in self._host:
            arrays = load_cifar10(self.archive)
            images = getattr(arrays, f"{split}_images")
            labels = getattr(arrays, f"{split}_labels")
            wanted = self.train_size if split == "train" else self.test_size
            if wanted > len(labels):
                raise UsageError(
                    f"{split}_size={wanted} exceeds the {len(labels)} {split} images in "
                    f"{self.archive}; use {split}_size={len(labels)} or less"
                )
            if wanted < len(labels):
                chosen = balanced_subset(labels, wanted)
                images, labels = images[chosen], labels[chosen]
            self._host[split] = (images, labels)
        return self._host[split]

    def on(self, split: str, device: torch.device) -> tuple[Tensor, Tensor]:
        """The split as device tensors (uint8 NHWC images, int64 labels), uploaded once."""
        key = (split, torch.device(device))
        if key not in self._device:
            # "cuda" and "cuda:0" name the same memory: upload once per physical device.
            canonical = (split, torch.empty(0, device=key[1]).device)
            if canonical not in self._device:
                images, labels = self.host(split)
                # torch.tensor copies: the shared arrays are read-only and must stay untouched.
                self._device[canonical] = (
                    torch.tensor(images, device=canonical[1]),
                    torch.tensor(labels, device=canonical[1]),
                )
            self._device[key] = self._device[canonical]
        return self._device[key]


def sample_indices(dataset_size: int, batch_size: int, generator: torch.Generator) -> Tensor:
    """Indices of one batch, drawn without replacement.

    A batch larger than the dataset cannot occur in real training (an epoch would hold no full
    batch). It is still served, for memory and throughput probes that need the shape, by
    concatenating independent permutations: every example then appears floor or ceil of
    batch / dataset times."""
    batch_size = require_int("batch_size", batch_size)
    permutations = math.ceil(batch_size / dataset_size)
    drawn = [
        torch.randperm(dataset_size, generator=generator, device=generator.device)
        for _ in range(permutations)
    ]
    return torch.cat(drawn)[:batch_size] if permutations > 1 else drawn[0][:batch_size]
