"""File-system helpers private to :mod:`flm.tls`."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flm.core.paths import ensure_private_dir


@contextmanager
def dir_lock(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``directory/.lock`` (POSIX ``flock``; a no-op on Windows).

    Two proxies starting at once must not both issue a certificate into the same files.
    """
    ensure_private_dir(directory)
    if sys.platform == "win32":
        yield
        return
    import fcntl

    fd = os.open(directory / ".lock", os.O_CREAT | os.O_RDWR | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
