"""The call paths a user trains with, each as ``step(carry, x, y) -> (carry, aux)`` per mode.

* ``make_step``: ``bpjax.train.make_step(net, loss, optax.sgd(lr), grad_mode=mode)`` returning
  ``(new_state, loss)`` (what ``make_epoch`` keeps of it); the carry is the ``TrainState``.
* ``value_and_grad``: the README's plain path. ``bpjax.value_and_grad(net, loss, mode=mode)``
  and the optax update (``optimizer.update`` + ``optax.apply_updates``) in one jitted function,
  returning the new ``(params, opt_state)`` and the loss. No key and no state are passed, as in
  the README; a network with state (batch norm) gets ``with_state=True``, its state and a
  constant key (training mode).
* ``custom_vjp``: ``jax.grad`` of a user loss through ``bpjax.as_custom_vjp(net)`` (manual:
  ``jax.grad`` runs the hand-written backward) or through the network's forward (autodiff:
  ``jax.grad`` differentiates ``net.forward``), then the same update. The user loss is the
  configured loss's forward, differentiated by ``jax.grad`` in both modes (its hand-written
  backward is not used), so the two modes differ in the network's backward only.

The carry of the last two is ``(params, opt_state)``, or ``(params, opt_state, net_state, key)``
for a network with state. Every path starts from the point's state.
"""

from collections.abc import Callable
from typing import Any

import jax
import optax

from bpjax import as_custom_vjp, layers, value_and_grad
from bpjax.train import make_step

from .points import Point

PATHS = ("make_step", "value_and_grad", "custom_vjp")


def loss_only(step: Callable) -> Callable:
    """``make_step``'s step returning ``(new_state, loss)``: what a training loop keeps (the
    gradients, updates and outputs in ``aux`` are dropped, so XLA need not materialise them)."""

    def f(state, x, y):
        new_state, aux = step(state, x, y)
        return new_state, aux["loss"]

    return f


def _update(optimizer: optax.GradientTransformation, grads, opt_state, params):
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def _readme_step(net: layers.Layer, loss, optimizer, mode: str) -> Callable:
    if not layers.is_stateful(net):
        grad_fn = value_and_grad(net, loss, mode=mode)

        def step(carry, x, y):
            params, opt_state = carry
            value, grads = grad_fn(params, x, y)
            return _update(optimizer, grads, opt_state, params), value

        return step
    grad_fn = value_and_grad(net, loss, mode=mode, with_state=True)

    def step_with_state(carry, x, y):
        params, opt_state, net_state, key = carry
        (value, net_state), grads = grad_fn(params, x, y, key=key, state=net_state)
        return (*_update(optimizer, grads, opt_state, params), net_state, key), value

    return step_with_state


def _custom_vjp_step(net: layers.Layer, loss, optimizer, mode: str) -> Callable:
    stateful = layers.is_stateful(net)
    if mode == "manual":
        apply_net = as_custom_vjp(net)

        def forward(params, x, key, net_state):
            if stateful:
                return apply_net(params, x, key=key, state=net_state)
            return apply_net(params, x), net_state

    else:

        def forward(params, x, key, net_state):
            y, _, new_state = layers.apply(net, params, x, key=key, state=net_state)
            return y, new_state

    def user_loss(params, x, y, key, net_state):
        out, new_state = forward(params, x, key, net_state)
        return loss.forward(out, y)[0], new_state

    grad_fn = jax.grad(user_loss, has_aux=True)

    def step(carry, x, y):
        params, opt_state, net_state, key = carry if stateful else (*carry, (), None)
        grads, net_state = grad_fn(params, x, y, key, net_state)
        params, opt_state = _update(optimizer, grads, opt_state, params)
        return ((params, opt_state, net_state, key) if stateful else (params, opt_state)), ()

    return step


def path_step(path: str, point: Point, mode: str) -> Callable:
    """The point's step on ``path`` in ``mode`` (``"manual"`` or ``"autodiff"``).

    Raises:
      ValueError: an unknown path.
    """
    if path == "make_step":
        return loss_only(make_step(point.net, point.loss, point.optimizer, grad_mode=mode))
    if path == "value_and_grad":
        return _readme_step(point.net, point.loss, point.optimizer, mode)
    if path == "custom_vjp":
        return _custom_vjp_step(point.net, point.loss, point.optimizer, mode)
    raise ValueError(f"unknown path {path!r}; valid: {', '.join(PATHS)}")


def initial_carry(path: str, point: Point) -> Any:
    """What ``path_step(path, ...)`` starts from: the point's state, in that path's carry."""
    state = point.state
    if path == "make_step":
        return state
    if layers.is_stateful(point.net):
        return (state.params, state.opt_state, state.net_state, state.key)
    return (state.params, state.opt_state)


def carry_params(carry: Any) -> Any:
    """The params in a carry of any path."""
    return carry.params if hasattr(carry, "params") else carry[0]
