"""Atomic file writes: a temp file in the same directory, fsync, rename, fsync the directory.

A crash mid-write never leaves a truncated file under the final name, and no temp file is left
behind. Used for dataset caches and every record a run or a script writes (checkpoints are
written by orbax: see ``bpjax.checkpoint``). (numpy only: no jax here.)
"""

import os
import pathlib
import tempfile
from collections.abc import Callable
from typing import IO


def _fsync_dir(directory: pathlib.Path) -> None:
    """Makes a rename in ``directory`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> pathlib.Path:
    """Calls ``write(file)`` on a temp file next to ``path``, then renames it onto ``path``.

    The file gets the usual permissions (0o666 less the umask; ``mkstemp`` alone would make it
    owner-only). The parent directory is created if needed.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = pathlib.Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> pathlib.Path:
    """``atomic_write`` of ``text`` (UTF-8): the whole text under ``path``, or its old content."""
    data = text.encode()
    return atomic_write(path, lambda file: file.write(data))
