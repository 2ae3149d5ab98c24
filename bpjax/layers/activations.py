"""Activations and other parameter-free elementwise layers, each with its derivative rule.

Every activation is a ``Layer`` with ``()`` params; ``ACTIVATIONS`` maps names to factories and
``activation(name)`` builds one by name. Each backward reuses what the forward computed (a
sigmoid, a tanh, the exps of a softmax) rather than recomputing a transcendental.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from bpjax.layers._core import Layer, Shape


def _same_shape_init(key: Any, in_shape: Shape) -> tuple[Shape, tuple]:
    """``init`` of a parameter-free layer that keeps the shape."""
    del key  # unused: no parameters
    return tuple(in_shape), ()


def _cached(name: str, forward_fn: Callable, backward_rule: Callable) -> Layer:
    """A deterministic parameter-free layer whose forward returns what its backward reads.

    ``forward_fn(x) -> (y, cache)`` and ``backward_rule(cache, dy) -> dx``: e.g. activations
    whose derivative reuses a transcendental of the forward pass (a sigmoid, a tanh, an exp),
    kept rather than computed again.
    """

    def forward(params, x, *, key=None):
        del params, key  # unused: no parameters, deterministic
        return forward_fn(x)

    def backward(params, cache, dy):
        del params  # unused: no parameters
        return (), backward_rule(cache, dy)

    return Layer(_same_shape_init, forward, backward, name)


def _parameter_free(name: str, fn: Callable, backward_rule: Callable) -> Layer:
    """A deterministic parameter-free layer ``y = fn(x)``, ``dx = backward_rule(x, y, dy)``.

    Both ``x`` and ``y`` are cached; under jit, whichever the rule does not read is not kept.
    """

    def forward_fn(x):
        y = fn(x)
        return y, (x, y)

    return _cached(name, forward_fn, lambda cache, dy: backward_rule(*cache, dy))


def _elementwise(name: str, fn: Callable, grad: Callable) -> Layer:
    """A parameter-free elementwise layer ``y = fn(x)`` with ``dx = dy * grad(x, y)``."""
    return _parameter_free(name, fn, lambda x, y, dy: dy * grad(x, y))


def identity() -> Layer:
    """``y = x``;  dx = dy."""
    return _parameter_free("identity", lambda x: x, lambda x, y, dy: dy)


def sigmoid() -> Layer:
    """``y = 1 / (1 + exp(-x))``;  dx = dy * y * (1 - y).

    Only ``y`` is needed (the rule ``jax.nn.sigmoid``'s own derivative uses), so ``x`` need not
    be kept for the backward pass. For large ``x`` the derivative rounds to 0 where the true value
    is below the dtype's resolution of ``1 - y`` (< 6e-8 in float32): harmless for training.
    """
    return _elementwise("sigmoid", jax.nn.sigmoid, lambda x, y: y * (1 - y))


def tanh() -> Layer:
    """``y = tanh(x)``;  dx = dy * (1 - y^2)."""
    return _elementwise("tanh", jnp.tanh, lambda x, y: 1 - y * y)


def relu() -> Layer:
    """``y = max(x, 0)``;  dx = dy where x > 0, else 0  (zero at x = 0, as ``jax.nn.relu``).

    A select, not ``dy * mask``. The mask is read from ``x``, as autodiff's rule does: under jit
    XLA fuses it with the dense layer's bias add, where a mask from ``y`` made it recompute the
    ``max`` (one flop per unit more than autodiff).
    """
    return _parameter_free(
        "relu", jax.nn.relu, lambda x, y, dy: jnp.where(x > 0, dy, jnp.zeros_like(dy))
    )


def leaky_relu(negative_slope: float = 0.01) -> Layer:
    """``y = x if x >= 0 else negative_slope * x``;  dx = dy if x >= 0 else slope * dy."""
    return _parameter_free(
        f"leaky_relu({negative_slope})",
        lambda x: jax.nn.leaky_relu(x, negative_slope),
        lambda x, y, dy: jnp.where(x >= 0, dy, negative_slope * dy),
    )


def elu(alpha: float = 1.0) -> Layer:
    """``y = x if x > 0 else alpha (exp(x) - 1)``;  dx = dy if x > 0 else dy (y + alpha).

    ``alpha exp(x) = y + alpha`` where ``x <= 0``, so the backward pass needs no exp. For
    ``alpha > 0`` the sign of ``x`` is that of ``y``, and only ``y`` is kept.
    """

    def backward_rule(x, y, dy):
        positive = y > 0 if alpha > 0 else x > 0
        return jnp.where(positive, dy, dy * (y + alpha))

    return _parameter_free(f"elu({alpha})", lambda x: jax.nn.elu(x, alpha), backward_rule)


_SQRT_2_OVER_PI = 0.7978845608028654
_INV_SQRT_2PI = 0.3989422804014327
_GELU_C = 0.044715
_SQRT_HALF = 0.7071067811865476


def _gelu_tanh_forward(x):
    # y = x (1 + t) / 2, t = tanh(u), u = sqrt(2/pi) (x + c x^3) (jax.nn.gelu's tanh form).
    t = jnp.tanh(_SQRT_2_OVER_PI * (x + _GELU_C * (x * x * x)))
    half = 0.5 * (1 + t)
    return x * half, (x, t, half)


def _gelu_tanh_backward(cache, dy):
    # dy/dx = (1 + t) / 2 + x (1 - t^2) / 2 du/dx, du/dx = sqrt(2/pi) (1 + 3 c x^2).
    x, t, half = cache
    du = _SQRT_2_OVER_PI * (1 + 3 * _GELU_C * (x * x))
    return dy * (half + 0.5 * x * (1 - t * t) * du)


def _gelu_exact_forward(x):
    # y = x Phi(x), Phi(x) = erfc(z) / 2 with z = -x / sqrt 2 (jax.nn.gelu's exact form).
    z = -x * _SQRT_HALF
    cdf = 0.5 * lax.erfc(z)
    return x * cdf, (x, z, cdf)


def _gelu_exact_backward(cache, dy):
    # dy/dx = Phi(x) + x phi(x), phi(x) = exp(-x^2 / 2) / sqrt(2 pi) = exp(-z^2) / sqrt(2 pi).
    x, z, cdf = cache
    return dy * (cdf + x * _INV_SQRT_2PI * jnp.exp(-(z * z)))


def gelu(approximate: bool = False) -> Layer:
    """Gaussian error linear unit, exact ``x Phi(x)`` or the tanh form.

    dx = dy * (Phi(x) + x phi(x))  (exact; ``Phi(x)`` is kept from the forward pass);
    dx = dy * ((1 + t) / 2 + x (1 - t^2) u' / 2)  with t = tanh u, u = sqrt(2/pi)(x + 0.044715 x^3)
    (tanh form; ``t`` is kept from the forward pass, so the backward needs no transcendental).

    References:
      Hendrycks & Gimpel, "Gaussian Error Linear Units (GELUs)", 2016.
    """
    if approximate:
        return _cached("gelu_tanh", _gelu_tanh_forward, _gelu_tanh_backward)
    return _cached("gelu", _gelu_exact_forward, _gelu_exact_backward)


def softplus() -> Layer:
    """``y = log(1 + exp(x))``;  dx = dy * sigmoid(x)."""
    return _elementwise("softplus", jax.nn.softplus, lambda x, y: jax.nn.sigmoid(x))


def _silu_forward(x):
    s = jax.nn.sigmoid(x)
    y = x * s
    return y, (s, y)


def _silu_backward(cache, dy):
    # d(x s)/dx = s + x s (1 - s) = s + y (1 - s).
    s, y = cache
    return dy * (s + y * (1 - s))


def silu() -> Layer:
    """``y = x sigmoid(x)`` (swish);  dx = dy * (s + y (1 - s)), s = sigmoid(x) kept."""
    return _cached("silu", _silu_forward, _silu_backward)


swish = silu


def softmax() -> Layer:
    """``y = softmax(x)`` over the last axis;  dx = y * (dy - sum(dy * y, -1))."""
    return _parameter_free(
        "softmax",
        lambda x: jax.nn.softmax(x, axis=-1),
        lambda x, y, dy: y * (dy - jnp.sum(dy * y, axis=-1, keepdims=True)),
    )


def _log_softmax_parts(x):
    # jax.nn.log_softmax's shift; the exps and their row sums are kept: softmax = exps / sums.
    shifted = x - lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))
    exps = jnp.exp(shifted)
    sums = jnp.sum(exps, axis=-1, keepdims=True)
    return shifted - jnp.log(sums), (exps, sums)


def _log_softmax_backward(cache, dy):
    exps, sums = cache  # one divide per row, not per element
    return dy - exps * (jnp.sum(dy, axis=-1, keepdims=True) / sums)


def log_softmax() -> Layer:
    """``y = x - logsumexp(x)`` over the last axis;  dx = dy - softmax(x) * sum(dy, -1).

    ``softmax(x)`` comes from the forward pass's exps (kept), so the backward needs no exp.
    """
    return _cached("log_softmax", _log_softmax_parts, _log_softmax_backward)


ACTIVATIONS: dict[str, Callable[..., Layer]] = {
    "identity": identity,
    "sigmoid": sigmoid,
    "tanh": tanh,
    "relu": relu,
    "leaky_relu": leaky_relu,
    "elu": elu,
    "gelu": gelu,
    "gelu_tanh": lambda: gelu(approximate=True),
    "softplus": softplus,
    "silu": silu,
    "swish": swish,
    "softmax": softmax,
    "log_softmax": log_softmax,
}

# Activation families whose default weight init is He (Kaiming); everything else gets Glorot.
_HE_FAMILY = ("relu", "leaky_relu", "elu", "gelu", "gelu_tanh", "silu", "swish", "softplus")


def activation(spec: str | Layer, **kwargs: Any) -> Layer:
    """Returns the activation layer named ``spec`` (with ``kwargs``), or ``spec`` if a Layer.

    Raises:
      ValueError: unknown name (the message lists the valid ones), or ``kwargs`` with a Layer.
    """
    if isinstance(spec, Layer):
        if kwargs:  # they could not reach the layer: refuse rather than drop them
            raise ValueError(f"activation arguments {sorted(kwargs)} given with a Layer")
        return spec
    if not isinstance(spec, str) or spec not in ACTIVATIONS:
        raise ValueError(
            f"unknown activation {spec!r}; valid names: {', '.join(sorted(ACTIVATIONS))}"
        )
    return ACTIVATIONS[spec](**kwargs)


def default_w_init(activation_spec: str | Layer | None) -> str:
    """He-normal for the ReLU family, Glorot-uniform otherwise (tanh, sigmoid, identity, ...)."""
    name = activation_spec.name if isinstance(activation_spec, Layer) else activation_spec
    base = (name or "").split("(")[0]
    return "he_normal" if base in _HE_FAMILY else "glorot_uniform"
