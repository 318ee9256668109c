"""Decoding both archive formats, on small archives built here with known pixels."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from batchscope.errors import UsageError
from batchscope.workloads.cifar10_archives import (
    CLASSES,
    decode_archive,
    encode_binary_records,
)


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")  # lossless, so pixels compare exactly
    return buffer.getvalue()


def _write_tar(path: Path, members: list[tuple[str, bytes]], mode: str) -> Path:
    with tarfile.open(path, mode) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _image(value: int) -> np.ndarray:
    pixels = np.zeros((32, 32, 3), dtype=np.uint8)
    pixels[..., 0] = value
    pixels[0, 0] = (value, 255 - value, 7)
    return pixels


def test_image_archive_is_decoded_in_class_then_name_order(tmp_path):
    # Stored shuffled, under a top-level folder, with a README: none of that may matter.
    members = [
        ("cifar/README.md", b"hello"),
        ("cifar/train/truck/0001.png", _png(_image(91))),
        ("cifar/train/airplane/0001.png", _png(_image(1))),
        ("cifar/train/truck/0000.png", _png(_image(90))),
        ("cifar/train/airplane/0000.png", _png(_image(0))),
        ("cifar/train/cat/0000.png", _png(_image(30))),
        ("cifar/test/dog/0000.png", _png(_image(50))),
        ("cifar/test/airplane/0005.png", _png(_image(5))),
        ("cifar/other/cat/0000.png", _png(_image(200))),  # not a split: ignored
    ]
    arrays = decode_archive(_write_tar(tmp_path / "a.tar.xz", members, "w:xz"))
    assert arrays.train_labels.tolist() == [0, 0, 3, 9, 9]
    assert arrays.train_images[:, 1, 1, 0].tolist() == [0, 1, 30, 90, 91]
    assert arrays.test_labels.tolist() == [0, 5]
    assert np.array_equal(arrays.test_images[1], _image(50))
    assert arrays.train_images.dtype == np.uint8 and arrays.train_labels.dtype == np.int64
    assert CLASSES.index("dog") == 5 and len(CLASSES) == 10


def test_binary_archive_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(6):
        images = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, 3)
        batches.append((images, labels))
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    members = [
        (f"cifar-10-batches-bin/{name}", encode_binary_records(*batch))
        for name, batch in zip(names, batches)
    ]
    members.append(("cifar-10-batches-bin/batches.meta.txt", "\n".join(CLASSES).encode()))
    arrays = decode_archive(_write_tar(tmp_path / "cifar-10-binary.tar.gz", members, "w:gz"))
    assert np.array_equal(arrays.train_images, np.concatenate([b[0] for b in batches[:5]]))
    assert arrays.train_labels.tolist() == np.concatenate([b[1] for b in batches[:5]]).tolist()
    assert np.array_equal(arrays.test_images, batches[5][0])
    assert arrays.test_labels.dtype == np.int64


def test_binary_layout_is_label_then_colour_planes():
    image = np.zeros((1, 32, 32, 3), dtype=np.uint8)
    image[0, 0, 1] = (10, 20, 30)  # row 0, column 1
    record = encode_binary_records(image, np.array([7]))
    assert len(record) == 3073
    assert record[0] == 7
    assert (record[1 + 1], record[1 + 1024 + 1], record[1 + 2048 + 1]) == (10, 20, 30)


def test_incomplete_binary_archive_is_a_usage_error(tmp_path):
    members = [("cifar-10-batches-bin/test_batch.bin", bytes(3073))]
    with pytest.raises(UsageError, match="data_batch_1.bin"):
        decode_archive(_write_tar(tmp_path / "b.tar.gz", members, "w:gz"))


def test_truncated_records_are_a_usage_error(tmp_path):
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    members = [(f"x/{name}", bytes(3073)) for name in names]
    members[0] = ("x/data_batch_1.bin", bytes(3000))
    with pytest.raises(UsageError, match="3073-byte"):
        decode_archive(_write_tar(tmp_path / "b.tar.gz", members, "w:gz"))


def test_archive_without_cifar_content_is_a_usage_error(tmp_path):
    path = _write_tar(tmp_path / "c.tar.xz", [("photos/cat.png", _png(_image(1)))], "w:xz")
    with pytest.raises(UsageError, match="neither"):
        decode_archive(path)


def test_archive_missing_a_split_is_a_usage_error(tmp_path):
    path = _write_tar(tmp_path / "c.tar.xz", [("train/cat/0.png", _png(_image(1)))], "w:xz")
    with pytest.raises(UsageError, match="no test/"):
        decode_archive(path)


def test_wrong_image_size_is_a_usage_error(tmp_path):
    big = np.zeros((64, 64, 3), dtype=np.uint8)
    members = [("train/cat/0.png", _png(big)), ("test/cat/0.png", _png(_image(1)))]
    with pytest.raises(UsageError, match="64x64, not 32x32"):
        decode_archive(_write_tar(tmp_path / "c.tar.xz", members, "w:xz"))


def test_not_a_tar_is_a_usage_error(tmp_path):
    path = tmp_path / "junk.tar.xz"
    path.write_bytes(b"this is not a tar")
    with pytest.raises(UsageError, match="cannot be read as a tar archive"):
        decode_archive(path)
