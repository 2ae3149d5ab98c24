"""Reading IDX files, the format of the original MNIST distribution (and Fashion-MNIST, KMNIST).

An IDX file is a 4-byte magic number ``0x0000TTNN`` (``TT``: element type, ``NN``: number of
dimensions), ``NN`` big-endian uint32 sizes, then the elements in C order, big-endian. Files may
be gzip-compressed (detected from their content, not their name).
"""

from __future__ import annotations

import gzip
import os
import pathlib

import numpy as np

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

_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(file: str | os.PathLike, *, expect_magic: int | None = None) -> np.ndarray:
    """Reads one IDX file (raw or gzip-compressed) into a numpy array.

    Args:
        file: path of the ``.idx*-ubyte`` file, optionally gzip-compressed.
        expect_magic: if given, the file's magic number must equal it (e.g. ``0x00000803`` for
            MNIST images, ``0x00000801`` for labels).

    Returns:
        The array, shape as stored (e.g. ``[60000, 28, 28]`` uint8), in native byte order.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a bad magic number, or a size that does not match the header.
    """
    path = pathlib.Path(file)
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        raw = gzip.decompress(raw)
    if len(raw) < 4:
        raise ValueError(f"{path}: too short ({len(raw)} bytes) to be an IDX file")
    magic = int.from_bytes(raw[:4], "big")
    type_byte, ndim = raw[2], raw[3]
    if raw[:2] != b"\x00\x00" or type_byte not in IDX_DTYPES:
        raise ValueError(
            f"{path}: not an IDX file: bad magic number 0x{magic:08X} (expected 0x0000TTNN with "
            f"type byte TT in {{{', '.join(f'0x{t:02X}' for t in IDX_DTYPES)}}})"
        )
    if expect_magic is not None and magic != expect_magic:
        raise ValueError(f"{path}: magic number 0x{magic:08X} found, expected 0x{expect_magic:08X}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated header ({len(raw)} bytes for {ndim} dimensions)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = IDX_DTYPES[type_byte]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: header says shape {shape} ({expected} data bytes) but the file holds "
            f"{len(raw) - header} data bytes"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def find_idx_file(directory: pathlib.Path, split: str, kind: str) -> pathlib.Path:
    """Finds ``{split}-{kind}`` in ``directory`` under the usual MNIST names.

    Accepts ``train-images-idx3-ubyte`` and ``train-images.idx3-ubyte``, each optionally ``.gz``.

    Args:
        directory: folder to look in.
        split: ``"train"`` or ``"t10k"``.
        kind: ``"images"`` or ``"labels"``.

    Returns:
        The path of the first candidate that exists.
    """
    n = 3 if kind == "images" else 1
    candidates = [
        f"{split}-{kind}{sep}idx{n}-ubyte{gz}" for sep in ("-", ".") for gz in ("", ".gz")
    ]
    for name in candidates:
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(
        f"no {split} {kind} file in {directory}: looked for {', '.join(candidates)}"
    )


def read_idx_dir(
    path: str | os.PathLike | None, *, name: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Reads the four MNIST-layout IDX files of a directory.

    Args:
        path: directory holding ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
            ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` (each optionally ``.gz``).
        name: the dataset's name, for messages.

    Returns:
        ``(x_train, y_train, x_test, y_test)``: uint8 images ``[n, rows, cols]``, uint8 labels
        ``[n]``.
    """
    if path is None:
        raise ValueError(
            f"{name} needs the directory of its IDX files: pass path=/dir/with/idx/files "
            f"(from a config: dataset.path=/dir/with/idx/files); nothing is downloaded"
        )
    directory = pathlib.Path(path).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(
            f"{name}: IDX directory {directory} does not exist; pass path=/dir/with/idx/files "
            f"(train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
            f"t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz])"
        )
    arrays = []
    for split in ("train", "t10k"):
        images_file = find_idx_file(directory, split, "images")
        labels_file = find_idx_file(directory, split, "labels")
        images = read_idx(images_file, expect_magic=IMAGES_MAGIC)
        labels = read_idx(labels_file, expect_magic=LABELS_MAGIC)
        if len(images) != len(labels):
            raise ValueError(
                f"{name}: {images_file.name} holds {len(images)} images but {labels_file.name} "
                f"holds {len(labels)} labels"
            )
        arrays += [images, labels]
    return tuple(arrays)
