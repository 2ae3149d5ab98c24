"""The `Dataset` record and the preprocessing every loader shares.

Convention (the whole ``bpjax.data`` package):

* features ``x_*``: floating (float32 by default), shape ``[n, *input_shape]``. Image data is
  ``[n, height, width, channels]`` (channels-last) when not flattened, ``[n, h * w * c]`` when
  flattened (the default).
* classification labels ``y_*``: int32 ``[n]`` in ``[0, n_classes)``.
* regression targets ``y_*``: floating ``[n, k]`` with ``k >= 1`` (always 2-D).
* the validation split is carved from the training data, never from the test data, and every
  preprocessing statistic (min/max, mean/std) comes from the final training split only (after
  the validation split is carved and ``limit_train`` is applied).
* every split is a seeded selection that keeps the source order; classification splits are
  stratified (each class keeps its share, up to rounding).

The seeded splits (the random streams, ``rng_for``, ``resolve_size``, ``split_indices``,
``split_test``) are defined in ``bpjax.data._splits`` and re-exported here; the ``Dataset``
record and ``build`` (validation, splitting, preprocessing) are defined here.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import numpy.typing as npt

from bpjax._summaries import array_summary
from bpjax.data._checks import TASKS, check_split
from bpjax.data._splits import (
    GENERATE,  # noqa: F401  (re-exported: used by the synthetic sets)
    LIMIT_TRAIN,
    TEST_SPLIT,  # noqa: F401  (re-exported)
    VAL_SPLIT,
    resolve_size,
    rng_for,
    split_indices,
    split_test,  # noqa: F401  (re-exported: used by the loaders that split a test set)
)

SCALES = ("none", "unit", "standardize")

# Features whose training std is below this are only centred, not divided: dividing by a tiny
# std would blow up test values that differ from the (constant) training value.
_MIN_STD = 1e-8


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """One dataset, split into train / validation / test and preprocessed.

    Attributes:
        name: the dataset's name, e.g. ``"mnist"``.
        x_train: features ``[n_train, *input_shape]``, floating.
        y_train: labels int32 ``[n_train]`` (classification) or targets ``[n_train, k]``.
        x_val: features ``[n_val, *input_shape]`` (``n_val`` may be 0), carved from train data.
        y_val: labels / targets of the validation split.
        x_test: features ``[n_test, *input_shape]``.
        y_test: labels / targets of the test split.
        task: ``"classification"`` or ``"regression"``.
        n_classes: number of classes, ``None`` for regression.
        input_shape: per-example feature shape, e.g. ``(784,)`` or ``(28, 28, 1)``.
        target_scale: for regression with standardized targets, ``(mean, std)`` each ``[k]``, the
            training statistics the targets were standardized with: ``raw = y * std + mean``.
            ``None`` when the targets are as loaded.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    task: str
    n_classes: int | None
    input_shape: tuple[int, ...]
    target_scale: tuple[np.ndarray, np.ndarray] | None = None

    def __repr__(self) -> str:
        # Arrays as their dtype and shape (the default repr printed them all)
        fields = ", ".join(
            f"{f.name}={array_summary(getattr(self, f.name))}" for f in dataclasses.fields(self)
        )
        return f"Dataset({fields})"

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if (self.task == "classification") != (self.n_classes is not None):
            raise ValueError(
                f"n_classes must be set for classification and None for regression; got task "
                f"{self.task!r} with n_classes={self.n_classes!r}"
            )
        for split, x, y in self._splits():
            check_split(split, x, y, task=self.task, n_classes=self.n_classes)
            if x.shape[1:] != tuple(self.input_shape):
                raise ValueError(
                    f"x_{split} has per-example shape {x.shape[1:]}, expected input_shape "
                    f"{tuple(self.input_shape)}"
                )
            if not np.issubdtype(x.dtype, np.floating):
                raise ValueError(f"x_{split} must be floating, got {x.dtype}")
            if self.task == "classification" and y.dtype != np.int32:
                raise ValueError(f"y_{split} must be int32 labels, got {y.dtype}")
            if self.task == "regression" and (y.ndim != 2 or y.shape[1] != self.y_train.shape[1]):
                raise ValueError(
                    f"y_{split} must be [n, {self.y_train.shape[-1]}] targets, got {y.shape}"
                )

    def _splits(self) -> tuple[tuple[str, np.ndarray, np.ndarray], ...]:
        return (
            ("train", self.x_train, self.y_train),
            ("val", self.x_val, self.y_val),
            ("test", self.x_test, self.y_test),
        )

    @property
    def n_outputs(self) -> int:
        """Width of the model's output: ``n_classes``, or ``k`` for ``[n, k]`` targets."""
        if self.n_classes is not None:
            return self.n_classes
        return int(self.y_train.shape[-1])

    @property
    def n_train(self) -> int:
        """Number of training examples."""
        return int(self.x_train.shape[0])

    @property
    def n_val(self) -> int:
        """Number of validation examples (may be 0)."""
        return int(self.x_val.shape[0])

    @property
    def n_test(self) -> int:
        """Number of test examples."""
        return int(self.x_test.shape[0])

    def summary(self) -> str:
        """Returns a one-line description: task, shapes, split sizes and feature range."""
        if self.task == "classification":
            kind = f"classification, {self.n_classes} classes"
        else:
            kind = f"regression, {self.n_outputs} target(s)"
            if self.target_scale is not None:
                kind += " (standardized)"
        x_range = ""
        if self.n_train:
            x_range = f" in [{self.x_train.min():.3g}, {self.x_train.max():.3g}]"
        return (
            f"{self.name}: {kind}; input {tuple(self.input_shape)} {self.x_train.dtype}{x_range}; "
            f"train {self.n_train}, val {self.n_val}, test {self.n_test}"
        )


