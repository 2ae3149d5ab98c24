"""Image sets stored as MNIST-layout IDX directories: one spec per set, one shared loader.

After tensorflow_datasets / torchvision: a set is a small `IdxSet` record (name, classes, default
validation size, where its files come from, where a system package installs them); `load_idx_set`
reads any of them, and the public loaders (`fashion_mnist`, `kmnist`, `idx`) are made from their
specs by `_make_loader`, so they share one signature and one docstring. ``mnist(path=...)`` reads
its IDX files through `load_idx_set` too.

Pixels become ``x / 255`` in [0, 1]; images are ``[n, rows, cols]`` before `build` flattens them
(``[n, rows * cols]``, the default) or adds the channel axis (``[n, rows, cols, 1]``, NHWC).
Nothing is downloaded: the files are in ``path``, or (Fashion-MNIST) where the Debian package
``dataset-fashion-mnist`` installs them.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import textwrap
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from bpjax.data._dataset import Dataset, build
from bpjax.data._idx import read_idx_dir

_PASS_PATH = "path=/dir/with/idx/files (from a config: dataset.path=/dir/with/idx/files)"


@dataclasses.dataclass(frozen=True)
class IdxSet:
    """What `load_idx_set` needs to know about one IDX image set.

    Attributes:
        name: the loader's name, e.g. ``"fashion_mnist"``.
        title: one line for the docstring, e.g. ``"Fashion-MNIST: 28x28 grey images of ..."``.
        n_classes: number of classes; None: the largest label + 1.
        val_size: default count or fraction of the training images held out for validation.
        source: where the original files come from, for messages ("" for none in particular).
        default_dir: where a system package installs the files, read when no path is given.
        install: the command that installs them in ``default_dir``.
        reinstall: the command that repairs that installation.
        reference: the paper that introduced the set.
    """

    name: str
    title: str
    n_classes: int | None
    val_size: int | float
    source: str = ""
    default_dir: pathlib.Path | None = None
    install: str | None = None
    reinstall: str | None = None
    reference: str = ""


IDX_SETS: dict[str, IdxSet] = {
    spec.name: spec
    for spec in (
        IdxSet(
            name="mnist",
            title="MNIST: 28x28 grey handwritten digits, 10 classes (60000 train, 10000 test)",
            n_classes=10,
            val_size=10_000,
            source="the original MNIST distribution (LeCun et al.), or any mirror of its files",
            reference="LeCun, Bottou, Bengio, Haffner (1998), Gradient-based learning applied to "
            "document recognition, Proc. IEEE 86(11).",
        ),
        IdxSet(
            name="fashion_mnist",
            title="Fashion-MNIST: 28x28 grey images of clothing, 10 classes (60000 train, "
            "10000 test)",
            n_classes=10,
            val_size=10_000,
            source="the Debian package dataset-fashion-mnist, or the data/fashion folder of "
            "github.com/zalandoresearch/fashion-mnist",
            default_dir=pathlib.Path("/usr/share/datasets/fashion-mnist"),
            install="sudo apt install dataset-fashion-mnist",
            reinstall="sudo apt install --reinstall dataset-fashion-mnist",
            reference="Xiao, Rasul, Vollgraf (2017), Fashion-MNIST: a novel image dataset for "
            "benchmarking machine learning algorithms, arXiv:1708.07747.",
        ),
        IdxSet(
            name="kmnist",
            title="KMNIST: 28x28 grey cursive Japanese (Kuzushiji) characters, 10 classes "
            "(60000 train, 10000 test)",
            n_classes=10,
            val_size=10_000,
            source="github.com/rois-codh/kmnist",
            reference="Clanuwat et al. (2018), Deep learning for classical Japanese literature, "
            "arXiv:1812.01718.",
        ),
        IdxSet(
            name="idx",
            title="Any image classification set stored like MNIST, from a directory of IDX files",
            n_classes=None,
            val_size=0.1,
        ),
    )
}


def _remedy(spec: IdxSet, *, default: bool) -> str:
    """What to do about a missing or bad file, for every message of `load_idx_set`."""
    if default:
        return f"reinstall them ({spec.reinstall}), or pass another directory: {_PASS_PATH}"
    return f"pass the directory that holds intact copies of all four files: {_PASS_PATH}" + (
        f"; original files: {spec.source}" if spec.source else ""
    )


def resolve_idx_dir(spec: IdxSet, path: str | os.PathLike | None) -> tuple[pathlib.Path, bool]:
    """Returns the directory to read and whether it is the spec's default one.

    Args:
        spec: the set.
        path: the directory the user gave, or None for the spec's ``default_dir``.

    Returns:
        ``(directory, is_default)``.

    Raises:
        ValueError: no ``path`` and the set has no default directory.
        FileNotFoundError: no ``path`` and the default directory does not exist.
    """
    if path is not None:
        return pathlib.Path(path).expanduser(), False
    if spec.default_dir is None:
        raise ValueError(
            f"{spec.name} needs the directory of its IDX files: pass {_PASS_PATH}; nothing is "
            f"downloaded" + (f"; original files: {spec.source}" if spec.source else "")
        )
    if not spec.default_dir.exists():  # a file there: read_idx_dir says so
        raise FileNotFoundError(
            f"{spec.name}: no path was given and {spec.default_dir} does not exist; install the "
            f"files there with `{spec.install}` (Debian/Ubuntu), or pass the directory that "
            f"holds them: {_PASS_PATH}"
        )
    return spec.default_dir, True


def load_idx_set(
    spec: IdxSet,
    *,
    path: str | os.PathLike | None = None,
    val_size: int | float | None = None,
    scale: str = "none",
    flatten: bool = True,
    seed: int = 0,
    limit_train: int | None = None,
    dtype: npt.DTypeLike = np.float32,
    n_classes: int | None = None,
) -> Dataset:
    """Loads the IDX set ``spec``: the shared body of every IDX loader.

    Args:
        spec: the set (an entry of `IDX_SETS`).
        path: its directory; None: ``spec.default_dir`` (an error when the set has none).
        val_size: int count or float fraction of the training images held out for validation
            (stratified); None: ``spec.val_size``.
        scale: ``"none"``, ``"unit"`` or ``"standardize"`` (one global statistic).
        flatten: ``[n, rows * cols]`` if True, else NHWC ``[n, rows, cols, 1]``.
        seed: seeds the validation split and the ``limit_train`` subset.
        limit_train: keep this many training examples (stratified random subset).
        dtype: floating dtype of the features.
        n_classes: number of classes; None: ``spec.n_classes``.

    Returns:
        The `Dataset` named ``spec.name``.

    Raises:
        FileNotFoundError: the directory does not exist.
        ValueError: see the `fashion_mnist` docstring; each message names the file.
    """
    directory, default = resolve_idx_dir(spec, path)
    x_train, y_train, x_test, y_test = read_idx_dir(
        directory, name=spec.name, remedy=_remedy(spec, default=default)
    )
    return build(
        spec.name,
        x_train=x_train.astype(np.float32) / 255.0,
        y_train=y_train,
        x_test=x_test.astype(np.float32) / 255.0,
        y_test=y_test,
        task="classification",
        n_classes=spec.n_classes if n_classes is None else n_classes,
        val_size=spec.val_size if val_size is None else val_size,
        scale=scale,
        flatten=flatten,
        seed=seed,
        limit_train=limit_train,
        dtype=dtype,
        image=True,
        per_feature=False,
        source=directory,
    )


_DOC = """{title}.

