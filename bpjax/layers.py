"""Layers as three pure functions, with the backward pass written by hand.

The convention, written once (after jax's stax, plus an explicit backward)::

    init(key, in_shape)            -> (out_shape, params)
    forward(params, x, *, key=None) -> (y, cache)      cache: what backward needs
    backward(params, cache, dy)    -> (grads, dx)     grads: same tree as params

* ``in_shape``/``out_shape`` are shapes of a whole batch, e.g. ``(batch, 784)``; ``init`` threads
  them so a network is built without a sample input.
* ``backward`` receives ``dy = dL/dy`` for a scalar loss ``L`` and returns ``dL/dparams`` (exactly
  the tree structure of ``params``) and ``dL/dx``. It never calls ``jax.grad``/``jax.vjp``: each
  layer carries its own local gradient rule, stated in its docstring.
* Parameter-free layers have ``()`` params and ``()`` grads.
* Randomness (dropout) reaches ``forward`` through the keyword-only ``key``: a key means
  *training mode*; ``key=None`` means *evaluation mode* (dropout is the identity). ``serial``
  splits its key, one per layer, so every draw is distinct.
* ``dense`` and the elementwise layers accept any number of leading batch axes, and a single
  example (``x`` of shape ``[n_in]``), so ``jax.vmap`` gives per-example gradients. ``flatten``
  keeps exactly one batch axis, the first: under ``vmap`` give it a batch of one, or flatten the
  data beforehand (``bpjax.data.load`` flattens images by default).

A ``Layer`` also carries a ``name`` (for error messages and gradient-check tables) and, for
combinators, its ``sublayers`` (so ``check_grads`` can check each layer on its own).
"""

import numbers
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from bpjax import initializers

__all__ = [
    "ACTIVATIONS",
    "Layer",
    "activation",
    "default_w_init",
    "dense",
    "dropout",
    "elu",
    "flatten",
    "gelu",
    "identity",
    "leaky_relu",
    "log_softmax",
    "mlp",
    "relu",
    "serial",
    "sigmoid",
    "silu",
    "softmax",
    "softplus",
    "split_keys",
    "swish",
    "tanh",
]

Params = Any
Shape = tuple[int, ...]


class Layer(NamedTuple):
    """A layer as three pure functions (see the module docstring for the convention)."""

    init: Callable  # (key, in_shape) -> (out_shape, params)
    forward: Callable  # (params, x, *, key=None) -> (y, cache)
    backward: Callable  # (params, cache, dy) -> (grads, dx)
    name: str = "layer"
    sublayers: tuple["Layer", ...] = ()


@jax.tree_util.register_pytree_node_class
class _Static:
    """A pytree node with no leaves that carries a static value (e.g. a shape) through jit."""

    def __init__(self, value: Any):
        self.value = value

    def tree_flatten(self):
        return (), self.value

    @classmethod
    def tree_unflatten(cls, value, children):
        del children  # unused: a static node has none
        return cls(value)


def _check_key(key: Any, name: str) -> None:
    if key is None:
        return
    if not isinstance(key, jax.Array):
        raise TypeError(f"{name}: key must be a jax PRNG key array or None, got {type(key)}")


def split_keys(key: Any, n: int) -> list[Any]:
    """Splits ``key`` into ``n`` keys, or returns ``n`` Nones for evaluation mode (key=None)."""
    if key is None:
        return [None] * n
    return list(jax.random.split(key, n))


# --------------------------------------------------------------------------------------------
# dense


def _matmul_grads(x: jax.Array, dy: jax.Array) -> jax.Array:
    """dw = x^T dy, contracting every leading (batch) axis without materialising a transpose."""
    axes = tuple(range(x.ndim - 1))
    return lax.dot_general(x, dy, ((axes, axes), ((), ())))


