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
"""

import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from bpjax import initializers
from bpjax.layers._core import Layer, _check_key, _check_positive_int, _Static

_Shape = tuple[int, ...]


# --------------------------------------------------------------------------------------------
# shared pieces


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


# --------------------------------------------------------------------------------------------
# batch norm


def _feature_axis(name: str, axis: int, shape: _Shape) -> int:
    """``axis`` as a non-negative index into ``shape``, which must not be the batch axis 0."""
    ndim = len(shape)
    if ndim < 2:
        raise ValueError(
            f"{name}: input must be [batch, ..., features] (at least 2 axes), got shape "
            f"{tuple(shape)}"
        )
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}: axis {axis} is out of range for input shape {tuple(shape)}")
    if axis % ndim == 0:
        raise ValueError(
            f"{name}: axis {axis} is the batch axis of input shape {tuple(shape)}; the feature "
            f"axis must be another one"
        )
    return axis % ndim


def batch_norm(
    *,
    momentum: float = 0.9,
    eps: float = 1e-5,
    axis: int = -1,
    scale_init: str | Callable = "ones",
    offset_init: str | Callable = "zeros",
    dtype: Any = jnp.float32,
) -> Layer:
    """Batch normalization, with running averages of the statistics as state.

    Normalizes every feature (channel) over all the other axes: over the batch for ``[batch,
    features]``, over the batch and the positions for ``[batch, h, w, c]``.

    *Training mode* (``forward(..., key=key, state=state)``, any key): normalizes with the batch
    mean and the two-pass batch variance, and returns the running averages updated as
    ``running = momentum * running + (1 - momentum) * batch`` (the flax/Keras convention:
    PyTorch's ``momentum`` is ``1 - momentum`` here). The running variance averages the BIASED
    batch variance ``mean((x - mean)^2)``, the one that normalizes, as flax, Keras and haiku do
    (PyTorch and Ioffe & Szegedy's inference rule use the unbiased ``m / (m - 1)`` times it;
    the two differ by ``1 / (m - 1)`` relative, ``m`` the values per channel, and the biased
    one is defined for ``m = 1``). *Evaluation mode* (``key=None``): normalizes with the
    running averages and returns the state unchanged.

    Under ``jax.jit`` with the batch sharded over devices (``jax.sharding``), the means over
    the batch axis are those of the GLOBAL batch (XLA inserts the cross-device reductions), so
    the statistics, the update of the running averages and the gradients are those of a
    single device seeing the whole batch (``bpjax.trainer.fit`` shards its batches this way).
    Under ``jax.pmap``/``shard_map`` each device would see only its own shard.

    Backward (Ioffe & Szegedy 2015, sec. 3; CS231n ``batchnorm_backward_alt``), ``m`` values
    per channel, sums over every axis but the feature axis:
    ``dx = scale / (m sqrt(var + eps)) * (m dy - sum(dy) - xhat * sum(dy * xhat))`` in training
    mode, ``dx = dy * scale / sqrt(running_var + eps)`` in evaluation mode;
    ``dscale = sum(dy * xhat)``, ``doffset = sum(dy)`` in both. The running statistics get no
    gradient.

    Args:
      momentum: weight of the old running average in [0, 1] (0: the last batch's statistics).
      eps: added to the variance inside the square root, > 0.
      axis: the feature axis of the input (-1: channels-last); not the batch axis 0.
      scale_init: initializer name (``bpjax.initializers``) or callable for ``scale`` [c];
        ``"zeros"`` starts a residual branch at the identity (Goyal et al. 2017).
      offset_init: initializer name or callable for ``offset`` [c].
      dtype: dtype of the params and of the running statistics.

    Returns:
      A Layer with params ``{"scale": [c], "offset": [c]}`` and state
      ``{"running_mean": [c], "running_var": [c]}`` (zeros, ones); input
      ``[batch, ..., c, ...]`` (``c`` on ``axis``), output of the same shape and dtype.

    Raises:
      ValueError: ``momentum`` outside [0, 1], ``eps`` not positive, ``axis`` not an integer;
        at ``init``/``forward``, an input with fewer than 2 axes, ``axis`` out of range or the
        batch axis, a channel count that differs from the params' or the state's.
      TypeError: ``forward`` without ``state=`` or with a non-floating input.

    References:
      Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training by Reducing
      Internal Covariate Shift", ICML 2015, Algorithm 1 and sec. 3.
    """
    name = "batch_norm" if axis == -1 else f"batch_norm(axis={axis})"
    if (
        not isinstance(momentum, numbers.Real)
        or isinstance(momentum, bool)
        or not 0.0 <= momentum <= 1.0
    ):
        raise ValueError(f"{name}: momentum must be in [0, 1], got {momentum!r}")
    momentum = float(momentum)
    eps = _check_eps(name, eps)
    if not isinstance(axis, numbers.Integral) or isinstance(axis, bool):
        raise ValueError(f"{name}: axis must be an integer, got {axis!r}")
    axis = int(axis)
    init_scale, init_offset = initializers.get(scale_init), initializers.get(offset_init)

    def init(key, in_shape):
        c = in_shape[_feature_axis(name, axis, in_shape)]
        return tuple(in_shape), _affine_params(key, c, init_scale, init_offset, dtype)

    def init_state(in_shape):
        c = in_shape[_feature_axis(name, axis, in_shape)]
        return {"running_mean": jnp.zeros((c,), dtype), "running_var": jnp.ones((c,), dtype)}

    def running_average(running, batch):
        acc = jnp.promote_types(running.dtype, batch.dtype)
        new = momentum * running.astype(acc) + (1.0 - momentum) * batch.astype(acc)
        return lax.stop_gradient(new.astype(running.dtype))

    def forward(params, x, *, key=None, state=None):
        if state is None:
            raise TypeError(
                f"{name}: forward needs state= (its running statistics: "
                f"layer.init_state(in_shape), then the new_state each call returns)"
            )
        _check_key(key, name)
        _check_floating(name, x)
        ax = _feature_axis(name, axis, x.shape)
        _check_vectors(name, x.shape, ax, params, "params", ("scale", "offset"))
        _check_vectors(name, x.shape, ax, state, "state", ("running_mean", "running_var"))
        xc = x.astype(_compute_dtype(x.dtype))
        training = key is not None
        if training:
            stats_axes = tuple(a for a in range(x.ndim) if a != ax)
            centered, inv_std, mean, var = _standardize(xc, stats_axes, eps)
            xhat = centered * inv_std
            inv_std = inv_std.reshape(-1)
            new_state = {
                "running_mean": running_average(state["running_mean"], mean.reshape(-1)),
                "running_var": running_average(state["running_var"], var.reshape(-1)),
            }
        else:
            inv_std = lax.rsqrt(state["running_var"].astype(xc.dtype) + eps)
            mean = state["running_mean"].astype(xc.dtype)
            xhat = (xc - _along(mean, x.ndim, ax)) * _along(inv_std, x.ndim, ax)
            new_state = state
        scale, offset = (params[k].astype(xc.dtype) for k in ("scale", "offset"))
        y = xhat * _along(scale, x.ndim, ax) + _along(offset, x.ndim, ax)
        return y.astype(x.dtype), (xhat, inv_std, _Static((x.dtype, ax, training))), new_state

    def backward(params, cache, dy):
        """Training: dx = scale / (m sqrt(var + eps)) * (m dy - sum(dy) - xhat sum(dy xhat));
        evaluation: dx = dy * scale / sqrt(running_var + eps); dscale = sum(dy * xhat),
        doffset = sum(dy) (sums over every axis but the feature axis)."""
        xhat, inv_std, static = cache
        x_dtype, ax, training = static.value
        dyc = dy.astype(xhat.dtype)
        dscale, doffset = _affine_sums(dyc, xhat, ax)
        gain = _along(params["scale"].astype(xhat.dtype) * inv_std, dy.ndim, ax)
        if training:
            # Ioffe & Szegedy's dx with its two batch means taken from the param gradients
            # already summed: mean(dxhat) = scale doffset / m, mean(dxhat xhat) = scale dscale / m.
            m = xhat.size // xhat.shape[ax]
            dyc = dyc - _along(doffset / m, dy.ndim, ax) - xhat * _along(dscale / m, dy.ndim, ax)
        dx = dyc * gain
        grads = _affine_grads(params, dscale, doffset)
        return grads, dx.astype(x_dtype)

    return Layer(init, forward, backward, name, init_state=init_state)


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
