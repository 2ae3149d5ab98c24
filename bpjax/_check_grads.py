"""``bpjax.grad.check_grads``: the hand-written backward checked per layer and per leaf against
``jax.vjp``, in total against autodiff, and against a finite difference (re-exported by
``bpjax.grad``; its rows, result and finite-difference witness are in ``bpjax._gradcheck``).
``check_grads.__module__`` is ``bpjax.grad``, where users import it from."""

import warnings
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from bpjax._grad_modes import _resolve_loss, _state_for, value_and_grad
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


check_grads.__module__ = "bpjax.grad"  # re-exported there, its public home
