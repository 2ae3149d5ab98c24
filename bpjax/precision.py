"""Mixed precision, pure: a gradient function that computes in a low dtype (e.g. bfloat16)
around float32 master parameters, loss and optimizer.

``mixed_precision_grad(net, loss, mode, compute_dtype)`` casts params, inputs and the network's
state to ``compute_dtype`` for the forward and backward passes, runs the loss in float32 and
returns gradients and the new state in the dtypes they came in. The cast to float32 belongs to
the loss (``_loss_in``), not to the network: the network the gradient runs through is the one
given, so every rule of ``bpjax.credit`` that walks its structure (direct feedback alignment
reads a ``serial`` network's layers and caches) sees it unchanged.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bpjax.grad import value_and_grad
from bpjax.layers import Layer, _Static
from bpjax.losses import Loss

__all__ = ["as_compute_dtype", "mixed_precision_grad"]


def _cast_floats(tree: Any, dtype: Any) -> Any:
    return jax.tree_util.tree_map(
        lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree
    )


def as_compute_dtype(compute_dtype: Any) -> np.dtype | None:
    """``compute_dtype`` as a numpy dtype; None stays None (compute in the params' dtype).

    Raises:
      ValueError: not a dtype, or not a floating one (an integer compute dtype would round
        every weight).
    """
    if compute_dtype is None:
        return None
    try:
        dtype = jnp.dtype(compute_dtype)
    except TypeError as e:
        raise ValueError(
            f"compute_dtype {compute_dtype!r} is not a dtype; use bfloat16, float16 or float32"
        ) from e
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"compute_dtype must be a floating dtype (bfloat16, float16, float32, ...), "
            f"got {dtype.name}"
        )
    return dtype


def mixed_precision_grad(net: Layer, loss: Loss, mode: str, compute_dtype: Any) -> Callable:
    """``f(params, x, y, *, key, state, feedback=None) -> ((loss, (output, new_state)), grads)``
    of ``net`` in ``compute_dtype``, by ``bpjax.grad.value_and_grad(mode=mode)``.

    With a compute dtype, params, inputs and the network's state are cast for the forward and
    backward passes, the network output is cast to float32 for the loss (and returned in
    float32), and the gradients and the new state come back in the dtypes of the params and
    the state given (float32 master weights and statistics). ``feedback`` (a learning rule's
    state, ``bpjax.credit``) is passed as it is: the rules cast it to the dtype they compute in.
    Without a compute dtype, it is ``value_and_grad`` itself.
    """
    if compute_dtype is None:
        return value_and_grad(net, loss, mode=mode, with_output=True, with_state=True)
    grad_fn = value_and_grad(
        net, _loss_in(loss, jnp.float32), mode=mode, with_output=True, with_state=True
    )

    def f(params, x, y, *, key=None, state=(), feedback=None):
        low = _cast_floats(params, compute_dtype)
        low_state = _cast_floats(state, compute_dtype)
        (value, (output, new_state)), grads = grad_fn(
            low, x.astype(compute_dtype), y, key=key, state=low_state, feedback=feedback
        )
        grads = jax.tree_util.tree_map(lambda g, p: g.astype(p.dtype), grads, params)
        new_state = jax.tree_util.tree_map(lambda n, s: n.astype(s.dtype), new_state, state)
        return (value, (output.astype(jnp.float32), new_state)), grads

    return f


def _loss_in(loss: Loss, dtype: Any) -> Loss:
    """``loss`` computed in ``dtype``: its input is cast up, its gradient back to the input's
    dtype (the network's output runs in the compute dtype, the loss in full precision)."""

    def forward(pred, target):
        value, cache = loss.forward(pred.astype(dtype), target)
        return value, (cache, _Static(pred.dtype))

    def backward(cache):
        loss_cache, pred_dtype = cache
        return loss.backward(loss_cache).astype(pred_dtype.value)

    return loss._replace(forward=forward, backward=backward)
