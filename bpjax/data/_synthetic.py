"""Synthetic toy problems, generated with numpy and fully determined by ``seed``.

``two_moons``, ``circles``, ``spirals`` and ``sine`` draw ``n_samples`` points from ``seed``, then
split off ``test_size`` (default 0.2) of them as test data and ``val_size`` (default 0.2) of the
rest as validation data, both with ``seed`` (stratified for classification). ``xor`` is the
classic four points (see `xor`). Features are 2-D points ``[n, 2]`` (``[n, 1]`` for ``sine``).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from bpjax.data._dataset import GENERATE, Dataset, build, rng_for, split_test

XOR_X = np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
XOR_Y = np.array([0, 1, 1, 0])


def _class_sizes(n_samples: int, n_classes: int) -> np.ndarray:
    """Splits ``n_samples`` as evenly as possible over classes (first classes get the extra)."""
    if n_samples < n_classes:
        raise ValueError(f"n_samples={n_samples} must be at least n_classes={n_classes}")
    return np.full(n_classes, n_samples // n_classes) + (
        np.arange(n_classes) < n_samples % n_classes
    )


def _finish(
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    *,
    task: str,
    n_classes: int | None,
    test_size: int | float,
    val_size: int | float,
    scale: str,
    flatten: bool,
    seed: int,
    limit_train: int | None,
    dtype: npt.DTypeLike,
    standardize_targets: bool = False,
) -> Dataset:
    splits = split_test(x, y, test_size=test_size, seed=seed, stratify=task == "classification")
    return build(
        name,
        **splits,
        task=task,
        n_classes=n_classes,
        val_size=val_size,
        scale=scale,
        flatten=flatten,
        seed=seed,
        limit_train=limit_train,
        dtype=dtype,
        standardize_targets=standardize_targets,
    )


def xor(
    *,
    n_repeat: int = 1,
    val_size: int | float | None = None,
    scale: str = "none",
    flatten: bool = True,
    seed: int = 0,
    limit_train: int | None = None,
    dtype: npt.DTypeLike = np.float32,
) -> Dataset:
    """XOR: the four points of {0, 1}^2, label ``x0 != x1`` (2 classes).

    The classic problem has no held-out data: train is the four points repeated ``n_repeat``
    times, and by default validation and test are the four points themselves, so "val / test
    accuracy" means "has it learned XOR". Nothing is random unless ``val_size`` or
    ``limit_train`` is given.

    Args:
        n_repeat: how many copies of the four points make up the training split.
        val_size: None: validation = the four points. An int count or float fraction carves
            validation from the training copies instead, like every other loader (0: empty).
        scale: ``"none"``, ``"unit"`` or ``"standardize"`` (training statistics).
        flatten: no effect (points are already ``[n, 2]``).
        seed: seeds a carved validation split and the ``limit_train`` subset.
        limit_train: keep this many training examples.
        dtype: floating dtype of the features.

    Returns:
        The `Dataset`: train ``[4 * n_repeat, 2]``, test ``[4, 2]``, labels int32 in [0, 2).
    """
    if isinstance(n_repeat, bool) or n_repeat < 1:
        raise ValueError(f"n_repeat must be a positive int, got {n_repeat!r}")
    # Given a val_size, carve validation from the training copies, without folding the four
    # points of the default validation split back into train.
    four_points = {"x_val": XOR_X, "y_val": XOR_Y} if val_size is None else {}
    return build(
        "xor",
        x_train=np.tile(XOR_X, (n_repeat, 1)),
        y_train=np.tile(XOR_Y, n_repeat),
        **four_points,
        x_test=XOR_X,
        y_test=XOR_Y,
        task="classification",
        n_classes=2,
        val_size=val_size,
        scale=scale,
        flatten=flatten,
        seed=seed,
        limit_train=limit_train,
        dtype=dtype,
    )


def two_moons(
    *,
    n_samples: int = 1000,
    noise: float = 0.1,
    test_size: int | float = 0.2,
    val_size: int | float = 0.2,
    scale: str = "none",
    flatten: bool = True,
    seed: int = 0,
    limit_train: int | None = None,
    dtype: npt.DTypeLike = np.float32,
) -> Dataset:
    """Two interleaving half circles (2 classes), as in ``sklearn.datasets.make_moons``.

    Class 0: ``(cos t, sin t)``; class 1: ``(1 - cos t, 0.5 - sin t)``; ``t ~ U[0, pi]``; plus
    Gaussian noise of std ``noise`` on each coordinate.

    Args:
        n_samples: total number of points before the test / validation splits.
        noise: std of the Gaussian noise added to each coordinate.
        test_size: int count or float fraction of the points held out as test data.
        val_size: int count or float fraction of the remaining points held out for validation.
        scale: ``"none"``, ``"unit"`` or ``"standardize"`` (per-feature training statistics).
        flatten: no effect (points are already ``[n, 2]``).
        seed: seeds the points, the splits and the ``limit_train`` subset.
        limit_train: keep this many training examples (stratified random subset).
        dtype: floating dtype of the features.

    Returns:
        The `Dataset`, points ``[n, 2]``, labels int32 in [0, 2).
    """
    rng = rng_for(seed, GENERATE)
    sizes = _class_sizes(n_samples, 2)
    t0, t1 = rng.uniform(0.0, np.pi, sizes[0]), rng.uniform(0.0, np.pi, sizes[1])
    x = np.concatenate(
        [
            np.stack([np.cos(t0), np.sin(t0)], axis=1),
            np.stack([1.0 - np.cos(t1), 0.5 - np.sin(t1)], axis=1),
        ]
    )
    x += noise * rng.standard_normal(x.shape)
    y = np.repeat(np.arange(2), sizes)
    return _finish(
        "two_moons",
        x,
        y,
        task="classification",
        n_classes=2,
        test_size=test_size,
        val_size=val_size,
        scale=scale,
        flatten=flatten,
        seed=seed,
        limit_train=limit_train,
        dtype=dtype,
    )


def circles(
    *,
    n_samples: int = 1000,
    noise: float = 0.05,
    factor: float = 0.5,
    test_size: int | float = 0.2,
    val_size: int | float = 0.2,
    scale: str = "none",
    flatten: bool = True,
    seed: int = 0,
    limit_train: int | None = None,
    dtype: npt.DTypeLike = np.float32,
) -> Dataset:
    """Two concentric circles (2 classes), as in ``sklearn.datasets.make_circles``.

    Class 0: the unit circle; class 1: the circle of radius ``factor``; angles ``U[0, 2 pi)``;
    plus Gaussian noise of std ``noise`` on each coordinate.

    Args:
        n_samples: total number of points before the test / validation splits.
        noise: std of the Gaussian noise added to each coordinate.
        factor: radius of the inner circle, in (0, 1).
        test_size: int count or float fraction of the points held out as test data.
        val_size: int count or float fraction of the remaining points held out for validation.
        scale: ``"none"``, ``"unit"`` or ``"standardize"`` (per-feature training statistics).
        flatten: no effect (points are already ``[n, 2]``).
        seed: seeds the points, the splits and the ``limit_train`` subset.
        limit_train: keep this many training examples (stratified random subset).
        dtype: floating dtype of the features.

    Returns:
        The `Dataset`, points ``[n, 2]``, labels int32 in [0, 2).
    """
    if not 0.0 < factor < 1.0:
        raise ValueError(f"factor must be in (0, 1), got {factor}")
    rng = rng_for(seed, GENERATE)
    sizes = _class_sizes(n_samples, 2)
    y = np.repeat(np.arange(2), sizes)
    angle = rng.uniform(0.0, 2.0 * np.pi, n_samples)
    radius = np.where(y == 0, 1.0, factor)
    x = radius[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    x += noise * rng.standard_normal(x.shape)
    return _finish(
        "circles",
        x,
        y,
        task="classification",
        n_classes=2,
        test_size=test_size,
        val_size=val_size,
        scale=scale,
        flatten=flatten,
        seed=seed,
        limit_train=limit_train,
        dtype=dtype,
    )


def spirals(
    *,
    n_samples: int = 1000,
    n_classes: int = 2,
    noise: float = 0.05,
    n_turns: float = 1.0,
    test_size: int | float = 0.2,
    val_size: int | float = 0.2,
    scale: str = "none",
    flatten: bool = True,
    seed: int = 0,
    limit_train: int | None = None,
    dtype: npt.DTypeLike = np.float32,
) -> Dataset:
    """Interleaved spiral arms, one class per arm.

    Arm ``c`` of ``k``: radius ``r ~ sqrt(U[0, 1])`` (even density over the disc), angle
    ``2 pi (n_turns * r + c / k)``; point ``r (cos, sin)`` plus Gaussian noise of std ``noise``.

    Args:
        n_samples: total number of points before the test / validation splits.
        n_classes: number of arms (classes), at least 2.
        noise: std of the Gaussian noise added to each coordinate.
        n_turns: how many turns each arm makes from the centre to radius 1.
        test_size: int count or float fraction of the points held out as test data.
        val_size: int count or float fraction of the remaining points held out for validation.
        scale: ``"none"``, ``"unit"`` or ``"standardize"`` (per-feature training statistics).
        flatten: no effect (points are already ``[n, 2]``).
        seed: seeds the points, the splits and the ``limit_train`` subset.
        limit_train: keep this many training examples (stratified random subset).
        dtype: floating dtype of the features.

    Returns:
        The `Dataset`, points ``[n, 2]``, labels int32 in [0, n_classes).
    """
    if isinstance(n_classes, bool) or n_classes < 2:
        raise ValueError(f"spirals needs n_classes >= 2, got {n_classes!r}")
    rng = rng_for(seed, GENERATE)
    y = np.repeat(np.arange(n_classes), _class_sizes(n_samples, n_classes))
    radius = np.sqrt(rng.uniform(0.0, 1.0, n_samples))
    angle = 2.0 * np.pi * (n_turns * radius + y / n_classes)
    x = radius[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    x += noise * rng.standard_normal(x.shape)
    return _finish(
        "spirals",
        x,
        y,
        task="classification",
        n_classes=n_classes,
        test_size=test_size,
        val_size=val_size,
        scale=scale,
        flatten=flatten,
        seed=seed,
        limit_train=limit_train,
        dtype=dtype,
    )


def sine(
    *,
    n_samples: int = 1000,
    noise: float = 0.1,
    test_size: int | float = 0.2,
    val_size: int | float = 0.2,
    scale: str = "none",
    flatten: bool = True,
    seed: int = 0,
    limit_train: int | None = None,
    dtype: npt.DTypeLike = np.float32,
    standardize_targets: bool = False,
) -> Dataset:
    """1-D regression: ``y = sin(x) + noise * N(0, 1)`` with ``x ~ U[-pi, pi]``.

    Args:
        n_samples: total number of points before the test / validation splits.
        noise: std of the Gaussian noise added to the targets.
        test_size: int count or float fraction of the points held out as test data.
        val_size: int count or float fraction of the remaining points held out for validation.
        scale: ``"none"``, ``"unit"`` or ``"standardize"`` (training statistics).
        flatten: no effect (inputs are already ``[n, 1]``).
        seed: seeds the points, the splits and the ``limit_train`` subset.
        limit_train: keep this many training examples (random subset).
        dtype: floating dtype of inputs and targets.
        standardize_targets: standardize the targets with their training mean / std, kept in
            ``Dataset.target_scale``.

    Returns:
        The `Dataset`, inputs ``[n, 1]``, targets ``[n, 1]``.
    """
    if isinstance(n_samples, bool) or n_samples < 2:
        raise ValueError(f"n_samples must be at least 2, got {n_samples!r}")
    rng = rng_for(seed, GENERATE)
    x = rng.uniform(-np.pi, np.pi, (n_samples, 1))
    y = np.sin(x) + noise * rng.standard_normal(x.shape)
    return _finish(
        "sine",
        x,
        y,
        task="regression",
        n_classes=None,
        test_size=test_size,
        val_size=val_size,
        scale=scale,
        flatten=flatten,
        seed=seed,
        limit_train=limit_train,
        dtype=dtype,
        standardize_targets=standardize_targets,
    )
