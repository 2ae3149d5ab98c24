"""User datasets stored as one ``.npz`` file of numpy arrays.

The file holds ``x_train``, ``y_train``, ``x_test``, ``y_test`` and optionally ``x_val``,
``y_val`` (both or neither). It is read with ``allow_pickle=False``: object arrays are refused.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np
import numpy.typing as npt

from bpjax.data._dataset import Dataset, build

REQUIRED_KEYS = ("x_train", "y_train", "x_test", "y_test")
OPTIONAL_KEYS = ("x_val", "y_val")


def npz(
    *,
    path: str | os.PathLike | None = None,
    task: str | None = None,
    n_classes: int | None = None,
    val_size: int | float | None = None,
    scale: str = "none",
    flatten: bool = True,
    seed: int = 0,
    limit_train: int | None = None,
    dtype: npt.DTypeLike = np.float32,
    standardize_targets: bool = False,
) -> Dataset:
    """A dataset from a user's ``.npz`` file.

    Args:
        path: the ``.npz`` file, holding ``x_train``, ``y_train``, ``x_test``, ``y_test`` and
            optionally ``x_val``, ``y_val``.
        task: ``"classification"`` or ``"regression"``; None infers it: integer (or bool)
            ``y_train`` means classification, floating means regression.
        n_classes: number of classes; None: the largest label (over all splits) + 1.
        val_size: None: the file's ``x_val`` / ``y_val`` if it has them, else 0.1 of train. An
            int count or float fraction carves validation from train (after merging the file's
            validation split, if any, back into train).
        scale: ``"none"``, ``"unit"`` or ``"standardize"`` (per-feature training statistics).
        flatten: flatten each example to 1-D.
        seed: seeds the validation split and the ``limit_train`` subset.
        limit_train: keep this many training examples (random subset, stratified for
            classification).
        dtype: floating dtype of features (and regression targets).
        standardize_targets: regression only: standardize the targets with their training
            mean / std, kept in ``Dataset.target_scale``.

    Returns:
        The `Dataset`, named after the file's stem.
    """
    if path is None:
        raise ValueError(
            "npz needs a file: pass path=/path/to/data.npz (from a config: "
            "dataset.path=/path/to/data.npz) holding x_train, y_train, x_test, y_test "
            "[, x_val, y_val]"
        )
    file = pathlib.Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(
            f"npz: file {file} does not exist; pass path=/path/to/data.npz holding x_train, "
            f"y_train, x_test, y_test [, x_val, y_val]"
        )
    with np.load(file, allow_pickle=False) as f:
        missing = [k for k in REQUIRED_KEYS if k not in f.files]
        if missing:
            raise ValueError(
                f"{file} lacks array(s) {', '.join(missing)}; it holds {', '.join(f.files)} "
                f"and needs {', '.join(REQUIRED_KEYS)} (optionally {', '.join(OPTIONAL_KEYS)})"
            )
        present = [k for k in OPTIONAL_KEYS if k in f.files]
        if len(present) == 1:
            raise ValueError(f"{file} holds {present[0]} without its partner: give x_val and y_val")
        arrays = {k: f[k] for k in REQUIRED_KEYS + tuple(present)}
    if task is None:
        y = arrays["y_train"]
        integer = np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_
        task = "classification" if integer else "regression"
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
        standardize_targets=standardize_targets and task == "regression",
    )
