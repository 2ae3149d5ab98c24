"""The signal: angles in degrees between a rule's update and the true gradient, and between each
weight and its feedback."""

from typing import Any

import jax
import jax.numpy as jnp

from bpjax.credit._common import SUBSTITUTING, check_mode, feedback_params, weights


def _upcast(x: jax.Array) -> jax.Array:
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _unit(leaves: list[jax.Array]) -> list[jax.Array]:
    """``leaves / ||leaves||`` as one vector (zero stays zero), scaled by the largest entry first
    so that no square under- or overflows."""
    leaves = [_upcast(jnp.asarray(x)) for x in leaves]
    if not leaves:
        return []
    dtype = jnp.result_type(*leaves)
    biggest = jnp.max(jnp.stack([jnp.max(jnp.abs(x), initial=0.0).astype(dtype) for x in leaves]))
    leaves = [x / jnp.where(biggest > 0, biggest, 1).astype(x.dtype) for x in leaves]
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(x)).astype(dtype) for x in leaves))
    return [x / jnp.where(norm > 0, norm, 1).astype(x.dtype) for x in leaves]


def angle(a: Any, b: Any) -> jax.Array:
    """The angle in degrees between two pytrees of the same structure, each read as one vector.

    ``2 atan2(||â - b̂||, ||â + b̂||)`` with ``â = a / ||a||``: the half-angle form, accurate at
    every angle (an arccos of the cosine loses half the digits near 0° and 180°: in float32 it
    reads 0° below about 0.015°). At least float32, jittable. A zero vector is at 90° to any
    non-zero one, and two zero vectors are at 0° (they agree), as
    ``bpjax.grad.cosine_similarity``'s 1.

    Raises:
      ValueError: trees of different structure or leaf shapes.
    """
    leaves_a, tree_a = jax.tree_util.tree_flatten(a)
    leaves_b, tree_b = jax.tree_util.tree_flatten(b)
    shapes_a = [jnp.shape(x) for x in leaves_a]
    shapes_b = [jnp.shape(x) for x in leaves_b]
    if tree_a != tree_b or shapes_a != shapes_b:
        raise ValueError(f"angle: trees differ: {tree_a} {shapes_a} and {tree_b} {shapes_b}")
    unit_a, unit_b = _unit(leaves_a), _unit(leaves_b)
    if not unit_a:
        return jnp.float32(0.0)
    diff = jnp.sqrt(sum(jnp.sum(jnp.square(x - y)) for x, y in zip(unit_a, unit_b)))
    total = jnp.sqrt(sum(jnp.sum(jnp.square(x + y)) for x, y in zip(unit_a, unit_b)))
    return jnp.degrees(2 * jnp.arctan2(diff, total))


def alignment(
    grads: Any,
    true_grads: Any,
    *,
    mode: str = "manual",
    params: Any = None,
    feedback: Any = None,
) -> dict[str, jax.Array]:
    """How far a rule's update is from the true gradient, per layer, in degrees (jittable).

    Args:
      grads: the rule's gradient tree (``value_and_grad(net, loss, mode=mode)``).
      true_grads: the true gradient of the same loss on the same minibatch (``mode="autodiff"``,
        i.e. ``jax.grad``), same structure.
      mode: the rule; for the feedback rules the weight angles are added.
      params, feedback: the params and rule state the gradient was computed with (needed by
        the feedback rules for the weight angles; ``feedback`` not by sign symmetry).

    Raises:
      ValueError: an unknown mode; gradient trees of different structure.
      TypeError: a feedback rule without ``params``, or without the ``feedback`` it needs.

    Returns:
      ``layer{i}/angle`` (the angle between the rule's and the true gradient of layer ``i``)
      and, for ``feedback_alignment``, ``sign_symmetry`` and ``kolen_pollack``,
      ``layer{i}/weight_angle`` (between the layer's ``w`` leaves and their feedback: ``B``, or
      ``sign(w)``); then ``total/angle`` over every parameter. ``i`` indexes the top-level
      ``serial`` (the params tuple) as ``bpjax.grad.grad_agreement`` does; a tree that is not a
      tuple is ``layer0``; layers without parameters are skipped, and so are weight angles of
      layers without ``w``. ``manual`` gives angles of ~0° (rounding): the control. For
      ``direct_feedback_alignment`` there is no weight angle: ``B_i`` stands in for the whole
      path from layer ``i`` to the output (weights and activation derivatives), not for one
      weight, so no single ``w`` is its counterpart. The first layer's feedback sends ``dx``
      to the input only, which nothing uses: under ``feedback_alignment`` its fixed ``B``
      never meets the weights' updates, so that layer's weight angle stays near where it
      started (~90°), by construction.
    """
    check_mode(mode, "alignment")
    per_layer = grads if isinstance(grads, tuple) else (grads,)
    true_per_layer = true_grads if isinstance(true_grads, tuple) else (true_grads,)
    if len(per_layer) != len(true_per_layer):
        raise ValueError(
            f"alignment: {len(per_layer)} layers of gradients, {len(true_per_layer)} true ones"
        )
    weight_pairs = [((), ())] * len(per_layer)
    if mode in SUBSTITUTING:
        if params is None:
            raise TypeError(
                f"alignment: {mode} needs params= (and feedback=) for the weight angles"
            )
        backward_params = feedback_params(mode, params, feedback)
        pairs = (
            zip(params, backward_params)
            if isinstance(params, tuple)
            else [(params, backward_params)]
        )
        weight_pairs = [(weights(p), weights(b)) for p, b in pairs]
    out = {}
    for i, (g, t, (w, b)) in enumerate(zip(per_layer, true_per_layer, weight_pairs)):
        if not jax.tree_util.tree_leaves(g):
            continue
        out[f"layer{i}/angle"] = angle(g, t)
        if w:
            out[f"layer{i}/weight_angle"] = angle(w, b)
    out["total/angle"] = angle(grads, true_grads)
    return out
