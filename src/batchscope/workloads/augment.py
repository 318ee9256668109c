"""CIFAR augmentation on whole batches, on the device that trains.

The standard CIFAR recipe (zero-pad 4 pixels, random 32x32 crop, random horizontal flip,
per-channel normalisation) done per sample in Python on the CPU is what usually caps GPU
throughput for small images. Here the dataset stays on the device as uint8 NHWC, a batch is one
gather, and the crop and flip are one more gather with per-sample offsets: no Python loop over
samples. Random draws come from the caller's generator (usually a CPU generator, so runs are
reproducible whatever the device); they are drawn there and moved in a single copy.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Per-channel statistics of the CIFAR-10 training set (RGB, pixel values scaled to [0, 1]).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
PADDING = 4


def draw_crop_flip(batch_size: int, generator: torch.Generator, padding: int = PADDING) -> Tensor:
    """Per-sample (row offset, column offset, flip) as a (3, batch) int64 tensor on the
    generator's device; offsets are in [0, 2 * padding] in padded coordinates."""
    offsets = torch.randint(
        0, 2 * padding + 1, (2, batch_size), generator=generator, device=generator.device
    )
    flips = torch.randint(0, 2, (1, batch_size), generator=generator, device=generator.device)
    return torch.cat([offsets, flips])


def crop_flip(images: Tensor, draws: Tensor, padding: int = PADDING) -> Tensor:
    """Zero-pad `images` (B, H, W, C) by `padding`, take the crop at each sample's offsets and
    mirror it left-right where its flip is 1. Same shape and dtype out."""
    batch, height, width, channels = images.shape
    padded_height, padded_width = height + 2 * padding, width + 2 * padding
    padded = images.new_zeros((batch, padded_height, padded_width, channels))
    padded[:, padding : padding + height, padding : padding + width] = images
    row_offset, col_offset, flip = draws.to(images.device)
    rows = row_offset[:, None] + torch.arange(height, device=images.device)
    columns = torch.arange(width, device=images.device)
    # A flipped crop reads its columns right to left: column j comes from width - 1 - j.
    columns = torch.where(flip[:, None].bool(), width - 1 - columns, columns) + col_offset[:, None]
    # One flat pixel index per output pixel and a single index_select: several times faster
    # than advanced indexing with three broadcast index tensors (measured on CPU).
    sample_start = torch.arange(batch, device=images.device)[:, None, None] * padded_height
    pixel = (sample_start + rows[:, :, None]) * padded_width + columns[:, None, :]
    flat = padded.view(-1, channels).index_select(0, pixel.view(-1))
    return flat.view(batch, height, width, channels)


class Normaliser:
    """uint8 NHWC -> normalised float32 NCHW, keeping per-device constants."""

    def __init__(
        self,
        mean: tuple[float, ...] = CIFAR10_MEAN,
        std: tuple[float, ...] = CIFAR10_STD,
        channels_last: bool = False,
    ) -> None:
        self.mean = mean
        self.std = std
        self.channels_last = channels_last
        self._constants: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def __call__(self, images: Tensor) -> Tensor:
        scale, shift = self._constants_on(images.device)
        # Permuting NHWC gives an NCHW view whose strides already are channels_last; keep that
        # when the model runs channels_last, otherwise make it the default contiguous layout.
        nchw = images.permute(0, 3, 1, 2)
        if not self.channels_last:
            nchw = nchw.contiguous()
        return nchw.float().mul_(scale).add_(shift)

    def invert(self, normalised: Tensor) -> Tensor:
        """Back to uint8 NHWC (rounded): for tests and for looking at batches."""
        scale, shift = self._constants_on(normalised.device)
        pixels = ((normalised - shift) / scale).round().clamp(0, 255)
        return pixels.to(torch.uint8).permute(0, 2, 3, 1).contiguous()

    def _constants_on(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if device not in self._constants:
            std = torch.tensor(self.std, dtype=torch.float32)
            mean = torch.tensor(self.mean, dtype=torch.float32)
            # (x / 255 - mean) / std == x * scale + shift with the values below.
            scale = (1.0 / (255.0 * std)).view(1, -1, 1, 1)
            shift = (-mean / std).view(1, -1, 1, 1)
            self._constants[device] = (scale.to(device), shift.to(device))
        return self._constants[device]


def augmented_batch(
    images: Tensor,
    labels: Tensor,
    indices: Tensor,
    generator: torch.Generator,
    normalise: Normaliser,
    augment: bool = True,
) -> tuple[Tensor, Tensor]:
    """Examples `indices` of the device-resident uint8 dataset, cropped, flipped and
    normalised, with their labels (indexed by the same tensor, so they stay aligned)."""
    batch_size = indices.numel()
    if augment:
        draws = draw_crop_flip(batch_size, generator)
        # One host-to-device copy carries the indices and all per-sample draws.
        packed = torch.cat([indices.view(1, -1).to(draws.device), draws]).to(images.device)
        device_indices, draws = packed[0], packed[1:]
    else:
        device_indices = indices.to(images.device)
    batch = images[device_indices]
    if augment:
        batch = crop_flip(batch, draws)
    return normalise(batch), labels[device_indices]