def _expand_to(b: jax.Array, ndim: int) -> jax.Array:
    """Adds leading unit axes to ``b`` (explicit broadcasting: rank promotion may be disabled)."""
    return b.reshape((1,) * (ndim - b.ndim) + b.shape)


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
    """
    if not isinstance(n_out, numbers.Integral) or isinstance(n_out, bool) or n_out < 1:
        raise ValueError(f"dense: n_out must be a positive integer, got {n_out!r}")
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
        grads = {"w": _matmul_grads(x, dy).astype(w.dtype)}
        if use_bias:
            b = params["b"]
            grads["b"] = jnp.sum(dy, axis=tuple(range(dy.ndim - 1))).astype(b.dtype)
        dx = dy @ w.T
        if jnp.issubdtype(x.dtype, jnp.inexact):  # integer inputs have no gradient dtype
            dx = dx.astype(x.dtype)
        return grads, dx

    return Layer(init, forward, backward, name)


# --------------------------------------------------------------------------------------------
# parameter-free layers


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


def flatten() -> Layer:
    """Flattens all axes but the first (batch) one: ``[batch, ...] -> [batch, prod(...)]``.

    dx = dy reshaped back to the input shape.
    """

    def init(key, in_shape):
        del key  # unused: no parameters
        size = 1
        for d in in_shape[1:]:
            size *= d
        return (in_shape[0], size), ()

    def forward(params, x, *, key=None):
        del params, key  # unused: no parameters, deterministic
        if x.ndim < 1:
            raise ValueError(f"flatten: input needs a leading batch axis, got shape {x.shape}")
        return x.reshape(x.shape[0], -1), _Static(x.shape)

    def backward(params, cache, dy):
        del params  # unused: no parameters
        return (), dy.reshape(cache.value)

    return Layer(init, forward, backward, "flatten")


def dropout(rate: float) -> Layer:
    """Inverted dropout: zeroes each unit with probability ``rate`` at training time.

    ``rate`` is the probability of DROPPING a unit (as ``torch.nn.Dropout``; jax's stax used the
    keep probability). Training mode is ``forward(params, x, key=key)``: kept units are scaled by
    ``1 / (1 - rate)`` so evaluation needs no rescaling. ``key=None`` is evaluation mode: the
    identity.

    dx = dy * mask / (1 - rate)   (training);   dx = dy   (evaluation).
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout: rate is the drop probability and must be in [0, 1), got {rate}")

    def forward(params, x, *, key=None):
        del params  # unused: no parameters
        _check_key(key, "dropout")
        if key is None or rate == 0.0:
            return x, ()
        keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
        scale = jnp.where(keep, 1.0 / (1.0 - rate), 0.0).astype(x.dtype)
        return x * scale, scale

    def backward(params, cache, dy):
        del params  # unused: no parameters
        if isinstance(cache, tuple):  # evaluation mode: the identity
            return (), dy
        return (), dy * cache

    return Layer(_same_shape_init, forward, backward, f"dropout({rate})")


# --------------------------------------------------------------------------------------------
# combinators


def serial(*layers: Layer) -> Layer:
    """Composes layers in sequence; the result is itself a Layer.

    Params, grads and caches are tuples with one entry per layer (``()`` for parameter-free
    ones). ``backward`` walks the layers in reverse, feeding each layer's ``dx`` to the layer
    before it as ``dy``: the layerwise backward pass.
    """
    if not layers:
        raise ValueError("serial: needs at least one layer")
    for i, layer in enumerate(layers):
        if not isinstance(layer, Layer):
            raise TypeError(f"serial: argument {i} is {type(layer).__name__}, not a Layer")
    n = len(layers)
    name = "serial(" + ", ".join(layer.name for layer in layers) + ")"

    def init(key, in_shape):
        params = []
        shape = tuple(in_shape)
        for layer, layer_key in zip(layers, jax.random.split(key, n)):
            shape, layer_params = layer.init(layer_key, shape)
            params.append(layer_params)
        return shape, tuple(params)

    def forward(params, x, *, key=None):
        if len(params) != n:
            raise ValueError(f"serial: got params for {len(params)} layers, expected {n}")
        caches = []
        for i, (layer, layer_params, layer_key) in enumerate(
            zip(layers, params, split_keys(key, n))
        ):
            try:
                x, cache = layer.forward(layer_params, x, key=layer_key)
            except ValueError as e:
                raise ValueError(f"layer {i} of {n}: {e}") from None
            caches.append(cache)
        return x, tuple(caches)

    def backward(params, cache, dy):
        grads = [None] * n
        for i in reversed(range(n)):
            grads[i], dy = layers[i].backward(params[i], cache[i], dy)
        return tuple(grads), dy

    return Layer(init, forward, backward, name, tuple(layers))


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


def mlp(
    features: Sequence[int],
    *,
    activation: str | Layer = "relu",
    output_activation: str | Layer | None = None,
    w_init: str | Callable | None = None,
    b_init: str | Callable = "zeros",
    dropout_rate: float = 0.0,
    dtype: Any = jnp.float32,
) -> Layer:
    """A multi-layer perceptron: dense layers of the given output sizes, activations between.

    Args:
      features: output size of each dense layer, e.g. ``[100, 10]`` for 784-100-10.
      activation: hidden activation, a name from ``ACTIVATIONS`` or a Layer.
      output_activation: optional activation after the last dense layer (None = linear output,
        the right choice with ``softmax_cross_entropy``/``binary_cross_entropy`` from logits).
      w_init: weight initializer; default by activation (He for the ReLU family, Glorot for
        tanh/sigmoid and the rest).
      b_init: bias initializer.
      dropout_rate: if > 0, a ``dropout(dropout_rate)`` after every hidden activation.
      dtype: parameter dtype.
    """
    features = list(features)
    if not features:
        raise ValueError("mlp: features must name at least one layer size, got []")
    for f in features:
        if not isinstance(f, numbers.Integral) or isinstance(f, bool) or f < 1:
            raise ValueError(f"mlp: every feature size must be a positive integer, got {features}")
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"mlp: dropout_rate is a drop probability in [0, 1), got {dropout_rate}")
    hidden = _activation_layer(activation)
    out = None if output_activation is None else _activation_layer(output_activation)
    if w_init is None:
        w_init = default_w_init(hidden)
    layers: list[Layer] = []
    for i, n_out in enumerate(features):
        layers.append(dense(int(n_out), w_init=w_init, b_init=b_init, dtype=dtype))
        if i < len(features) - 1:
            layers.append(hidden)
            if dropout_rate > 0:
                layers.append(dropout(dropout_rate))
    if out is not None:
        layers.append(out)
    return serial(*layers)


_activation_layer = activation
