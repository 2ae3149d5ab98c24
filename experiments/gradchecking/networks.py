"""The networks experiments/gradcheck.py checks and the check of one combination: layer kinds,
bug injection (``with_bug``, ``inject_bug``), inputs and targets suited to a dtype and a loss,
the MLP or image network of a combination, the activation it really uses, and ``check_one``
(``bpjax.check_grads`` on one combination)."""

import inspect
import warnings
from collections.abc import Iterator
from typing import Any

import hydra
import jax
import jax.numpy as jnp

import bpjax
from bpjax import losses
from bpjax.grad import GradCheckResult, GradCheckWarning
from bpjax.layers import ACTIVATIONS, Layer, init_state, is_stateful


def layer_kind(layer: Layer) -> str:
    """The layer's name without its arguments: ``"leaky_relu(0.01)"`` -> ``"leaky_relu"``."""
    return layer.name.split("(")[0]


# The kinds of bpjax's activation layers (``"tanh"``, ``"leaky_relu"``, ...).
ACTIVATION_KINDS = frozenset(layer_kind(make()) for make in ACTIVATIONS.values())


def with_bug(layer: Layer) -> Layer:
    """``layer`` with the same init and forward but a wrong backward (for demonstrations).

    A parameter-free layer forgets its local derivative: ``dx = dy`` instead of
    ``dx = dy * f'(x)``. A layer with a bias forgets to sum its gradient over the batch:
    ``db = mean(dy)`` instead of ``sum(dy)``; one without (a conv before batch norm) forgets
    half its weight gradient: ``dw / 2``. Any other layer with parameters (batch norm's
    ``scale``/``offset``, a residual block's nested gradients) halves every parameter gradient.
    A parameter-free layer whose output has another shape than its input (pooling, flatten)
    returns a ``dx`` of the wrong shape, which the check reports as a failure of that layer.
    """

    def backward(params, cache, dy):
        grads, dx = layer.backward(params, cache, dy)
        if not jax.tree_util.tree_leaves(grads):
            return grads, dy
        if isinstance(grads, dict) and "b" in grads:
            batch = dy.size // dy.shape[-1]
            return {**grads, "b": grads["b"] / batch}, dx
        if isinstance(grads, dict) and "w" in grads:
            return {**grads, "w": grads["w"] / 2}, dx
        return jax.tree_util.tree_map(lambda g: g / 2, grads), dx

    return layer._replace(backward=backward)


# How to rebuild a combinator from new sublayers (``Layer.combinator`` -> constructor).
_REBUILD = {
    "serial": lambda subs: bpjax.serial(*subs),
    "parallel": lambda subs: bpjax.layers.parallel(*subs),
    "residual": lambda subs: bpjax.layers.residual(*subs),
}


def layers_within(net: Layer) -> Iterator[Layer]:
    """``net`` and every layer inside it, at any depth (residual blocks, parallel branches)."""
    yield net
    for layer in net.sublayers:
        yield from layers_within(layer)


def inject_bug(net: Layer, kind: str) -> Layer:
    """``net`` with ``with_bug`` applied to every layer of ``kind`` at any depth: the convs
    inside a residual block too (the check then names the block that holds them)."""
    if layer_kind(net) == kind:
        return with_bug(net)
    if net.combinator in _REBUILD:
        return _REBUILD[net.combinator]([inject_bug(layer, kind) for layer in net.sublayers])
    return net


def make_targets(key: jax.Array, loss_name: str, batch: int, n_out: int, dtype: Any) -> jax.Array:
    """Targets in the form each loss expects.

    Returns:
      integer labels ``[batch]`` in ``[0, n_out)`` for ``softmax_cross_entropy``; probabilities
      ``[batch, n_out]`` in ``[0, 1]`` for ``binary_cross_entropy``; standard normal values
      ``[batch, n_out]`` otherwise.
    """
    if loss_name in ("softmax_cross_entropy", "cross_entropy"):
        return jax.random.randint(key, (batch,), 0, n_out, dtype=jnp.int32)
    # Drawn in float32 and cast, so every dtype is checked at the same point.
    if loss_name in ("binary_cross_entropy", "bce"):
        return jax.random.uniform(key, (batch, n_out), jnp.float32).astype(dtype)
    return jax.random.normal(key, (batch, n_out), jnp.float32).astype(dtype)


