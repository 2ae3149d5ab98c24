"""Combinators: networks of layers that are themselves layers.

``serial`` runs layers in sequence; the branching forms follow stax: ``fan_out(n)`` copies its
input into a tuple of ``n``, ``parallel(*layers)`` applies the i-th layer to the i-th element,
and ``fan_in_sum()`` / ``fan_in_concat(axis)`` join a tuple into one array. ``residual(block,
shortcut)`` is ``serial(fan_out(2), parallel(block, shortcut), fan_in_sum())``, written out
with params ``(block_params, shortcut_params)``.

Backward rules: ``serial`` walks its layers in reverse, each layer's ``dx`` the ``dy`` of the
one before; ``parallel`` runs each branch's backward on its own part of ``dy``; the backward of
a fan-out SUMS the gradients of every branch that read the same input (the chain rule for a
value used twice); ``fan_in_sum``'s gives each input the same ``dy``; ``fan_in_concat``'s
splits ``dy`` where the forward joined.

Params, caches and states of a combinator are tuples with one entry per sublayer (``()`` for a
sublayer without params or state). A combinator has state if any sublayer has.
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from bpjax.layers._core import (
    Layer,
    _Static,
    apply,
    check_layer,
    init_state,
    is_stateful,
    out_shape,
    split_keys,
)
from bpjax.layers.activations import identity


def _layer(
    name: str,
    init: Callable,
    run: Callable,
    backward: Callable,
    sublayers: Sequence[Layer],
    combinator: str,
    state_init: Callable,
) -> Layer:
    """A combinator from ``run(params, x, key, state) -> (y, cache, state)``: with state if
    any sublayer has it (``forward`` then takes ``state=`` and returns it), else without."""
    if not any(is_stateful(layer) for layer in sublayers):

        def forward(params, x, *, key=None):
            y, cache, _ = run(params, x, key, None)
            return y, cache

        return Layer(init, forward, backward, name, tuple(sublayers), None, combinator)

    def forward_with_state(params, x, *, key=None, state):
        return run(params, x, key, state)

    return Layer(init, forward_with_state, backward, name, tuple(sublayers), state_init, combinator)


def _naming(error: ValueError, message: str) -> ValueError:
    """``error`` again with ``message`` (naming the layer), of its own kind where it can be."""
    try:
        return type(error)(message)
    except Exception:  # a subclass whose constructor takes other arguments
        return ValueError(message)


def _per_layer(n: int, state: Any) -> list[Any]:
    return [()] * n if state is None else list(state)


def _check_params(name: str, params: Any, n: int) -> None:
    if not isinstance(params, tuple) or len(params) != n:
        got = len(params) if isinstance(params, tuple) else type(params).__name__
        raise ValueError(f"{name}: got params for {got} layers, expected {n}")


def serial(*layers: Layer) -> Layer:
    """Composes layers in sequence; the result is itself a Layer.

    Params, grads, caches (and states) are tuples with one entry per layer (``()`` for
    parameter-free ones). ``backward`` walks the layers in reverse, feeding each layer's ``dx``
    to the layer before it as ``dy``: the layerwise backward pass.

    Raises:
      ValueError: no layers; at ``forward``, a bad input, prefixed with the layer's index.
      TypeError: an argument that is not a Layer (a factory gets the call that fixes it).
    """
    if not layers:
        raise ValueError("serial: needs at least one layer")
    layers = tuple(check_layer(layer, f"serial: argument {i}") for i, layer in enumerate(layers))
    n = len(layers)

    def init(key, in_shape):
        params = []
        shape = in_shape
        for layer, layer_key in zip(layers, jax.random.split(key, n)):
            shape, layer_params = layer.init(layer_key, shape)
            params.append(layer_params)
        return shape, tuple(params)

    def state_init(in_shape):
        states, shape = [], in_shape
        for layer in layers:
            states.append(init_state(layer, shape))
            shape = out_shape(layer, shape)
        return tuple(states)

    def run(params, x, key, state):
        _check_params("serial", params, n)
        caches, states = [], []
        for i, (layer, p, k, s) in enumerate(
            zip(layers, params, split_keys(key, n), _per_layer(n, state))
        ):
            try:
                x, cache, s = apply(layer, p, x, key=k, state=s)
            except ValueError as e:
                raise _naming(e, f"layer {i} of {n}: {e}") from None
            caches.append(cache)
            states.append(s)
        return x, tuple(caches), tuple(states)

    def backward(params, cache, dy):
        grads = [None] * n
        for i in reversed(range(n)):
            grads[i], dy = layers[i].backward(params[i], cache[i], dy)
        return tuple(grads), dy

    name = "serial(" + ", ".join(layer.name for layer in layers) + ")"
    return _layer(name, init, run, backward, layers, "serial", state_init)


def parallel(*layers: Layer) -> Layer:
    """Applies the i-th layer to the i-th element of a tuple input (stax's ``parallel``).

    Input: a tuple of ``n`` arrays (``in_shape`` a tuple of ``n`` shapes); output: the tuple of
    the layers' outputs. Params, grads, caches and states: one entry per layer.
    ``dx[i] = layers[i].backward(dy[i])``: the branches do not interact.

    Raises:
      ValueError: no layers; at ``init``/``forward``, an input that is not a tuple of ``n``.
      TypeError: an argument that is not a Layer.
    """
    if not layers:
        raise ValueError("parallel: needs at least one layer")
    layers = tuple(check_layer(layer, f"parallel: argument {i}") for i, layer in enumerate(layers))
    n = len(layers)
    name = "parallel(" + ", ".join(layer.name for layer in layers) + ")"

    def check_inputs(what, xs):
        if not isinstance(xs, tuple | list) or len(xs) != n:
            raise ValueError(
                f"{name}: needs a tuple of {n} inputs (e.g. from fan_out({n})), got {what}"
            )

    def init(key, in_shape):
        check_inputs(f"input shape {in_shape}", in_shape)
        outs, params = zip(
            *(layer.init(k, s) for layer, k, s in zip(layers, jax.random.split(key, n), in_shape))
        )
        return tuple(outs), tuple(params)

    def state_init(in_shape):
        return tuple(init_state(layer, s) for layer, s in zip(layers, in_shape))

    def run(params, x, key, state):
        _check_params("parallel", params, n)
        check_inputs(type(x).__name__, x)
        results = [
            apply(layer, p, xi, key=k, state=s)
            for layer, p, xi, k, s in zip(
                layers, params, x, split_keys(key, n), _per_layer(n, state)
            )
        ]
        ys, caches, states = zip(*results)
        return tuple(ys), tuple(caches), tuple(states)

    def backward(params, cache, dy):
        grads, dx = zip(
            *(layer.backward(p, c, d) for layer, p, c, d in zip(layers, params, cache, dy))
        )
        return tuple(grads), tuple(dx)

    return _layer(name, init, run, backward, layers, "parallel", state_init)


def fan_out(n: int) -> Layer:
    """Copies the input into a tuple of ``n`` (stax's ``FanOut``).

    dx = sum of the ``n`` branch gradients ``dy[0] + ... + dy[n-1]``: every branch read ``x``.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"fan_out: n must be a positive integer, got {n!r}")

    def init(key, in_shape):
        del key  # unused: no parameters
        return (in_shape,) * n, ()

    def forward(params, x, *, key=None):
        del params, key  # unused: no parameters, deterministic
        return (x,) * n, _Static(x.dtype)

    def backward(params, cache, dy):
        del params  # unused: no parameters
        dx = dy[0]
        for d in dy[1:]:
            dx = dx + d
        return (), _as_input_dtype(dx, cache.value)

    return Layer(init, forward, backward, f"fan_out({n})")


def _as_input_dtype(dx: jax.Array, dtype: Any) -> jax.Array:
    """``dx`` in its primal's dtype, as ``jax.vjp`` gives it (branches may promote)."""
    return dx.astype(dtype) if jnp.issubdtype(dtype, jnp.inexact) else dx


def _check_join(name: str, shapes: Any, axis: int | None) -> None:
    if (
        not isinstance(shapes, tuple | list)
        or not shapes
        or not all(isinstance(s, tuple | list) for s in shapes)
    ):
        raise ValueError(
            f"{name}: needs a tuple of input shapes (e.g. after parallel), got {shapes}"
        )
    ranks = {len(s) for s in shapes}
    if len(ranks) != 1:
        raise ValueError(f"{name}: inputs have different ranks: {list(map(tuple, shapes))}")
    rank = ranks.pop()
    keep = [i for i in range(rank) if axis is None or i != axis % rank]
    if len({tuple(s[i] for i in keep) for s in shapes}) != 1:
        what = "shapes" if axis is None else f"shapes outside axis {axis}"
        raise ValueError(f"{name}: inputs must have equal {what}, got {list(map(tuple, shapes))}")


def fan_in_sum() -> Layer:
    """Sums a tuple of arrays of one shape (stax's ``FanInSum``).

    dx[i] = dy for every input.

    Raises:
      ValueError: at ``init``, inputs of different shapes (naming them).
    """

    def init(key, in_shape):
        del key  # unused: no parameters
        _check_join("fan_in_sum", in_shape, None)
        return tuple(in_shape[0]), ()

    def forward(params, x, *, key=None):
        del params, key  # unused: no parameters, deterministic
        _check_join("fan_in_sum", tuple(xi.shape for xi in x), None)
        y = x[0]
        for xi in x[1:]:
            y = y + xi
        return y, _Static(tuple(xi.dtype for xi in x))

    def backward(params, cache, dy):
        del params  # unused: no parameters
        return (), tuple(dy.astype(dtype) for dtype in cache.value)

    return Layer(init, forward, backward, "fan_in_sum")


def fan_in_concat(axis: int = -1) -> Layer:
    """Concatenates a tuple of arrays along ``axis`` (stax's ``FanInConcat``; -1: features).

    dx[i] = the slice of ``dy`` that input ``i`` filled.

    Raises:
      ValueError: at ``init``, inputs that differ outside ``axis`` (naming their shapes).
    """
    name = f"fan_in_concat({axis})"

    def init(key, in_shape):
        del key  # unused: no parameters
        _check_join(name, in_shape, axis)
        shape = list(in_shape[0])
        shape[axis] = sum(s[axis] for s in in_shape)
        return tuple(shape), ()

    def forward(params, x, *, key=None):
        del params, key  # unused: no parameters, deterministic
        _check_join(name, tuple(xi.shape for xi in x), axis)
        sizes = tuple(xi.shape[axis] for xi in x)
        return jnp.concatenate(x, axis=axis), _Static(sizes)

    def backward(params, cache, dy):
        del params  # unused: no parameters
        bounds, start = [], 0
        for size in cache.value[:-1]:
            start += size
            bounds.append(start)
        return (), tuple(jnp.split(dy, bounds, axis=axis))

    return Layer(init, forward, backward, name)


def residual(block: Layer, shortcut: Layer | None = None) -> Layer:
    """``y = block(x) + shortcut(x)``; the identity shortcut by default (He et al., 2016).

    The same as ``serial(fan_out(2), parallel(block, shortcut), fan_in_sum())``, with params
    ``(block_params, shortcut_params)`` (``()`` for the identity). Backward: both branches get
    ``dy``; dx = dx_block + dx_shortcut (the fan-out's sum).

    Raises:
      ValueError: at ``init``, a block and shortcut whose outputs differ in shape (a strided or
        wider block needs a projection shortcut, e.g. ``conv2d(c, 1, stride=2)``).
      TypeError: a block or shortcut that is not a Layer.

    References:
      He, Zhang, Ren & Sun, "Deep Residual Learning for Image Recognition", CVPR 2016.
    """
    block = check_layer(block, "residual: block")
    shortcut = identity() if shortcut is None else check_layer(shortcut, "residual: shortcut")
    branches = (block, shortcut)
    label = block.name if shortcut.name == "identity" else f"{block.name}, {shortcut.name}"
    name = f"residual({label})"

    def init(key, in_shape):
        block_key, shortcut_key = jax.random.split(key)
        block_shape, block_params = block.init(block_key, in_shape)
        shortcut_shape, shortcut_params = shortcut.init(shortcut_key, in_shape)
        if tuple(block_shape) != tuple(shortcut_shape):
            raise ValueError(
                f"{name}: the block maps {tuple(in_shape)} to {tuple(block_shape)} but the "
                f"shortcut to {tuple(shortcut_shape)}; give a shortcut that matches (e.g. a "
                f"1x1 conv2d with the block's stride and channels)"
            )
        return tuple(block_shape), (block_params, shortcut_params)

    def state_init(in_shape):
        return tuple(init_state(layer, in_shape) for layer in branches)

    def run(params, x, key, state):
        _check_params(name, params, 2)
        (y_block, c_block, s_block), (y_short, c_short, s_short) = (
            apply(layer, p, x, key=k, state=s)
            for layer, p, k, s in zip(branches, params, split_keys(key, 2), _per_layer(2, state))
        )
        cache = (c_block, c_short, _Static(x.dtype))
        return y_block + y_short, cache, (s_block, s_short)

    def backward(params, cache, dy):
        c_block, c_short, x_dtype = cache
        g_block, dx_block = block.backward(params[0], c_block, dy)
        g_short, dx_short = shortcut.backward(params[1], c_short, dy)
        return (g_block, g_short), _as_input_dtype(dx_block + dx_short, x_dtype.value)

    return _layer(name, init, run, backward, branches, "residual", state_init)
