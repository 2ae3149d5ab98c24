"""The training engine, pure: state, update step, whole epochs as one ``lax.scan``, evaluation.

Convention:

* ``TrainState(params, opt_state, step, key)`` is a pytree. ``key`` is the run's *training* key
  and never changes: every draw derives from it by ``fold_in`` with a stream id and a counter
  (shuffling: ``(SHUFFLE, epoch)``; dropout: ``(DROPOUT, step)``), so no key is ever reused and a
  resumed run redraws exactly what an uninterrupted run would have drawn.
* Gradients come from ``bpjax.grad.value_and_grad(mode=grad_mode)``; the step never knows which.
* An epoch shuffles the training set on device and scans over ``n // batch_size`` minibatches.
  The ``n % batch_size`` examples left over by that epoch's permutation are not used *in that
  epoch* (they differ from epoch to epoch), so every step has the same shape and the scan
  compiles once. Evaluation pads the last batch and masks it: every example counts, once.
* Optimizers are optax ``GradientTransformation``s, used as they are.
"""

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from bpjax.grad import MODES, grad_agreement, value_and_grad
from bpjax.layers import Layer, _Static, apply, is_stateful, out_shape
from bpjax.layers import init_state as init_net_state
from bpjax.losses import Loss

__all__ = [
    "DROPOUT",
    "SHUFFLE",
    "TrainState",
    "encode_targets",
    "init_state",
    "layer_stats",
    "make_epoch",
    "make_eval",
    "make_optimizer",
    "make_step",
    "output_shape",
    "updates_applied",
    "weights_mask",
    "pad_batches",
    "single_output_binary",
    "target_mismatch",
]

# fold_in stream ids: each kind of randomness has its own stream.
INIT, SHUFFLE, DROPOUT = 0, 1, 2


class TrainState(NamedTuple):
    """Everything that changes during training, as one pytree.

    ``net_state`` is the network's state that is not a parameter (batch norm's running
    statistics; ``()`` for a network without): updated by the training-mode forward pass, never
    by the optimizer. ``rule_state`` is the learning rule's (``bpjax.credit``: feedback
    weights; ``()`` for backprop). Both are checkpointed with the params.
    """

    params: Any
    opt_state: optax.OptState
    step: jax.Array  # int32 scalar: minibatch steps taken (one forward/backward each)
    key: jax.Array  # the run's training key (constant; draws fold in counters)
    net_state: Any = ()
    rule_state: Any = ()


def init_state(
    net: Layer, optimizer: optax.GradientTransformation, key: jax.Array, in_shape: tuple
) -> TrainState:
    """Initialises params (from ``fold_in(key, INIT)``) and the optimizer state.

    Args:
      net: the network.
      optimizer: an optax GradientTransformation.
      key: the run's root key, e.g. ``jax.random.PRNGKey(seed)``.
      in_shape: a batch input shape, e.g. ``(batch, 784)``.
    """
    in_shape = tuple(in_shape)
    _, params = net.init(jax.random.fold_in(key, INIT), in_shape)
    step = jnp.zeros((), jnp.int32)
    return TrainState(params, optimizer.init(params), step, key, init_net_state(net, in_shape))


def output_shape(net: Layer, in_shape: tuple) -> tuple[int, ...]:
    """The output shape of ``net`` for inputs of ``in_shape``, without allocating params."""
    return tuple(out_shape(net, tuple(in_shape)))


WEIGHT_DECAY_MODES = ("decoupled", "l2")
WEIGHT_DECAY_MASKS = ("weights", "all")


def weights_mask(params: Any) -> Any:
    """True for the leaves named ``"w"`` (dense weights, conv kernels), False elsewhere.

    The default weight-decay mask: biases, normalization scales and offsets are not decayed
    (decaying them pulls a layer's outputs towards zero, not its weights towards small norms).
    """

    def is_weight(path, _):
        last = path[-1] if path else None
        return getattr(last, "key", None) == "w"

    return jax.tree_util.tree_map_with_path(is_weight, params)


