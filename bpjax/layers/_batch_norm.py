"""``bpjax.layers.normalization.batch_norm``: batch normalization with running statistics as
state (re-exported by ``bpjax.layers.normalization``, whose docstring states the conventions the
normalization layers share; the shared pieces are in ``bpjax.layers._norm_shared``).
``batch_norm.__module__`` is ``bpjax.layers.normalization``, where it was defined."""

import numbers
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
from jax import lax

from bpjax import initializers
from bpjax.layers._core import Layer, _check_key, _Static
from bpjax.layers._norm_shared import (
    _affine_grads,
    _affine_params,
    _affine_sums,
    _along,
    _check_eps,
    _check_floating,
    _check_vectors,
    _compute_dtype,
    _Shape,
    _standardize,
)


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


batch_norm.__module__ = "bpjax.layers.normalization"  # re-exported there, its public home
