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
finite-difference witness live in ``bpjax._gradcheck`` and are re-exported here, as are
``MODES``, ``value_and_grad`` and ``as_custom_vjp``, defined in ``bpjax._grad_modes``, and
``check_grads``, defined in ``bpjax._check_grads``; the agreement metrics are defined here.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from bpjax._check_grads import check_grads
from bpjax._grad_modes import MODES, as_custom_vjp, value_and_grad
from bpjax._gradcheck import (
    GradCheckResult,
    GradCheckRow,
    GradCheckWarning,
    default_tolerances,
)

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
_TINY = 1e-30


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
