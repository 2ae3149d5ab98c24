"""``bpjax.grad``'s gradient modes: ``MODES``, ``value_and_grad`` (the hand-written backward,
autodiff, or a learning rule of ``bpjax.credit``) and ``as_custom_vjp`` (re-exported by
``bpjax.grad``, whose docstring states the convention). The public functions' ``__module__`` is
``bpjax.grad``, where users import them from."""

from collections.abc import Callable
from typing import Any

import jax

from bpjax import credit
from bpjax import losses as losses_lib
from bpjax.layers import Layer, apply, check_layer, is_stateful
from bpjax.losses import Loss

MODES = ("manual", "autodiff", *credit.RULES)


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


for _public in (value_and_grad, as_custom_vjp):
    _public.__module__ = "bpjax.grad"  # re-exported there, their public home
del _public
