"""The decoded-array cache: round trip, atomic writes, no pickles, one decode per process."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from batchscope.atomic import atomic_output
from batchscope.workloads import cifar10_data
from batchscope.workloads.cifar10_archives import CifarArrays
from batchscope.workloads.cifar10_data import cache_file_for, load_cifar10, read_cache, write_cache


def _arrays(train: int = 6, test: int = 4, seed: int = 0) -> CifarArrays:
    rng = np.random.default_rng(seed)
    return CifarArrays(
        train_images=rng.integers(0, 256, (train, 32, 32, 3), dtype=np.uint8),
        train_labels=rng.integers(0, 10, train).astype(np.int64),
        test_images=rng.integers(0, 256, (test, 32, 32, 3), dtype=np.uint8),
        test_labels=rng.integers(0, 10, test).astype(np.int64),
    )


def _equal(a: CifarArrays, b: CifarArrays) -> bool:
    return all(
        np.array_equal(x, y) and x.dtype == y.dtype
        for x, y in zip(a.as_dict().values(), b.as_dict().values())
    )


def test_round_trip(tmp_path):
    arrays = _arrays()
    write_cache(tmp_path / "c.npz", arrays)
    assert _equal(read_cache(tmp_path / "c.npz"), arrays)
    assert [p.name for p in tmp_path.iterdir()] == ["c.npz"]


def test_interrupted_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "c.npz"
    write_cache(target, _arrays(seed=1))
    with pytest.raises(RuntimeError):
        with atomic_output(target, "wb") as handle:
            handle.write(b"half a file")
            raise RuntimeError("crash mid-write")
    assert _equal(read_cache(target), _arrays(seed=1))
    assert [p.name for p in tmp_path.iterdir()] == ["c.npz"]


def test_pickled_content_is_never_loaded(tmp_path):
    target = tmp_path / "c.npz"
    arrays = _arrays().as_dict()
    arrays["train_labels"] = np.array([object()] * 6, dtype=object)  # needs pickle to load
    np.savez(target, **arrays)
    assert read_cache(target) is None


@pytest.mark.parametrize(
    "content", [b"", b"not a zip", b"PK\x03\x04 truncated"], ids=["empty", "garbage", "truncated"]
)
def test_unreadable_cache_means_decode_again(tmp_path, content):
    target = tmp_path / "c.npz"
    target.write_bytes(content)
    assert read_cache(target) is None


def test_wrong_shapes_are_rejected(tmp_path):
    arrays = _arrays().as_dict()
    arrays["test_images"] = arrays["test_images"][:, :16]
    np.savez(tmp_path / "c.npz", **arrays)
    assert read_cache(tmp_path / "c.npz") is None


def test_cache_key_changes_with_size_and_mtime(tmp_path):
    archive = Path("/data/a.tar.xz")
    base = cache_file_for(archive, 10, 1, tmp_path)
    assert cache_file_for(archive, 10, 1, tmp_path) == base
    assert cache_file_for(archive, 11, 1, tmp_path) != base
    assert cache_file_for(archive, 10, 2, tmp_path) != base
    assert cache_file_for(Path("/data/b.tar.xz"), 10, 1, tmp_path) != base


def test_decodes_once_then_reads_memory_then_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("BATCHSCOPE_CACHE_DIR", str(tmp_path / "cache"))
    archive = tmp_path / "a.tar.xz"
    archive.write_bytes(b"x")
    decodes: list[Path] = []

    def fake_decode(path: Path) -> CifarArrays:
        decodes.append(path)
        return _arrays(seed=3)

    monkeypatch.setattr(cifar10_data, "decode_archive", fake_decode)
    cifar10_data.clear_memory_cache()
    try:
        first = load_cifar10(archive)
        assert load_cifar10(archive) is first  # memory
        assert len(decodes) == 1
        assert not first.train_images.flags.writeable  # shared, so read-only
        cifar10_data.clear_memory_cache()
        from_disk = load_cifar10(archive)
        assert len(decodes) == 1 and _equal(from_disk, _arrays(seed=3))
    finally:
        cifar10_data.clear_memory_cache()


def test_unwritable_cache_warns_and_still_returns_data(tmp_path, monkeypatch):
    blocker = tmp_path / "file-not-dir"
    blocker.write_bytes(b"")
    monkeypatch.setenv("BATCHSCOPE_CACHE_DIR", str(blocker / "cache"))
    archive = tmp_path / "a.tar.xz"
    archive.write_bytes(b"x")
    monkeypatch.setattr(cifar10_data, "decode_archive", lambda path: _arrays(seed=4))
    cifar10_data.clear_memory_cache()
    try:
        with pytest.warns(UserWarning, match="BATCHSCOPE_CACHE_DIR"):
            arrays = load_cifar10(archive)
        assert _equal(arrays, _arrays(seed=4))
    finally:
        cifar10_data.clear_memory_cache()


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_the_cache_file_gets_the_usual_permissions(tmp_path):
    # A shared cache directory must hold files others can read (umask 022 -> 0o644), not the
    # 0o600 of a temporary file.
    previous = os.umask(0o022)
    try:
        write_cache(tmp_path / "c.npz", _arrays())
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(tmp_path / "c.npz").st_mode) == 0o644
