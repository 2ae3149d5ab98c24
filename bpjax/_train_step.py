"""``bpjax.train``'s state and update step: the ``fold_in`` stream ids, ``TrainState``,
``init_state``, ``output_shape``, ``updates_applied``, ``layer_stats`` and ``make_step``
(re-exported by ``bpjax.train``, whose docstring states the convention). The public names'
``__module__`` is ``bpjax.train``, where users import them from: reprs name them there, and
pickles refer to them there."""

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from bpjax import credit
from bpjax._rule_wiring import (
    draw_rule_state,
    gradient_step,
    kolen_pollack_step,
    resolve_rule_options,
)
from bpjax.grad import MODES
from bpjax.layers import Layer, out_shape
from bpjax.layers import init_state as init_net_state
from bpjax.losses import Loss
from bpjax.precision import as_compute_dtype, mixed_precision_grad

# fold_in stream ids: each kind of randomness has its own stream.
INIT, SHUFFLE, DROPOUT, FEEDBACK = 0, 1, 2, 3


class TrainState(NamedTuple):
    """Everything that changes during training, as one pytree.

    ``net_state`` is the network's state that is not a parameter (batch norm's running
    statistics; ``()`` for a network without): updated by the training-mode forward pass, never
    by the optimizer. ``rule_state`` is the learning rule's (``bpjax.credit``: feedback
    weights, for Kolen-Pollack held as a ``bpjax.credit.KolenPollackState`` tied to
    ``params``; ``()`` for backprop). Both are checkpointed with the params.
    """

    params: Any
    opt_state: optax.OptState
    step: jax.Array  # int32 scalar: minibatch steps taken (one forward/backward each)
    key: jax.Array  # the run's training key (constant; draws fold in counters)
    net_state: Any = ()
    rule_state: Any = ()


def init_state(
    net: Layer,
    optimizer: optax.GradientTransformation,
    key: jax.Array,
    in_shape: tuple,
    *,
    grad_mode: str = "manual",
    rule_options: Mapping[str, Any] | None = None,
) -> TrainState:
    """Initialises params (from ``fold_in(key, INIT)``), the optimizer state and, for a
    learning rule, its state (from ``fold_in(key, FEEDBACK)``).

    Args:
      net: the network.
      optimizer: an optax GradientTransformation.
      key: the run's root key, e.g. ``jax.random.PRNGKey(seed)``.
      in_shape: a batch input shape, e.g. ``(batch, 784)``.
      grad_mode: the mode the state will be trained with: a learning rule
        (``bpjax.credit.RULES``) gets its ``rule_state`` (``bpjax.credit.init_rule_state``;
        ``()`` for backprop and sign symmetry; for Kolen-Pollack its draw of ``B`` held as a
        ``bpjax.credit.KolenPollackState``, ``B = w + scale * (B - w)``, see
        ``bpjax.credit.kolen_pollack_state``).
      rule_options: how the feedback is drawn (see ``check_rule``).

    Raises:
      ValueError: as ``check_rule``.
    """
    in_shape = tuple(in_shape)
    if grad_mode not in MODES:
        raise ValueError(f"unknown grad_mode {grad_mode!r}; valid modes: {', '.join(MODES)}")
    options = resolve_rule_options(rule_options)
    rule_state = draw_rule_state(
        grad_mode, net, in_shape, jax.random.fold_in(key, FEEDBACK), options
    )
    _, params = net.init(jax.random.fold_in(key, INIT), in_shape)
    if grad_mode == "kolen_pollack":  # B held as w + scale * (B - w): see KolenPollackState
        rule_state = credit.kolen_pollack_state(params, rule_state)
    step = jnp.zeros((), jnp.int32)
    net_state = init_net_state(net, in_shape)
    return TrainState(params, optimizer.init(params), step, key, net_state, rule_state)


def output_shape(net: Layer, in_shape: tuple) -> tuple[int, ...]:
    """The output shape of ``net`` for inputs of ``in_shape``, without allocating params."""
    return tuple(out_shape(net, tuple(in_shape)))


def updates_applied(state: TrainState) -> jax.Array:
    """Optimizer updates applied so far.

    ``state.step`` counts minibatch steps (one forward/backward each). They are the updates
    applied unless gradients are accumulated: with ``optax.MultiSteps(opt, every_k_schedule=k)``
    anywhere in the optimizer, k steps make one update, and its ``gradient_step`` is returned.
    """
    found = gradient_step(state.opt_state)
    return state.step if found is None else found


