"""Validating one split's arrays against the ``bpjax.data`` convention (see ``_dataset``).

Every check raises ONE ValueError, one line: ``[{source}: ]{what is wrong}; {what to do}``, where
``source`` is the file or directory the arrays came from, so a user knows what to fix. Features
must be real numbers (int, uint, float or bool: not complex, strings, dates or objects) and
finite; classification labels 1-D integers in ``[0, n_classes)``; regression targets ``[n]`` or
``[n, k]``, real and finite.
"""

from __future__ import annotations

import os

import numpy as np

TASKS = ("classification", "regression")


def _real_dtype_problem(a: np.ndarray) -> str | None:
    """Why ``a``'s dtype is not real numbers (None when it is: int, uint, float or bool)."""
    if np.issubdtype(a.dtype, np.complexfloating):
        return "complex numbers"
    if a.dtype.kind in "US":
        return "strings"
    if a.dtype.kind in "Mm":
        return "dates or times"
    if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
        return "non-numeric values"
    return None


def check_split(
    split: str,
    x: np.ndarray,
    y: np.ndarray,
    *,
    task: str,
    n_classes: int | None,
    source: str | os.PathLike | None = None,
) -> None:
    """Raises a ValueError naming ``split`` if ``x`` / ``y`` break the package convention.

    Checks: matching lengths, real finite features (int, uint, float or bool; not complex,
    strings, dates), and for classification 1-D integer labels in ``[0, n_classes)``; for
    regression 1-D or 2-D real finite targets. Each message says what to do about it.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"`` (used in messages).
        x: features ``[n, ...]``.
        y: labels ``[n]`` or targets ``[n]`` / ``[n, k]``.
        task: ``"classification"`` or ``"regression"``.
        n_classes: number of classes (classification), else ignored.
        source: where the arrays came from (a file, a directory), prefixed to messages.

    Raises:
        ValueError: the first problem found, one line.
    """
    at = f"{source}: " if source is not None else ""
    xn, yn = f"x_{split}", f"y_{split}"
    if x.ndim == 0 or y.ndim == 0:
        raise ValueError(
            f"{at}{xn} and {yn} must have a leading example axis, got shapes {x.shape} and "
            f"{y.shape}; store one row per example"
        )
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"{at}{split} split: {xn} has {x.shape[0]} examples but {yn} has {y.shape[0]}; "
            f"store one label or target per example"
        )
    problem = _real_dtype_problem(x)
    if problem:
        fix = {
            "complex numbers": "split them into real features, e.g. "
            "np.concatenate([x.real, x.imag], axis=-1)",
            "strings": "encode them as numbers first",
        }.get(problem, "convert them to numbers, e.g. x.astype(np.float32)")
        raise ValueError(
            f"{at}{xn} holds {problem} (dtype {x.dtype}); features must be real numbers: {fix}"
        )
    if np.issubdtype(x.dtype, np.floating):
        n_bad = x.size - int(np.count_nonzero(np.isfinite(x)))
        if n_bad:
            raise ValueError(
                f"{at}{xn} contains {n_bad} non-finite value(s) (NaN or Inf) out of {x.size}; "
                f"remove or impute them (e.g. np.nan_to_num, or drop those examples)"
            )
    if task == "classification":
        _check_labels(at, yn, y, n_classes=n_classes)
    elif task == "regression":
        if y.ndim not in (1, 2):
            raise ValueError(
                f"{at}{yn} must be targets [n] or [n, k], got shape {y.shape}; reshape them, "
                f"e.g. y.reshape(len(y), -1)"
            )
        problem = _real_dtype_problem(y)
        if problem:
            raise ValueError(
                f"{at}{yn} holds {problem} (dtype {y.dtype}); regression targets must be real "
                f"numbers: convert them (e.g. y.astype(np.float32)), or pass "
                f"task=classification for class labels"
            )
        if np.issubdtype(y.dtype, np.floating):
            n_bad = y.size - int(np.count_nonzero(np.isfinite(y)))
            if n_bad:
                raise ValueError(
                    f"{at}{yn} contains {n_bad} non-finite target value(s) (NaN or Inf); remove "
                    f"those examples"
                )
    else:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def _check_labels(at: str, yn: str, y: np.ndarray, *, n_classes: int | None) -> None:
    if y.ndim != 1:
        fix = "store one integer class per example"
        if y.ndim == 2 and y.shape[1] == 1:
            fix = "flatten them: y.reshape(-1)"
        elif y.ndim == 2:
            fix = "one-hot labels? store y.argmax(axis=1)"
        raise ValueError(f"{at}{yn} must be 1-D class labels [n], got shape {y.shape}; {fix}")
    problem = _real_dtype_problem(y)
    if problem:
        raise ValueError(
            f"{at}classification needs integer class labels, but {yn} holds {problem} (dtype "
            f"{y.dtype}); encode them as 0, 1, ..., e.g. "
            f"classes, y = np.unique(y, return_inverse=True)"
        )
    if not is_integer_valued(y):
        example = y[~_integral_mask(y)][:1]
        raise ValueError(
            f"{at}classification needs integer class labels, but {yn} has dtype {y.dtype}"
            + (f" with non-integer values (e.g. {example[0]!r})" if example.size else "")
            + "; store integer labels, or pass task=regression for real-valued targets"
        )
    if y.size and y.min() < 0:  # before n_classes: an inferred one would be max + 1
        raise ValueError(
            f"{at}{yn} has negative labels (min {y.min()}): class labels are 0, 1, ...; "
            f"shift or re-encode them"
        )
    if y.size and n_classes is not None:
        lo, hi = y.min(), y.max()
        if hi >= n_classes:
            raise ValueError(
                f"{at}{yn} has labels outside [0, {n_classes}): min {lo}, max {hi}; fix the "
                f"labels or the number of classes (n_classes)"
            )


def _integral_mask(y: np.ndarray) -> np.ndarray:
    if np.issubdtype(y.dtype, np.floating):
        return np.isfinite(y) & (np.floor(y) == y)
    return np.full(y.shape, np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_)


def is_integer_valued(y: np.ndarray) -> bool:
    """Whether ``y`` holds integers: an integer / bool dtype, or floats that are all integral."""
    if np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_:
        return True
    return bool(np.issubdtype(y.dtype, np.floating) and _integral_mask(y).all())
