"""Finding the CIFAR-10 archive, decoding it once, and caching the decoded arrays.

Where the archive is looked for, in order (the first that exists wins):
1. the `data_path=` option of a workload (a file, or a directory holding one);
2. the `BATCHSCOPE_CIFAR10` environment variable (same);
3. `../shared/data/cifar10-jpg.tar.xz` next to the source checkout batchscope runs from;
4. `../shared/data/cifar10-jpg.tar.xz` relative to the current directory;
5. the user cache directory (`BATCHSCOPE_CACHE_DIR`, else `~/.cache/batchscope`), holding
   `cifar10-jpg.tar.xz` or the official `cifar-10-binary.tar.gz`;
6. the official download into the cache directory, only when the user allowed it
   (`download=True` or `BATCHSCOPE_DOWNLOAD=1`).
An explicit place (1, 2) that does not exist is an error rather than a silent fallback: the
user said where the data is. Nothing found anywhere is one `DataNotFoundError` naming every
place looked and the ways to fix it.

Decoding 60,000 JPEGs takes several seconds, so the decoded uint8 arrays are saved as an
uncompressed `.npz` in the cache directory (keyed by the archive's path, size and mtime, written
atomically, read back with `allow_pickle=False`) and kept in memory for the rest of the process.
"""

from __future__ import annotations

import functools
import hashlib
import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from batchscope.atomic import atomic_output
from batchscope.errors import DataNotFoundError
from batchscope.workloads.cifar10_archives import CifarArrays, decode_archive
from batchscope.workloads.download import (
    OFFICIAL_NAME,
    OFFICIAL_URL,
    download_official_archive,
)

ARCHIVE_NAME = "cifar10-jpg.tar.xz"
ENV_ARCHIVE = "BATCHSCOPE_CIFAR10"
ENV_CACHE_DIR = "BATCHSCOPE_CACHE_DIR"
ENV_DOWNLOAD = "BATCHSCOPE_DOWNLOAD"
# Bump when the decoded layout changes, so stale caches are ignored rather than misread.
CACHE_FORMAT_VERSION = 1
_ARCHIVE_NAMES = (ARCHIVE_NAME, OFFICIAL_NAME)
_TRUE_WORDS = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Place:
    """One place the archive may be: a path, and what made batchscope look there."""

    path: Path
    origin: str

    def describe(self) -> str:
        return f"{self.path} ({self.origin})"


def cache_dir() -> Path:
    """The user cache directory: `BATCHSCOPE_CACHE_DIR`, else `~/.cache/batchscope`."""
    configured = os.environ.get(ENV_CACHE_DIR)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "batchscope"


def download_allowed(option: bool | None) -> bool:
    """An explicit option wins; otherwise `BATCHSCOPE_DOWNLOAD=1` allows the download."""
    if option is not None:
        return bool(option)
    return os.environ.get(ENV_DOWNLOAD, "").strip().lower() in _TRUE_WORDS


def source_checkout_root() -> Path | None:
    """The repository root when batchscope runs from a source checkout (editable install)."""
    root = Path(__file__).resolve().parents[3]
    return root if (root / "src" / "batchscope").is_dir() else None


def implicit_places() -> list[Place]:
    """Places 3-5 of the search order (the ones the user did not name)."""
    places = []
    root = source_checkout_root()
    if root is not None:
        places.append(Place(root.parent / "shared" / "data" / ARCHIVE_NAME, "next to the checkout"))
    places.append(
        Place(Path.cwd().parent / "shared" / "data" / ARCHIVE_NAME, "next to the current directory")
    )
    directory = cache_dir()
    places.extend(Place(directory / name, "user cache") for name in _ARCHIVE_NAMES)
    unique: dict[Path, Place] = {}
    for place in places:
        unique.setdefault(place.path.resolve(), place)
    return list(unique.values())


