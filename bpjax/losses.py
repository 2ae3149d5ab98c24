"""Losses as pairs of pure functions with hand-written gradients.

Convention (written once, here):

* ``forward(pred, target) -> (value, cache)``: ``value`` is a scalar, always a *mean* (over all
  elements, or over the examples for the per-example losses ``quadratic`` and
  ``softmax_cross_entropy``); ``cache`` is a tuple of the arrays ``backward`` needs.
* ``backward(cache) -> dpred``: ``d value / d pred``, same shape and dtype as ``pred``. It is the
  ``dy`` that starts a network's backward pass.
* ``target`` is cast to ``pred``'s dtype, so integer targets are fine wherever shapes match.
  Shapes are static: a mismatch raises ``ValueError`` at trace time, naming both shapes.
* Everything is jit- and vmap-able; under ``vmap`` each example is a single (unbatched) example.

The gradients are written by hand (never ``jax.grad``); the tests check them against autodiff
and the values against optax.
"""

import math
import typing
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bpjax.layers import _log_softmax_parts
from bpjax.layers._core import call_hint

__all__ = [
    "LOSSES",
    "Loss",
    "binary_cross_entropy",
    "get",
    "huber",
    "mse",
    "quadratic",
    "resolve",
    "softmax_cross_entropy",
]

Array = jax.Array


class Loss(NamedTuple):
    """A loss as two pure functions."""

    forward: Callable  # (pred, target) -> (value, cache)   value: scalar
    backward: Callable  # (cache) -> dpred   d value / d pred, same shape and dtype as pred
    name: str = ""  # the factory's name: tells training how to encode targets


def _as_arrays(name: str, pred: Any, target: Any) -> tuple[Array, Array]:
    """Converts to arrays, checks equal shapes and casts target to pred's dtype."""
    pred, target = jnp.asarray(pred), jnp.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(
            f"{name}: pred shape {pred.shape} and target shape {target.shape} differ; "
            "they must be equal."
        )
    return pred, target.astype(pred.dtype)


def _require_class_axis(name: str, pred: Array) -> None:
    if pred.ndim < 1:
        raise ValueError(f"{name}: pred needs a last (feature) axis, got shape {pred.shape}.")


def _batch_count(shape: tuple[int, ...]) -> int:
    """Number of examples: the product of all leading axes (1 for a single 1-D example)."""
    return math.prod(shape[:-1])


def mse() -> Loss:
    """Mean squared error over all elements (as ``torch.nn.MSELoss``).

    ``value = mean((pred - target)**2)``.

    Returns:
        A :class:`Loss`.
    """

    def forward(pred, target):
        pred, target = _as_arrays("mse", pred, target)
        diff = pred - target
        return jnp.mean(diff**2), (diff,)

    def backward(cache):
        """``dpred = 2 * (pred - target) / n``, ``n`` the number of elements."""
        (diff,) = cache
        return 2 * diff / diff.size

    return Loss(forward, backward, "mse")


def quadratic() -> Loss:
    """The textbook quadratic cost: half the squared norm per example, mean over examples.

    ``value = mean_over_batch(0.5 * ||pred - target||**2)``, the norm over the last axis and the
    mean over all leading axes. A 1-D ``pred`` is one example: ``0.5 * ||pred - target||**2``.

    Returns:
        A :class:`Loss`.

    References:
        Nielsen, *Neural Networks and Deep Learning*, ch. 1-2 (2015).
    """

    def forward(pred, target):
        pred, target = _as_arrays("quadratic", pred, target)
        _require_class_axis("quadratic", pred)
        diff = pred - target
        return 0.5 * jnp.sum(diff**2) / _batch_count(diff.shape), (diff,)

    def backward(cache):
        """``dpred = (pred - target) / batch``, ``batch`` the number of examples."""
        (diff,) = cache
        return diff / _batch_count(diff.shape)

    return Loss(forward, backward, "quadratic")


def _check_label_range(labels: jax.Array, n_classes: int) -> None:
    """Integer labels in ``[0, n_classes)``; checked only where their values are known."""
    if isinstance(labels, jax.core.Tracer) or labels.size == 0:
        return
    values = np.asarray(labels)  # concrete: numpy, so no jax op is traced for the check
    lo, hi = int(values.min()), int(values.max())
    if lo < 0 or hi >= n_classes:
        raise ValueError(
            f"softmax_cross_entropy: integer labels must be in [0, {n_classes}) for "
            f"{n_classes} logits, got labels from {lo} to {hi}"
        )


