"""batchscope.atomic: all-or-nothing writes with the permissions a plain open() would give."""

from __future__ import annotations

import contextlib
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import batchscope.record
from batchscope import atomic
from batchscope.atomic import atomic_output, write_bytes_atomic, write_text_atomic
from batchscope.errors import UsageError

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX permission bits")


@contextlib.contextmanager
def umask(value: int) -> Iterator[None]:
    previous = os.umask(value)
    try:
        yield
    finally:
        os.umask(previous)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@posix_only
@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
@pytest.mark.parametrize("write", [write_text_atomic, write_bytes_atomic], ids=["text", "bytes"])
def test_a_new_file_gets_0666_minus_the_umask(tmp_path, write, mask, expected):
    content = "x" if write is write_text_atomic else b"x"
    with umask(mask):
        path = write(tmp_path / "out.json", content)
    assert mode_of(path) == expected


@posix_only
def test_an_existing_file_keeps_its_mode(tmp_path):
    path = tmp_path / "private.json"
    path.write_text("old")
    os.chmod(path, 0o640)
    with umask(0o022):  # a new file would get 0o644
        write_text_atomic(path, "new")
    assert path.read_text() == "new"
    assert mode_of(path) == 0o640


def test_text_is_utf8_and_bytes_are_verbatim(tmp_path):
    text_path = write_text_atomic(tmp_path / "t.txt", "µs ± 3\n")
    assert text_path.read_bytes() == "µs ± 3\n".encode("utf-8")
    data = bytes(range(256))
    assert write_bytes_atomic(tmp_path / "b.bin", data).read_bytes() == data


def test_readers_see_the_old_file_until_the_write_completes(tmp_path):
    path = tmp_path / "run.json"
    path.write_text("old")
    with atomic_output(path, "w") as handle:
        handle.write("new")
        handle.flush()
        assert path.read_text() == "old"
        # The data is in a hidden file in the same directory (same filesystem: atomic rename).
        (temporary,) = [p for p in tmp_path.iterdir() if p.name != "run.json"]
        assert temporary.name.startswith(".run.json.") and temporary.read_text() == "new"
    assert path.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()],
                         ids=["error", "ctrl-c"])
@pytest.mark.parametrize("mode", ["w", "wb"])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, mode, error):
    path = tmp_path / "run.json"
    path.write_text("old")
    with pytest.raises(type(error)):
        with atomic_output(path, mode) as handle:
            handle.write("half" if mode == "w" else b"half")
            raise error
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_a_failed_first_write_creates_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_output(tmp_path / "new.bin", "wb") as handle:
            handle.write(b"half")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


def test_missing_parent_directories_are_created(tmp_path):
    path = write_text_atomic(tmp_path / "a" / "b" / "report.html", "<p>")
    assert path.read_text() == "<p>"


@pytest.mark.parametrize("mode", ["a", "r", "w+", "x", "ab"])
def test_only_whole_file_writes_are_accepted(tmp_path, mode):
    with pytest.raises(UsageError) as raised:
        atomic_output(tmp_path / "f", mode)  # type: ignore[call-overload]
    assert str(raised.value) == f"mode={mode!r} must be 'w' (text) or 'wb' (binary)"
    assert list(tmp_path.iterdir()) == []


def test_replacing_a_directory_fails_and_cleans_up(tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(OSError):
        write_text_atomic(tmp_path / "taken", "x")
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]


def test_a_directory_target_is_refused_before_the_caller_writes_anything(tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(IsADirectoryError, match="Is a directory"):
        with atomic_output(tmp_path / "taken", "w"):
            pytest.fail("the body ran although its result could never take the name")
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]


def test_checking_a_directory_that_is_a_file_says_not_a_directory(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotADirectoryError, match="Not a directory"):
        atomic.check_writable_directory(tmp_path / "afile")
    assert (tmp_path / "afile").read_text() == "x"


def test_record_re_exports_the_one_implementation():
    # report/ and sweep/ import write_text_atomic from batchscope.record.
    assert batchscope.record.write_text_atomic is atomic.write_text_atomic


@pytest.mark.parametrize(("durable", "expected_fsyncs"), [(True, 2), (False, 0)])
def test_durable_writes_fsync_file_and_directory_and_others_skip_both(
        tmp_path, monkeypatch, durable, expected_fsyncs):
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    path = tmp_path / "plot.svg"
    path.write_text("old")
    with atomic_output(path, "w", durable=durable) as handle:
        handle.write("new")
        assert path.read_text() == "old"  # still all-or-nothing without the fsyncs
    assert path.read_text() == "new" and len(synced) == expected_fsyncs
    assert [p.name for p in tmp_path.iterdir()] == ["plot.svg"]
