"""Normalization layers: ``batch_norm`` (with running statistics), ``layer_norm``, ``group_norm``.

Each standardizes its input over some axes, ``xhat = (x - mean) / sqrt(var + eps)``, then applies
a learnable per-channel affine map ``y = scale * xhat + offset`` (params ``{"scale": [c],
"offset": [c]}``, ones and zeros by default). They differ only in the axes the statistics run
over: batch norm over every axis but the feature axis (the batch and the spatial positions),
layer norm over each position's features (the last axis), group norm over each example's
positions and the channels of one group.

Conventions shared by the three:

* The variance is two-pass, ``mean((x - mean)^2)``, never ``E[x^2] - E[x]^2``, which cancels
  catastrophically in floating point when ``|mean| >> std``.
* The statistics and the arithmetic run in at least float32 (``bfloat16``/``float16`` inputs are
  promoted; float64 stays float64); ``y`` has ``x``'s dtype, each gradient its primal's.
* ``eps`` (> 0) is added to the variance inside the square root, so a constant channel (a batch
  of one with no spatial axes in batch norm) has ``xhat = 0``, ``y = offset`` and finite
  gradients.
* Backward, with statistics computed from ``x`` over ``m`` values (Ioffe & Szegedy 2015, sec. 3;
  CS231n's ``batchnorm_backward_alt``)::

      dxhat = dy * scale
      dx = (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) / sqrt(var + eps)
      dscale = sum(dy * xhat),  doffset = sum(dy)

  the means over the statistics' axes, the sums over every axis but the channel axis. With fixed
  statistics (batch norm in evaluation mode) ``dx = dy * scale / sqrt(var + eps)``.

``batch_norm`` is defined in ``bpjax.layers._batch_norm`` and re-exported here; the pieces the
three share are in ``bpjax.layers._norm_shared``; ``layer_norm`` and ``group_norm`` are defined
here.
"""

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

from bpjax import initializers
from bpjax.layers._batch_norm import batch_norm  # noqa: F401  (re-exported)
from bpjax.layers._core import Layer, _check_key, _check_positive_int, _Static
from bpjax.layers._norm_shared import (
    _affine_grads,
    _affine_params,
    _affine_sums,
    _along,
    _check_eps,
    _check_floating,
    _check_vectors,
    _compute_dtype,
    _standardize,
    _standardize_backward,
)

# --------------------------------------------------------------------------------------------
# layer norm and group norm: statistics per example, no state


def _per_example_norm(
    name: str,
    eps: float,
    scale_init: str | Callable,
    offset_init: str | Callable,
    dtype: Any,
    check_shape: Callable,
    grouped: Callable,
) -> Layer:
    """A stateless layer standardizing ``grouped(x) -> (x regrouped, statistics' axes)`` and
    then scaling and offsetting each channel (the last axis): layer_norm, group_norm."""
    eps = _check_eps(name, eps)
    init_scale, init_offset = initializers.get(scale_init), initializers.get(offset_init)

    def init(key, in_shape):
        check_shape(tuple(in_shape))
        return tuple(in_shape), _affine_params(key, in_shape[-1], init_scale, init_offset, dtype)

    def forward(params, x, *, key=None):
        _check_key(key, name)  # either mode: the statistics are the example's own
        _check_floating(name, x)
        check_shape(x.shape)
        ax = x.ndim - 1
        _check_vectors(name, x.shape, ax, params, "params", ("scale", "offset"))
        xg, stats_axes = grouped(x.astype(_compute_dtype(x.dtype)))
        centered, inv_std, _, _ = _standardize(xg, stats_axes, eps)
        xhat = (centered * inv_std).reshape(x.shape)
        scale, offset = (params[k].astype(xhat.dtype) for k in ("scale", "offset"))
        y = xhat * _along(scale, x.ndim, ax) + _along(offset, x.ndim, ax)
        return y.astype(x.dtype), (centered, inv_std, _Static(x.dtype))

    def backward(params, cache, dy):
        """dxhat = dy * scale; dx = (dxhat - mean(dxhat) - xhat mean(dxhat xhat)) / sqrt(var +
        eps) (means over the statistics' axes); dscale = sum(dy * xhat), doffset = sum(dy)
        (sums over every axis but the last)."""
        centered, inv_std, x_dtype = cache
        ax = dy.ndim - 1
        dyc = dy.astype(centered.dtype)
        dxhat, stats_axes = grouped(dyc * _along(params["scale"].astype(dyc.dtype), dy.ndim, ax))
        dx = _standardize_backward(dxhat, centered, inv_std, stats_axes).reshape(dy.shape)
        sums = _affine_sums(dyc, (centered * inv_std).reshape(dy.shape), ax)
        return _affine_grads(params, *sums), dx.astype(x_dtype.value)

    return Layer(init, forward, backward, name)