def make_inputs(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """Inputs of ``dtype``: image-like integers in ``[0, 256)`` for integer dtypes, random bits
    for bool, standard normal values (drawn in float32 and cast) for floating dtypes."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.bool_:
        return jax.random.bernoulli(key, 0.5, shape)
    if jnp.issubdtype(dtype, jnp.integer):
        return jax.random.randint(key, shape, 0, 256, jnp.int32).astype(dtype)
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def network(
    features: list[int] | dict[str, Any],
    activation: str,
    *,
    batch: int,
    n_in: int,
    b_init: str = "normal",
) -> tuple[Layer, tuple[int, ...]]:
    """``(net, in_shape)`` of a combination (``check_one``'s ``features``): an MLP on
    ``[batch, n_in]`` inputs, or an image network on ``[batch, *input_shape]``."""
    if isinstance(features, dict):
        return build_image_net(features, activation), (batch, *features["input_shape"])
    return bpjax.mlp(features, activation=activation, b_init=b_init), (batch, n_in)


def injectable_kinds(net: Layer) -> set[str]:
    """The kinds ``inject_bug`` can reach in ``net``: every layer at any depth, blocks
    (``residual``) included, but not the ``serial`` stacks that hold them."""
    return {layer_kind(layer) for layer in layers_within(net)} - {"serial"}


def own_activation(net: Layer) -> str | None:
    """The activation a network uses of its own (one whose factory takes none): the kinds of
    its activation layers at any depth, in order, joined by ``+`` (``"tanh"``,
    ``"relu+sigmoid"``), or None if it has none."""
    kinds = [layer_kind(layer) for layer in layers_within(net)]
    return "+".join(dict.fromkeys(k for k in kinds if k in ACTIVATION_KINDS)) or None


def activation_used(
    features: list[int] | dict[str, Any], activation: str, *, batch: int, n_in: int
) -> str | None:
    """What a combination's network really uses as its activation, as its rows record it:
    ``activation`` where it is set (an MLP, an image network whose factory takes one), else
    the network's own (``own_activation``: ``"tanh"`` for ``conv-strided-groups``, None for a
    network without one), whatever ``image_activations`` says."""
    if not isinstance(features, dict) or _takes(features["model"], "activation"):
        return activation
    return own_activation(network(features, activation, batch=batch, n_in=n_in)[0])


def check_one(
    features: list[int] | dict[str, Any],
    activation: str,
    loss_name: str,
    dtype: Any,
    *,
    batch: int,
    n_in: int,
    seed: int,
    b_init: str = "normal",
    fd_eps: float | None = None,
    bug: str | None = None,
    x_dtype: Any = None,
) -> GradCheckResult:
    """Runs ``bpjax.check_grads`` on one combination (params cast to ``dtype``, inputs to
    ``x_dtype``, by default ``dtype``; see ``make_inputs``).

    ``features`` is an MLP's layer sizes (inputs ``[batch, n_in]``), or an image network: a
    dict with the model's Hydra config (``model``, its ``activation`` set to ``activation``
    where the model takes one) and one example's ``input_shape`` ``[h, w, c]``. A network with
    state (batch norm) is checked in training mode (batch statistics, a key), the harder case.

    ``b_init`` defaults to small random biases: with zero biases a layer of dead ReLUs feeds the
    next one exact zeros, putting its pre-activations (or the logits) exactly on a kink, where
    a finite difference is no derivative and the fd row can only be inconclusive.
    """
    init_key, x_key, target_key = jax.random.split(jax.random.PRNGKey(seed), 3)
    net, in_shape = network(features, activation, batch=batch, n_in=n_in, b_init=b_init)
    if bug is not None:
        net = inject_bug(net, bug)
    out_shape, params = net.init(init_key, in_shape)
    params = jax.tree_util.tree_map(lambda p: p.astype(dtype), params)
    x = make_inputs(x_key, in_shape, dtype if x_dtype is None else x_dtype)
    target = make_targets(target_key, loss_name, batch, out_shape[-1], dtype)
    stateful = is_stateful(net)
    state = init_state(net, in_shape) if stateful else None
    with warnings.catch_warnings():
        # Tolerances already follow the dtype; the header says float32 checks are loose.
        warnings.simplefilter("ignore", GradCheckWarning)
        return bpjax.check_grads(
            net,
            losses.get(loss_name),
            params,
            x,
            target,
            key=jax.random.PRNGKey(seed + 1) if stateful else None,
            state=state,
            eps=fd_eps,
            seed=seed,
        )


def build_image_net(spec: dict[str, Any], activation: str) -> Layer:
    """The image network of an ``image_architectures`` entry, with ``activation`` where its
    factory takes one."""
    model = dict(spec["model"])
    if _takes(model, "activation"):
        model["activation"] = activation
    return hydra.utils.instantiate(model, _convert_="all")


def _takes(model: dict[str, Any], argument: str) -> bool:
    factory = hydra.utils.get_method(model["_target_"])
    return argument in inspect.signature(factory).parameters
