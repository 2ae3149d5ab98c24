"""Rule state: feedback weights drawn from a key, and Kolen-Pollack's update after the optimizer."""

import math
import numbers
from typing import Any

import jax

from bpjax.credit import _dfa
from bpjax.credit._common import (
    BACKPROP,
    KolenPollackState,
    _held_scale,
    check_mode,
    expected_feedback,
    feedback_params,
    require_weights,
)
from bpjax.layers import Layer, check_layer

DISTRIBUTIONS = ("uniform", "normal")
SCALES = ("fan_in", "fan_out", "fan_avg")
KP_DECAY = 1e-4  # per step: W - B shrinks by a factor e every 10,000 steps


def _check_draw_options(distribution: str, scale: float | str) -> None:
    if distribution not in DISTRIBUTIONS:
        raise ValueError(
            f"init_rule_state: unknown distribution {distribution!r}; valid: "
            f"{', '.join(DISTRIBUTIONS)}"
        )
    if isinstance(scale, str):
        if scale not in SCALES:
            raise ValueError(
                f"init_rule_state: unknown scale {scale!r}; valid: {', '.join(SCALES)}, or a "
                f"positive standard deviation"
            )
    elif isinstance(scale, bool) or not isinstance(scale, int | float) or not scale > 0:
        raise ValueError(
            f"init_rule_state: scale must be {', '.join(SCALES)} or > 0, got {scale!r}"
        )


def _draw(key: Any, spec: Any, distribution: str, scale: float | str) -> jax.Array:
    """A feedback matrix of ``spec``'s shape and dtype with mean 0 and the standard deviation
    ``scale`` names. Fans as a forward weight's: ``[..., fan_in_axis, fan_out_axis]`` with a
    receptive field (a conv kernel's ``kh * kw``) in front."""
    shape = tuple(spec.shape)
    receptive = math.prod(shape[:-2])
    fan_in = receptive * (shape[-2] if len(shape) > 1 else 1)
    fan_out = receptive * (shape[-1] if shape else 1)
    std = {
        "fan_in": lambda: 1 / math.sqrt(fan_in),
        "fan_out": lambda: 1 / math.sqrt(fan_out),
        "fan_avg": lambda: math.sqrt(2 / (fan_in + fan_out)),
    }.get(scale, lambda: float(scale))()
    if distribution == "uniform":
        bound = math.sqrt(3) * std  # U(-a, a) has standard deviation a / sqrt(3)
        return jax.random.uniform(key, shape, spec.dtype, -bound, bound)
    return std * jax.random.normal(key, shape, spec.dtype)