def _one_hot_scattered(
    labels: jax.Array, n_classes: int, dtype: Any, scale: float = 1.0
) -> jax.Array:
    """``scale * jax.nn.one_hot(labels, n_classes)`` for labels in range, built as a scatter of
    ``scale`` into zeros (as autodiff's gradient of picking the labels' log-probabilities is).

    The values are the same; the program is not. A scatter depends on the labels alone and
    XLA:CPU doesn't fuse it, so the backward has a source independent of the forward pass, as
    autodiff's has. Without one, a plain ``jax.jit`` of ``value_and_grad(..., mode="manual")``
    and an optax update ran 7-22% slower than the same step in autodiff mode, kernel for kernel
    the same (issue 10 #18; docs/benchmarks.md: XLA's runtime runs a program whose every
    instruction depends on the one before differently). Scattering the backward's ``1/batch``
    itself, not ones then multiplied, leaves no product for XLA to contract with the
    softmax's into a fused multiply-add: the float64 gradient stays bit for bit autodiff's.
    """
    flat = labels.reshape(-1)
    rows = jnp.arange(flat.shape[0])
    hot = jnp.zeros((flat.shape[0], n_classes), dtype).at[rows, flat].set(scale)
    return hot.reshape(*labels.shape, n_classes)


def softmax_cross_entropy() -> Loss:
    """Cross-entropy of ``softmax(pred)`` against the targets, mean over examples.

    ``pred`` holds logits ``[..., n_classes]``; ``target`` is either integer labels ``[...]`` in
    ``[0, n_classes)`` (integer dtype, ``target.shape == pred.shape[:-1]``) or one-hot/probability
    targets with ``pred``'s shape. ``value = mean_over_batch(-sum(p_target * log_softmax(pred)))``,
    computed with log-sum-exp so it stays finite for large logits. A 1-D ``pred`` is one example.

    Labels outside ``[0, n_classes)`` raise a ValueError when the labels are concrete (an eager
    call). Under ``jit`` their values can't be checked, so an example with such a label gets a
    NaN loss and a NaN row of ``dpred``: the mean value is NaN and so is the gradient of every
    parameter it reaches, consistently (the backward stays the gradient of the value
    returned), and training stops at its divergence guard instead of learning from a class
    nobody meant (a label of -1 would otherwise read as the last class, or as none). Validate
    labels where they are loaded (``bpjax.data`` does).

    Probability targets need not sum to one (nor lie in ``[0, 1]``): the value is
    ``-sum(target * log_softmax(pred))`` as written, and the gradient is that of this value.
    ``pred`` must be finite.

    Returns:
        A :class:`Loss`.
    """

    def forward(pred, target):
        pred, target = jnp.asarray(pred), jnp.asarray(target)
        _require_class_axis("softmax_cross_entropy", pred)
        # log_softmax with its exps and their row sums (one exp per logit): the backward needs
        # the probabilities, and exp(log_probs) would be a second exp.
        log_probs, (exps, sums) = _log_softmax_parts(pred)
        is_labels = jnp.issubdtype(target.dtype, jnp.integer) and target.shape == pred.shape[:-1]
        if is_labels:
            n_classes = pred.shape[-1]
            _check_label_range(target, n_classes)
            # Under jit a label may be out of range: NaN for its example, in the value and (as
            # the row scale of the backward) in the gradient alike.
            valid = (target >= 0) & (target < n_classes)
            in_range = jnp.where(valid, target, 0)
            nan_if_invalid = jnp.where(valid, 1, jnp.nan).astype(pred.dtype)
            picked = jnp.take_along_axis(log_probs, in_range[..., None], axis=-1)[..., 0]
            nll = -picked * nan_if_invalid
            # the backward's p_target / batch, scattered (see _one_hot_scattered)
            target_term = _one_hot_scattered(
                in_range, n_classes, pred.dtype, scale=1.0 / _batch_count(pred.shape)
            )
            total = nan_if_invalid[..., None]  # a one-hot row sums to 1 (NaN: no valid label)
        else:
            if target.shape != pred.shape:
                raise ValueError(
                    f"softmax_cross_entropy: pred shape {pred.shape} and target shape "
                    f"{target.shape} do not match; target must be integer labels of shape "
                    f"{pred.shape[:-1]} or probabilities of shape {pred.shape}."
                )
            p_target = target.astype(pred.dtype)
            nll = -jnp.sum(p_target * log_probs, axis=-1)
            total = jnp.sum(p_target, axis=-1, keepdims=True)
            target_term = p_target * (1.0 / _batch_count(pred.shape))
        return jnp.mean(nll), (exps, sums, target_term, total)

    def backward(cache):
        """``dpred = (softmax(pred) * sum(p_target) - p_target) / batch``.

        ``sum(p_target)`` is over the class axis; it is 1 for labels and proper distributions,
        giving the familiar ``(softmax(pred) - p_target) / batch`` (and NaN for the row of an
        out-of-range label, as its value). ``softmax(pred)`` is the forward pass's exps over
        their row sums, scaled per row rather than per element.
        """
        exps, sums, target_term, total = cache  # target_term: p_target / batch
        inv_batch = 1.0 / _batch_count(exps.shape)
        return exps * (total * inv_batch / sums) - target_term

    return Loss(forward, backward, "softmax_cross_entropy")


