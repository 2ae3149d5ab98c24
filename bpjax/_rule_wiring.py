"""How ``bpjax.train`` wires in a learning rule of ``bpjax.credit``: the rule's options, the
check that it applies before anything compiles, its state's draw, and Kolen-Pollack's update
inside the step. Re-exported by ``bpjax.train``."""

import inspect
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from bpjax import credit
from bpjax.grad import MODES
from bpjax.layers import Layer

_DRAW_DEFAULTS = inspect.signature(credit.init_rule_state).parameters
# A learning rule's options and their defaults (those of bpjax.credit): how the feedback
# weights are drawn (``init_rule_state``'s distribution and scale) and Kolen-Pollack's decay.
RULE_OPTIONS = {
    "distribution": _DRAW_DEFAULTS["distribution"].default,
    "scale": _DRAW_DEFAULTS["scale"].default,
    "kp_decay": credit.KP_DECAY,
}


def resolve_rule_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``RULE_OPTIONS`` updated with ``options``; unknown names and a decay out of range raise."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(RULE_OPTIONS))
    if unknown:
        raise ValueError(f"unknown rule_options {unknown}; valid: {', '.join(RULE_OPTIONS)}")
    resolved = {**RULE_OPTIONS, **options}
    decay = resolved["kp_decay"]
    if isinstance(decay, bool) or not isinstance(decay, int | float) or not 0 <= decay < 1:
        raise ValueError(f"rule_options: kp_decay must be a number in [0, 1), got {decay!r}")
    return resolved


def check_rule(
    grad_mode: str, net: Layer, in_shape: tuple, rule_options: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Checks that ``grad_mode`` exists and applies to ``net``, without computing anything.

    What ``fit`` runs before compiling: the mode, the rule's options, and the rule's own
    refusals (``bpjax.credit.init_rule_state``, traced for shapes only: e.g. direct feedback
    alignment on a network with a residual block, naming the block).

    Args:
      grad_mode: ``"manual"``, ``"autodiff"`` or a learning rule (``bpjax.grad.MODES``).
      net: the network.
      in_shape: a batch input shape, e.g. ``(batch, 784)``.
      rule_options: any of ``RULE_OPTIONS``: ``distribution`` (``"uniform"`` or ``"normal"``)
        and ``scale`` (``"fan_avg"``, ``"fan_in"``, ``"fan_out"`` or a standard deviation) of
        the feedback weights (``bpjax.credit.init_rule_state``), and ``kp_decay``, Kolen-Pollack's
        per-step decay in ``[0, 1)`` (``bpjax.credit.kolen_pollack_update``). Accepted and
        unused by the modes they don't concern.

    Returns:
      The options with the defaults filled in.

    Raises:
      ValueError: an unknown mode (listing the valid ones), option or option value; a rule
        that can't apply to ``net``.
    """
    if grad_mode not in MODES:
        raise ValueError(f"unknown grad_mode {grad_mode!r}; valid modes: {', '.join(MODES)}")
    options = resolve_rule_options(rule_options)
    # Traced for shapes: nothing is drawn or compiled.
    jax.eval_shape(
        lambda: draw_rule_state(grad_mode, net, in_shape, jax.random.PRNGKey(0), options)
    )
    return options


def draw_rule_state(
    grad_mode: str, net: Layer, in_shape: tuple, key: jax.Array, options: Mapping[str, Any]
) -> Any:
    """``bpjax.credit.init_rule_state`` with the draw options of ``options``."""
    return credit.init_rule_state(
        grad_mode,
        net,
        tuple(in_shape),
        key=key,
        distribution=options["distribution"],
        scale=options["scale"],
    )


def gradient_step(opt_state: Any) -> jax.Array | None:
    """``optax.MultiSteps``'s count of updates applied, or None if the optimizer has none."""
    found = [
        node.gradient_step
        for node in jax.tree_util.tree_leaves(
            opt_state, is_leaf=lambda n: isinstance(n, optax.MultiStepsState)
        )
        if isinstance(node, optax.MultiStepsState)
    ]
    return found[0] if found else None


def kolen_pollack_step(state: Any, opt_state: Any, updates: Any, decay: float):
    """``kolen_pollack_update`` after the optimizer; under gradient accumulation
    (``optax.MultiSteps``) only at the steps that apply an update, so that the feedback, like
    the weights, stays put between them."""
    new_updates, rule_state = credit.kolen_pollack_update(
        state.rule_state, state.params, updates, decay=decay
    )
    before = gradient_step(state.opt_state)
    if before is None:  # no MultiSteps: every step applies an update
        return new_updates, rule_state
    applied = gradient_step(opt_state) != before

    def pick(new, old):
        return jax.tree_util.tree_map(lambda n, o: jnp.where(applied, n, o), new, old)

    return pick(new_updates, updates), pick(rule_state, state.rule_state)
