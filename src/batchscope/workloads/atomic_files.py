"""Write a file so that readers see either the old file or the complete new one, never a part.

The data goes to a temporary file in the same directory (same filesystem, so the final
`os.replace` is an atomic rename), is flushed to disk, and only then takes the final name. An
interrupted write (crash, Ctrl-C, full disk) leaves the destination untouched and removes the
temporary file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[BinaryIO]:
    """Yield a binary file; on normal exit it replaces `path`, on any exception it vanishes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".part"
    )
    try:
        with os.fdopen(descriptor, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
