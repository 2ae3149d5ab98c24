"""``bpjax.train``'s epochs: ``epoch_order`` and ``chunk_plan`` (which minibatches, in which
chunks), and ``make_epoch`` and ``make_chunk``, the update step scanned over an epoch or a slice
of it, with the optional gradient checks and layer statistics (re-exported by ``bpjax.train``,
whose docstring states the convention). The public names' ``__module__`` is ``bpjax.train``,
where users import them from."""

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax

from bpjax import credit
from bpjax._train_step import SHUFFLE, TrainState, _step_key, layer_stats, make_step
from bpjax.grad import grad_agreement
from bpjax.layers import Layer
from bpjax.losses import Loss
from bpjax.precision import as_compute_dtype, mixed_precision_grad


def _nan_like(tree: dict[str, jax.Array]) -> dict[str, jax.Array]:
    return {k: jnp.full(v.shape, jnp.nan, jnp.float32) for k, v in tree.items()}


def epoch_order(key: jax.Array, epoch: Any, n: int, batch_size: int) -> jax.Array:
    """The minibatches of an epoch: ``[n // batch_size, batch_size]`` example indices.

    A permutation of ``n`` from ``fold_in(fold_in(key, SHUFFLE), epoch)`` (``key`` the run's
    training key), cut into whole batches; the ``n % batch_size`` left over are not used in
    this epoch. Jittable (``epoch`` may be traced).

    Raises:
      ValueError: a batch larger than the training set.
    """
    steps = n // batch_size
    if steps < 1:
        raise ValueError(f"batch_size {batch_size} is larger than the training set ({n})")
    shuffle_key = jax.random.fold_in(jax.random.fold_in(key, SHUFFLE), epoch)
    order = jax.random.permutation(shuffle_key, n)[: steps * batch_size]
    return order.reshape(steps, batch_size)


