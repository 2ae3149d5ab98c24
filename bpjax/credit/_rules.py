"""The gradient function of each rule: the feedback rules as the network's own backward with
substituted weights, DFA by segments."""

from collections.abc import Callable
from typing import Any

from bpjax.credit import _dfa
from bpjax.credit._common import RULES, check_mode, feedback_params, is_empty
from bpjax.layers import Layer, apply


def rule_value_and_grad(net: Layer, loss: Any, mode: str) -> Callable:
    """``f(params, x, target, key, state, feedback) -> (value, y, new_state, grads)`` for a rule.

    What ``bpjax.grad.value_and_grad(mode=<rule>)`` runs (it adds the keywords and packing).
    What the rule can't apply to, known from the network's structure, raises here, before
    anything is traced; what needs shapes raises when ``f`` is traced, before anything compiles.
    """
    check_mode(mode, "rule_value_and_grad")
    if mode not in RULES:
        raise ValueError(
            f"rule_value_and_grad: {mode!r} is backprop, not one of {', '.join(RULES)}"
        )
    if mode == "direct_feedback_alignment":
        _dfa.check_network(net)
        return _dfa.value_and_grad(net, loss)

    def f(params, x, target, key, state, feedback):
        if mode == "sign_symmetry" and not is_empty(feedback):
            raise TypeError(
                "sign_symmetry takes no feedback=: its feedback is sign(w) of the current weights"
            )
        backward_params = feedback_params(mode, params, feedback)
        y, cache, new_state = apply(net, params, x, key=key, state=state)
        value, loss_cache = loss.forward(y, target)
        grads, _ = net.backward(backward_params, cache, loss.backward(loss_cache))
        return value, y, new_state, grads

    return f
