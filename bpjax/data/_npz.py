"""User datasets stored as one ``.npz`` file of numpy arrays.

The file holds ``x_train``, ``y_train``, ``x_test``, ``y_test`` and optionally ``x_val``,
``y_val`` (both or neither). It is read with ``allow_pickle=False``: object arrays are refused
(see ``_files``). Every problem with the file or its arrays is one ValueError (FileNotFoundError
when the file does not exist) that names the file.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np
import numpy.typing as npt

from bpjax.data._dataset import Dataset, build
from bpjax.data._files import read_npz

REQUIRED_KEYS = ("x_train", "y_train", "x_test", "y_test")
OPTIONAL_KEYS = ("x_val", "y_val")
_HOW = (
    "pass path=/path/to/data.npz (from a config: dataset.path=/path/to/data.npz), a file written "
    "by np.savez holding x_train, y_train, x_test, y_test [, x_val, y_val]"
)


def npz(
    *,
    path: str | os.PathLike | None = None,
    task: str | None = None,
    n_classes: int | None = None,
    val_size: int | float | None = None,
    scale: str = "none",
    flatten: bool = True,
    image: bool = True,
    seed: int = 0,
    limit_train: int | None = None,
    dtype: npt.DTypeLike = np.float32,
    standardize_targets: bool = False,
) -> Dataset:
    """A dataset from a user's ``.npz`` file.

    Args:
        path: the ``.npz`` file, holding ``x_train``, ``y_train``, ``x_test``, ``y_test`` and
            optionally ``x_val``, ``y_val``. Features are ``[n, d]`` (tabular) or images
            ``[n, h, w]`` / ``[n, h, w, c]`` (channels-last).
        task: ``"classification"`` or ``"regression"``; None infers it: floating (or complex)
            ``y_train`` means regression, anything else (integers, bools, strings) means
            classification, whose checks then say what is wrong with non-integer labels.
        n_classes: number of classes; None: the largest label (over all splits) + 1.
        val_size: None: the file's ``x_val`` / ``y_val`` if it has them, else 0.1 of train. An
            int count or float fraction carves validation from train (after merging the file's
            validation split, if any, back into train).
        scale: ``"none"``, ``"unit"`` or ``"standardize"`` (per-feature training statistics).
        flatten: flatten each example to 1-D (``[n, h * w * c]``).
        image: with ``flatten=False``, examples ``[h, w]`` are grey images and get a channel
            axis: ``[n, h, w, 1]`` (NHWC, as every image set). False keeps them ``[n, h, w]``.
        seed: seeds the validation split and the ``limit_train`` subset.
        limit_train: keep this many training examples (random subset, stratified for
            classification).
        dtype: floating dtype of features (and regression targets).
        standardize_targets: regression only: standardize the targets with their training
            mean / std, kept in ``Dataset.target_scale``.

    Returns:
        The `Dataset`, named after the file's stem.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: no ``path``; the file is a directory, empty, truncated, damaged or not an
            ``.npz``; an array is missing, an object or structured array, damaged, or breaks the
            package convention (lengths, shapes, dtypes, NaN / Inf, labels); an option is invalid.
            The message names the file.
    """
    if path is None:
        raise ValueError(f"npz needs a file: {_HOW}")
    arrays = read_npz(path, required=REQUIRED_KEYS, optional=OPTIONAL_KEYS, what="npz", remedy=_HOW)
    file = pathlib.Path(path).expanduser()
    present = [k for k in OPTIONAL_KEYS if k in arrays]
    if len(present) == 1:
        raise ValueError(
            f"{file} holds {present[0]} without its partner; give x_val and y_val, or neither"
        )
    if task is None:
        inexact = np.issubdtype(arrays["y_train"].dtype, np.inexact)
        task = "regression" if inexact else "classification"
    if val_size is None and "x_val" not in arrays:
        val_size = 0.1
    return build(
        file.stem,
        **arrays,
        task=task,
        n_classes=n_classes,
        val_size=val_size,
        scale=scale,
        flatten=flatten,
        seed=seed,
        limit_train=limit_train,
        dtype=dtype,
        image=image,
        standardize_targets=standardize_targets and task == "regression",
        source=file,
    )
