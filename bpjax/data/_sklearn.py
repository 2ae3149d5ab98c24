"""Small datasets bundled with scikit-learn (``sklearn.datasets.load_*``; nothing is downloaded).

scikit-learn ships no test split, so one is drawn here: ``test_size`` (default 0.2) of the
examples, stratified for classification, with a FIXED seed (0), so that the test set is the same
whatever ``seed`` a run uses; ``seed`` only moves the validation split (``val_size``, default 0.2
of what is left) and the ``limit_train`` subset.

The arrays are read through scikit-learn's loaders once per scikit-learn version and cached as
``.npz`` in ``$BPJAX_CACHE_DIR`` (default ``~/.cache/bpjax``), as MNIST's are: importing
scikit-learn takes over a second, every run. A damaged cache is rebuilt, with a warning.
"""

from __future__ import annotations

import importlib.metadata

import numpy as np
import numpy.typing as npt

from bpjax.data._dataset import Dataset, build, split_test
from bpjax.data._files import cached_arrays, default_cache_dir, read_npz

# The test split's seed: fixed, so every run sees the same test set.
TEST_SEED = 0


def _load_bunch(loader_name: str, *, image: bool) -> tuple[np.ndarray, np.ndarray]:
    """The features (images, for ``image``) and targets of ``sklearn.datasets.<loader_name>``,
    cached as ``.npz`` per scikit-learn version: importing scikit-learn costs more than a
    second, and its arrays are the same for a version."""
    try:
        version = importlib.metadata.version("scikit-learn")
    except importlib.metadata.PackageNotFoundError:
        version = None  # the import below says what is missing
    kind = "images" if image else "data"

    def build() -> dict[str, np.ndarray]:
        import sklearn.datasets  # Imported here: scikit-learn is slow to import.

        if loader_name == "load_diabetes":
            bunch = sklearn.datasets.load_diabetes(scaled=False)  # raw; standardized in `build`
        else:
            bunch = getattr(sklearn.datasets, loader_name)()
        return {"x": getattr(bunch, kind), "y": bunch.target}

    if version is None:
        arrays = build()
    else:
        arrays = cached_arrays(
            default_cache_dir() / f"sklearn-{version}-{loader_name}-{kind}.npz",
            build,
            read=lambda file: read_npz(
                file, required=["x", "y"], what=f"{loader_name} cache", remedy="it is rebuilt"
            ),
            what=f"scikit-learn {loader_name}",
            source=f"scikit-learn {version}",
        )
    return arrays["x"], arrays["y"]


def _sklearn_dataset(
    name: str,
    loader_name: str,
    *,
    task: str,
    n_classes: int | None,
    image: bool = False,
    test_size: int | float,
    val_size: int | float,
    scale: str,
    flatten: bool,
    seed: int,
    limit_train: int | None,
    dtype: npt.DTypeLike,
    standardize_targets: bool = False,
) -> Dataset:
    x, y = _load_bunch(loader_name, image=image)
    regression = task == "regression"
    splits = split_test(x, y, test_size=test_size, seed=TEST_SEED, stratify=not regression)
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
        image=image,
        per_feature=not image,
        standardize_targets=standardize_targets,
    )


def digits(
    *,
    test_size: int | float = 0.2,
    val_size: int | float = 0.2,
    scale: str = "unit",
    flatten: bool = True,
    seed: int = 0,
    limit_train: int | None = None,
    dtype: npt.DTypeLike = np.float32,
) -> Dataset:
    """1797 8x8 handwritten digits, pixels 0..16, 10 classes (``sklearn.datasets.load_digits``).

    Args:
        test_size: int count or float fraction of all examples for the test split, drawn with
            a fixed seed and stratified.
        val_size: int count or float fraction of the remaining training examples held out for
            validation, drawn with ``seed``.
        scale: ``"none"``, ``"unit"`` or ``"standardize"``, with one global statistic over all
            training pixels.
        flatten: ``[n, 64]`` if True, else ``[n, 8, 8, 1]``.
        seed: seeds the validation split and the ``limit_train`` subset.
        limit_train: keep this many training examples (random subset, stratified).
        dtype: floating dtype of the features.

    Returns:
        The `Dataset`, labels int32 in [0, 10).
    """
    return _sklearn_dataset(
        "digits",
        "load_digits",
        task="classification",
        n_classes=10,
        image=True,
        test_size=test_size,
        val_size=val_size,
        scale=scale,
        flatten=flatten,
        seed=seed,
        limit_train=limit_train,
        dtype=dtype,
    )


