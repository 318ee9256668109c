"""Device-side batch augmentation against a plain per-image reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batchscope.workloads.augment import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    Normaliser,
    augmented_batch,
    crop_flip,
    draw_crop_flip,
)


def _images(count: int = 16, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 32, 32, 3), dtype=torch.uint8, generator=generator)


def _reference_crop_flip(image: np.ndarray, top: int, left: int, flip: int) -> np.ndarray:
    padded = np.zeros((40, 40, 3), dtype=np.uint8)
    padded[4:36, 4:36] = image
    crop = padded[top : top + 32, left : left + 32]
    return crop[:, ::-1] if flip else crop


def test_crop_flip_matches_the_per_image_reference():
    images = _images(64)
    draws = draw_crop_flip(64, torch.Generator().manual_seed(1))
    out = crop_flip(images, draws)
    assert out.shape == images.shape and out.dtype == torch.uint8
    for i in range(64):
        top, left, flip = draws[:, i].tolist()
        assert np.array_equal(
            out[i].numpy(), _reference_crop_flip(images[i].numpy(), top, left, flip)
        )


def test_draws_cover_every_offset_and_both_flips():
    draws = draw_crop_flip(4000, torch.Generator().manual_seed(2))
    assert set(draws[0].tolist()) == set(range(9)) == set(draws[1].tolist())
    assert set(draws[2].tolist()) == {0, 1}
    assert 0.45 < draws[2].float().mean().item() < 0.55


def test_extreme_offsets_bring_in_zero_padding():
    images = torch.full((2, 32, 32, 3), 200, dtype=torch.uint8)
    draws = torch.tensor([[0, 8], [0, 8], [0, 0]])
    out = crop_flip(images, draws)
    assert out[0, :4].eq(0).all() and out[0, :, :4].eq(0).all() and out[0, 4:, 4:].eq(200).all()
    assert out[1, -4:].eq(0).all() and out[1, :, -4:].eq(0).all() and out[1, :28, :28].eq(200).all()


def test_normaliser_values_layout_and_inverse():
    images = _images(4)
    out = Normaliser()(images)
    assert out.shape == (4, 3, 32, 32) and out.dtype == torch.float32 and out.is_contiguous()
    expected = (
        images.permute(0, 3, 1, 2).float() / 255 - torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    ) / torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(out, expected)
    assert torch.equal(Normaliser().invert(out), images)
    channels_last = Normaliser(channels_last=True)(images)
    assert channels_last.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(channels_last, out)


def test_augmented_batch_keeps_labels_with_their_images():
    images = _images(32)
    labels = torch.arange(32) * 10
    indices = torch.tensor([5, 3, 31, 0, 5])
    batch, batch_labels = augmented_batch(
        images, labels, indices, torch.Generator().manual_seed(0), Normaliser()
    )
    assert batch_labels.tolist() == [50, 30, 310, 0, 50]
    # Replaying the same generator gives the draws that were used.
    generator = torch.Generator().manual_seed(0)
    draws = draw_crop_flip(5, generator)
    pixels = Normaliser().invert(batch)
    for row, index in enumerate(indices.tolist()):
        top, left, flip = draws[:, row].tolist()
        assert np.array_equal(
            pixels[row].numpy(), _reference_crop_flip(images[index].numpy(), top, left, flip)
        )


def test_same_generator_seed_same_batch():
    images, labels = _images(32), torch.arange(32)
    indices = torch.arange(16)

    def batch(seed: int) -> torch.Tensor:
        return augmented_batch(
            images, labels, indices, torch.Generator().manual_seed(seed), Normaliser()
        )[0]

    assert torch.equal(batch(7), batch(7))
    assert not torch.equal(batch(7), batch(8))


def test_unaugmented_batch_is_only_normalised():
    images, labels = _images(8), torch.arange(8)
    batch, _ = augmented_batch(
        images, labels, torch.arange(8), torch.Generator(), Normaliser(), augment=False
    )
    assert torch.equal(Normaliser().invert(batch), images)


@pytest.mark.parametrize("size", [1, 7])
def test_any_batch_size(size):
    out = crop_flip(_images(size), draw_crop_flip(size, torch.Generator().manual_seed(0)))
    assert out.shape == (size, 32, 32, 3)
