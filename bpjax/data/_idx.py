"""Reading IDX files, the format of the original MNIST distribution (and Fashion-MNIST, KMNIST).

An IDX file is a 4-byte magic number ``0x0000TTNN`` (``TT``: element type, ``NN``: number of
dimensions), ``NN`` big-endian uint32 sizes, then the elements in C order, big-endian. Files may
be gzip-compressed (detected from their content, not their name). A directory in the MNIST layout
holds four of them: ``{train,t10k}-{images-idx3,labels-idx1}-ubyte``, each optionally ``.gz``.

Every problem with a file or a directory is one `ValueError` (`FileNotFoundError` for a path that
does not exist) naming the file, what is wrong and what to do (see ``_files``).
"""

from __future__ import annotations

import gzip
import os
import pathlib
import zlib

import numpy as np

from bpjax.data._files import describe_content, list_dir, require_dir, require_file

# IDX element-type byte -> big-endian numpy dtype.
IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
IMAGES_MAGIC = 0x00000803  # uint8, 3 dimensions: [n, rows, cols]
LABELS_MAGIC = 0x00000801  # uint8, 1 dimension: [n]

# The four files of an MNIST-layout directory: (split, kind) -> expected magic number.
IDX_FILES = {
    ("train", "images"): IMAGES_MAGIC,
    ("train", "labels"): LABELS_MAGIC,
    ("t10k", "images"): IMAGES_MAGIC,
    ("t10k", "labels"): LABELS_MAGIC,
}

_GZIP_MAGIC = b"\x1f\x8b"
_REPLACE = "replace it with an intact copy of the original file"


def _magic_name(magic: int) -> str:
    dtype = IDX_DTYPES.get((magic >> 8) & 0xFF)
    kind = {IMAGES_MAGIC: " (images)", LABELS_MAGIC: " (labels)"}.get(magic, "")
    return f"0x{magic:08X}: {dtype}, {magic & 0xFF} dimension(s){kind}"


def read_idx(
    file: str | os.PathLike, *, expect_magic: int | None = None, remedy: str = _REPLACE
) -> np.ndarray:
    """Reads one IDX file (raw or gzip-compressed) into a numpy array.

    Args:
        file: path of the ``.idx*-ubyte`` file, optionally gzip-compressed.
        expect_magic: if given, the file's magic number must equal it (e.g. ``0x00000803`` for
            MNIST images, ``0x00000801`` for labels).
        remedy: what to do about a bad file, appended to error messages.

    Returns:
        The array, shape as stored (e.g. ``[60000, 28, 28]`` uint8), in native byte order.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is a directory, unreadable, empty, a truncated or damaged gzip
            stream, not an IDX file (bad magic number), the wrong IDX file (``expect_magic``),
            or holds fewer or more bytes than its header says.
    """
    path = require_file(file, what="IDX", remedy=remedy)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: cannot be read ({e.strerror or e}); {remedy}") from None
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except EOFError:
            raise ValueError(
                f"{path}: truncated gzip file (it ends before its compressed stream does); {remedy}"
            ) from None
        except (OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
            raise ValueError(f"{path}: damaged gzip file ({e}); {remedy}") from None
    if len(raw) < 4:
        raise ValueError(
            f"{path}: too short ({len(raw)} bytes) to be an IDX file, which starts with a 4-byte "
            f"magic number; {remedy}"
        )
    magic = int.from_bytes(raw[:4], "big")
    type_byte, ndim = raw[2], raw[3]
    if raw[:2] != b"\x00\x00" or type_byte not in IDX_DTYPES:
        raise ValueError(
            f"{path}: not an IDX file: it holds {describe_content(raw[:16])} (bad magic number "
            f"0x{magic:08X}; an IDX file starts 0x0000TTNN with type byte TT in "
            f"{{{', '.join(f'0x{t:02X}' for t in IDX_DTYPES)}}}); {remedy}"
        )
    if expect_magic is not None and magic != expect_magic:
        raise ValueError(
            f"{path}: magic number 0x{magic:08X} found, expected 0x{expect_magic:08X} (found "
            f"{_magic_name(magic)}; expected {_magic_name(expect_magic)}): the wrong file under "
            f"this name; {remedy}"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(
            f"{path}: truncated header ({len(raw)} bytes for {ndim} dimensions); {remedy}"
        )
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = IDX_DTYPES[type_byte]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    held = len(raw) - header
    if held != expected:
        problem = "it is truncated" if held < expected else "it has trailing data"
        raise ValueError(
            f"{path}: header says shape {shape} ({expected} data bytes) but the file holds "
            f"{held} data bytes: {problem}; {remedy}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def idx_file_names(split: str, kind: str) -> list[str]:
    """The accepted names of ``{split}-{kind}``: ``-`` or ``.`` before ``idxN``, optional ``.gz``.

    Args:
        split: ``"train"`` or ``"t10k"``.
        kind: ``"images"`` or ``"labels"``.

    Returns:
        The candidate file names, most usual first (``train-images-idx3-ubyte`` first).
    """
    n = 3 if kind == "images" else 1
    return [f"{split}-{kind}{sep}idx{n}-ubyte{gz}" for sep in ("-", ".") for gz in ("", ".gz")]


def find_idx_file(directory: pathlib.Path, split: str, kind: str) -> pathlib.Path | None:
    """Finds ``{split}-{kind}`` in ``directory`` under any name of `idx_file_names`.

    Args:
        directory: folder to look in.
        split: ``"train"`` or ``"t10k"``.
        kind: ``"images"`` or ``"labels"``.

    Returns:
        The path of the first candidate that exists, or None.
    """
    for name in idx_file_names(split, kind):
        if (directory / name).is_file():
            return directory / name
    return None


def read_idx_dir(
    path: str | os.PathLike, *, name: str, remedy: str = _REPLACE
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Reads the four MNIST-layout IDX files of a directory.

    Args:
        path: directory holding ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
            ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` (each optionally ``.gz``;
            ``train-images.idx3-ubyte`` spellings accepted).
        name: the dataset's name, for messages.
        remedy: what to do about a missing or bad file, appended to error messages.

    Returns:
        ``(x_train, y_train, x_test, y_test)``: uint8 images ``[n, rows, cols]``, uint8 labels
        ``[n]``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is a file; it lacks some (or all) of the four files, naming each;
            a file is bad (see `read_idx`); images and labels differ in number.
    """
    directory = require_dir(path, what=name, remedy=remedy)
    found = {key: find_idx_file(directory, *key) for key in IDX_FILES}
    missing = [key for key, file in found.items() if file is None]
    if missing:
        wanted = ", ".join(f"{idx_file_names(*key)[0]}[.gz]" for key in missing)
        raise ValueError(
            f"{name}: {directory} lacks {len(missing)} of the 4 IDX files: {wanted}; it holds "
            f"{list_dir(directory)}; {remedy}"
        )
    arrays = []
    for split in ("train", "t10k"):
        images_file, labels_file = found[split, "images"], found[split, "labels"]
        images = read_idx(images_file, expect_magic=IMAGES_MAGIC, remedy=remedy)
        labels = read_idx(labels_file, expect_magic=LABELS_MAGIC, remedy=remedy)
        if len(images) != len(labels):
            raise ValueError(
                f"{name}: {images_file} holds {len(images)} images but {labels_file.name} "
                f"holds {len(labels)} labels; {remedy}"
            )
        arrays += [images, labels]
    return tuple(arrays)