def iris(
    *,
    test_size: int | float = 0.2,
    val_size: int | float = 0.2,
    scale: str = "standardize",
    flatten: bool = True,
    seed: int = 0,
    limit_train: int | None = None,
    dtype: npt.DTypeLike = np.float32,
) -> Dataset:
    """150 iris flowers, 4 features, 3 classes (``sklearn.datasets.load_iris``).

    Args:
        test_size: int count or float fraction of all examples for the test split, drawn with
            a fixed seed and stratified.
        val_size: int count or float fraction of the remaining training examples held out for
            validation, drawn with ``seed``.
        scale: ``"none"``, ``"unit"`` or ``"standardize"``, with per-feature training statistics.
        flatten: no effect on tabular data (already ``[n, d]``).
        seed: seeds the validation split and the ``limit_train`` subset.
        limit_train: keep this many training examples (random subset, stratified).
        dtype: floating dtype of the features.

    Returns:
        The `Dataset`, labels int32 in [0, 3).
    """
    return _sklearn_dataset(
        "iris",
        "load_iris",
        task="classification",
        n_classes=3,
        image=False,
        test_size=test_size,
        val_size=val_size,
        scale=scale,
        flatten=flatten,
        seed=seed,
        limit_train=limit_train,
        dtype=dtype,
    )


def wine(
    *,
    test_size: int | float = 0.2,
    val_size: int | float = 0.2,
    scale: str = "standardize",
    flatten: bool = True,
    seed: int = 0,
    limit_train: int | None = None,
    dtype: npt.DTypeLike = np.float32,
) -> Dataset:
    """178 wines, 13 chemical features, 3 cultivars (``sklearn.datasets.load_wine``).

    Args:
        test_size: int count or float fraction of all examples for the test split, drawn with
            a fixed seed and stratified.
        val_size: int count or float fraction of the remaining training examples held out for
            validation, drawn with ``seed``.
        scale: ``"none"``, ``"unit"`` or ``"standardize"``, with per-feature training statistics.
        flatten: no effect on tabular data (already ``[n, d]``).
        seed: seeds the validation split and the ``limit_train`` subset.
        limit_train: keep this many training examples (random subset, stratified).
        dtype: floating dtype of the features.

    Returns:
        The `Dataset`, labels int32 in [0, 3).
    """
    return _sklearn_dataset(
        "wine",
        "load_wine",
        task="classification",
        n_classes=3,
        image=False,
        test_size=test_size,
        val_size=val_size,
        scale=scale,
        flatten=flatten,
        seed=seed,
        limit_train=limit_train,
        dtype=dtype,
    )


def breast_cancer(
    *,
    test_size: int | float = 0.2,
    val_size: int | float = 0.2,
    scale: str = "standardize",
    flatten: bool = True,
    seed: int = 0,
    limit_train: int | None = None,
    dtype: npt.DTypeLike = np.float32,
) -> Dataset:
    """569 breast-cancer cases, 30 features, 2 classes (``sklearn.datasets.load_breast_cancer``).

    Args:
        test_size: int count or float fraction of all examples for the test split, drawn with
            a fixed seed and stratified.
        val_size: int count or float fraction of the remaining training examples held out for
            validation, drawn with ``seed``.
        scale: ``"none"``, ``"unit"`` or ``"standardize"``, with per-feature training statistics.
        flatten: no effect on tabular data (already ``[n, d]``).
        seed: seeds the validation split and the ``limit_train`` subset.
        limit_train: keep this many training examples (random subset, stratified).
        dtype: floating dtype of the features.

    Returns:
        The `Dataset`, labels int32 in [0, 2).
    """
    return _sklearn_dataset(
        "breast_cancer",
        "load_breast_cancer",
        task="classification",
        n_classes=2,
        image=False,
        test_size=test_size,
        val_size=val_size,
        scale=scale,
        flatten=flatten,
        seed=seed,
        limit_train=limit_train,
        dtype=dtype,
    )


def diabetes(
    *,
    test_size: int | float = 0.2,
    val_size: int | float = 0.2,
    scale: str = "standardize",
    flatten: bool = True,
    seed: int = 0,
    limit_train: int | None = None,
    dtype: npt.DTypeLike = np.float32,
    standardize_targets: bool = True,
) -> Dataset:
    """442 diabetes patients, 10 raw features, 1 target (``sklearn.datasets.load_diabetes``).

    Args:
        test_size: int count or float fraction of all examples for the test split, drawn with
            a fixed seed.
        val_size: int count or float fraction of the remaining training examples held out for
            validation, drawn with ``seed``.
        scale: ``"none"``, ``"unit"`` or ``"standardize"``, with per-feature training statistics.
        flatten: no effect on tabular data (already ``[n, d]``).
        seed: seeds the validation split and the ``limit_train`` subset.
        limit_train: keep this many training examples (random subset).
        dtype: floating dtype of the features.
        standardize_targets: standardize the targets with their training mean / std; the
            statistics are kept in ``Dataset.target_scale`` (raw = y * std + mean).

    Returns:
        The `Dataset`.
    """
    return _sklearn_dataset(
        "diabetes",
        "load_diabetes",
        task="regression",
        n_classes=None,
        image=False,
        test_size=test_size,
        val_size=val_size,
        scale=scale,
        flatten=flatten,
        seed=seed,
        limit_train=limit_train,
        dtype=dtype,
        standardize_targets=standardize_targets,
    )
