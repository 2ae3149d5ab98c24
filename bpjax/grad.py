"""Gradients from one place, by hand or by autodiff, and the checks that compare them.

* ``value_and_grad(net, loss, mode=...)`` is the only source of gradients for training:
  ``mode="manual"`` runs the forward pass with caches, the loss backward and the layerwise
  backward pass; ``mode="autodiff"`` is ``jax.value_and_grad`` of the same forward; a learning
  rule of ``bpjax.credit`` (``"feedback_alignment"``, ``"direct_feedback_alignment"``,
  ``"sign_symmetry"``, ``"kolen_pollack"``) returns its update direction in place of the
  gradient, from the network's own backward transformed by the rule (its state passed as
  ``feedback=``). All return ``f(params, x, target, *, key=None, state=None, feedback=None) ->
  (value, grads)`` and are jit- and vmap-able; ``MODES`` lists them.
* ``check_grads`` is the witness: per layer and per leaf it compares each layer's hand-written
  backward with ``jax.vjp`` of that layer's forward (same upstream gradient, so a wrong layer is
  *named*), the whole manual gradient with autodiff, and both with a central finite difference.
* ``grad_agreement`` is the cheap, jittable per-layer signal logged during training.
* ``as_custom_vjp`` registers the manual backward with ``jax.custom_vjp`` so ``jax.grad`` through
  the network runs the hand-written pass and composes with every JAX transformation.

The relative error of two arrays is ``||a - b|| / max(||a||, ||b||, tiny)`` and their cosine is
``<a, b> / (||a|| ||b||)`` (1 when both are zero). ``check_grads``' rows, result and
finite-difference witness live in ``bpjax._gradcheck`` and are re-exported here.
"""

import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from bpjax import credit
from bpjax import losses as losses_lib
from bpjax._gradcheck import (
    GradCheckResult,
    GradCheckRow,
    GradCheckWarning,
    compare,
    compare_inputs,
    compare_trees,
    default_tolerances,
    finite_difference_row,
    raised_row,
    shapes_match,
    tree_norm,
)
from bpjax.layers import Layer, apply, check_layer, is_stateful, split_keys
from bpjax.losses import Loss

__all__ = [
    "MODES",
    "GradCheckResult",
    "GradCheckRow",
    "GradCheckWarning",
    "as_custom_vjp",
    "check_grads",
    "cosine_similarity",
    "default_tolerances",
    "grad_agreement",
    "relative_error",
    "value_and_grad",
]

MODES = ("manual", "autodiff", *credit.RULES)
_TINY = 1e-30


def _resolve_loss(loss: Loss | str, where: str = "loss") -> Loss:
    """The Loss ``loss`` names or is; a factory passed uncalled gets the call that fixes it."""
    return losses_lib.resolve(loss, where)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown gradient mode {mode!r}; valid modes: {', '.join(MODES)}")


def _state_for(net: Layer, state: Any, where: str) -> Any:
    """The state to thread through ``net``: ``()`` for a network without state."""
    if not is_stateful(net):
        return ()
    if state is None:
        raise TypeError(
            f"{where}: {net.name} has state (batch_norm's running statistics): pass "
            f"state=net.init_state(in_shape) (or the state the previous call returned)"
        )
    return state


