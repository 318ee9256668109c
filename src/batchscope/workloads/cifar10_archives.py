"""Decoding the two CIFAR-10 archive formats batchscope reads into uint8 arrays.

- The JPEG archive (`cifar10-jpg.tar.xz`): `[prefix/]{train,test}/<class>/<name>.jpg`.
- The official binary archive (`cifar-10-binary.tar.gz`): fixed 3073-byte records (one label
  byte, then 1024 red, 1024 green, 1024 blue bytes, each plane row-major).

The official *python* archive is deliberately not supported: it holds pickled batches and
batchscope never unpickles anything read from disk.
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from batchscope.errors import UsageError

CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
IMAGE_SHAPE = (32, 32, 3)
_RECORD_BYTES = 1 + 32 * 32 * 3
_BINARY_TRAIN_MEMBERS = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
_BINARY_TEST_MEMBER = "test_batch.bin"
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class CifarArrays:
    """Decoded CIFAR-10: images uint8 (N, 32, 32, 3) RGB, labels int64 (N,) in 0..9."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray

    def as_dict(self) -> dict[str, np.ndarray]:
        return {
            "train_images": self.train_images,
            "train_labels": self.train_labels,
            "test_images": self.test_images,
            "test_labels": self.test_labels,
        }

    @classmethod
    def from_dict(cls, arrays: dict[str, np.ndarray], source: str) -> CifarArrays:
        """Validated construction (shapes, dtypes, label range); `source` names the origin in
        the error message."""
        try:
            result = cls(**{key: arrays[key] for key in cls.__dataclass_fields__})
        except KeyError as missing:
            raise ValueError(f"{source}: missing array {missing}") from None
        result.validate(source)
        return result

    def validate(self, source: str) -> None:
        for split in ("train", "test"):
            images = getattr(self, f"{split}_images")
            labels = getattr(self, f"{split}_labels")
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
                raise ValueError(
                    f"{source}: {split} images have shape {images.shape} dtype {images.dtype}, "
                    f"expected (N, 32, 32, 3) uint8"
                )
            if labels.dtype != np.int64 or labels.shape != (images.shape[0],):
                raise ValueError(
                    f"{source}: {split} labels have shape {labels.shape} dtype {labels.dtype}, "
                    f"expected ({images.shape[0]},) int64"
                )
            if labels.size and (labels.min() < 0 or labels.max() >= len(CLASSES)):
                raise ValueError(f"{source}: {split} labels outside 0..{len(CLASSES) - 1}")


def decode_archive(path: Path) -> CifarArrays:
    """Decode either supported archive, recognised by its content, in one pass over the tar."""
    images: dict[str, list[tuple[int, str, bytes]]] = {"train": [], "test": []}
    binary: dict[str, bytes] = {}
    wanted_binary = set(_BINARY_TRAIN_MEMBERS) | {_BINARY_TEST_MEMBER}
    with _open_tar(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            located = _locate_image(member)
            base_name = PurePosixPath(member.name).name
            if located is None and base_name not in wanted_binary:
                continue
            data = tar.extractfile(member)
            if data is None:
                continue
            if located is not None:
                split, label, name = located
                images[split].append((label, name, data.read()))
            else:
                binary[base_name] = data.read()
    if binary:
        return _decode_binary_members(binary, path)
    if images["train"] or images["test"]:
        return CifarArrays(
            *_decode_images(images["train"], "train", path),
            *_decode_images(images["test"], "test", path),
        )
    raise UsageError(
        f"{path} holds neither train/<class>/*.jpg images nor data_batch_*.bin records; point "
        f"data_path at cifar10-jpg.tar.xz or the official cifar-10-binary.tar.gz"
    )


def _decode_images(
    items: list[tuple[int, str, bytes]], split: str, path: Path
) -> tuple[np.ndarray, np.ndarray]:
    """JPEG bytes -> (images, labels), sorted by (class, file name) so the arrays are identical
    on every machine whatever the order inside the tar."""
    from PIL import Image  # Pillow is only needed on the one-time decode

    if not items:
        raise UsageError(
            f"{path} holds no {split}/<class>/*.jpg images; a CIFAR-10 JPEG archive needs "
            f"train/ and test/ folders named after the 10 classes"
        )
    items = sorted(items, key=lambda item: (item[0], item[1]))
    images = np.empty((len(items), *IMAGE_SHAPE), dtype=np.uint8)
    for index, (label, name, blob) in enumerate(items):
        with Image.open(io.BytesIO(blob)) as image:
            pixels = np.asarray(image.convert("RGB"))
        if pixels.shape != IMAGE_SHAPE:
            raise UsageError(
                f"{path}: image {split}/{CLASSES[label]}/{name} is "
                f"{pixels.shape[1]}x{pixels.shape[0]}, not 32x32"
            )
        images[index] = pixels
    labels = np.fromiter((item[0] for item in items), dtype=np.int64, count=len(items))
    return images, labels


def _decode_binary_members(members: dict[str, bytes], path: Path) -> CifarArrays:
    wanted = set(_BINARY_TRAIN_MEMBERS) | {_BINARY_TEST_MEMBER}
    missing = sorted(wanted - set(members))
    if missing:
        raise UsageError(
            f"{path} lacks {', '.join(missing)}; it is not a complete CIFAR-10 binary archive, "
            f"delete it and download cifar-10-binary.tar.gz again"
        )
    train = [_decode_records(members[name], name) for name in _BINARY_TRAIN_MEMBERS]
    test_images, test_labels = _decode_records(members[_BINARY_TEST_MEMBER], _BINARY_TEST_MEMBER)
    return CifarArrays(
        train_images=np.concatenate([images for images, _ in train]),
        train_labels=np.concatenate([labels for _, labels in train]),
        test_images=test_images,
        test_labels=test_labels,
    )


def encode_binary_records(images: np.ndarray, labels: np.ndarray) -> bytes:
    """The inverse of the binary format (used to build small archives in tests)."""
    planes = np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(len(images), -1)
    records = np.concatenate([labels.astype(np.uint8)[:, None], planes], axis=1)
    return records.tobytes()


def _decode_records(blob: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    if len(blob) % _RECORD_BYTES:
        raise UsageError(
            f"{name} is {len(blob)} bytes, not a multiple of the {_RECORD_BYTES}-byte CIFAR-10 "
            f"record; the archive is damaged, delete it and download again"
        )
    records = np.frombuffer(blob, dtype=np.uint8).reshape(-1, _RECORD_BYTES)
    labels = records[:, 0].astype(np.int64)
    # Stored as three colour planes per image; the arrays are HWC like decoded JPEGs.
    images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _locate_image(member: tarfile.TarInfo) -> tuple[str, int, str] | None:
    parts = PurePosixPath(member.name).parts
    if len(parts) < 3 or not parts[-1].lower().endswith(_IMAGE_SUFFIXES):
        return None
    split, class_name, name = parts[-3:]
    if split not in ("train", "test") or class_name not in CLASSES:
        return None
    return split, CLASSES.index(class_name), name


def _open_tar(path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(path, mode="r:*")
    except (tarfile.TarError, OSError) as exc:
        raise UsageError(
            f"{path} cannot be read as a tar archive ({exc}); delete it or point data_path at "
            f"cifar10-jpg.tar.xz or cifar-10-binary.tar.gz"
        ) from None