def find_archive(
    data_path: str | os.PathLike[str] | None = None, download: bool | None = None
) -> Path:
    """The CIFAR-10 archive to use, following the search order in the module docstring."""
    if data_path is not None:
        return _explicit_archive(Path(data_path).expanduser(), "data_path option")
    from_env = os.environ.get(ENV_ARCHIVE)
    if from_env:
        return _explicit_archive(Path(from_env).expanduser(), f"{ENV_ARCHIVE} environment variable")
    places = implicit_places()
    for place in places:
        if place.path.is_file():
            return place.path
    if download_allowed(download):
        return download_official_archive(cache_dir())
    looked = "; ".join(
        ["data_path option (not given)", f"{ENV_ARCHIVE} (unset)"]
        + [place.describe() for place in places]
    )
    raise DataNotFoundError(
        f"CIFAR-10 archive not found; looked at: {looked}. Fix: pass "
        f"data_path=PATH/{ARCHIVE_NAME}, set {ENV_ARCHIVE}=PATH, put the archive in "
        f"{cache_dir()}, or allow the official "
        f"download (170 MB from {OFFICIAL_URL}) with download=True or {ENV_DOWNLOAD}=1"
    )


def load_cifar10(archive: Path) -> CifarArrays:
    """Decoded arrays of `archive` (read-only), from memory, the on-disk cache, or a decode."""
    stat = archive.stat()
    return _load_memoised(str(archive.resolve()), stat.st_size, stat.st_mtime_ns, str(cache_dir()))


def clear_memory_cache() -> None:
    """Forget the arrays kept in memory (the on-disk cache stays)."""
    _load_memoised.cache_clear()


def cache_file_for(archive: Path, size: int, mtime_ns: int, directory: Path) -> Path:
    """The `.npz` that holds the decoded form of this exact archive file."""
    key = f"{archive}|{size}|{mtime_ns}|v{CACHE_FORMAT_VERSION}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return directory / f"cifar10-decoded-{digest}.npz"


def write_cache(path: Path, arrays: CifarArrays) -> None:
    """Save the arrays atomically (a crash mid-write never leaves a truncated cache)."""
    with atomic_output(path, "wb") as handle:
        np.savez(handle, **arrays.as_dict())


def read_cache(path: Path) -> CifarArrays | None:
    """The cached arrays, or None when the file is missing or unreadable (then re-decode).

    `allow_pickle=False`: a cache file is data, never code."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {name: stored[name] for name in stored.files}
        return CifarArrays.from_dict(arrays, str(path))
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None


@functools.lru_cache(maxsize=2)
def _load_memoised(archive: str, size: int, mtime_ns: int, directory: str) -> CifarArrays:
    # Memoised per process so that building several workloads (or one workload twice) decodes
    # and reads the cache once; the arrays are made read-only so sharing them is safe.
    cache_file = cache_file_for(Path(archive), size, mtime_ns, Path(directory))
    arrays = read_cache(cache_file)
    if arrays is None:
        arrays = decode_archive(Path(archive))
        try:
            write_cache(cache_file, arrays)
        except OSError as exc:
            warnings.warn(
                f"could not cache decoded CIFAR-10 at {cache_file} ({exc}); it will be decoded "
                f"again next run; set {ENV_CACHE_DIR} to a writable directory",
                stacklevel=2,
            )
    for array in arrays.as_dict().values():
        array.setflags(write=False)
    return arrays


def _explicit_archive(path: Path, origin: str) -> Path:
    if path.is_dir():
        for name in _ARCHIVE_NAMES:
            if (path / name).is_file():
                return path / name
        raise DataNotFoundError(
            f"{origin} {path} is a directory without {' or '.join(_ARCHIVE_NAMES)}; point it at "
            f"the archive file itself"
        )
    if not path.is_file():
        raise DataNotFoundError(
            f"{origin} {path} does not exist; point it at {ARCHIVE_NAME} or {OFFICIAL_NAME}"
        )
    return path