def value_and_grad(
    net: Layer,
    loss: Loss | str,
    *,
    mode: str = "manual",
    with_output: bool = False,
    with_state: bool = False,
) -> Callable:
    """Returns ``f(params, x, target, *, key=None, state=None, feedback=None) -> (value, grads)``.

    Args:
      net: the network Layer.
      loss: a ``bpjax.losses.Loss`` or its name.
      mode: ``"manual"`` (forward with caches, then the hand-written layerwise backward),
        ``"autodiff"`` (``jax.value_and_grad`` of the forward pass), or a learning rule of
        ``bpjax.credit`` (below): ``"feedback_alignment"``, ``"direct_feedback_alignment"``,
        ``"sign_symmetry"``, ``"kolen_pollack"``.
      with_output: if True, ``f`` returns ``((value, y), grads)`` with the network output ``y``
        (e.g. for training accuracy without a second forward pass).
      with_state: if True, ``f`` also returns the network's new state: ``((value, new_state),
        grads)``, or ``((value, (y, new_state)), grads)`` with ``with_output``.

    A network with state (``bpjax.layers.is_stateful``: batch norm) needs ``state=``; its
    running statistics are updated in training mode (a ``key``) and used in evaluation mode
    (``key=None``); they get no gradient. The function is pure: jit it, or vmap it over
    ``(None, 0, 0)`` for per-example gradients (each example is then a batch of one, so the
    per-example gradients average to the batch gradient of a mean loss). ``key`` enables
    dropout and batch statistics (training mode); None is evaluation mode.

    **Learning rules** (``bpjax.credit``). ``grads`` is then the rule's update direction, not
    the gradient; ``value``, ``y`` and the new state are the forward pass's, as for backprop.
    ``feedback=`` is the rule state from ``bpjax.credit.init_rule_state`` (required by
    ``feedback_alignment``, ``direct_feedback_alignment`` and ``kolen_pollack``; backprop and
    ``sign_symmetry`` take none, or ``()``).

    * ``feedback_alignment`` (Lillicrap et al. 2016), ``kolen_pollack`` (Akrout et al. 2019),
      ``sign_symmetry`` (Liao, Leibo & Poggio 2016): the network's own backward, once, with
      every parameter named ``"w"`` replaced by its feedback (``B``; ``B``; ``sign(w)``) and
      every other parameter real. Each layer's weight gradient is its own (``x.T @ dy``: it does
      not read ``w``); the ``dx`` it sends back is ``dy @ B.T`` (a conv's: the transposed
      convolution with ``B``). Works through every combinator (residual, parallel) and state.
      Sign symmetry's ``dx`` is larger than backprop's by about ``1 / mean|w|`` per layer.
    * ``direct_feedback_alignment`` (Nøkland 2016), for a ``serial`` network (nested serials
      flattened). A layer is *parametric* if it has parameters; the last one is the output
      layer, the others are *hidden*. Each parametric layer's *segment* is it and the
      parameter-free layers after it, up to the next parametric layer (the output layer's: up to
      the network's output). The output error ``e`` is the gradient at the output layer's own
      output: ``dL/dy`` sent back through the output segment's parameter-free layers (an output
      softmax, say), which is Nøkland's ``e = dL/da_out``; with logits into
      ``softmax_cross_entropy`` it is ``dL/dy = (softmax(y) - onehot) / batch``. The output
      layer trains on ``e`` (its true gradient). Each hidden layer ``i`` gets ``e @ B_i``
      (``B_i``: ``[n_outputs, units]``) reshaped to its segment's output and sent back through
      the segment's parameter-free layers: activation derivatives (``f'(a_i)``), the dropout
      mask of the same forward pass, pooling (to the pooled positions), flatten (a reshape);
      that is the layer's ``dy``, and its weight gradient is its own backward's. Nothing is
      chained through another parametric layer, so layers before the first parametric one get
      nothing (they need nothing). Refused, with the layer named: residual/parallel blocks and
      other branches, parametric layers without ``"w"`` (batch norm and layer norm have
      scales: put no normalization between hidden layers), and an output layer whose output is
      not ``[batch, n_outputs]``.

    What a rule can't apply to raises here when the network's structure shows it (DFA and a
    branch); when it takes the params' or the input's shapes to know (a layer without ``"w"``,
    the output's shape, feedback that doesn't match), it raises when ``f`` is traced, before
    anything is compiled, and already at ``bpjax.credit.init_rule_state``.

    Raises:
      ValueError: an unknown mode (listing the valid ones); a rule that can't apply to ``net``.
      TypeError: ``loss`` is not a Loss or a loss name (a factory gets the call that fixes it);
        at call time, a network with state called without ``state=``; ``feedback=`` missing
        for a rule that needs it, or given to a mode that takes none.

    References:
      Lillicrap, Cownden, Tweed & Akerman, Nat. Commun. 7:13276, 2016. Nøkland, NeurIPS 2016.
      Liao, Leibo & Poggio, "How Important Is Weight Symmetry in Backpropagation?", AAAI 2016.
      Akrout, Wilson, Humphreys, Lillicrap & Tweed, NeurIPS 2019.
    """
    _check_mode(mode)
    loss = _resolve_loss(loss, "value_and_grad: loss")
    net = check_layer(net, "value_and_grad: net")

    def pack(value, y, new_state, grads):
        if with_output and with_state:
            return (value, (y, new_state)), grads
        if with_output:
            return (value, y), grads
        if with_state:
            return (value, new_state), grads
        return value, grads

    def no_feedback(feedback):
        if not (feedback is None or (isinstance(feedback, tuple) and not feedback)):
            raise TypeError(f"mode {mode!r} takes no feedback= (only the learning rules do)")

    if mode in credit.RULES:
        rule = credit.rule_value_and_grad(net, loss, mode)

        def f(params, x, target, *, key=None, state=None, feedback=None):
            state = _state_for(net, state, "value_and_grad")
            value, y, new_state, grads = rule(params, x, target, key, state, feedback)
            return pack(value, y, new_state, grads)

    elif mode == "manual":

        def f(params, x, target, *, key=None, state=None, feedback=None):
            no_feedback(feedback)
            state = _state_for(net, state, "value_and_grad")
            y, cache, new_state = apply(net, params, x, key=key, state=state)
            value, loss_cache = loss.forward(y, target)
            grads, _ = net.backward(params, cache, loss.backward(loss_cache))
            return pack(value, y, new_state, grads)

    else:

        def f(params, x, target, *, key=None, state=None, feedback=None):
            no_feedback(feedback)
            state = _state_for(net, state, "value_and_grad")

            def objective(p):
                y, _, new_state = apply(net, p, x, key=key, state=state)
                return loss.forward(y, target)[0], (y, new_state)

            (value, (y, new_state)), grads = jax.value_and_grad(objective, has_aux=True)(params)
            return pack(value, y, new_state, grads)

    return f


