"""The table of dataset loaders and `load`, which picks one by name (e.g. from a config)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bpjax.data._dataset import Dataset
from bpjax.data._idx_sets import fashion_mnist, idx, kmnist
from bpjax.data._mnist import mnist
from bpjax.data._npz import npz
from bpjax.data._sklearn import breast_cancer, diabetes, digits, iris, wine
from bpjax.data._synthetic import circles, sine, spirals, two_moons, xor

DATASETS: dict[str, Callable[..., Dataset]] = {
    "mnist": mnist,
    "fashion_mnist": fashion_mnist,
    "kmnist": kmnist,
    "idx": idx,
    "digits": digits,
    "iris": iris,
    "wine": wine,
    "breast_cancer": breast_cancer,
    "diabetes": diabetes,
    "xor": xor,
    "two_moons": two_moons,
    "moons": two_moons,  # alias
    "circles": circles,
    "spirals": spirals,
    "sine": sine,
    "npz": npz,
}


def load(name: str, **kwargs: Any) -> Dataset:
    """Loads the dataset called ``name`` (a key of `DATASETS`; ``-`` reads as ``_``).

    Args:
        name: e.g. ``"mnist"``, ``"fashion-mnist"``, ``"two_moons"``.
        **kwargs: keyword options of that loader (``val_size``, ``scale``, ``path``, ...).

    Returns:
        The `Dataset`.

    Raises:
        ValueError: ``name`` is not in `DATASETS`.
    """
    key = name.strip().lower().replace("-", "_")
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(sorted(DATASETS))}")
    return DATASETS[key](**kwargs)