def _decay_mask(mask: str | Any) -> Any:
    if isinstance(mask, str):
        if mask not in WEIGHT_DECAY_MASKS:
            raise ValueError(
                f"unknown weight_decay_mask {mask!r}; valid: {', '.join(WEIGHT_DECAY_MASKS)}, "
                f"or a pytree/callable as optax.masked takes"
            )
        return weights_mask if mask == "weights" else None
    return mask


def make_optimizer(
    factory: Callable[..., optax.GradientTransformation],
    *,
    learning_rate: float | optax.Schedule,
    clip_global_norm: float | None = None,
    weight_decay: float = 0.0,
    weight_decay_mode: str = "decoupled",
    weight_decay_mask: str | Any = "weights",
    **kwargs: Any,
) -> optax.GradientTransformation:
    """An optax optimizer with optional global-norm clipping and weight decay.

    Weight decay comes in the two forms in use, named for what they are (Loshchilov & Hutter
    2019 show they differ for every optimizer but plain SGD):

    * ``"decoupled"`` (AdamW/SGDW-style): after the optimizer's own update ``u``, each decayed
      weight moves by ``-lr_t * weight_decay * w``, ``lr_t`` the (scheduled) learning rate:
      ``optax.chain(factory(lr), add_decayed_weights(-lr_t * weight_decay))``. With
      ``optax.adam`` this is ``optax.adamw``.
    * ``"l2"`` (coupled, the textbook L2 penalty ``weight_decay / 2 * ||w||^2``):
      ``weight_decay * w`` is added to the gradient BEFORE the optimizer, so adaptive
      optimizers rescale it (``optax.chain(add_decayed_weights(weight_decay), factory(lr))``).

    ``weight_decay_mask`` chooses the decayed leaves: ``"weights"`` (default: leaves named
    ``"w"``, see ``weights_mask``; biases and normalization scales are left alone), ``"all"``,
    or a pytree/callable of booleans as ``optax.masked`` takes. A factory with its own decoupled
    decay and a ``mask`` argument (``optax.adamw``, whose ``weight_decay`` defaults to 1e-4)
    gets the same mask unless ``kwargs`` names one; its own decay is bound to the factory (e.g.
    ``functools.partial(optax.adamw, weight_decay=1e-2)``, as a config's ``_partial_: true``
    does), not given here. Clipping (``optax.clip_by_global_norm``) comes first, on the raw
    gradient.

    Raises:
      ValueError: a non-positive constant learning rate or clip norm, a negative weight decay,
        an unknown mode or mask, or weight decay given twice (here and to a factory that has
        its own).

    References:
      Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019.
    """
    if not callable(learning_rate) and not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate}")
    if clip_global_norm is not None and not clip_global_norm > 0:
        raise ValueError(f"clip_global_norm must be positive, got {clip_global_norm}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if weight_decay_mode not in WEIGHT_DECAY_MODES:
        raise ValueError(
            f"unknown weight_decay_mode {weight_decay_mode!r}; valid: "
            f"{', '.join(WEIGHT_DECAY_MODES)}"
        )
    mask = _decay_mask(weight_decay_mask)
    if weight_decay and _takes(factory, "weight_decay"):
        name = getattr(factory, "__name__", factory)
        raise ValueError(
            f"weight decay given twice: {name} has its own weight_decay (give it there, "
            f"{name}(weight_decay=...)), or use the optimizer without decay (optax.adam for "
            f"optax.adamw) with this weight_decay"
        )
    if _takes(factory, "weight_decay") and _takes(factory, "mask") and "mask" not in kwargs:
        kwargs["mask"] = mask
    parts = []
    if clip_global_norm is not None:
        parts.append(optax.clip_by_global_norm(clip_global_norm))
    if weight_decay and weight_decay_mode == "l2":
        parts.append(optax.add_decayed_weights(weight_decay, mask))
    parts.append(factory(learning_rate=learning_rate, **kwargs))
    if weight_decay and weight_decay_mode == "decoupled":
        if callable(learning_rate):
            rate = lambda count: -weight_decay * learning_rate(count)
        else:
            rate = -weight_decay * learning_rate
        parts.append(optax.add_decayed_weights(rate, mask))
    return parts[0] if len(parts) == 1 else optax.chain(*parts)


def _takes(factory: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(factory).parameters
    except (TypeError, ValueError):  # no signature to read
        return False


def updates_applied(state: TrainState) -> jax.Array:
    """Optimizer updates applied so far.

    ``state.step`` counts minibatch steps (one forward/backward each). They are the updates
    applied unless gradients are accumulated: with ``optax.MultiSteps(opt, every_k_schedule=k)``
    anywhere in the optimizer, k steps make one update, and its ``gradient_step`` is returned.
    """
    found = [
        node.gradient_step
        for node in jax.tree_util.tree_leaves(
            state.opt_state, is_leaf=lambda n: isinstance(n, optax.MultiStepsState)
        )
        if isinstance(node, optax.MultiStepsState)
    ]
    return found[0] if found else state.step


def _cast_floats(tree: Any, dtype: Any) -> Any:
    return jax.tree_util.tree_map(
        lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree
    )


def _compute_dtype(compute_dtype: Any) -> np.dtype | None:
    """``compute_dtype`` as a numpy dtype; None stays None (compute in the params' dtype).

    Raises:
      ValueError: not a dtype, or not a floating one (an integer compute dtype would round
        every weight).
    """
    if compute_dtype is None:
        return None
    try:
        dtype = jnp.dtype(compute_dtype)
    except TypeError as e:
        raise ValueError(
            f"compute_dtype {compute_dtype!r} is not a dtype; use bfloat16, float16 or float32"
        ) from e
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"compute_dtype must be a floating dtype (bfloat16, float16, float32, ...), "
            f"got {dtype.name}"
        )
    return dtype


def _mixed_precision_grad(net: Layer, loss: Loss, mode: str, compute_dtype: Any) -> Callable:
    """``f(params, x, y, *, key, state) -> ((loss, (output, new_state)), grads)`` of ``net`` in
    ``compute_dtype``.

    With a compute dtype, params, inputs and the network's state are cast for the forward and
    backward passes, the network output is cast back to float32 for the loss, and the
    gradients and the new state come back in the dtypes of the params and the state given
    (float32 master weights and statistics). Without one, it is ``value_and_grad`` itself.
    """
    if compute_dtype is None:
        return value_and_grad(net, loss, mode=mode, with_output=True, with_state=True)
    grad_fn = value_and_grad(
        _output_in(net, jnp.float32), loss, mode=mode, with_output=True, with_state=True
    )

    def f(params, x, y, *, key=None, state=()):
        low = _cast_floats(params, compute_dtype)
        low_state = _cast_floats(state, compute_dtype)
        (value, (output, new_state)), grads = grad_fn(
            low, x.astype(compute_dtype), y, key=key, state=low_state
        )
        grads = jax.tree_util.tree_map(lambda g, p: g.astype(p.dtype), grads, params)
        new_state = jax.tree_util.tree_map(lambda n, s: n.astype(s.dtype), new_state, state)
        return (value, (output, new_state)), grads

    return f


def _output_in(net: Layer, dtype: Any) -> Layer:
    """``net`` with its output cast to ``dtype`` (the loss runs in full precision)."""

    def run(params, x, key, state):
        y, cache, new_state = apply(net, params, x, key=key, state=state)
        return y.astype(dtype), (cache, _Static(y.dtype)), new_state

    def backward(params, cache, dy):
        net_cache, y_dtype = cache
        return net.backward(params, net_cache, dy.astype(y_dtype.value))

    if is_stateful(net):

        def forward_with_state(params, x, *, key=None, state):
            return run(params, x, key, state)

        return net._replace(forward=forward_with_state, backward=backward)

    def forward(params, x, *, key=None):
        return run(params, x, key, ())[:2]

    return net._replace(forward=forward, backward=backward)


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


def make_step(
    net: Layer,
    loss: Loss,
    optimizer: optax.GradientTransformation,
    *,
    grad_mode: str = "manual",
    compute_dtype: Any = None,
    batch_sharding: Any = None,
) -> Callable:
    """Returns the pure update ``step(state, x, y) -> (state, aux)``.

    Args:
      net, loss, optimizer: what to train, on what, with what.
      grad_mode: ``"manual"`` (hand-written backward) or ``"autodiff"`` (``jax.grad``).
      compute_dtype: e.g. ``jnp.bfloat16`` for mixed precision: params and inputs are cast for
        the forward and backward passes, the loss and the optimizer update stay in the params'
        dtype (float32 master weights).
      batch_sharding: a ``jax.sharding.Sharding`` for the batch (data parallelism): the batch is
        constrained to it and XLA inserts the gradient all-reduce.

    ``aux`` holds ``loss`` (the minibatch loss), ``output`` (the network output) and ``grads``
    and ``updates`` (for optional statistics; XLA drops what the caller does not use).
    """
    if grad_mode not in MODES:
        raise ValueError(f"unknown grad_mode {grad_mode!r}; valid modes: {', '.join(MODES)}")
    grad_fn = _mixed_precision_grad(net, loss, grad_mode, _compute_dtype(compute_dtype))

    def step(state: TrainState, x: jax.Array, y: jax.Array):
        if batch_sharding is not None:
            x = lax.with_sharding_constraint(x, batch_sharding)
            y = lax.with_sharding_constraint(y, batch_sharding)
        key = jax.random.fold_in(jax.random.fold_in(state.key, DROPOUT), state.step)
        (value, (output, net_state)), grads = grad_fn(
            state.params, x, y, key=key, state=state.net_state
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        new_state = state._replace(
            params=new_params, opt_state=opt_state, step=state.step + 1, net_state=net_state
        )
        return new_state, {"loss": value, "output": output, "grads": grads, "updates": updates}

    return step


def _nan_like(tree: dict[str, jax.Array]) -> dict[str, jax.Array]:
    return {k: jnp.full(v.shape, jnp.nan, jnp.float32) for k, v in tree.items()}


def make_epoch(
    net: Layer,
    loss: Loss,
    optimizer: optax.GradientTransformation,
    *,
    batch_size: int,
    grad_mode: str = "manual",
    compute_dtype: Any = None,
    batch_sharding: Any = None,
    grad_check_every: int = 0,
    with_layer_stats: bool = False,
    donate: bool = False,
) -> Callable:
    """Returns a jitted ``epoch(state, x, y, epoch) -> (state, metrics)``: one ``lax.scan``.

    The training set ``x [n, ...]``, ``y [n, ...]`` stays on device; each epoch draws a
    permutation from ``fold_in(fold_in(key, SHUFFLE), epoch)`` and scans the update step over
    ``n // batch_size`` minibatches gathered by index.

    Args:
      net, loss, optimizer, grad_mode, compute_dtype, batch_sharding: as ``make_step``.
      batch_size: examples per update.
      grad_check_every: if > 0, every that many steps (global step count) the step also
        computes the other mode's gradient and records ``grad_check/layer{i}/{rel_err,cosine}``
        (NaN at the other steps): the manual-vs-autodiff signal, at the cost of one extra
        backward on those steps only (``lax.cond``).
      with_layer_stats: record ``layer_stats/layer{i}/{grad_norm,weight_norm,update_ratio}``
        (see ``layer_stats``) at the last step of the epoch (NaN elsewhere).
      donate: donate the input state's buffers (saves a copy of params and optimizer state, but
        the caller must not use the old state afterwards).

    Returns:
      ``metrics`` maps names to per-step arrays ``[n // batch_size]``: ``loss`` always.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    step_fn = make_step(
        net,
        loss,
        optimizer,
        grad_mode=grad_mode,
        compute_dtype=compute_dtype,
        batch_sharding=batch_sharding,
    )
    other_mode = "autodiff" if grad_mode == "manual" else "manual"
    # The other mode in the same precision as the step, so that under a compute dtype the
    # signal is manual against autodiff, not bfloat16 against float32 rounding.
    other_grad = _mixed_precision_grad(net, loss, other_mode, _compute_dtype(compute_dtype))

    def epoch(state: TrainState, x: jax.Array, y: jax.Array, epoch_index: jax.Array):
        n = x.shape[0]
        steps = n // batch_size
        if steps < 1:
            raise ValueError(f"batch_size {batch_size} is larger than the training set ({n})")
        shuffle_key = jax.random.fold_in(jax.random.fold_in(state.key, SHUFFLE), epoch_index)
        order = jax.random.permutation(shuffle_key, n)[: steps * batch_size]
        order = order.reshape(steps, batch_size)

        def body(state, scan_in):
            i, idx = scan_in
            xb, yb = x[idx], y[idx]
            new_state, aux = step_fn(state, xb, yb)
            metrics = {"loss": aux["loss"].astype(jnp.float32)}
            if grad_check_every:
                key = jax.random.fold_in(jax.random.fold_in(state.key, DROPOUT), state.step)

                def agreement(_):
                    _, g_other = other_grad(state.params, xb, yb, key=key, state=state.net_state)
                    pair = (
                        (aux["grads"], g_other)
                        if grad_mode == "manual"
                        else (g_other, aux["grads"])
                    )
                    agreement = grad_agreement(*pair)
                    return {f"grad_check/{k}": v.astype(jnp.float32) for k, v in agreement.items()}

                shapes = jax.eval_shape(agreement, None)
                metrics.update(
                    lax.cond(
                        state.step % grad_check_every == 0,
                        agreement,
                        lambda _: _nan_like(shapes),
                        None,
                    )
                )
            if with_layer_stats:

                def stats(_):
                    values = layer_stats(new_state.params, aux["grads"], aux["updates"])
                    return {f"layer_stats/{k}": v for k, v in values.items()}

                shapes = jax.eval_shape(stats, None)
                metrics.update(lax.cond(i == steps - 1, stats, lambda _: _nan_like(shapes), None))
            return new_state, metrics

        return lax.scan(body, state, (jnp.arange(steps), order))

    return jax.jit(epoch, donate_argnums=0 if donate else ())


def encode_targets(y: np.ndarray, *, task: str, loss_name: str, n_outputs: int) -> np.ndarray:
    """Targets in the form ``loss_name`` expects for a network with ``n_outputs`` outputs.

    Classification labels stay integers for ``softmax_cross_entropy``; they become one-hot
    floats for the regression-style losses (``mse``, ``quadratic``, ``huber``: the classic
    textbook setting) and for ``binary_cross_entropy`` with several outputs, and ``[n, 1]``
    floats for a single-output binary classifier. Regression targets are returned as they are.
    """
    y = np.asarray(y)
    if task != "classification":
        return y
    if loss_name == "softmax_cross_entropy":
        return y.astype(np.int32)
    if n_outputs == 1:
        return y.astype(np.float32)[:, None]
    return np.eye(n_outputs, dtype=np.float32)[y]


def single_output_binary(n_outputs: int, n_classes: int | None, loss_name: str) -> bool:
    """Whether a network with ``n_outputs`` outputs is a one-output binary classifier.

    Two classes may be predicted by a single output (a logit for ``binary_cross_entropy``, a
    probability for ``mse``/``quadratic``): ``encode_targets`` then gives ``[n, 1]`` targets.
    ``softmax_cross_entropy`` needs one output per class.
    """
    return n_outputs == 1 and n_classes == 2 and loss_name != "softmax_cross_entropy"


def target_mismatch(loss_name: str, task: str, y: np.ndarray) -> str | None:
    """Why ``loss_name`` can't fit these training targets, or None if it can.

    ``softmax_cross_entropy`` needs class labels or several target columns (probabilities), so
    not a regression task's single target (a softmax over one output is constant: nothing would
    be learnt); ``binary_cross_entropy`` needs regression targets in [0, 1] (outside, its value
    goes negative). Any loss fits labels.
    """
    if task != "regression":
        return None
    y = np.asarray(y)
    if loss_name == "softmax_cross_entropy" and (y.ndim == 1 or y.shape[-1] == 1):
        return (
            "softmax_cross_entropy needs class labels or probability targets, but the targets "
            "are a single regression output; use mse, quadratic or huber"
        )
    if loss_name == "binary_cross_entropy" and y.size and (y.min() < 0 or y.max() > 1):
        return (
            f"binary_cross_entropy needs targets in [0, 1], but the regression targets range "
            f"over [{y.min():.4g}, {y.max():.4g}]; use mse, quadratic or huber"
        )
    return None


def pad_batches(
    x: np.ndarray, y: np.ndarray, batch_size: int, *, multiple_of: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pads to a whole number of batches: ``([nb, b, ...], [nb, b, ...], mask [nb, b])``.

    ``b`` is ``batch_size``, at most the number of examples, rounded up to a multiple of
    ``multiple_of`` (e.g. the device count, so that each batch shards evenly).
    """
    n = x.shape[0]
    batch_size = max(1, min(batch_size, n))
    batch_size = -(-batch_size // multiple_of) * multiple_of
    n_batches = -(-n // batch_size)
    pad = n_batches * batch_size - n
    mask = np.concatenate([np.ones(n, bool), np.zeros(pad, bool)])
    x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
    y = np.concatenate([y, np.zeros((pad, *y.shape[1:]), y.dtype)])
    shape = (n_batches, batch_size)
    return x.reshape(shape + x.shape[1:]), y.reshape(shape + y.shape[1:]), mask.reshape(shape)


def make_eval(net: Layer, loss: Loss, *, task: str, loss_name: str) -> Callable:
    """Returns a jitted ``evaluate(params, xb, yb, mask, net_state=()) -> metrics`` over padded
    batches (``net_state``: the network's state, for a network with state).

    Metrics: ``loss`` (mean per-example loss), and ``accuracy`` (classification) or ``rmse`` and
    ``r2`` (regression, R^2 averaged over outputs as scikit-learn's ``r2_score``). Padded
    examples (``mask`` False) are excluded. Inputs come from ``pad_batches``; evaluation mode
    (no dropout).
    """

    def example_loss(pred, target):
        return loss.forward(pred[None], target[None])[0]

    def batch_sums(params, net_state, x, y, mask, center):
        pred = apply(net, params, x, state=net_state)[0]
        pred = pred.astype(jnp.float32)
        w = mask.astype(jnp.float32)
        sums = {"n": jnp.sum(w), "loss": jnp.sum(w * jax.vmap(example_loss)(pred, y))}
        if task == "classification":
            if pred.shape[-1] == 1:
                threshold = 0.0 if loss_name == "binary_cross_entropy" else 0.5
                label = (pred[:, 0] > threshold).astype(jnp.int32)
                truth = y[:, 0].astype(jnp.int32)
            else:
                label = jnp.argmax(pred, axis=-1)
                truth = y if y.ndim == 1 else jnp.argmax(y, axis=-1)
            sums["correct"] = jnp.sum(w * (label == truth))
        else:
            y = y.astype(jnp.float32)
            w2 = w[:, None]
            sums["sse"] = jnp.sum(w2 * jnp.square(pred - y), axis=0)
            # Sums of y - center (one real target): the same variance, without the float32
            # cancellation of sum(y^2) - sum(y)^2 / n when |mean| >> std.
            d = y - center[None]
            sums["sy"] = jnp.sum(w2 * d, axis=0)
            sums["syy"] = jnp.sum(w2 * jnp.square(d), axis=0)
        return sums

    @jax.jit
    def evaluate(params, xb, yb, mask, net_state=()):
        # The first example is never padding (padding goes last).
        center = yb[0, 0].astype(jnp.float32) if task == "regression" else None
        per_batch = lax.map(
            lambda args: batch_sums(params, net_state, *args, center), (xb, yb, mask)
        )
        sums = jax.tree_util.tree_map(lambda a: jnp.sum(a, axis=0), per_batch)
        n = sums["n"]
        out = {"loss": sums["loss"] / n}
        if task == "classification":
            out["accuracy"] = sums["correct"] / n
        else:
            out["rmse"] = jnp.sqrt(jnp.sum(sums["sse"]) / (n * sums["sse"].shape[0]))
            sst = sums["syy"] - jnp.square(sums["sy"]) / n
            out["r2"] = jnp.mean(1.0 - sums["sse"] / jnp.maximum(sst, 1e-12))
        return out

    return evaluate