def chunk_plan(steps: int, chunk_steps: int | None) -> tuple[tuple[int, int], ...]:
    """How ``make_chunk`` cuts an epoch of ``steps`` steps: ``((start, length), ...)``.

    ``chunk_steps`` is the largest chunk (None or 0, or ``chunk_steps >= steps``: the whole
    epoch in one). Otherwise, of the plans with chunks of at most ``chunk_steps``:

    * chunks of one length (one compiled program), the longest length that divides ``steps``,
      if that makes at most one chunk more than the fewest possible, ``ceil(steps /
      chunk_steps)``: ``(8, 3)`` is four chunks of 2, ``(9, 8)`` three of 3;
    * else chunks of ``chunk_steps`` and one shorter remainder last (two compiled programs):
      ``(17, 4)`` is 4, 4, 4, 4, 1 and ``(997, 200)`` four of 200 then 197.

    So an epoch never has more than ``ceil(steps / chunk_steps) + 1`` chunks, and at most two
    lengths. (Each chunk costs a dispatch and a fetch of its metrics: the former rule, any
    divisor down to ``chunk_steps / 4``, cut digits' 17 steps at ``chunk_steps=4`` into 17
    chunks of one step, a third of the speed of ``chunk_steps=5``.)
    """
    if not chunk_steps or chunk_steps >= steps:
        return ((0, steps),)
    fewest = -(-steps // chunk_steps)  # ceil
    for length in range(chunk_steps, 0, -1):
        if -(-steps // length) > fewest + 1:  # shorter lengths make more chunks still
            break
        if steps % length == 0:
            return tuple((start, length) for start in range(0, steps, length))
    full, rest = divmod(steps, chunk_steps)
    plan = [(i * chunk_steps, chunk_steps) for i in range(full)]
    if rest:
        plan.append((full * chunk_steps, rest))
    return tuple(plan)


def _scan_steps(
    net: Layer,
    loss: Loss,
    optimizer: optax.GradientTransformation,
    *,
    grad_mode: str,
    compute_dtype: Any,
    batch_sharding: Any,
    grad_check_every: int,
    with_layer_stats: bool,
    rule_options: Mapping[str, Any] | None,
) -> Callable:
    """``run(state, x, y, rows, first, steps) -> (state, metrics)``: the update step scanned
    over the minibatch index ``rows [k, batch]``, which are steps ``first .. first + k - 1`` of
    an epoch of ``steps`` (so that the last step of the epoch records the layer statistics)."""
    step_fn = make_step(
        net,
        loss,
        optimizer,
        grad_mode=grad_mode,
        compute_dtype=compute_dtype,
        batch_sharding=batch_sharding,
        rule_options=rule_options,
    )
    backprop = grad_mode in ("manual", "autodiff")
    # The reference in the same precision as the step, so that under a compute dtype the
    # signals measure the backward (or the rule), not bfloat16 against float32 rounding: for
    # backprop the other mode (manual against autodiff), for a rule the true gradient.
    other_mode = {"manual": "autodiff", "autodiff": "manual"}.get(grad_mode, "autodiff")
    other_grad = mixed_precision_grad(net, loss, other_mode, as_compute_dtype(compute_dtype))

    own_grad = mixed_precision_grad(net, loss, grad_mode, as_compute_dtype(compute_dtype))

    def check(state, xb, yb):
        """The signals at ``state``'s step: the step's gradient (the rule's update direction)
        recomputed as the step computes it, against the other mode's."""
        key = _step_key(state)
        common = {"key": key, "state": state.net_state}
        _, grads = own_grad(state.params, xb, yb, feedback=state.rule_state, **common)
        _, g_other = other_grad(state.params, xb, yb, **common)
        out = {}
        if backprop:
            manual, true = (grads, g_other) if grad_mode == "manual" else (g_other, grads)
            out.update({f"grad_check/{k}": v for k, v in grad_agreement(manual, true).items()})
        else:
            true = g_other
        angles = credit.alignment(
            grads, true, mode=grad_mode, params=state.params, feedback=state.rule_state
        )
        out.update({f"alignment/{k}": v for k, v in angles.items()})
        return {k: v.astype(jnp.float32) for k, v in out.items()}

    def run(state, x, y, rows, first, steps):
        def body(state, scan_in):
            i, idx = scan_in
            new_state, aux = step_fn(state, x[idx], y[idx])
            metrics = {"loss": aux["loss"].astype(jnp.float32)}
            if with_layer_stats:

                def stats(_):
                    values = layer_stats(new_state.params, aux["grads"], aux["updates"])
                    return {f"layer_stats/{k}": v for k, v in values.items()}

                shapes = jax.eval_shape(stats, None)
                metrics.update(lax.cond(i == steps - 1, stats, lambda _: _nan_like(shapes), None))
            return new_state, metrics

        indices = first + jnp.arange(rows.shape[0])
        if not grad_check_every:
            return lax.scan(body, state, (indices, rows))
        return _checked_steps(body, check, grad_check_every, state, x, y, rows, indices)

    return run


def _checked_steps(body, check, every, state, x, y, rows, indices):
    """``lax.scan(body, state, (indices, rows))`` with ``check(state, xb, yb)`` (the signals)
    before every step whose ``state.step`` is a multiple of ``every``: its values at those
    steps, NaN at the others.

    The steps run in loops between the checks (placed from the first step's count), not in one
    scan with a ``lax.cond`` per step: a check beside the step reads the params that the step
    updates in place, and XLA then copies them in every step (on XLA:CPU, ~10% of a small
    MLP's epoch). Between two loops, a check costs one copy.
    """
    length = rows.shape[0]
    check_shapes = jax.eval_shape(check, state, x[rows[0]], y[rows[0]])
    if length == 1:  # one step: XLA compiles a one-step loop apart from a longer one's steps
        due = state.step % every == 0
        checked = lax.cond(
            due, check, lambda *_: _nan_like(check_shapes), state, x[rows[0]], y[rows[0]]
        )
        state, metrics = lax.scan(body, state, (indices, rows))
        return state, {**metrics, **{k: v[None] for k, v in checked.items()}}
    step_shapes = jax.eval_shape(body, state, (indices[0], rows[0]))[1]
    # Every per-step value is written by its step: the zeros are never read.
    metrics = {k: jnp.zeros((length, *v.shape), v.dtype) for k, v in step_shapes.items()}
    checks = {k: jnp.full((length, *v.shape), jnp.nan, v.dtype) for k, v in check_shapes.items()}

    def steps_between(lo, hi, carry):
        def one(j, carry):
            state, metrics = carry
            state, values = body(state, (indices[j], rows[j]))
            return state, {k: m.at[j].set(values[k]) for k, m in metrics.items()}

        return lax.fori_loop(lo, hi, one, carry)

    phase = jnp.asarray((-state.step) % every, jnp.int32)  # the chunk's first checked step
    n_checks = jnp.maximum(0, (length - phase + every - 1) // every)
    state, metrics = steps_between(0, jnp.minimum(phase, length), (state, metrics))

    def segment(k, carry):
        state, metrics, checks = carry
        at = phase + k * every
        values = check(state, x[rows[at]], y[rows[at]])
        checks = {key: c.at[at].set(values[key]) for key, c in checks.items()}
        state, metrics = steps_between(at, jnp.minimum(at + every, length), (state, metrics))
        return state, metrics, checks

    state, metrics, checks = lax.fori_loop(0, n_checks, segment, (state, metrics, checks))
    return state, {**metrics, **checks}


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


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
    rule_options: Mapping[str, Any] | None = None,
) -> Callable:
    """Returns a jitted ``epoch(state, x, y, epoch) -> (state, metrics)``: one ``lax.scan``.

    The training set ``x [n, ...]``, ``y [n, ...]`` stays on device; each epoch draws its
    minibatches with ``epoch_order`` and scans the update step over them.

    Args:
      net, loss, optimizer, grad_mode, compute_dtype, batch_sharding, rule_options: as
        ``make_step``.
      batch_size: examples per update.
      grad_check_every: if > 0, every that many steps (global step count, counted before the
        step) the step also computes a reference gradient for the same minibatch, key and
        network state, at the cost of one extra backward on those steps only (``lax.cond``),
        and records (NaN at the other steps):

        * ``alignment/layer{i}/angle`` and ``alignment/total/angle``, for every mode: the
          angle in degrees between the step's gradients (a rule's update direction) and the
          true gradient (``jax.grad``: ``mode="autodiff"``), and for the feedback rules
          (``feedback_alignment``, ``sign_symmetry``, ``kolen_pollack``)
          ``alignment/layer{i}/weight_angle``, between each layer's ``w`` and its feedback
          (``bpjax.credit.alignment``). About 0 for ``manual`` (the control), exactly 0 for
          ``autodiff``;
        * for ``manual`` and ``autodiff``, ``grad_check/layer{i}/{rel_err,cosine}`` and
          ``grad_check/total/...``: manual against autodiff (``bpjax.grad.grad_agreement``).
      with_layer_stats: record ``layer_stats/layer{i}/{grad_norm,weight_norm,update_ratio}``
        (see ``layer_stats``) at the last step of the epoch (NaN elsewhere).
      donate: donate the input state's buffers (saves a copy of params and optimizer state, but
        the caller must not use the old state afterwards).

    Returns:
      ``metrics`` maps names to per-step arrays ``[n // batch_size]``: ``loss`` always.
    """
    _check_batch_size(batch_size)
    run = _scan_steps(
        net,
        loss,
        optimizer,
        grad_mode=grad_mode,
        compute_dtype=compute_dtype,
        batch_sharding=batch_sharding,
        grad_check_every=grad_check_every,
        with_layer_stats=with_layer_stats,
        rule_options=rule_options,
    )

    def epoch(state: TrainState, x: jax.Array, y: jax.Array, epoch_index: jax.Array):
        order = epoch_order(state.key, epoch_index, x.shape[0], batch_size)
        return run(state, x, y, order, 0, order.shape[0])

    return jax.jit(epoch, donate_argnums=0 if donate else ())


def make_chunk(
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
    rule_options: Mapping[str, Any] | None = None,
) -> tuple[Callable, Callable]:
    """Returns jitted ``(order_fn, chunk)`` that run an epoch in chunks (see ``chunk_plan``).

    ``order_fn(state, n, epoch) -> order [steps, batch]`` is ``epoch_order`` of the run's key
    (``n`` static). ``chunk(state, x, y, order, start, length=k) -> (state, metrics)`` scans the
    update step over rows ``start .. start + k - 1`` of ``order`` (``start`` traced, ``k``
    static: one compilation per chunk length). Chunking changes nothing but when the caller
    gets control: the same steps give the same state as ``make_epoch``'s (bit-identical on
    CPU) — with progress between chunks and a place to stop and checkpoint mid-epoch.

    Args: as ``make_epoch``; the layer statistics are recorded at the last step of the epoch.
    """
    _check_batch_size(batch_size)
    run = _scan_steps(
        net,
        loss,
        optimizer,
        grad_mode=grad_mode,
        compute_dtype=compute_dtype,
        batch_sharding=batch_sharding,
        grad_check_every=grad_check_every,
        with_layer_stats=with_layer_stats,
        rule_options=rule_options,
    )

    def order_fn(state: TrainState, n: int, epoch_index: jax.Array) -> jax.Array:
        return epoch_order(state.key, epoch_index, n, batch_size)

    def chunk(state, x, y, order, start, *, length):
        rows = lax.dynamic_slice_in_dim(order, start, length)
        return run(state, x, y, rows, start, order.shape[0])

    return (
        jax.jit(order_fn, static_argnums=1),
        jax.jit(chunk, static_argnames="length", donate_argnums=0 if donate else ()),
    )


for _public in (epoch_order, chunk_plan, make_epoch, make_chunk):
    _public.__module__ = "bpjax.train"  # re-exported there, their public home
del _public
