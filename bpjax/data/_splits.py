"""The seeded splits ``bpjax.data._dataset.build`` and the loaders draw: the random streams per
purpose (``GENERATE``, ``TEST_SPLIT``, ``VAL_SPLIT``, ``LIMIT_TRAIN``) and ``rng_for``, and
``resolve_size``, ``split_indices`` (stratified on labels) and ``split_test``. Re-exported by
``bpjax.data._dataset``, whose docstring states the package's convention; the functions'
``__module__`` is ``bpjax.data._dataset``, where the loaders import them from."""

from __future__ import annotations

import numpy as np

# Independent random streams per purpose, so that e.g. the test split and the validation split
# drawn from the same ``seed`` are not the same permutation.
GENERATE, TEST_SPLIT, VAL_SPLIT, LIMIT_TRAIN = range(4)


def rng_for(seed: int, purpose: int) -> np.random.Generator:
    """Returns the random generator for one purpose (``GENERATE``, ``VAL_SPLIT``, ...)."""
    return np.random.default_rng([int(seed), purpose])


def resolve_size(size: int | float, n: int, *, what: str) -> int:
    """Turns a count or a fraction of ``n`` into a count in ``[0, n)``.

    Args:
        size: an int count, or a float fraction in ``[0, 1)``.
        n: the number of examples the size is taken from.
        what: the option's name, for messages (e.g. ``"val_size"``).

    Returns:
        The count; at least one example is always left over.
    """
    if isinstance(size, bool) or not isinstance(size, int | float | np.integer | np.floating):
        raise ValueError(f"{what} must be an int count or a float fraction, got {size!r}")
    if isinstance(size, float | np.floating):
        if not 0.0 <= size < 1.0:
            raise ValueError(f"{what} as a fraction must be in [0, 1), got {size}")
        count = round(float(size) * n)
    else:
        count = int(size)
    if not 0 <= count < max(n, 1):
        raise ValueError(
            f"{what}={size} takes {count} of {n} examples; it must leave at least one behind"
        )
    return count


def split_indices(
    n: int, k: int, *, rng: np.random.Generator, labels: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Splits ``range(n)`` into ``k`` taken indices and the rest, at random.

    With ``labels``, the split is stratified: each class gives ``k * n_c / n`` examples, rounded
    so the total is exactly ``k`` (largest remainders first, ties broken at random).

    Args:
        n: number of examples.
        k: how many to take, ``0 <= k <= n``.
        rng: the random generator.
        labels: optional class labels ``[n]`` to stratify on.

    Returns:
        ``(taken, rest)``: sorted int index arrays ``[k]`` and ``[n - k]``.
    """
    if labels is None or k in (0, n):
        taken = rng.permutation(n)[:k]
    else:
        _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
        quota = k * counts / n
        alloc = np.floor(quota).astype(np.int64)
        order = np.lexsort((rng.random(counts.size), alloc - quota))  # largest remainder first
        alloc[order[: k - int(alloc.sum())]] += 1
        taken = np.concatenate(
            [rng.permutation(np.flatnonzero(inverse == c))[: alloc[c]] for c in range(counts.size)]
        )
    mask = np.zeros(n, dtype=bool)
    mask[taken] = True
    return np.flatnonzero(mask), np.flatnonzero(~mask)


def split_test(
    x: np.ndarray, y: np.ndarray, *, test_size: int | float, seed: int, stratify: bool
) -> dict[str, np.ndarray]:
    """Splits ``(x, y)`` into train and test parts at random (stratified on ``y`` if asked).

    Args:
        x: features ``[n, ...]``.
        y: labels ``[n]`` or targets ``[n, ...]``.
        test_size: int count or float fraction of ``n`` for the test split.
        seed: seeds the split.
        stratify: keep each class's share in both parts.

    Returns:
        ``{"x_train", "y_train", "x_test", "y_test"}``.
    """
    k = resolve_size(test_size, len(x), what="test_size")
    if k == 0:
        raise ValueError("test_size must leave at least one test example, got 0")
    test, train = split_indices(
        len(x), k, rng=rng_for(seed, TEST_SPLIT), labels=y if stratify else None
    )
    return {"x_train": x[train], "y_train": y[train], "x_test": x[test], "y_test": y[test]}


for _public in (rng_for, resolve_size, split_indices, split_test):
    _public.__module__ = "bpjax.data._dataset"  # re-exported there, where the loaders import it
del _public
