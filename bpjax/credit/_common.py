"""What every learning rule shares: the modes, where the weights are, the feedback's layout."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

RULES = ("feedback_alignment", "direct_feedback_alignment", "sign_symmetry", "kolen_pollack")
BACKPROP = ("manual", "autodiff")
SUBSTITUTING = ("feedback_alignment", "sign_symmetry", "kolen_pollack")


class KolenPollackState(NamedTuple):
    """Kolen-Pollack's feedback as the trainer holds it: ``B = w + scale * offset``.

    Kolen-Pollack gives ``w`` and ``B`` the same update and decay (``kolen_pollack_update``), so
    their difference only decays: ``B_t - w_t = (1 - decay)^t (B_0 - w_0)``. This holds ``B``
    as that difference, fixed, and the scalar it has shrunk by, so a step reads ``w`` and the
    offset (XLA fuses ``w + scale * offset`` into the backward's dot) instead of reading,
    updating and writing a second weight-sized matrix per layer. ``B`` is the same as the
    per-step update's up to rounding; ``feedback_params`` forms it.

    Attributes:
      offset: the params' structure, each ``"w"`` leaf ``B - w`` at the start (``w``'s shape
        and dtype), every other leaf ``()``.
      scale: a scalar (float32, or the offset's dtype if wider): ``(1 - decay)`` to the power
        of the updates applied since the start, where it is 1.
    """

    offset: Any
    scale: jax.Array


def kolen_pollack_state(params: Any, feedback: Any) -> KolenPollackState:
    """``feedback`` (``B`` per ``"w"``, as ``init_rule_state("kolen_pollack", ...)`` draws it)
    held as a ``KolenPollackState`` for ``params``: ``offset = B - w``, ``scale = 1``.

    Raises:
      ValueError: params without a ``"w"``; feedback of the wrong structure or shapes.
    """
    expected = _expected_feedback("kolen_pollack", params)
    check_feedback("kolen_pollack", expected, feedback)
    offset = jax.tree_util.tree_map(
        lambda p, fb: fb if isinstance(fb, tuple) else (fb - p.astype(fb.dtype)),
        params,
        feedback,
    )
    dtypes = [jnp.float32] + [leaf.dtype for leaf in jax.tree_util.tree_leaves(offset)]
    return KolenPollackState(offset, jnp.ones((), jnp.result_type(*dtypes)))


def is_empty(feedback: Any) -> bool:
    return feedback is None or (isinstance(feedback, tuple) and not feedback)


def check_mode(mode: str, where: str) -> None:
    if mode not in BACKPROP + RULES:
        valid = ", ".join(BACKPROP + RULES)
        raise ValueError(f"{where}: unknown learning rule {mode!r}; valid: {valid}")


def is_weight(path: tuple) -> bool:
    last = path[-1] if path else None
    return isinstance(last, jax.tree_util.DictKey) and last.key == "w"


def weights(tree: Any) -> list[Any]:
    """The leaves named ``"w"``, in flattening order."""
    return [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0] if is_weight(path)]


def require_weights(mode: str, params: Any) -> None:
    if not weights(params):
        raise ValueError(
            f"{mode}: the network has no parameter named 'w' (the weight of dense and conv2d), "
            f"so there is no feedback to substitute: the rule would be backprop"
        )


def check_feedback(mode: str, expected: Any, feedback: Any) -> None:
    """``feedback`` has the structure and shapes of ``expected`` (``jax.ShapeDtypeStruct``
    leaves and ``()``), or one error that says how to make it."""
    hint = f"draw it with bpjax.credit.init_rule_state({mode!r}, net, in_shape, key=...)"
    if feedback is None:
        raise TypeError(f"{mode} needs feedback= (its rule state): {hint}")
    want = jax.tree_util.tree_structure(expected)
    got = jax.tree_util.tree_structure(feedback)
    if want != got:
        raise ValueError(f"{mode}: feedback has structure {got}, the network needs {want}; {hint}")
    for spec, fb in zip(jax.tree_util.tree_leaves(expected), jax.tree_util.tree_leaves(feedback)):
        if tuple(jnp.shape(fb)) != tuple(spec.shape):
            raise ValueError(
                f"{mode}: a feedback matrix has shape {jnp.shape(fb)}, the network needs "
                f"{spec.shape}; {hint}"
            )


def feedback_params(mode: str, params: Any, feedback: Any = None) -> Any:
    """The params a feedback rule's backward pass runs with: each ``"w"`` replaced by its feedback.

    ``feedback_alignment`` and ``kolen_pollack``: ``B`` from ``feedback`` (cast to ``w``'s dtype);
    for ``kolen_pollack`` ``feedback`` may also be a ``KolenPollackState`` (the trainer's), whose
    ``B = w + scale * offset`` is formed here;
    ``sign_symmetry``: ``sign(w)`` of the current weights (``feedback`` unused). Every other leaf
    is the real parameter.

    Raises:
      ValueError: another mode; params without a ``"w"``; feedback of the wrong structure.
      TypeError: ``feedback`` missing for a rule that needs it.
    """
    if mode not in SUBSTITUTING:
        raise ValueError(f"feedback_params: {mode!r} is not one of {', '.join(SUBSTITUTING)}")
    require_weights(mode, params)
    if mode == "sign_symmetry":
        return jax.tree_util.tree_map_with_path(
            lambda path, p: jnp.sign(p) if is_weight(path) else p, params
        )
    expected = _expected_feedback(mode, params)
    if mode == "kolen_pollack" and isinstance(feedback, KolenPollackState):
        check_feedback(mode, expected, feedback.offset)
        scale = feedback.scale

        def substitute(p, off):
            if isinstance(off, tuple):
                return p
            return (p.astype(off.dtype) + scale.astype(off.dtype) * off).astype(p.dtype)

        return jax.tree_util.tree_map(substitute, params, feedback.offset)
    check_feedback(mode, expected, feedback)
    return jax.tree_util.tree_map(
        lambda p, fb: p if isinstance(fb, tuple) else fb.astype(p.dtype), params, feedback
    )


def _expected_feedback(mode: str, params: Any) -> Any:
    """The feedback a substituting rule needs: ``w``'s spec per ``"w"`` leaf, else ``()``."""
    require_weights(mode, params)
    return jax.tree_util.tree_map_with_path(
        lambda path, p: jax.ShapeDtypeStruct(p.shape, p.dtype) if is_weight(path) else (), params
    )