def init_rule_state(
    mode: str,
    net: Layer,
    in_shape: tuple[int, ...],
    *,
    key: jax.Array,
    distribution: str = "uniform",
    scale: float | str = "fan_avg",
) -> Any:
    """The learning rule's state (its feedback weights), drawn from ``key``.

    The trainer passes ``jax.random.fold_in(run_key, FEEDBACK)``: a stream of its own, so the
    draws are the same on resume and independent of the params' init.

    * ``feedback_alignment``, ``kolen_pollack``: the params' structure with each leaf named
      ``"w"`` replaced by a feedback matrix ``B`` of ``w``'s shape and dtype (``[n_in, n_out]``
      for ``dense``, ``[kh, kw, c_in, c_out]`` for ``conv2d``) and every other leaf by ``()``.
    * ``direct_feedback_alignment``: for a ``serial`` network (nested serials flattened), one
      entry per layer nested as the params are: ``B_i`` of shape ``[n_outputs, units_i]`` for
      each hidden parametric layer, ``()`` for the output layer and parameter-free layers.
      ``units_i`` is the size of one example's output of layer ``i``'s segment (see
      ``bpjax.grad.value_and_grad``), so ``B_i`` maps the output error ``[batch, n_outputs]``
      to that output.
    * ``sign_symmetry``, ``manual``, ``autodiff``: ``()`` (sign symmetry reads ``sign(w)`` of
      the current weights at every step).

    Args:
      mode: a learning rule (``RULES``) or ``"manual"``/``"autodiff"``.
      net: the network.
      in_shape: a batch input shape, e.g. ``(batch, 784)``, as for ``net.init``.
      key: a PRNG key.
      distribution: ``"uniform"`` (zero mean, ``U(-a, a)``) or ``"normal"`` (Gaussian).
      scale: the standard deviation: ``"fan_avg"`` (Glorot's, ``sqrt(2 / (fan_in + fan_out))``),
        ``"fan_in"`` (``1 / sqrt(fan_in)``), ``"fan_out"``, or a positive float. Fans are those
        of a forward weight of the same shape (for DFA's ``B_i``, ``fan_in = n_outputs``).

    The defaults, uniform with Glorot's scale, give ``B`` the distribution of a
    Glorot-initialised ``w`` of its shape, so feedback and forward paths start at the same
    scale (biotorch's DFA layers default to this Xavier draw as well). Akrout et al.'s (2019)
    reference code for feedback alignment and Kolen-Pollack draws a Gaussian of variance
    ``1 / (fan_in + fan_out)``: ``distribution="normal", scale=(fan_in + fan_out) ** -0.5``.
    Lillicrap et al. (2016) and Nøkland (2016) set the feedback's range per experiment: pass
    ``scale`` to match one.

    Raises:
      ValueError: an unknown mode, distribution or scale; a network the rule can't apply to
        (naming the layer and why): for DFA one that is not serial, a parametric layer without
        ``"w"``, or an output that is not ``[batch, n_outputs]``; for the feedback rules, one
        without any ``"w"``.

    References:
      Lillicrap, Cownden, Tweed & Akerman, "Random synaptic feedback weights support error
      backpropagation for deep learning", Nat. Commun. 7:13276, 2016.
      Nøkland, "Direct Feedback Alignment Provides Learning in Deep Neural Networks", NeurIPS 2016.
      Akrout, Wilson, Humphreys, Lillicrap & Tweed, "Deep Learning without Weight Transport",
      NeurIPS 2019.
    """
    check_mode(mode, "init_rule_state")
    _check_draw_options(distribution, scale)
    net = check_layer(net, "init_rule_state: net")
    in_shape = tuple(in_shape)
    if mode == "direct_feedback_alignment":
        _dfa.check_network(net)
    if mode in BACKPROP:
        return ()
    params = jax.eval_shape(lambda k: net.init(k, in_shape)[1], key)
    if mode == "direct_feedback_alignment":
        flat = _dfa.flatten(net)
        layer_params = [_dfa.at(params, path) for path, _ in flat]
        expected = _dfa.expected_feedback(
            net, flat, layer_params, _dfa.segments(net, flat, layer_params, in_shape)
        )
    else:
        require_weights(mode, params)
        if mode == "sign_symmetry":
            return ()
        expected = expected_feedback(params)
    specs, treedef = jax.tree_util.tree_flatten(expected)
    keys = jax.random.split(key, max(len(specs), 1))
    return jax.tree_util.tree_unflatten(
        treedef, [_draw(k, spec, distribution, scale) for k, spec in zip(keys, specs)]
    )


def _check_decay(decay: Any) -> None:
    """A concrete decay is a number in [0, 1); a traced one (under jit or vmap) is not checked."""
    if isinstance(decay, jax.core.Tracer):
        return
    number = isinstance(decay, numbers.Real) and not isinstance(decay, bool)
    scalar = getattr(decay, "shape", None) == () and getattr(decay, "dtype", None) is not None
    try:
        ok = (number or scalar) and 0.0 <= float(decay) < 1.0
    except (TypeError, ValueError):  # a complex or non-numeric array
        ok = False
    if not ok:
        raise ValueError(f"kolen_pollack_update: decay must be a number in [0, 1), got {decay!r}")


