"""A lock helper for user code: uWSGI runs several worker processes that may write the same files."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock

LOCK_DIR_NAME = "mlserve-locks"


def lock_path(path: str | os.PathLike[str]) -> Path:
    """Where the lock of ``path`` lives: beside it when that folder is writable, else under the temp dir."""
    target = Path(path).absolute()
    if os.access(target.parent, os.W_OK):
        return target.with_name(target.name + ".lock")
    digest = hashlib.sha256(str(target).encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / LOCK_DIR_NAME
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder / f"{digest}.lock"


@contextmanager
def locked(path: str | os.PathLike[str], timeout: float = 60) -> Iterator[Path]:
    """Hold an exclusive inter-process lock on ``path`` for the ``with`` block; yields ``path``.

    Every process that writes ``path`` must take the lock. Raises ``filelock.Timeout`` after
    ``timeout`` seconds (-1 waits forever).
    """
    with FileLock(str(lock_path(path)), timeout=timeout):
        yield Path(path)