def layer_norm(
    *,
    eps: float = 1e-5,
    scale_init: str | Callable = "ones",
    offset_init: str | Callable = "zeros",
    dtype: Any = jnp.float32,
) -> Layer:
    """Layer normalization: each position normalized over its features (the LAST axis).

    On ``[batch, features]`` each example is normalized over its features; on ``[batch, h, w,
    c]`` each position over its channels (the transformer and flax default). Any number of
    leading axes, a single example ``[c]`` included. The statistics are per position, so
    training and evaluation are the same and there is no state.

    Backward (the module's rule, means over the last axis): ``dxhat = dy * scale``,
    ``dx = (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) / sqrt(var + eps)``,
    ``dscale = sum(dy * xhat)``, ``doffset = sum(dy)`` over every leading axis.

    Args:
      eps: added to the variance inside the square root, > 0.
      scale_init: initializer name (``bpjax.initializers``) or callable for ``scale`` [c].
      offset_init: initializer name or callable for ``offset`` [c].
      dtype: params dtype.

    Returns:
      A Layer with params ``{"scale": [c], "offset": [c]}``; input ``[..., c]``, output of the
      same shape and dtype.

    Raises:
      ValueError: ``eps`` not positive; at ``init``/``forward``, a scalar input, or a last axis
        that differs from the params'.
      TypeError: at ``forward``, a non-floating input.

    References:
      Ba, Kiros & Hinton, "Layer Normalization", arXiv:1607.06450 (2016), eq. 4.
    """

    def check_shape(shape):
        if len(shape) < 1:
            raise ValueError(f"layer_norm: input must have a feature axis, got shape {shape}")

    def grouped(x):
        return x, (x.ndim - 1,)

    return _per_example_norm(
        "layer_norm", eps, scale_init, offset_init, dtype, check_shape, grouped
    )


def group_norm(
    n_groups: int,
    *,
    eps: float = 1e-5,
    scale_init: str | Callable = "ones",
    offset_init: str | Callable = "zeros",
    dtype: Any = jnp.float32,
) -> Layer:
    """Group normalization: each example's channel groups normalized over positions and channels.

    For ``[batch, ..., c]`` the channels are split into ``n_groups`` consecutive groups of
    ``c / n_groups``; the statistics of each (example, group) run over all its positions and the
    group's channels; the affine map is per channel. ``group_norm(1)`` normalizes each example
    over all of ``(h, w, c)`` (layer norm over the whole example, as Wu & He's fig. 2 draws it);
    ``group_norm(c)`` is instance normalization (Ulyanov et al. 2016). No batch statistics, so no
    state and no difference between training and evaluation.

    Backward (the module's rule, means over each group's positions and channels):
    ``dxhat = dy * scale``, ``dx = (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) /
    sqrt(var + eps)``, ``dscale = sum(dy * xhat)``, ``doffset = sum(dy)`` over every axis but
    the channel axis.

    Args:
      n_groups: number of channel groups; must divide the channel count.
      eps: added to the variance inside the square root, > 0.
      scale_init: initializer name (``bpjax.initializers``) or callable for ``scale`` [c].
      offset_init: initializer name or callable for ``offset`` [c].
      dtype: params dtype.

    Returns:
      A Layer with params ``{"scale": [c], "offset": [c]}``; input ``[batch, ..., c]``, output
      of the same shape and dtype.

    Raises:
      ValueError: ``n_groups`` not a positive integer, ``eps`` not positive; at
        ``init``/``forward``, an input with fewer than 2 axes, channels not divisible by
        ``n_groups``, a channel count that differs from the params'.
      TypeError: at ``forward``, a non-floating input.

    References:
      Wu & He, "Group Normalization", ECCV 2018, eq. 1-3 and sec. 3.1.
    """
    n_groups = _check_positive_int("group_norm", "n_groups", n_groups)
    name = f"group_norm({n_groups})"

    def check_shape(shape):
        if len(shape) < 2:
            raise ValueError(
                f"{name}: input must be [batch, ..., channels] (at least 2 axes), got shape {shape}"
            )
        if shape[-1] % n_groups:
            raise ValueError(
                f"{name}: {shape[-1]} channels (input shape {shape}) are not divisible into "
                f"{n_groups} groups"
            )

    def grouped(x):
        """``[b, ..., c] -> [b, ..., n_groups, c / n_groups]``, and the statistics' axes.

        One group (statistics over all of an example) and one channel per group (instance
        norm) need no extra axis; without it XLA fuses the reductions better.
        """
        if n_groups == 1:
            return x, tuple(range(1, x.ndim))
        if n_groups == x.shape[-1]:
            return x, tuple(range(1, x.ndim - 1))
        shape = (*x.shape[:-1], n_groups, x.shape[-1] // n_groups)
        return x.reshape(shape), (*range(1, x.ndim - 1), x.ndim)

    return _per_example_norm(name, eps, scale_init, offset_init, dtype, check_shape, grouped)
