"""Opening data files: one ValueError (or FileNotFoundError) per problem, never a raw traceback.

Convention: every error a data file or directory can cause is raised here (or by the readers
that use these helpers) as ONE exception whose message is a single line of three parts:
``{the file}: {what is wrong}; {what to do}``. A path that does not exist raises
`FileNotFoundError`; everything else (a directory where a file belongs, an empty, truncated or
damaged file, another format under the expected name, missing or wrong arrays) raises
`ValueError`. The exceptions of numpy, zipfile, gzip and zlib never escape: the user sees the
file's name, not the library's (``experiments/train.py`` prints the message as one ``error:``
line).

``.npz`` files are read member by member with ``allow_pickle=False``: an object array would need
pickle, which can run any code while loading, so it is refused with its name before any of it is
read.
"""

from __future__ import annotations

import os
import pathlib
import warnings
import zipfile
import zlib
from collections.abc import Callable, Sequence

import numpy as np

from bpjax._atomic import atomic_write

# First bytes of formats users put where a data file belongs, and what to call them.
_SIGNATURES = (
    (b"PK\x03\x04", "a zip archive"),
    (b"PK\x05\x06", "an empty zip archive"),
    (b"\x93NUMPY", "a single .npy array"),
    (b"\x1f\x8b", "gzip-compressed data"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"%PDF", "a PDF document"),
    (b"BZh", "bzip2-compressed data"),
    (b"\xfd7zXZ\x00", "xz-compressed data"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file"),
    (b"\x80", "a Python pickle"),
)
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")

# What reading a damaged zip member can raise (numpy's .npy parser included).
_READ_ERRORS = (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error)


def describe_content(head: bytes) -> str:
    """Names what the first bytes of a file look like, for "this is not X" messages.

    Args:
        head: the file's first bytes (16 or more give the best answer).

    Returns:
        e.g. ``"a PNG image"``, ``"text ('x,y\\n1,2')"``, ``"binary data starting 0x12345678"``.
    """
    if not head:
        return "an empty file"
    for magic, what in _SIGNATURES:
        if head.startswith(magic):
            return what
    text = None
    for cut in range(4):  # a multi-byte character cut at the end of ``head`` is still text
        try:
            text = head[: len(head) - cut].decode("utf-8")
            break
        except UnicodeDecodeError:
            continue
    if text and all(c.isprintable() or c in "\t\r\n" for c in text):
        return f"text ({text[:24]!r})"
    return f"binary data starting 0x{head[:4].hex().upper()}"


def list_dir(directory: pathlib.Path, *, limit: int = 8) -> str:
    """A short listing of ``directory`` for messages, e.g. ``"a, b, c (and 5 more)"``."""
    try:
        names = sorted(p.name for p in directory.iterdir())
    except OSError:
        return "nothing readable"
    if not names:
        return "nothing (it is empty)"
    more = f" (and {len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def require_file(path: str | os.PathLike, *, what: str, remedy: str) -> pathlib.Path:
    """Returns ``path`` as a `pathlib.Path` to an existing, readable, non-empty regular file.

    Args:
        path: the file (``~`` is expanded).
        what: the loader's name, for messages (e.g. ``"npz"``).
        remedy: what to do, for messages (e.g. ``"pass path=/path/to/data.npz"``).

    Raises:
        FileNotFoundError: nothing exists at ``path``.
        ValueError: ``path`` is a directory, unreadable, or an empty file.
    """
    file = pathlib.Path(path).expanduser()
    if not file.exists():
        raise FileNotFoundError(f"{what}: file {file} does not exist; {remedy}")
    if file.is_dir():
        raise ValueError(f"{what}: {file} is a directory, not a file; {remedy}")
    try:
        with file.open("rb") as f:
            empty = not f.read(1)
    except OSError as e:
        raise ValueError(f"{what}: cannot read {file} ({e.strerror or e}); {remedy}") from None
    if empty:
        raise ValueError(f"{what}: {file} is empty (0 bytes); {remedy}")
    return file


def require_dir(path: str | os.PathLike, *, what: str, remedy: str) -> pathlib.Path:
    """Returns ``path`` as a `pathlib.Path` to an existing directory.

    Args:
        path: the directory (``~`` is expanded).
        what: the loader's name, for messages.
        remedy: what to do, for messages.

    Raises:
        FileNotFoundError: nothing exists at ``path``.
        ValueError: ``path`` is a file (the message names its directory).
    """
    directory = pathlib.Path(path).expanduser()
    if not directory.exists():
        raise FileNotFoundError(f"{what}: directory {directory} does not exist; {remedy}")
    if not directory.is_dir():
        raise ValueError(
            f"{what}: {directory} is a file, but a directory of files is expected (the one that "
            f"holds it is {directory.parent}); {remedy}"
        )
    return directory


def read_npz(
    path: str | os.PathLike,
    *,
    required: Sequence[str],
    optional: Sequence[str] = (),
    what: str,
    remedy: str,
) -> dict[str, np.ndarray]:
    """Reads the named arrays of an ``.npz`` file, refusing object arrays and damaged files.

    Args:
        path: the ``.npz`` file (``np.savez`` / ``np.savez_compressed`` output).
        required: keys that must be present.
        optional: keys read when present.
        what: the loader's name, for messages.
        remedy: what to do about a missing or unusable file, for messages.

    Returns:
        ``{key: array}`` for every required key and every optional key present.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is not a readable ``.npz`` (empty, truncated, another format), lacks
            a required key, or holds an object, structured or damaged array.
    """
    file = require_file(path, what=what, remedy=remedy)
    with file.open("rb") as f:
        head = f.read(16)
    if not head.startswith(_ZIP_MAGIC):
        hint = ""
        if head.startswith(b"\x93NUMPY"):
            hint = " (np.save writes one array; np.savez writes the named arrays of an .npz)"
        raise ValueError(
            f"{file}: not an .npz file: it holds {describe_content(head)}{hint}; write it with "
            f"np.savez({file.name!r}, x_train=..., y_train=..., x_test=..., y_test=...)"
        )
    try:
        archive = zipfile.ZipFile(file)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ValueError(
            f"{file}: damaged or truncated .npz (zip: {e}); write the file again (np.savez)"
        ) from None
    with archive:
        members = {n.removesuffix(".npy"): n for n in archive.namelist()}
        missing = [k for k in required if k not in members]
        if missing:
            holds = ", ".join(sorted(members)) or "no arrays"
            raise ValueError(
                f"{file} lacks array(s) {', '.join(missing)}; it holds {holds} and needs "
                f"{', '.join(required)}"
                + (f" (optionally {', '.join(optional)})" if optional else "")
                + "; save them under those names with np.savez"
            )
        keys = [*required, *(k for k in optional if k in members)]
        return {k: _read_member(archive, members[k], key=k, file=file) for k in keys}


def _read_member(
    archive: zipfile.ZipFile, member: str, *, key: str, file: pathlib.Path
) -> np.ndarray:
    damaged = f"{file}: array {key} is damaged or truncated"
    remedy = "write the file again (np.savez)"
    try:
        with archive.open(member) as f:
            version = np.lib.format.read_magic(f)
            reader = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            _, _, dtype = reader(f)
    except ValueError as e:  # numpy's header parser
        raise ValueError(f"{damaged} (not a valid .npy header: {e}); {remedy}") from None
    except _READ_ERRORS as e:  # the zip layer (a bad CRC of a small member shows up here)
        raise ValueError(f"{damaged} ({type(e).__name__}: {e}); {remedy}") from None
    if dtype.hasobject:
        raise ValueError(
            f"{file}: array {key} is an object array (dtype {dtype}), which only pickle can "
            f"load, and pickle can run any code, so it is refused; save numeric arrays instead "
            f"(e.g. np.asarray({key}, dtype=np.float32))"
        )
    if dtype.names is not None:
        raise ValueError(
            f"{file}: array {key} is a structured array (fields {', '.join(dtype.names)}); "
            f"save one plain numeric array per key instead"
        )
    try:
        with archive.open(member) as f:
            return np.lib.format.read_array(f, allow_pickle=False)
    except _READ_ERRORS as e:
        raise ValueError(f"{damaged} ({type(e).__name__}: {e}); {remedy}") from None


def default_cache_dir() -> pathlib.Path:
    """Returns ``$BPJAX_CACHE_DIR``, or ``~/.cache/bpjax`` when it is unset."""
    return pathlib.Path(os.environ.get("BPJAX_CACHE_DIR") or "~/.cache/bpjax").expanduser()


def cached_arrays(
    cache_file: pathlib.Path,
    build: Callable[[], dict[str, np.ndarray]],
    *,
    read: Callable[[pathlib.Path], dict[str, np.ndarray]],
    encode: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] = dict,
    what: str,
    source: str,
) -> dict[str, np.ndarray]:
    r"""``read(cache_file)`` when it can be read, else ``build()``, saved to ``cache_file`` as a
    compressed ``.npz`` (``encode``\ d first; written atomically, so an interrupted write leaves
    no torn file).

    A cache that can't be read (``read`` raised ValueError) is rebuilt, and one that can't be
    written (a read-only home, a full disk) is skipped, each with a warning naming the file:
    a cache never stops a load.

    Args:
        cache_file: the ``.npz``; name it after what its contents depend on (a version, a size).
        build: computes the arrays from ``source``.
        read: reads ``cache_file`` back into what ``build`` returns; raises ValueError if it
            can't (use `read_npz`).
        encode: what is stored for ``build``'s arrays (e.g. pixels as uint8).
        what: the data's name, for warnings.
        source: where ``build`` reads from, for warnings.
    """
    if cache_file.is_file():
        try:
            return read(cache_file)
        except ValueError as e:  # e.g. a disk that filled up under an older, non-atomic writer
            warnings.warn(
                f"the {what} cache {cache_file} is unreadable ({e}); rebuilding it from {source}",
                stacklevel=3,
            )
    arrays = build()
    try:
        atomic_write(cache_file, lambda file: np.savez_compressed(file, **encode(arrays)))
    except OSError as e:
        warnings.warn(f"could not write the {what} cache {cache_file}: {e}", stacklevel=3)
    return arrays