def as_custom_vjp(net: Layer) -> Callable:
    """Returns ``apply(params, x, *, key=None) -> y`` whose VJP is the hand-written backward.

    ``jax.grad``/``jax.vjp``/``jax.jacrev`` through ``apply`` run ``net.backward`` instead of
    differentiating ``net.forward``, so the manual pass composes with JAX transformations (jit,
    vmap, grad of a user-defined loss, ...). The key, if given, gets no cotangent.

    A network with state (batch norm) gives ``apply(params, x, *, key=None, state) ->
    (y, new_state)``; the state gets a zero cotangent and the new state none.
    """
    net = check_layer(net, "as_custom_vjp: net")

    @jax.custom_vjp
    def run(params, x, state, key):
        y, _, new_state = apply(net, params, x, key=key, state=state)
        return y, new_state

    def run_fwd(params, x, state, key):
        y, cache, new_state = apply(net, params, x, key=key, state=state)
        return (y, new_state), (params, cache)

    def run_bwd(residuals, cotangents):
        params, cache = residuals
        dy, _ = cotangents  # the new state gets no gradient
        grads, dx = net.backward(params, cache, dy)
        return grads, dx, None, None  # None: no cotangent for the state or the key

    run.defvjp(run_fwd, run_bwd)

    if is_stateful(net):

        def f_with_state(params, x, *, key=None, state=None):
            return run(params, x, _state_for(net, state, "as_custom_vjp"), key)

        return f_with_state

    def f(params, x, *, key=None):
        return run(params, x, (), key)[0]

    return f


# --------------------------------------------------------------------------------------------
# agreement metrics (jittable)


