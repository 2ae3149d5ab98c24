"""The pieces ``bpjax.layers.normalization``'s layers share: argument and input checks, the
compute dtype, the affine params, the two-pass standardization and its backward, and the
affine map's gradients. The conventions they implement are stated in
``bpjax.layers.normalization``'s docstring."""

import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

_Shape = tuple[int, ...]


def _check_eps(name: str, eps: Any) -> float:
    if not isinstance(eps, numbers.Real) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(
            f"{name}: eps must be a positive number (it keeps 1/sqrt(var + eps) finite where a "
            f"variance is 0), got {eps!r}"
        )
    return float(eps)


def _compute_dtype(dtype: Any) -> Any:
    """At least float32: the statistics of bfloat16/float16 data accumulate in float32."""
    return jnp.promote_types(dtype, jnp.float32)


def _check_floating(name: str, x: Any) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name}: input must be floating point, got {x.dtype} of shape {x.shape}")


def _check_vectors(name: str, x_shape: _Shape, axis: int, tree: Any, what: str, keys: tuple):
    """``tree`` is a dict of ``[c]`` vectors under ``keys`` with ``c = x_shape[axis]``."""
    c = x_shape[axis]
    if not isinstance(tree, dict) or set(tree) != set(keys):
        got = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
        raise ValueError(f"{name}: {what} must be a dict with keys {list(keys)}, got {got}")
    for k in keys:
        if tuple(tree[k].shape) != (c,):
            raise ValueError(
                f"{name}: input has shape {tuple(x_shape)}, {c} channels on axis {axis}, but "
                f"{what}[{k!r}] has shape {tuple(tree[k].shape)}"
            )


def _affine_params(key: Any, c: int, scale_init: Callable, offset_init: Callable, dtype: Any):
    scale_key, offset_key = jax.random.split(key)
    return {
        "scale": scale_init(scale_key, (c,), dtype),
        "offset": offset_init(offset_key, (c,), dtype),
    }


def _along(v: jax.Array, ndim: int, axis: int) -> jax.Array:
    """A ``[c]`` vector shaped to broadcast along ``axis`` of an ``ndim``-array (explicitly:
    rank promotion may be disabled)."""
    return v.reshape(tuple(v.shape[0] if a == axis else 1 for a in range(ndim)))


def _standardize(x: jax.Array, axes: tuple[int, ...], eps: float):
    """``(centered, inv_std, mean, var)`` over ``axes`` (kept as unit axes): ``centered = x -
    mean``, ``inv_std = 1 / sqrt(var + eps)``, the variance two-pass; ``xhat = centered *
    inv_std``."""
    mean = jnp.mean(x, axis=axes, keepdims=True)
    centered = x - mean
    var = jnp.mean(jnp.square(centered), axis=axes, keepdims=True)
    return centered, lax.rsqrt(var + eps), mean, var


def _standardize_backward(dxhat, centered, inv_std, axes: tuple[int, ...]) -> jax.Array:
    """dx of ``xhat = (x - mean(x)) / sqrt(var(x) + eps)``, the statistics over ``axes``.

    ``(dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) * inv_std``, written with ``centered =
    xhat / inv_std`` as ``dxhat * inv_std - mean(dxhat) * inv_std - centered * (mean(dxhat *
    centered) * inv_std^3)``: the per-group factors are small arrays, and XLA then evaluates
    fewer full-size operations than for jax.vjp of the forward (``test_normalization`` counts
    them). The product is taken left to right so ``inv_std^3`` alone never underflows.
    """
    mean_dxhat = jnp.mean(dxhat, axis=axes, keepdims=True)
    mean_dxhat_centered = jnp.mean(dxhat * centered, axis=axes, keepdims=True)
    slope = mean_dxhat_centered * inv_std * inv_std * inv_std
    return dxhat * inv_std - centered * slope - mean_dxhat * inv_std


def _affine_sums(dy, xhat, axis: int):
    """``(sum(dy * xhat), sum(dy))`` over every axis but ``axis``: dscale, doffset."""
    axes = tuple(a for a in range(dy.ndim) if a != axis)
    return jnp.sum(dy * xhat, axis=axes), jnp.sum(dy, axis=axes)


def _affine_grads(params, dscale, doffset) -> dict:
    """The param gradients, each in its param's dtype."""
    return {
        "scale": dscale.astype(params["scale"].dtype),
        "offset": doffset.astype(params["offset"].dtype),
    }
