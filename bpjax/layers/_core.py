"""The Layer type and the helpers every layer module shares (see ``bpjax.layers`` for the
convention)."""

import inspect
import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
from jax import lax

Params = Any
Shape = tuple[int, ...]


class NeedsImages(ValueError):
    """A layer that takes NHWC images ``[batch, h, w, c]`` (a convolution, a pool) was given
    an input of another rank, e.g. flattened images ``[batch, 784]``."""


class Layer(NamedTuple):
    """A layer as three pure functions (see ``bpjax.layers`` for the convention).

    ``init_state`` is None for a layer without state (every layer but the normalization layers
    with running statistics, and combinators holding one); otherwise
    ``init_state(in_shape) -> state`` and ``forward`` takes ``state=`` and returns
    ``(y, cache, new_state)``. ``combinator`` names how ``sublayers`` are connected
    (``"serial"``: in sequence), so tools that walk a network (``check_grads``, the learning
    rules of ``bpjax.credit``) know what they may assume.
    """

    init: Callable  # (key, in_shape) -> (out_shape, params)
    forward: Callable  # (params, x, *, key=None[, state]) -> (y, cache[, new_state])
    backward: Callable  # (params, cache, dy) -> (grads, dx)
    name: str = "layer"
    sublayers: tuple["Layer", ...] = ()
    init_state: Callable | None = None  # (in_shape) -> state; None: no state
    combinator: str | None = None  # "serial", "parallel", "residual", ...: how sublayers connect


def is_stateful(layer: Layer) -> bool:
    """Whether ``layer`` carries state that is not a parameter (e.g. running statistics)."""
    return layer.init_state is not None


def apply(
    layer: Layer, params: Params, x: Any, *, key: Any = None, state: Any = ()
) -> tuple[Any, Any, Any]:
    """``layer.forward`` as ``(y, cache, new_state)`` whether or not the layer has state.

    A layer without state ignores ``state`` and returns it unchanged (``()`` by default), so
    generic code (combinators, gradients, the trainer) has one call for every layer.

    Raises:
      TypeError: a stateful layer called without its state.
    """
    if layer.init_state is None:
        y, cache = layer.forward(params, x, key=key)
        return y, cache, state
    if state is None or (isinstance(state, tuple) and not state):
        raise TypeError(
            f"{layer.name} has state (e.g. batch_norm's running statistics): pass "
            f"state=layer.init_state(in_shape), and use the state it returns"
        )
    return layer.forward(params, x, key=key, state=state)


def init_state(layer: Layer, in_shape: Any) -> Any:
    """``layer.init_state(in_shape)``, or ``()`` for a layer without state."""
    return () if layer.init_state is None else layer.init_state(in_shape)


def out_shape(layer: Layer, in_shape: Any) -> Any:
    """The output shape(s) of ``layer`` for ``in_shape``, without allocating its params."""
    shapes = []
    jax.eval_shape(lambda k: shapes.append(layer.init(k, in_shape)[0]), jax.random.PRNGKey(0))
    return shapes[0]


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


def _check_positive_int(name: str, what: str, value: Any) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: {what} must be a positive integer, got {value!r}")
    return int(value)


def _expand_to(b: jax.Array, ndim: int) -> jax.Array:
    """Adds leading unit axes to ``b`` (explicit broadcasting: rank promotion may be disabled)."""
    return b.reshape((1,) * (ndim - b.ndim) + b.shape)


def _sum_to_last(dy: jax.Array) -> jax.Array:
    """Sums every axis but the last: the gradient of a bias broadcast over them."""
    return dy.sum(axis=tuple(range(dy.ndim - 1)))


def _contract_leading(x: jax.Array, dy: jax.Array) -> jax.Array:
    """``x^T dy`` contracting every leading (batch) axis without materialising a transpose."""
    axes = tuple(range(x.ndim - 1))
    return lax.dot_general(x, dy, ((axes, axes), ((), ())))


def _prod(shape: Shape) -> int:
    return math.prod(shape)


def _describe_factory(obj: Any) -> str:
    module = getattr(obj, "__module__", "") or ""
    name = getattr(obj, "__qualname__", getattr(obj, "__name__", repr(obj)))
    public = "bpjax" if module.startswith("bpjax.layers") else module
    return f"{public}.{name}" if public else name


def call_hint(obj: Any) -> str:
    """How to call a factory passed where its product was expected: ``bpjax.relu()``, or
    ``bpjax.dense(...)`` when it has required arguments."""
    name = _describe_factory(obj)
    try:
        required = any(
            p.default is inspect.Parameter.empty
            and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            for p in inspect.signature(obj).parameters.values()
        )
    except (TypeError, ValueError):  # no signature to read
        required = True
    return f"{name}(...)" if required else f"{name}()"


def check_layer(obj: Any, where: str) -> Layer:
    """``obj`` if it is a Layer; else a TypeError that says what to do instead.

    A layer factory passed where its product is expected (``serial(dense(3), relu)``) is named,
    with the call that fixes it (``call it: bpjax.relu()``).
    """
    if isinstance(obj, Layer):
        return obj
    if callable(obj) and not isinstance(obj, type):
        raise TypeError(
            f"{where} is the layer factory {_describe_factory(obj)}, not a Layer: call it: "
            f"{call_hint(obj)}"
        )
    raise TypeError(f"{where} is {type(obj).__name__}, not a Layer")