def build(
    name: str,
    *,
    x_train: npt.ArrayLike,
    y_train: npt.ArrayLike,
    x_test: npt.ArrayLike,
    y_test: npt.ArrayLike,
    x_val: npt.ArrayLike | None = None,
    y_val: npt.ArrayLike | None = None,
    task: str,
    n_classes: int | None = None,
    val_size: int | float | None,
    scale: str,
    flatten: bool,
    seed: int,
    limit_train: int | None,
    dtype: npt.DTypeLike,
    image: bool = False,
    per_feature: bool = True,
    standardize_targets: bool = False,
    source: str | os.PathLike | None = None,
) -> Dataset:
    """Validates raw splits, carves validation data, preprocesses, and returns a `Dataset`.

    Steps, in order: validate every given split; choose the validation split (the given one when
    ``val_size`` is None, else carve ``val_size`` from train, after merging a given validation
    split back into train); subsample train to ``limit_train``; reshape; scale features with
    training statistics; cast.

    Args:
        name: the dataset's name.
        x_train: raw training features ``[n, ...]``.
        y_train: raw training labels ``[n]`` or targets ``[n]`` / ``[n, k]``.
        x_test: raw test features.
        y_test: raw test labels / targets.
        x_val: optional raw validation features (``y_val`` must come with it).
        y_val: optional raw validation labels / targets.
        task: ``"classification"`` or ``"regression"``.
        n_classes: number of classes; inferred as ``max label + 1`` when None (classification).
        val_size: int count or float fraction of train to carve as validation (0: empty). None
            keeps the given ``x_val`` / ``y_val`` (and is an error without them).
        scale: ``"none"``, ``"unit"`` (min-max to [0, 1] with training min / max) or
            ``"standardize"`` (training mean / std; features with std < 1e-8 are only centred).
        flatten: flatten each example to 1-D. Otherwise image data ``[n, h, w]`` gets a channel
            axis ``[n, h, w, 1]``.
        seed: seeds the validation split and the ``limit_train`` subset.
        limit_train: keep a random (stratified) subset of this many training examples (all of
            them if there are fewer); None keeps all.
        dtype: floating dtype of features (and regression targets).
        image: the examples are images ``[h, w]`` or ``[h, w, c]``.
        per_feature: scaling statistics per feature (tabular data) or one global value (images,
            where per-pixel statistics would distort border pixels).
        standardize_targets: regression only: standardize targets with training mean / std and
            store them in ``Dataset.target_scale``.
        source: the file or directory the arrays came from; errors about the arrays start with
            it, so a message names what to fix.

    Returns:
        The preprocessed `Dataset`.

    Raises:
        ValueError: an option is invalid, or the arrays break the convention (see `check_split`;
            also: an empty train or test split, feature shapes or target widths that differ
            between splits).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    dtype = np.dtype(dtype)
    if not np.issubdtype(dtype, np.floating):
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    if (x_val is None) != (y_val is None):
        raise ValueError("x_val and y_val must be given together")

    splits = {"train": (x_train, y_train), "test": (x_test, y_test)}
    if x_val is not None:
        splits["val"] = (x_val, y_val)
    splits = {s: (np.asarray(x), np.asarray(y)) for s, (x, y) in splits.items()}
    at = f"{source}: " if source is not None else ""
    if task == "classification" and n_classes is None:
        for s, (x, y) in splits.items():
            check_split(s, x, y, task=task, n_classes=None, source=source)
        n_classes = int(max((y.max() for _, y in splits.values() if y.size), default=-1)) + 1
    if task == "regression":
        n_classes = None
    for s, (x, y) in splits.items():
        check_split(s, x, y, task=task, n_classes=n_classes, source=source)
        if s != "val" and not len(x):
            raise ValueError(f"{at}x_{s} holds no examples; a {s} split needs at least one")
    shapes = {s: x.shape[1:] for s, (x, _) in splits.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(
            f"{at}per-example feature shapes differ between splits: {shapes}; every split "
            f"needs the same feature shape"
        )
    if task == "regression":
        widths = {s: (y.shape[1] if y.ndim == 2 else 1) for s, (_, y) in splits.items()}
        if len(set(widths.values())) > 1:
            raise ValueError(
                f"{at}target widths differ between splits: {widths}; every split needs the "
                f"same number of targets"
            )

    x_train, y_train = splits["train"]
    x_test, y_test = splits["test"]
    stratify = task == "classification"
    if val_size is None:
        if "val" not in splits:
            raise ValueError(f"{name}: val_size=None needs a given validation split")
        x_val, y_val = splits["val"]
    else:
        if "val" in splits:
            x_train = np.concatenate([x_train, splits["val"][0]])
            y_train = np.concatenate([y_train, splits["val"][1]])
        k = resolve_size(val_size, len(x_train), what="val_size")
        val_idx, train_idx = split_indices(
            len(x_train), k, rng=rng_for(seed, VAL_SPLIT), labels=y_train if stratify else None
        )
        x_val, y_val = x_train[val_idx], y_train[val_idx]
        x_train, y_train = x_train[train_idx], y_train[train_idx]

    if limit_train is not None:
        if isinstance(limit_train, bool) or int(limit_train) < 1:
            raise ValueError(f"limit_train must be a positive int or None, got {limit_train!r}")
        if limit_train < len(x_train):
            keep, _ = split_indices(
                len(x_train),
                int(limit_train),
                rng=rng_for(seed, LIMIT_TRAIN),
                labels=y_train if stratify else None,
            )
            x_train, y_train = x_train[keep], y_train[keep]

    xs = [_reshape(x, flatten=flatten, image=image) for x in (x_train, x_val, x_test)]
    xs = [x.astype(dtype, copy=False) for x in xs]
    if scale != "none":
        xs = _scale(xs, scale=scale, per_feature=per_feature, dtype=dtype)

    target_scale = None
    if task == "classification":
        ys = [y.astype(np.int32) for y in (y_train, y_val, y_test)]
    else:
        ys = [y.reshape(len(y), -1).astype(dtype) for y in (y_train, y_val, y_test)]
        if standardize_targets:
            mean, std = _stats(ys[0], "standardize", per_feature=True)
            mean, std = mean.astype(dtype), std.astype(dtype)
            ys = [(y - mean) / std for y in ys]
            target_scale = (mean, std)
    arrays = [a for pair in zip(xs, ys, strict=True) for a in pair]
    for a in arrays:
        a.flags.writeable = False
    return Dataset(
        name,
        *arrays,
        task=task,
        n_classes=n_classes,
        input_shape=tuple(int(d) for d in xs[0].shape[1:]),
        target_scale=target_scale,
    )


def _reshape(x: np.ndarray, *, flatten: bool, image: bool) -> np.ndarray:
    if x.ndim == 1:
        return x.reshape(-1, 1)
    if flatten:
        return x.reshape(len(x), int(np.prod(x.shape[1:])))  # not -1: n may be 0
    if image and x.ndim == 3:
        return x[..., None]
    return x


def _stats(x: np.ndarray, scale: str, *, per_feature: bool) -> tuple[np.ndarray, np.ndarray]:
    """Returns ``(shift, divisor)`` in float64 so that ``(x - shift) / divisor`` is scaled."""
    axis = 0 if per_feature else None
    if x.shape[0] == 0:
        raise ValueError("cannot compute scaling statistics of an empty training split")
    if scale == "unit":
        lo = np.min(x, axis=axis).astype(np.float64)
        span = np.max(x, axis=axis).astype(np.float64) - lo
        return lo, np.where(span > 0, span, 1.0)
    mean = np.mean(x, axis=axis, dtype=np.float64)
    std = np.std(x, axis=axis, dtype=np.float64)
    return mean, np.where(std < _MIN_STD, 1.0, std)


def _scale(
    xs: list[np.ndarray], *, scale: str, per_feature: bool, dtype: np.dtype
) -> list[np.ndarray]:
    """Scales every split with the statistics of the first (training) split."""
    shift, divisor = _stats(xs[0], scale, per_feature=per_feature)
    shift, divisor = np.asarray(shift, dtype), np.asarray(divisor, dtype)
    return [(x - shift) / divisor for x in xs]
