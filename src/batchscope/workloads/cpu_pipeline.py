"""The input pipeline most CIFAR training scripts use: a `Dataset` that augments one sample at a
time on the CPU, batched by a `DataLoader`, then copied to the device.

The throughput probe runs it next to the device-side `make_batch` to show how much of the step
time a per-sample CPU pipeline costs (the usual bottleneck for 32x32 images on a GPU).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, get_worker_info

from batchscope.errors import UsageError
from batchscope.workloads.augment import CIFAR10_MEAN, CIFAR10_STD, PADDING


class AugmentedCifar(Dataset):
    """Per-sample pad-crop-flip-normalise over uint8 HWC images, like torchvision's
    `RandomCrop(32, padding=4)`, `RandomHorizontalFlip`, `ToTensor`, `Normalize`."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, seed: int = 0) -> None:
        self.images = images
        self.labels = labels
        self.seed = seed
        self._rng: np.random.Generator | None = None
        self._mean = torch.tensor(CIFAR10_MEAN).view(3, 1, 1)
        self._std = torch.tensor(CIFAR10_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        rng = self._generator()
        height, width, channels = self.images.shape[1:]
        padded = np.zeros((height + 2 * PADDING, width + 2 * PADDING, channels), dtype=np.uint8)
        padded[PADDING : PADDING + height, PADDING : PADDING + width] = self.images[index]
        top, left = rng.integers(0, 2 * PADDING + 1, size=2)
        crop = padded[top : top + height, left : left + width]
        if rng.integers(0, 2):
            crop = crop[:, ::-1]
        image = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1).float().div_(255)
        return (image - self._mean) / self._std, int(self.labels[index])

    def _generator(self) -> np.random.Generator:
        # Built lazily inside each worker process: a generator created in the parent would be
        # copied into every worker, which would then all draw the same augmentations.
        if self._rng is None:
            worker = get_worker_info()
            stream = 0 if worker is None else worker.id + 1
            self._rng = np.random.default_rng([self.seed, stream])
        return self._rng


def per_sample_loader(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    device: torch.device,
    num_workers: int = 0,
    channels_last: bool = False,
    seed: int = 0,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless stream of augmented batches (reshuffled every epoch, last partial batch dropped);
    take as many as needed with `itertools.islice` or `next`."""
    if batch_size > len(labels):
        # drop_last would yield no batch at all and the endless loop below would spin forever.
        raise UsageError(
            f"batch_size={batch_size} exceeds the {len(labels)} training examples the data "
            f"loader holds; use a batch of at most {len(labels)} or a larger train_size"
        )
    dataset = AugmentedCifar(images, labels, seed)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=num_workers > 0,
    )
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return _endless(loader, device, memory_format)


def _endless(
    loader: DataLoader, device: torch.device, memory_format: torch.memory_format
) -> Iterator[tuple[Tensor, Tensor]]:
    for _ in itertools.count():
        for batch_images, batch_labels in loader:
            yield (
                batch_images.to(device, non_blocking=True, memory_format=memory_format),
                batch_labels.to(device, non_blocking=True),
            )