{where}

Args:
    path: directory holding ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
        ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (each optionally ``.gz``;
        ``train-images.idx3-ubyte`` spellings accepted). {path_default}
    val_size: int count or float fraction of the training images held out for validation
        (stratified; default {val_size}). The test split is the set's own.
    scale: ``"none"`` (pixels ``x / 255`` in [0, 1]), ``"unit"`` or ``"standardize"`` (one
        global statistic over all training pixels).
    flatten: ``[n, rows * cols]`` if True, else NHWC images ``[n, rows, cols, 1]``.
    seed: seeds the validation split and the ``limit_train`` subset.
    limit_train: keep this many training examples (stratified random subset).
    dtype: floating dtype of the features.
    n_classes: number of classes; None: {n_classes}.

Returns:
    The `Dataset`, labels int32 in ``[0, n_classes)``.

Raises:
    FileNotFoundError: ``path`` (or, without one, the default directory) does not exist.
    ValueError: {no_path}the directory lacks some of the four files; a file is empty,
        truncated, damaged or not the expected IDX file; labels are out of range; an option is
        invalid. Each message names the file and what to do.
{reference}"""


def _make_loader(name: str) -> Callable[..., Dataset]:
    """The public loader of ``IDX_SETS[name]`` (looked up at call time, so tests can swap it)."""
    spec = IDX_SETS[name]

    def loader(
        *,
        path: str | os.PathLike | None = None,
        val_size: int | float | None = spec.val_size,
        scale: str = "none",
        flatten: bool = True,
        seed: int = 0,
        limit_train: int | None = None,
        dtype: npt.DTypeLike = np.float32,
        n_classes: int | None = None,
    ) -> Dataset:
        return load_idx_set(
            IDX_SETS[name],
            path=path,
            val_size=val_size,
            scale=scale,
            flatten=flatten,
            seed=seed,
            limit_train=limit_train,
            dtype=dtype,
            n_classes=n_classes,
        )

    if spec.default_dir is None:
        where = "Nothing is downloaded: ``path`` is required."
        path_default = "Required."
        no_path = "no ``path``; "
    else:
        where = (
            f"Nothing is downloaded: without ``path`` the files are read from "
            f"``{spec.default_dir}``, where ``{spec.install}`` puts them."
        )
        path_default = f"None:\n        ``{spec.default_dir}``."
        no_path = ""
    loader.__name__ = loader.__qualname__ = name
    loader.__doc__ = _DOC.format(
        title=spec.title,
        where=textwrap.fill(where, 96),
        path_default=path_default,
        val_size=spec.val_size,
        n_classes=spec.n_classes if spec.n_classes is not None else "the largest label + 1",
        no_path=no_path,
        reference=(
            "\nReferences:\n"
            + textwrap.fill(spec.reference, 96, initial_indent="    ", subsequent_indent="    ")
            + "\n"
            if spec.reference
            else ""
        ),
    )
    return loader


fashion_mnist = _make_loader("fashion_mnist")
kmnist = _make_loader("kmnist")
idx = _make_loader("idx")