def kolen_pollack_update(
    feedback: Any, params: Any, updates: Any, *, decay: float = KP_DECAY
) -> tuple[Any, Any]:
    """Kolen-Pollack: the feedback gets the forward weight's update, and both decay.

    Called after the optimizer with the params BEFORE the step and the optimizer's ``updates``
    (``optax.apply_updates(params, updates)`` gives the next params). For every leaf named
    ``"w"``, with ``u`` its update and ``lam = decay``::

        w_next = w + u - lam * w        (the returned updates: u - lam * w)
        B_next = B + u - lam * B        (the returned feedback)

    Akrout et al. (2019), eqs. 16-17 (Kolen & Pollack 1994): both matrices receive the same
    change, so ``w_next - B_next = (1 - lam) (w - B)``: the difference shrinks geometrically,
    whatever the optimizer (``u`` is its output: SGD's ``-lr g``, Adam's, a schedule's). The
    forward weight's decay is this rule-owned transform of the updates, applied per step and not
    scaled by the learning rate; biases and other leaves are untouched. A weight decay the
    optimizer applies itself (``make_optimizer(weight_decay=...)``) is inside ``u``, so it
    reaches ``B`` too and leaves ``w - B`` as it is.

    The feedback may be held either way: as ``B`` itself (``init_rule_state``'s draw), whose
    leaves are updated as above, or as a ``KolenPollackState`` (what ``bpjax.train.init_state``
    keeps), ``B = w + scale * offset``, whose ``scale`` is multiplied by ``1 - lam``: the same
    ``B_next`` (up to rounding), without a second weight-sized update per step.

    Args:
      feedback: the rule state: ``init_rule_state("kolen_pollack", ...)``, or a
        ``KolenPollackState`` (``kolen_pollack_state``).
      params: the params before the step.
      updates: the optimizer's updates (the params' structure).
      decay: ``lam`` in ``[0, 1)``, per step (a traced value is not checked). The default,
        1e-4, shrinks ``w - B`` by a factor ``e`` every 10,000 steps; larger aligns faster and
        decays ``w`` harder.

    Returns:
      ``(updates, feedback)``: the updates to apply to the params and the next feedback.

    Raises:
      ValueError: ``decay`` outside ``[0, 1)``; feedback that does not match the params.

    References:
      Kolen & Pollack, "Backpropagation without weight transport", IEEE ICNN 1994.
      Akrout et al., "Deep Learning without Weight Transport", NeurIPS 2019, eqs. 16-17.
    """
    _check_decay(decay)
    feedback_params("kolen_pollack", params, feedback)  # checks the feedback's layout
    held = isinstance(feedback, KolenPollackState)
    layout = feedback.offset if held else feedback

    def weight_update(p, u, fb):
        return u if isinstance(fb, tuple) else (u - decay * p).astype(u.dtype)

    new_updates = jax.tree_util.tree_map(weight_update, params, updates, layout)
    if held:  # B - w only decays: B_next = w_next + scale * (1 - lam) * offset
        scale = _held_scale(feedback)
        return new_updates, KolenPollackState(
            feedback.offset, (scale * (1 - decay)).astype(scale.dtype)
        )

    def feedback_update(p, u, fb):
        return fb if isinstance(fb, tuple) else (fb + u - decay * fb).astype(fb.dtype)

    return new_updates, jax.tree_util.tree_map(feedback_update, params, updates, feedback)


def update_rule_state(
    mode: str, rule_state: Any, params: Any, updates: Any, *, decay: float = KP_DECAY
) -> tuple[Any, Any]:
    """``(updates, rule_state)`` after the optimizer: ``kolen_pollack_update`` for
    ``kolen_pollack``, both unchanged for every other mode (their feedback is fixed, or, for
    sign symmetry, read from the weights)."""
    check_mode(mode, "update_rule_state")
    if mode != "kolen_pollack" and isinstance(rule_state, KolenPollackState):
        raise ValueError(
            f"update_rule_state: {mode} was given a KolenPollackState, Kolen-Pollack's held "
            f"feedback; pass {mode}'s own rule state (bpjax.credit.init_rule_state)"
        )
    if mode != "kolen_pollack":
        return updates, rule_state
    return kolen_pollack_update(rule_state, params, updates, decay=decay)
