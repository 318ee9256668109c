"""Write a file so that readers see either the old file or the complete new one, never a part.

    with atomic_output(path, "wb") as handle:   # or "w" for text (UTF-8)
        np.savez(handle, **arrays)
    write_text_atomic(path, text)
    write_bytes_atomic(path, data)

The data goes to a temporary file in the target's directory (same filesystem, so the final
`os.replace` is an atomic rename), is flushed and fsynced, and only then takes the final name;
the directory is fsynced after the rename so the new name survives a power cut too. An
interrupted write (exception, Ctrl-C, full disk) leaves the destination untouched and removes
the temporary file.

`durable=False` keeps the atomic rename but skips both fsyncs: for files that can be rebuilt
from a record (plots, HTML reports), where a power cut costs a re-render while each fsync costs
tens of milliseconds (about a second for a report's ten files on a slow disk).

Permissions: the result looks like a file written with plain `open(path, "w")`. A file that
already exists keeps its mode bits. A new file gets 0o666 minus the process umask, and the
kernel applies that umask itself: the temporary file is created with `os.open(..., 0o666)`
rather than `tempfile.mkstemp`, whose private 0o600 would otherwise end up on every report and
record. (The alternative, reading the umask with `os.umask(0)` and restoring it, briefly
changes process-wide state that other threads creating files would see; letting the kernel
apply it needs no reading at all, and honours a directory's default ACL as well.)
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, BinaryIO, Literal, TextIO, overload

from batchscope.errors import UsageError

_NEW_FILE_MODE = 0o666  # what open() asks for; the kernel takes the umask off
_NAME_ATTEMPTS = 100
# O_NOFOLLOW: never write through a symlink an attacker planted under the temporary name.
_CREATE_FLAGS = (
    os.O_WRONLY
    | os.O_CREAT
    | os.O_EXCL
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_BINARY", 0)
)


@overload
def atomic_output(
    path: str | os.PathLike[str], mode: Literal["w"] = "w", *, durable: bool = True
) -> contextlib.AbstractContextManager[TextIO]: ...


@overload
def atomic_output(
    path: str | os.PathLike[str], mode: Literal["wb"], *, durable: bool = True
) -> contextlib.AbstractContextManager[BinaryIO]: ...


def atomic_output(
    path: str | os.PathLike[str], mode: str = "w", *, durable: bool = True
) -> contextlib.AbstractContextManager[TextIO] | contextlib.AbstractContextManager[BinaryIO]:
    """Yield a file (text, UTF-8, for mode "w"; binary for "wb"); on normal exit it replaces
    `path`, on any exception it vanishes and `path` is left as it was. Missing parent
    directories are created. `durable=False` skips the fsyncs (see the module docstring)."""
    if mode not in ("w", "wb"):
        raise UsageError(f"mode={mode!r} must be 'w' (text) or 'wb' (binary)")
    return _atomic_output(Path(path), mode, durable)


def write_text_atomic(path: str | os.PathLike[str], text: str, *, durable: bool = True) -> Path:
    """Replace `path` with `text` (UTF-8) atomically; returns the path."""
    with atomic_output(path, "w", durable=durable) as handle:
        handle.write(text)
    return Path(path)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes, *,
                       durable: bool = True) -> Path:
    """Replace `path` with `data` atomically; returns the path."""
    with atomic_output(path, "wb", durable=durable) as handle:
        handle.write(data)
    return Path(path)


def check_writable_directory(directory: str | os.PathLike[str]) -> None:
    """Create `directory` if missing and prove a file can be written in it, so a run can refuse
    an unusable output path before it measures anything. Raises the OSError that says why."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        # mkdir(exist_ok=True) would say "File exists", which reads as no problem at all.
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(directory))
    directory.mkdir(parents=True, exist_ok=True)
    test_file = directory / f".batchscope-write-test-{os.getpid()}"
    test_file.write_text("ok")
    test_file.unlink()


@contextlib.contextmanager
def _atomic_output(path: Path, mode: str, durable: bool = True) -> Iterator[IO[Any]]:
    if path.is_dir():  # refused before the caller produces the data, not at the final rename
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = _create_temporary(path)
    try:
        encoding = "utf-8" if mode == "w" else None
        with os.fdopen(descriptor, mode, encoding=encoding) as handle:
            yield handle
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        _copy_existing_mode(path, temporary)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    if durable:
        _fsync_directory(path.parent)


def _create_temporary(path: Path) -> tuple[int, Path]:
    # A dot-name next to the target: hidden from listings, and on the target's filesystem.
    # The target's name is shortened so the temporary name stays within NAME_MAX.
    for _ in range(_NAME_ATTEMPTS):
        temporary = path.with_name(f".{path.name[:200]}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(temporary, _CREATE_FLAGS, _NEW_FILE_MODE), temporary
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a unique temporary file next to {path}")


def _copy_existing_mode(path: Path, temporary: Path) -> None:
    """An existing target keeps its permission bits (a file the user made private stays so)."""
    try:
        existing = os.stat(path)
    except FileNotFoundError:
        return
    os.chmod(temporary, stat.S_IMODE(existing.st_mode))


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable. Not every platform/filesystem can open or fsync a
    # directory (Windows, some network filesystems); the data is already safe, so skip there.
    with contextlib.suppress(OSError):
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
