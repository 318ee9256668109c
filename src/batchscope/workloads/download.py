"""Fetching the official CIFAR-10 archive, only ever when the user allowed it.

The binary version (fixed-size records) is fetched rather than the python version, whose
batches are pickles: batchscope never unpickles anything read from disk. The download is
checked against the MD5 the dataset authors publish and lands atomically, so an interrupted
download never leaves a truncated archive that later runs would trust.
"""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
from pathlib import Path

from batchscope.atomic import atomic_output
from batchscope.errors import DataNotFoundError

OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
OFFICIAL_NAME = "cifar-10-binary.tar.gz"
# Published on https://www.cs.toronto.edu/~kriz/cifar.html next to the download link.
OFFICIAL_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
_CHUNK_BYTES = 1 << 20


def download_file(url: str, destination: Path, md5: str | None, timeout_s: float = 60.0) -> Path:
    """Stream `url` to `destination` atomically, verifying `md5` when given."""
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with (
            atomic_output(destination, "wb") as out,
            urllib.request.urlopen(url, timeout=timeout_s) as response,
        ):
            while chunk := response.read(_CHUNK_BYTES):
                out.write(chunk)
                digest.update(chunk)
            if md5 is not None and digest.hexdigest() != md5:
                raise DataNotFoundError(
                    f"download of {url} has MD5 {digest.hexdigest()}, expected {md5}; the file "
                    f"was discarded, try again or place the archive at {destination} yourself"
                )
    except (urllib.error.URLError, OSError) as exc:
        raise DataNotFoundError(
            f"could not download {url} ({exc}); download it by hand and put it at "
            f"{destination}, or set BATCHSCOPE_CIFAR10 to its path"
        ) from None
    return destination


def download_official_archive(cache_dir: Path) -> Path:
    """The official binary archive in `cache_dir`, downloading it when it is not there yet."""
    destination = cache_dir / OFFICIAL_NAME
    if destination.is_file():
        return destination
    return download_file(OFFICIAL_URL, destination, OFFICIAL_MD5)
