"""Short texts for reprs: an array as ``f32[1150,64]`` (equinox's style), a pytree as how many
numbers it holds. For ``FitResult`` and ``Dataset``, whose default reprs printed every array."""

from typing import Any

import jax
import numpy as np


def array_summary(a: Any) -> str:
    """An array as its dtype and shape (``f32[1150,64]``, ``i32[1150]``, ``bool[3]``); anything
    else as its ``repr``."""
    if not hasattr(a, "shape") or not hasattr(a, "dtype"):
        return repr(a)
    if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
        return f"key<{jax.random.key_impl(a)}>[{','.join(map(str, a.shape))}]"
    dtype = np.dtype(a.dtype)
    name = f"{dtype.kind}{dtype.itemsize * 8}" if dtype.kind in "fiuc" else dtype.name
    return f"{name}[{','.join(map(str, a.shape))}]"


def tree_summary(tree: Any) -> str:
    """How many numbers a pytree of arrays holds, in how many arrays: ``25450 numbers in 4
    arrays``."""
    from bpjax.reporting import count  # the one plural helper (not at import: it loads logging)

    arrays = [x for x in jax.tree_util.tree_leaves(tree) if hasattr(x, "size")]
    return f"{count(sum(int(x.size) for x in arrays), 'number')} in {count(len(arrays), 'array')}"
