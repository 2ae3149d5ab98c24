"""Datasets as plain numpy arrays: loaders, one `Dataset` record, and `load` by name.

Convention: features float32 ``[n, *input_shape]`` (images flattened to ``[n, h * w]`` by
default, else channels-last ``[n, h, w, 1]``); classification labels int32 ``[n]`` in
``[0, n_classes)``; regression targets float ``[n, k]``. Validation data is carved from the
training data, never the test data; scaling statistics come from the training split only. This
package is I/O: numpy (and scikit-learn for its bundled sets), no jax; nothing is downloaded
(Fashion-MNIST is read where the Debian package dataset-fashion-mnist installs it).
Batching happens on the device, in training.

Image sets stored as IDX directories (`mnist` from a path, `fashion_mnist`, `kmnist`, `idx`) are
specs read by one shared loader (``_idx_sets``). Every problem with a data file or directory
(missing, empty, truncated, another format, missing or wrong arrays, wrong dtypes, object
arrays, NaN / Inf, non-integer labels) is ONE ValueError, or FileNotFoundError for a path that
does not exist, whose one-line message names the file, what is wrong and what to do (``_files``,
``_checks``); no numpy / zipfile / gzip exception escapes.
"""

from bpjax.data._dataset import Dataset
from bpjax.data._idx import read_idx
from bpjax.data._idx_sets import fashion_mnist, idx, kmnist
from bpjax.data._mnist import mnist
from bpjax.data._npz import npz
from bpjax.data._registry import DATASETS, load
from bpjax.data._sklearn import breast_cancer, diabetes, digits, iris, wine
from bpjax.data._synthetic import circles, sine, spirals, two_moons, xor

__all__ = [
    "DATASETS",
    "Dataset",
    "load",
    "read_idx",
    # MNIST and IDX-format image sets
    "mnist",
    "fashion_mnist",
    "kmnist",
    "idx",
    # scikit-learn's bundled sets
    "digits",
    "iris",
    "wine",
    "breast_cancer",
    "diabetes",
    # synthetic
    "xor",
    "two_moons",
    "circles",
    "spirals",
    "sine",
    # user files
    "npz",
]
