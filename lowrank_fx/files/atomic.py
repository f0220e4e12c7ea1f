"""Atomic file writes: a reader, or a crash, never sees a half-written file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..errors import FileWriteError


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` so that `path` holds either its old content or all of `data`.

    The bytes go to a temporary file in the same directory (so the final rename stays on
    one file system), are flushed and fsync'ed, and then `os.replace` swaps the file in;
    the directory is fsync'ed too so the rename itself survives a power loss. A missing parent
    directory is created. An OS error (a read-only directory, a full disk) raises FileWriteError
    (an AdapterFileError and an OSError) naming `path`, with `path` as it was and no temporary file left.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    temp = None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException as err:
        if temp is not None and os.path.exists(temp):
            os.unlink(temp)
        if isinstance(err, OSError):
            reason = err.strerror or str(err)
            blocking = next((p for p in path.absolute().parents if p.exists()), None)
            if blocking is not None and not blocking.is_dir():
                reason = f"{blocking} is a file, not a folder"
            raise FileWriteError(f"cannot write {path}: {reason}; it was left as it was. "
                                 "Check that its directory is writable and has free space.") from None
        raise
    _fsync_directory(directory)
    return path


def check_writable(directory: str | os.PathLike, what: str) -> None:
    """Check, before long work whose result goes to `directory`, that it can be created and written
    in: a file is created (and removed) in it or in the nearest folder above it that exists, and no
    folder is made. FileWriteError naming `what` (the path the caller writes) if not."""
    existing = Path(directory).absolute()
    while not existing.exists():
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, "a file is in the way", str(existing))
        fd, temp = tempfile.mkstemp(dir=existing, prefix=".lowrank-fx-check.")
    except OSError as err:
        raise FileWriteError(f"cannot write {what}: {err.strerror or err} ({existing}); choose a writable "
                             "place (nothing was written)") from None
    os.close(fd)
    os.unlink(temp)


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms that cannot open directories (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