def binary_cross_entropy() -> Loss:
    """Binary cross-entropy of ``sigmoid(pred)`` against targets in ``[0, 1]``, mean over all.

    ``pred`` holds logits, ``target`` has the same shape. Uses the stable form
    ``value = mean(softplus(pred) - pred * target)`` (``jax.nn.softplus`` is
    ``max(x, 0) + log1p(exp(-|x|))`` written so that autodiff of it is also right at 0, where
    differentiating ``max`` and ``abs`` separately gives a wrong reference gradient).

    Returns:
        A :class:`Loss`.
    """

    def forward(pred, target):
        pred, target = _as_arrays("binary_cross_entropy", pred, target)
        elementwise = jax.nn.softplus(pred) - pred * target
        return jnp.mean(elementwise), (pred, target)

    def backward(cache):
        """``dpred = (sigmoid(pred) - target) / n``, ``n`` the number of elements."""
        pred, target = cache
        return (jax.nn.sigmoid(pred) - target) / pred.size

    return Loss(forward, backward, "binary_cross_entropy")


def huber(*, delta: float = 1.0) -> Loss:
    """Huber loss (as ``optax.huber_loss``), mean over all elements.

    With ``e = pred - target``: ``0.5 * e**2`` where ``|e| <= delta``, else
    ``delta * (|e| - 0.5 * delta)``.

    Args:
        delta: where the loss turns from quadratic to linear; must be positive.

    Returns:
        A :class:`Loss`.

    References:
        Huber, *Robust Estimation of a Location Parameter* (1964).
    """
    if delta <= 0:
        raise ValueError(f"huber: delta must be positive, got {delta}.")

    def forward(pred, target):
        pred, target = _as_arrays("huber", pred, target)
        diff = pred - target
        abs_diff = jnp.abs(diff)
        quad = jnp.minimum(abs_diff, delta)
        elementwise = 0.5 * quad**2 + delta * (abs_diff - quad)
        return jnp.mean(elementwise), (diff,)

    def backward(cache):
        """``dpred = clip(pred - target, -delta, delta) / n``, ``n`` the number of elements."""
        (diff,) = cache
        return jnp.clip(diff, -delta, delta) / diff.size

    return Loss(forward, backward, "huber")


LOSSES: dict[str, Callable[..., Loss]] = {
    "mse": mse,
    "quadratic": quadratic,
    "softmax_cross_entropy": softmax_cross_entropy,
    "binary_cross_entropy": binary_cross_entropy,
    "huber": huber,
}
"""Canonical name -> factory."""

_ALIASES = {"cross_entropy": "softmax_cross_entropy", "bce": "binary_cross_entropy"}


def _is_factory(obj: Any) -> bool:
    """Whether ``obj`` makes a Loss: one of ``LOSSES`` or a function annotated to return one."""
    if any(obj is factory for factory in LOSSES.values()):
        return True
    try:
        return typing.get_type_hints(obj).get("return") is Loss
    except (TypeError, NameError, AttributeError):  # no annotations to read
        return False


def resolve(loss: Any, where: str = "loss") -> Loss:
    """The :class:`Loss` that ``loss`` is or names, for functions that take either.

    Args:
        loss: a :class:`Loss`, or a name for :func:`get`.
        where: the argument's place, for the error (e.g. ``"value_and_grad: loss"``).

    Returns:
        A :class:`Loss`.

    Raises:
        TypeError: ``loss`` is neither; a loss factory passed uncalled (``bpjax.losses.mse``)
            is named with the call that fixes it (``call it: bpjax.losses.mse()``).
        ValueError: an unknown name (listing the valid ones).
    """
    if isinstance(loss, Loss):
        return loss
    if isinstance(loss, str):
        return get(loss)
    if callable(loss) and _is_factory(loss):
        name = getattr(loss, "__qualname__", repr(loss))
        module = getattr(loss, "__module__", "") or ""
        raise TypeError(
            f"{where} is the loss factory {module + '.' if module else ''}{name}, not a Loss: "
            f"call it: {call_hint(loss)}"
        )
    raise TypeError(
        f"{where} must be a bpjax.losses.Loss or a loss name ({', '.join(sorted(LOSSES))}), "
        f"got {type(loss).__name__} {getattr(loss, '__qualname__', None) or repr(loss)}"
    )


def get(name: str, **kwargs: Any) -> Loss:
    """Builds a loss by name.

    Args:
        name: a key of :data:`LOSSES`, or an alias: ``"cross_entropy"`` for
            ``"softmax_cross_entropy"``, ``"bce"`` for ``"binary_cross_entropy"``.
        **kwargs: the factory's keyword-only hyperparameters (e.g. ``delta`` for ``huber``).

    Returns:
        A :class:`Loss`.

    Raises:
        ValueError: if ``name`` is neither a loss nor an alias.
    """
    canonical = _ALIASES.get(name, name)
    if canonical not in LOSSES:
        valid = sorted([*LOSSES, *_ALIASES])
        raise ValueError(f"Unknown loss {name!r}; valid names are: {', '.join(valid)}.")
    return LOSSES[canonical](**kwargs)