def _upcast(x: jax.Array) -> jax.Array:
    """Computes metrics in at least float32, so bfloat16 gradients don't overflow a norm."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _sum_over_leaves(fn: Callable, *trees: Any) -> jax.Array:
    leaves = [jax.tree_util.tree_leaves(t) for t in trees]
    return sum((jnp.sum(fn(*map(_upcast, xs))) for xs in zip(*leaves)), jnp.float32(0))


def relative_error(a: Any, b: Any) -> jax.Array:
    """``||a - b|| / max(||a||, ||b||, tiny)`` over all leaves of two pytrees."""
    diff = jnp.sqrt(_sum_over_leaves(lambda x, y: jnp.square(x - y), a, b))
    norm_a = jnp.sqrt(_sum_over_leaves(jnp.square, a))
    norm_b = jnp.sqrt(_sum_over_leaves(jnp.square, b))
    return diff / jnp.maximum(jnp.maximum(norm_a, norm_b), _TINY)


def cosine_similarity(a: Any, b: Any) -> jax.Array:
    """``<a, b> / (||a|| ||b||)`` over all leaves of two pytrees; 1 when both are zero."""
    dot = _sum_over_leaves(lambda x, y: x * y, a, b)
    norm_a = jnp.sqrt(_sum_over_leaves(jnp.square, a))
    norm_b = jnp.sqrt(_sum_over_leaves(jnp.square, b))
    both_zero = (norm_a == 0) & (norm_b == 0)
    return jnp.where(both_zero, 1.0, dot / jnp.maximum(norm_a * norm_b, _TINY))


def grad_agreement(manual: Any, autodiff: Any) -> dict[str, jax.Array]:
    """Per-layer relative error and cosine of two gradient trees (jittable training signal).

    Args:
      manual, autodiff: gradient trees of the same structure; if they are tuples (the params of
        ``serial``), one entry per layer, else the whole tree counts as one layer. Layers without
        parameters are skipped.

    Returns:
      ``{"layer{i}/rel_err": ..., "layer{i}/cosine": ..., "total/rel_err": ...,
      "total/cosine": ...}`` as scalar arrays.
    """
    per_layer = manual if isinstance(manual, tuple) else (manual,)
    per_layer_auto = autodiff if isinstance(autodiff, tuple) else (autodiff,)
    out = {}
    for i, (m, a) in enumerate(zip(per_layer, per_layer_auto)):
        if not jax.tree_util.tree_leaves(m):
            continue
        out[f"layer{i}/rel_err"] = relative_error(m, a)
        out[f"layer{i}/cosine"] = cosine_similarity(m, a)
    out["total/rel_err"] = relative_error(manual, autodiff)
    out["total/cosine"] = cosine_similarity(manual, autodiff)
    return out


# --------------------------------------------------------------------------------------------
# check_grads


def check_grads(
    net: Layer,
    loss: Loss | str,
    params: Any,
    x: Any,
    target: jax.Array,
    *,
    key: jax.Array | None = None,
    state: Any = None,
    rtol: float | None = None,
    fd_rtol: float | None = None,
    eps: float | None = None,
    seed: int = 0,
    warn: bool = True,
) -> GradCheckResult:
    """Checks the hand-written backward pass per layer and per leaf.

    Three witnesses, each reported with max abs error, relative error and cosine:

    1. per layer, in backward order: the layer's ``backward`` vs ``jax.vjp`` of the layer's
       ``forward`` at the same input and the same upstream gradient ``dy`` (the manual one), for
       every parameter leaf and for ``dx`` — so a wrong layer is named, not only a wrong total;
       the loss's own backward is checked first, against ``jax.grad``;
    2. the whole manual gradient vs ``jax.value_and_grad`` of the network and loss;
    3. a central finite difference ``(L(p + eps v) - L(p - eps v)) / 2 eps`` along a random unit
       direction ``v`` vs ``<g, v>`` for the manual gradient. Where the loss is not smooth
       within the step (a ReLU at 0, a max over ties: any kink) a difference quotient is no
       derivative; that is detected (``bpjax._gradcheck.finite_difference_row``: Simpson's
       rule on ``jax.jvp``'s slopes vs the difference) and the row is ``"inconclusive"``,
       never a failure of a correct backward; a wrong gradient where the loss is smooth fails.

    Inputs of any dtype the network accepts are checked (uint8, int32 or bool images; float16,
    bfloat16, float32, float64; a tuple of them for a branching network): an input leaf that is
    not floating point has no gradient, so its ``dx`` row is ``"skipped"`` (with a note), and a
    low-precision input's ``dx`` is compared at that dtype's tolerance. Only the params are
    perturbed and differentiated, so every other witness is unaffected.

    Matmul precision is pinned to ``"highest"`` while checking (GPUs default to TF32 and TPUs to
    bfloat16 for float32 matmuls). Tolerances and step follow the params' dtype
    (``default_tolerances``); checking below float64 warns (``GradCheckWarning``).

    Args:
      net: the network; if it is a ``serial`` combinator, each sublayer is checked on its own.
      loss: a ``bpjax.losses.Loss`` or its name.
      params: the network's params (floating point).
      x: the input ``[batch, ...]`` (or a tuple of inputs for a branching network), any dtype
        the network accepts.
      target: what the loss compares the output with.
      key: dropout key (training mode); the same draws are used by every witness.
      state: the network's state, for a network with state (batch norm's running statistics:
        used in evaluation mode, ``key=None``); never perturbed or compared.
      rtol, fd_rtol, eps: override the dtype's defaults.
      seed: seed of the finite-difference direction.
      warn: warn when checking in a precision below float64.

    Returns:
      A ``GradCheckResult``: ``print`` it for a table (statuses ok / FAIL / INCONCLUSIVE /
      skipped, with a note on each that is not ok); ``.passed`` (no conclusive row failed),
      ``.first_failure``, ``.inconclusive``, ``.skipped``.

    Raises:
      TypeError: ``net`` is not a Layer or ``loss`` not a Loss or loss name (a factory gets the
        call that fixes it); a network with state checked without ``state=``.
      ValueError: no parameters, params for the wrong number of layers, or an input the
        network rejects (naming the layer).
    """
    net = check_layer(net, "check_grads: net")
    loss = _resolve_loss(loss, "check_grads: loss")
    leaves = jax.tree_util.tree_leaves(params)
    if not leaves:
        raise ValueError("check_grads: the network has no parameters to check")
    dtype = jnp.result_type(*leaves)
    tols = default_tolerances(dtype)
    rtol = tols["rtol"] if rtol is None else rtol
    fd_rtol = tols["fd_rtol"] if fd_rtol is None else fd_rtol
    eps = tols["eps"] if eps is None else eps
    if warn and jnp.dtype(dtype) != jnp.float64:
        warnings.warn(
            f"check_grads in {jnp.dtype(dtype).name}: agreement is only checked to rtol={rtol:g}; "
            "enable jax_enable_x64 and cast params and inputs to float64 for a tight check",
            GradCheckWarning,
            stacklevel=2,
        )
    state = _state_for(net, state, "check_grads")
    in_sequence = net.combinator == "serial"
    layers = net.sublayers if in_sequence else (net,)
    layer_params = params if in_sequence else (params,)
    layer_keys = split_keys(key, len(layers)) if in_sequence else [key]
    if len(layer_params) != len(layers):  # zip below would silently drop the layers after
        raise ValueError(
            f"check_grads: got params for {len(layer_params)} layers, {net.name} has {len(layers)}"
        )
    if not in_sequence:
        layer_states = (state,)
    else:
        layer_states = state if is_stateful(net) else ((),) * len(layers)

    # Every witness runs jitted, one program per layer and per witness: eagerly, jax compiles
    # each operation for each new shape, several times slower for a CNN.
    @jax.jit
    def loss_at(p, x_, target_, key_, state_):
        return loss.forward(apply(net, p, x_, key=key_, state=state_)[0], target_)[0]

    def objective(p):
        return loss_at(p, x, target, key, state)

    with jax.default_matmul_precision("highest"):
        rows: list[GradCheckRow] = []
        # 1. loss, then each layer in backward order, fed the manual upstream gradient.
        inputs = [x]
        for i, (layer, p, k, st) in enumerate(zip(layers, layer_params, layer_keys, layer_states)):
            try:
                y = jax.jit(partial(_output, layer))(p, inputs[-1], k, st)
            except ValueError as e:
                if not in_sequence:
                    raise
                # Name the layer, as serial's own forward does.
                raise ValueError(f"layer {i} of {len(layers)}: {e}") from None
            inputs.append(y)
        value, dy, dy_ref = _loss_witnesses(loss, inputs[-1], target)
        rows.append(compare("loss", None, "loss", "dpred", dy, dy_ref, rtol))
        for i in reversed(range(len(layers))):
            layer, p, k, st = layers[i], layer_params[i], layer_keys[i], layer_states[i]
            try:
                grads, dx, grads_ref, dx_ref = _layer_witnesses(layer, p, inputs[i], dy, k, st)
            except (ValueError, TypeError) as e:  # a backward that raises is a failed check
                rows.append(raised_row("layer", i, layer.name, e, rtol))
                dy = _layer_vjp(layer, p, inputs[i], dy, k, st)[1]
                continue
            scale = tree_norm((grads, dx), (grads_ref, dx_ref))  # this layer's whole gradient
            rows += compare_trees("layer", i, layer.name, grads, grads_ref, rtol, scale)
            rows += compare_inputs(i, layer.name, inputs[i], dx, dx_ref, rtol, scale)
            # A dx of the wrong shape can't feed the layer below: it gets jax.vjp's instead.
            dy = dx if shapes_match(dx, dx_ref) else dx_ref
        # 2. the whole manual gradient vs autodiff.
        manual = jax.jit(value_and_grad(net, loss, mode="manual"))
        try:
            _, grads_manual = manual(params, x, target, key=key, state=state)
        except (ValueError, TypeError) as e:  # e.g. a layer's dx of the wrong shape, above
            rows.append(raised_row("total", None, net.name, e, rtol))
            return GradCheckResult(
                tuple(rows), jnp.dtype(dtype).name, rtol, fd_rtol, eps, float(value)
            )
        _, grads_auto = jax.jit(jax.value_and_grad(loss_at))(params, x, target, key, state)
        scale = tree_norm(grads_manual, grads_auto)  # the network's whole gradient
        for i, layer in enumerate(layers):
            g_m = grads_manual[i] if in_sequence else grads_manual
            g_a = grads_auto[i] if in_sequence else grads_auto
            rows += compare_trees("total", i, layer.name, g_m, g_a, rtol, scale)
        # 3. central finite difference along a random unit direction.
        rows.append(
            finite_difference_row(
                objective, params, grads_manual, eps=eps, fd_rtol=fd_rtol, seed=seed
            )
        )
    return GradCheckResult(tuple(rows), jnp.dtype(dtype).name, rtol, fd_rtol, eps, float(value))


def _output(layer: Layer, p: Any, x: Any, key: Any, state: Any) -> Any:
    return apply(layer, p, x, key=key, state=state)[0]


def _loss_witnesses(loss: Loss, pred: jax.Array, target: jax.Array):
    """The loss's value, its manual ``dpred`` and ``jax.grad``'s (jitted)."""

    def witnesses(pred, target):
        value, cache = loss.forward(pred, target)
        dy_ref = jax.grad(lambda pred_: loss.forward(pred_, target)[0])(pred)
        return value, loss.backward(cache), dy_ref

    return jax.jit(witnesses)(pred, target)


def _vjp(layer: Layer, p: Any, x: Any, dy: Any, key: Any, state: Any):
    """``jax.vjp``'s ``(grads, dx)`` of the layer's forward at ``x`` for upstream ``dy``."""
    _, vjp = jax.vjp(lambda p_, x_: _output(layer, p_, x_, key, state), p, x)
    return vjp(dy)


def _layer_vjp(layer: Layer, p: Any, x: Any, dy: Any, key: Any, state: Any):
    """``_vjp`` alone (jitted): where the layer's own backward raised."""
    return jax.jit(partial(_vjp, layer))(p, x, dy, key, state)


def _layer_witnesses(layer: Layer, p: Any, x: Any, dy: Any, key: Any, state: Any):
    """A layer's manual ``(grads, dx)`` and ``jax.vjp``'s at input ``x`` and upstream ``dy``
    (jitted). An integer or bool input gets a ``float0`` cotangent from jax.vjp:
    compare_inputs skips it."""

    def witnesses(p, x, dy, key, state):
        _, cache, _ = apply(layer, p, x, key=key, state=state)
        grads, dx = layer.backward(p, cache, dy)
        return (grads, dx, *_vjp(layer, p, x, dy, key, state))

    return jax.jit(witnesses)(p, x, dy, key, state)
