"""Targets and evaluation, pure: encoding labels for a loss, padded batches, metrics.

* ``encode_targets`` gives each loss the targets it expects (labels, one-hot, ``[n, 1]``).
* Evaluation pads the last batch and masks it (``pad_batches``): every example counts, once.
* ``make_eval`` computes a split's mean loss and accuracy (classification) or RMSE and R^2
  (regression) in one jitted ``lax.map`` over the padded batches, in evaluation mode.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bpjax.layers import Layer, apply
from bpjax.losses import Loss

__all__ = ["encode_targets", "make_eval", "pad_batches", "single_output_binary", "target_mismatch"]


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
