"""Files a site keeps: written whole or not at all, private from their first byte. Blocking."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import ConfigError


def write_new_file(path: Path, data: bytes, mode: int) -> None:
    """Create `path` exclusively with `mode` from the first instant (no chmod window)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
    except OSError as error:
        raise ConfigError(f"cannot write {path}: {error.strerror or error}") from None


def write_private_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data`, mode 0600, atomically (temp file in the same dir + rename)."""
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        try:
            os.unlink(temp_name)
        except OSError:
            pass
        raise
