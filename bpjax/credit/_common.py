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
    as that difference, fixed, and the scalar it has shrunk by. A step forms
    ``B = w + scale * offset`` from its inputs alone (nothing of the step waits for it before
    the backward, so XLA:CPU runs it beside the forward pass) and updates one scalar, instead
    of updating a second weight-sized matrix per layer after the optimizer and writing it back.
    ``B`` is the same as the per-step update's up to rounding; ``feedback_params`` forms it in
    the params' structure, ``kolen_pollack_feedback`` in ``init_rule_state``'s.

    ``B`` is tied to the params it is held against: a state whose params are replaced (loaded
    weights, a copy from another run) moves ``B`` with them. To keep ``B``, re-hold it::

        B = kolen_pollack_feedback(state.params, state.rule_state)
        state = state._replace(params=new, rule_state=kolen_pollack_state(new, B))

    A checkpoint written before this form (bpjax up to 2026-11-30) holds ``B`` itself: restore
    it into ``like._replace(rule_state=like.rule_state.offset)`` and convert with
    ``kolen_pollack_state`` (``bpjax.trainer.fit``'s resume does so).

    Attributes:
      offset: the params' structure, each ``"w"`` leaf ``B - w`` at the start (``w``'s shape
        and dtype), every other leaf ``()``.
      scale: a floating-point scalar (float32, or the offset's dtype if wider): ``(1 - decay)``
        to the power of the updates applied since the start, where it is 1.
    """

    offset: Any
    scale: jax.Array


def kolen_pollack_state(params: Any, feedback: Any) -> KolenPollackState:
    """``feedback`` (``B`` per ``"w"``, as ``init_rule_state("kolen_pollack", ...)`` draws it)
    held as a ``KolenPollackState`` for ``params``: ``offset = B - w``, ``scale = 1``.

    Raises:
      ValueError: params without a ``"w"``; feedback of the wrong structure or shapes, or one
        held already.
    """
    if isinstance(feedback, KolenPollackState):
        raise ValueError(
            "kolen_pollack_state: feedback is a KolenPollackState already; pass B itself "
            "(bpjax.credit.kolen_pollack_feedback(params, state))"
        )
    require_weights("kolen_pollack", params)
    expected = expected_feedback(params)
    check_feedback("kolen_pollack", expected, feedback)
    offset = jax.tree_util.tree_map(
        lambda p, fb: fb if isinstance(fb, tuple) else (fb - p.astype(fb.dtype)),
        params,
        feedback,
    )
    dtypes = [jnp.float32] + [leaf.dtype for leaf in jax.tree_util.tree_leaves(offset)]
    return KolenPollackState(offset, jnp.ones((), jnp.result_type(*dtypes)))


def kolen_pollack_feedback(params: Any, feedback: Any) -> Any:
    """Kolen-Pollack's ``B`` itself, in ``init_rule_state``'s structure (``B`` per ``"w"``,
    ``()`` elsewhere), from a ``KolenPollackState`` held for ``params`` (or ``B`` itself); in
    the dtypes of the params' ``w``, as the backward reads it.

    Raises:
      ValueError, TypeError: as ``feedback_params``.
    """
    backward = feedback_params("kolen_pollack", params, feedback)
    layout = feedback.offset if isinstance(feedback, KolenPollackState) else feedback
    return jax.tree_util.tree_map(
        lambda fb, b: fb if is_empty(fb) else b, layout, backward, is_leaf=is_empty
    )


def _held_scale(feedback: KolenPollackState) -> jax.Array:
    """The state's ``scale`` as an array, or one error if it is not a floating-point scalar."""
    scale = feedback.scale
    dtype = getattr(scale, "dtype", None)
    if isinstance(scale, float):
        return jnp.asarray(scale, jnp.float32)
    if dtype is None or jnp.ndim(scale) != 0 or not jnp.issubdtype(dtype, jnp.floating):
        shown = f"{dtype}{list(jnp.shape(scale))}" if dtype is not None else repr(scale)
        raise ValueError(
            f"kolen_pollack: KolenPollackState.scale must be a floating-point scalar "
            f"((1 - decay) ** updates; 1.0 at the start), got {shown}"
        )
    # at least float32: in float16 or bfloat16, 1 - 1e-4 rounds to 1 and the decay is lost
    return jnp.asarray(scale, jnp.promote_types(dtype, jnp.float32))


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


def check_feedback(mode: str, expected: Any, feedback: Any, *, what: str = "feedback") -> None:
    """``feedback`` has the structure and shapes of ``expected`` (``jax.ShapeDtypeStruct``
    leaves and ``()``), or one error that says how to make it; ``what`` names it
    (``"feedback"``, or a held state's ``"offset (B - w)"``)."""
    hint = f"draw it with bpjax.credit.init_rule_state({mode!r}, net, in_shape, key=...)"
    if what != "feedback":
        hint = (
            "hold B as bpjax.credit.kolen_pollack_state(params, B), B drawn by "
            "bpjax.credit.init_rule_state('kolen_pollack', net, in_shape, key=...)"
        )
    if feedback is None:
        raise TypeError(f"{mode} needs feedback= (its rule state): {hint}")
    if isinstance(feedback, KolenPollackState):
        raise ValueError(
            f"{mode}: feedback is a KolenPollackState, Kolen-Pollack's B held as w + scale * "
            f"offset, which only kolen_pollack reads; {hint}"
        )
    want = jax.tree_util.tree_structure(expected)
    got = jax.tree_util.tree_structure(feedback)
    if want != got:
        raise ValueError(f"{mode}: {what} has structure {got}, the network needs {want}; {hint}")
    specs = jax.tree_util.tree_flatten_with_path(expected)[0]
    for (path, spec), fb in zip(specs, jax.tree_util.tree_leaves(feedback)):
        where = f"{mode}: {what} at {jax.tree_util.keystr(path)}"
        if tuple(jnp.shape(fb)) != tuple(spec.shape):
            raise ValueError(
                f"{where} has shape {jnp.shape(fb)}, the network needs {spec.shape}; {hint}"
            )
        if not jnp.issubdtype(jnp.result_type(fb), jnp.floating):
            raise ValueError(
                f"{where} has dtype {jnp.result_type(fb)}: it must be floating-point; {hint}"
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
    expected = expected_feedback(params)
    if mode == "kolen_pollack" and isinstance(feedback, KolenPollackState):
        check_feedback(mode, expected, feedback.offset, what="offset (B - w)")
        scale = _held_scale(feedback)

        def substitute(p, off):
            if isinstance(off, tuple):
                return p
            return (p.astype(off.dtype) + scale.astype(off.dtype) * off).astype(p.dtype)

        return jax.tree_util.tree_map(substitute, params, feedback.offset)
    check_feedback(mode, expected, feedback)
    return jax.tree_util.tree_map(
        lambda p, fb: p if isinstance(fb, tuple) else fb.astype(p.dtype), params, feedback
    )


def expected_feedback(params: Any) -> Any:
    """The feedback a substituting rule needs: ``w``'s spec per ``"w"`` leaf, else ``()``."""
    return jax.tree_util.tree_map_with_path(
        lambda path, p: jax.ShapeDtypeStruct(p.shape, p.dtype) if is_weight(path) else (), params
    )