def layer_stats(params: Any, grads: Any, updates: Any) -> dict[str, jax.Array]:
    """Per-layer gradient norm, weight norm and update-to-weight ratio ``||u|| / ||w||``.

    Layers are the entries of a tuple ``params`` (``serial``); parameter-free ones are skipped.
    """

    def norm(tree):
        leaves = jax.tree_util.tree_leaves(tree)
        return jnp.sqrt(sum(jnp.sum(jnp.square(a.astype(jnp.float32))) for a in leaves))

    per_layer = params if isinstance(params, tuple) else (params,)
    per_grads = grads if isinstance(grads, tuple) else (grads,)
    per_updates = updates if isinstance(updates, tuple) else (updates,)
    out = {}
    for i, (p, g, u) in enumerate(zip(per_layer, per_grads, per_updates)):
        if not jax.tree_util.tree_leaves(p):
            continue
        w_norm = norm(p)
        out[f"layer{i}/grad_norm"] = norm(g)
        out[f"layer{i}/weight_norm"] = w_norm
        out[f"layer{i}/update_ratio"] = norm(u) / jnp.maximum(w_norm, 1e-12)
    return out


def _step_key(state: TrainState) -> jax.Array:
    """The dropout key of the step ``state.step``: ``fold_in(fold_in(key, DROPOUT), step)``."""
    return jax.random.fold_in(jax.random.fold_in(state.key, DROPOUT), state.step)


def make_step(
    net: Layer,
    loss: Loss,
    optimizer: optax.GradientTransformation,
    *,
    grad_mode: str = "manual",
    compute_dtype: Any = None,
    batch_sharding: Any = None,
    rule_options: Mapping[str, Any] | None = None,
) -> Callable:
    """Returns the pure update ``step(state, x, y) -> (state, aux)``.

    Args:
      net, loss, optimizer: what to train, on what, with what.
      grad_mode: ``"manual"`` (hand-written backward), ``"autodiff"`` (``jax.grad``) or a
        learning rule of ``bpjax.credit`` (``bpjax.grad.MODES``). A rule's gradients are its
        update direction, computed with ``feedback=state.rule_state`` (so ``state`` must come
        from ``init_state(..., grad_mode=grad_mode)``). For ``"kolen_pollack"`` the step then
        applies ``bpjax.credit.kolen_pollack_update`` to the optimizer's updates: the feedback
        gets the weights' update and both decay by ``rule_options["kp_decay"]`` (with
        ``optax.MultiSteps``, only at the steps that apply an update). The optimizer and its
        weight decay see the rule's gradients and the params only, never the rule state.
      compute_dtype: e.g. ``jnp.bfloat16`` for mixed precision: params and inputs are cast for
        the forward and backward passes, the loss and the optimizer update stay in the params'
        dtype (float32 master weights).
      batch_sharding: a ``jax.sharding.Sharding`` for the batch (data parallelism): the batch is
        constrained to it and XLA inserts the gradient all-reduce.
      rule_options: the learning rule's options (``check_rule``); the step uses ``kp_decay``.

    ``aux`` holds ``loss`` (the minibatch loss), ``output`` (the network output) and ``grads``
    and ``updates`` (the updates applied; for optional statistics; XLA drops what the caller
    does not use).

    Jitted on its own and called once per batch, the step returns every buffer of the state
    anew: a rule's fixed feedback (feedback alignment's ``B``) is copied out of every call
    unless the state is donated (``jax.jit(step, donate_argnums=0)``, the old state then
    unusable). ``make_epoch`` and ``make_chunk`` scan it, and there it is not copied.

    Raises:
      ValueError: an unknown mode or rule option.
    """
    if grad_mode not in MODES:
        raise ValueError(f"unknown grad_mode {grad_mode!r}; valid modes: {', '.join(MODES)}")
    kp_decay = resolve_rule_options(rule_options)["kp_decay"]
    grad_fn = mixed_precision_grad(net, loss, grad_mode, as_compute_dtype(compute_dtype))

    def step(state: TrainState, x: jax.Array, y: jax.Array):
        if batch_sharding is not None:
            x = lax.with_sharding_constraint(x, batch_sharding)
            y = lax.with_sharding_constraint(y, batch_sharding)
        key = _step_key(state)
        (value, (output, net_state)), grads = grad_fn(
            state.params, x, y, key=key, state=state.net_state, feedback=state.rule_state
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        rule_state = state.rule_state
        if grad_mode == "kolen_pollack":
            updates, rule_state = kolen_pollack_step(state, opt_state, updates, kp_decay)
        new_params = optax.apply_updates(state.params, updates)
        new_state = state._replace(
            params=new_params,
            opt_state=opt_state,
            step=state.step + 1,
            net_state=net_state,
            rule_state=rule_state,
        )
        return new_state, {"loss": value, "output": output, "grads": grads, "updates": updates}

    return step


for _public in (TrainState, init_state, output_shape, updates_applied, layer_stats, make_step):
    _public.__module__ = "bpjax.train"  # re-exported there, their public home
del _public
