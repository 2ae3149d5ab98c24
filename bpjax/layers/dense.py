"""``dense``: the fully connected layer."""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from bpjax import initializers
from bpjax.layers._core import Layer, _check_positive_int, _contract_leading, _expand_to


def dense(
    n_out: int,
    *,
    w_init: str | Callable = "glorot_uniform",
    b_init: str | Callable = "zeros",
    use_bias: bool = True,
    dtype: Any = jnp.float32,
) -> Layer:
    """A fully connected layer ``y = x @ w + b``.

    Args:
      n_out: output features.
      w_init: initializer name (see ``bpjax.initializers``) or callable for ``w`` [n_in, n_out].
      b_init: initializer name or callable for ``b`` [n_out].
      use_bias: if False, params are ``{"w": w}`` only.
      dtype: parameter dtype.

    Returns:
      A Layer with params ``{"w": [n_in, n_out], "b": [n_out]}``; input ``[..., n_in]``, output
      ``[..., n_out]``.

    Raises:
      ValueError: ``n_out`` is not a positive integer; at ``forward``, an input whose last axis
        is not ``n_in``.
    """
    n_out = _check_positive_int("dense", "n_out", n_out)
    w_initializer = initializers.get(w_init)
    b_initializer = initializers.get(b_init)
    name = f"dense({n_out})"

    def init(key, in_shape):
        if len(in_shape) < 1:
            raise ValueError(f"{name}: input shape must have a feature axis, got {in_shape}")
        n_in = in_shape[-1]
        w_key, b_key = jax.random.split(key)
        params = {"w": w_initializer(w_key, (n_in, n_out), dtype)}
        if use_bias:
            params["b"] = b_initializer(b_key, (n_out,), dtype)
        return (*in_shape[:-1], n_out), params

    def forward(params, x, *, key=None):
        del key  # unused: dense is deterministic
        w = params["w"]
        if x.ndim < 1 or x.shape[-1] != w.shape[0]:
            raise ValueError(
                f"{name}: input has shape {x.shape} but the layer was initialised for "
                f"{w.shape[0]} input features (w has shape {w.shape})"
            )
        y = x @ w
        if use_bias:
            y = y + _expand_to(params["b"], y.ndim)
        return y, x

    def backward(params, cache, dy):
        """dx = dy @ w.T,  dw = x.T @ dy,  db = sum(dy over batch axes).

        Each gradient has its primal's dtype, as ``jax.vjp``'s do, also when ``x`` and the
        params differ (float64 data into float32 params; a bfloat16 input): the optimizer
        state and a ``lax.scan`` carry keep their dtypes. Same dtypes cast nothing.
        """
        x = cache
        w = params["w"]
        grads = {"w": _contract_leading(x, dy).astype(w.dtype)}
        if use_bias:
            b = params["b"]
            grads["b"] = jnp.sum(dy, axis=tuple(range(dy.ndim - 1))).astype(b.dtype)
        dx = dy @ w.T
        if jnp.issubdtype(x.dtype, jnp.inexact):  # integer inputs have no gradient dtype
            dx = dx.astype(x.dtype)
        return grads, dx

    return Layer(init, forward, backward, name)
