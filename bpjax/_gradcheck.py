"""The rows, results and witnesses of ``bpjax.grad.check_grads`` (re-exported there).

Every comparison is a ``GradCheckRow`` with a ``status``:

* ``"passed"`` / ``"failed"``: the hand-written gradient agrees / disagrees with its reference;
* ``"inconclusive"``: the reference cannot judge it here. Only the finite-difference row can be
  inconclusive: when the loss is not smooth within the step (a ReLU or leaky ReLU at 0, a max
  over ties, any kink), a difference quotient is not a derivative, so it can neither confirm
  nor refute the manual one; the per-layer and total rows (exact autodiff) still decide;
* ``"skipped"``: there is nothing to compare: the ``dx`` of an input without a gradient (an
  integer or bool input, for which ``jax.vjp`` gives a ``float0`` cotangent).

A result passes when no row failed: every conclusive row passed. A row's ``passed`` means the
same, for the row: it did not fail (``status`` ``"passed"``, ``"inconclusive"`` or
``"skipped"``), so a result passed exactly when every row did, and filtering rows (or the
gradcheck script's CSV/JSON records) on ``passed`` false finds the failures and nothing else;
``status`` says whether a row that did not fail agreed or could not be judged. ``note`` says why
a row is inconclusive, skipped or failed.

The relative error of two arrays is ``||a - b|| / max(||a||, ||b||, tiny)`` and their cosine is
``<a, b> / (||a|| ||b||)`` (1 when both are zero). A leaf whose true gradient is zero (a
convolution's bias before batch norm in training mode: the normalization removes every constant)
comes out of both computations as rounding noise, whose relative error is ~1: such a row passes
when ``||a - b|| <= rtol * ||G||``, ``G`` the whole gradient it belongs to (the layer's, or the
network's for a total row), with a note; an error that large relative to the whole gradient
still fails.

The rows and the result (``STATUSES``, ``GradCheckWarning``, ``default_tolerances``,
``GradCheckRow``, ``GradCheckResult``) are defined in ``bpjax._gradcheck_rows`` and re-exported
here; the comparisons and the finite-difference witness are defined here.
"""

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bpjax._errors import first_line
from bpjax._gradcheck_rows import (
    STATUSES,  # noqa: F401  (re-exported)
    GradCheckResult,  # noqa: F401  (re-exported: used by bpjax.grad)
    GradCheckRow,
    GradCheckWarning,  # noqa: F401  (re-exported: used by bpjax.grad)
    default_tolerances,
)
from bpjax._trees import path_name

_TINY = 1e-30


def _leaf_name(path: tuple) -> str:
    return path_name(path) or "value"


def _dtype_rtol(dtype: Any, rtol: float) -> float:
    """``rtol``, loosened to ``dtype``'s own where an array is stored in lower precision (a
    bfloat16 input's ``dx`` is rounded to bfloat16 by the manual backward and jax.vjp alike)."""
    if jnp.issubdtype(dtype, jnp.floating):
        return max(rtol, default_tolerances(dtype)["rtol"])
    return rtol


def compare(
    check: str,
    layer: int | None,
    layer_name: str,
    leaf: str,
    a: Any,
    b: Any,
    tol: float,
    scale: float = 0.0,
) -> GradCheckRow:
    """Compares two arrays: passed when both are finite and their relative error is <= tol, or
    their difference is <= tol * ``scale`` (the norm of the whole gradient the leaf belongs to:
    both are zero to rounding)."""
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a64.shape != b64.shape:  # a wrong backward, not a crash of the check
        nan = math.nan
        note = f"shape {a64.shape}, but the reference's is {b64.shape}"
        return GradCheckRow(
            check, layer, layer_name, leaf, a64.shape, nan, nan, nan, tol, "failed", note
        )
    max_abs = float(np.max(np.abs(a64 - b64))) if a64.size else 0.0
    norm_a, norm_b = float(np.linalg.norm(a64)), float(np.linalg.norm(b64))
    err = float(np.linalg.norm(a64 - b64))
    rel = err / max(norm_a, norm_b, _TINY)
    cos = 1.0 if norm_a == norm_b == 0 else float(np.vdot(a64, b64)) / max(norm_a * norm_b, _TINY)
    finite = bool(np.all(np.isfinite(a64)) and np.all(np.isfinite(b64)))
    status, note = ("passed", "") if finite and rel <= tol else ("failed", "")
    if not finite:
        note = "non-finite values"
    elif status == "failed" and err <= tol * scale:
        status = "passed"
        note = (
            f"zero to rounding: ||a - b|| = {err:.1e} <= rtol * ||whole gradient|| = "
            f"{tol * scale:.1e} (this leaf's gradient cancels, e.g. a bias before batch norm)"
        )
    return GradCheckRow(
        check, layer, layer_name, leaf, a64.shape, max_abs, rel, cos, tol, status, note
    )


def raised_row(check: str, layer: int | None, layer_name: str, error: Exception, tol: float):
    """A failed row for a hand-written backward that raised instead of returning gradients."""
    note = f"the hand-written backward raised {type(error).__name__}: {first_line(error)}"
    nan = math.nan
    return GradCheckRow(check, layer, layer_name, "all", (), nan, nan, nan, tol, "failed", note)


def shapes_match(a: Any, b: Any) -> bool:
    """Whether two trees have the same structure and leaf shapes."""
    leaves_a, tree_a = jax.tree_util.tree_flatten(a)
    leaves_b, tree_b = jax.tree_util.tree_flatten(b)
    return tree_a == tree_b and all(np.shape(x) == np.shape(y) for x, y in zip(leaves_a, leaves_b))


def tree_norm(*trees: Any) -> float:
    """The largest of the trees' norms (over all their floating-point leaves): the scale a
    leaf's error is measured against when its own gradient cancels to rounding noise."""
    norms = [0.0]
    for tree in trees:
        leaves = [
            np.asarray(leaf, np.float64)
            for leaf in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
        ]
        total = math.sqrt(sum(float(np.sum(leaf * leaf)) for leaf in leaves))
        norms.append(total if math.isfinite(total) else 0.0)
    return max(norms)


def compare_trees(
    check: str,
    layer: int | None,
    layer_name: str,
    a: Any,
    b: Any,
    tol: float,
    scale: float = 0.0,
) -> list[GradCheckRow]:
    """One row per leaf of two gradient trees of the same structure (``scale``: see
    ``compare``)."""
    paths_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
    leaves_b, tree_b = jax.tree_util.tree_flatten(b)
    if tree_a != tree_b:
        raise ValueError(f"{layer_name}: gradient tree {tree_a} does not match {tree_b}")
    return [
        compare(check, layer, layer_name, _leaf_name(path), leaf_a, leaf_b, tol, scale)
        for (path, leaf_a), leaf_b in zip(paths_a, leaves_b)
    ]


def compare_inputs(
    layer: int | None,
    layer_name: str,
    x: Any,
    dx: Any,
    dx_ref: Any,
    tol: float,
    scale: float = 0.0,
) -> list[GradCheckRow]:
    """Rows for a layer's ``dx`` (``"dx"``, or ``"dx/0"``, ``"dx/1"``, ... for a tuple input).

    An input leaf that is not floating point (uint8, int32, bool) has no gradient: jax.vjp
    gives it a ``float0`` cotangent and the manual ``dx`` there means nothing, so its row is
    ``"skipped"``. A low-precision input's ``dx`` is compared at that dtype's tolerance.
    """
    paths, tree_x = jax.tree_util.tree_flatten_with_path(x)
    tree_dx, tree_ref = jax.tree_util.tree_structure(dx), jax.tree_util.tree_structure(dx_ref)
    if not tree_x == tree_dx == tree_ref:
        raise ValueError(
            f"{layer_name}: dx has structure {tree_dx}, jax.vjp's {tree_ref}; the input {tree_x}"
        )
    rows = []
    for (path, x_leaf), d, d_ref in zip(
        paths, jax.tree_util.tree_leaves(dx), jax.tree_util.tree_leaves(dx_ref)
    ):
        leaf = "/".join(["dx", _leaf_name(path)]) if path else "dx"
        dtype = jnp.result_type(x_leaf)
        if not jnp.issubdtype(dtype, jnp.inexact):
            note = f"{jnp.dtype(dtype).name} input: no gradient (jax.vjp gives float0)"
            errors = (math.nan, math.nan, math.nan)
            shape = np.shape(x_leaf)
            rows.append(
                GradCheckRow("layer", layer, layer_name, leaf, shape, *errors, tol, "skipped", note)
            )
            continue
        rows.append(
            compare("layer", layer, layer_name, leaf, d, d_ref, _dtype_rtol(dtype, tol), scale)
        )
    return rows


# --------------------------------------------------------------------------------------------
# the finite-difference witness


def finite_difference_row(
    objective: Callable, params: Any, grads: Any, *, eps: float, fd_rtol: float, seed: int
) -> GradCheckRow:
    """Compares ``D = <grads, v>`` with ``C = (L(p + eps v) - L(p - eps v)) / 2 eps``.

    ``v`` is a random unit direction over all parameter leaves (drawn from ``seed``). The params
    are cast to the widest float available (float64 with ``jax_enable_x64``, else float32: a
    float32 difference at eps = 1e-3 rounds to ~1e-4 |L|, a bfloat16 one is noise), so ``D`` of
    a low-precision gradient is judged against the derivative of the same network in high
    precision. The row passes when
    ``|C - D| <= fd_rtol * max(|C|, |D|) + 10 * machine_eps * |L| / eps`` (the last term: the
    rounding error of ``C``, ``machine_eps`` that of the loss's dtype).

    When they disagree, the step is tested for a kink before the row is called failed. Along
    the line ``f(t) = L(p + t v)``, ``C`` is exactly the mean of ``f'`` over ``[-eps, eps]``.
    Two quadratures of that mean from the slopes ``f'(t)`` by ``jax.jvp`` (of the forward pass,
    not the manual backward) at ``t = 0, +-eps/2, +-eps``: Simpson's rule ``S3 = (f'(-eps) +
    4 f'(0) + f'(eps)) / 6`` and the composite rule ``S5 = (f'(-eps) + 4 f'(-eps/2) + 2 f'(0) +
    4 f'(eps/2) + f'(eps)) / 12`` equal it up to ``eps^4 f^(5) / 180`` where ``f`` is smooth,
    but not across a jump of ``f'``. So ``roughness = max(|C - S3|, |C - S5|)`` measures how far
    ``f`` is from smooth on the step, whatever layer makes the kink. The row is
    ``"inconclusive"`` if the roughness exceeds a sixth of the disagreement ``|C - D|`` (its
    note says "or at its rounding limit" when the roughness is within ``C``'s rounding
    allowance: then noise could explain both); otherwise ``f`` is smooth on the step and the
    row fails.

    Why two rules and a sixth: for one kink at ``s * eps`` (``|s| < 1``) and a correct
    ``D = f'(0)``, the roughness is at least a third of the disagreement (the least at
    ``|s| = 3/4``; two thirds at ``s = 0``). Each rule alone is blind where its weights happen
    to match the kink's place (``|s| = 2/3`` for ``S3``; ``1/6`` and ``5/6`` for ``S5``) and
    the other sees it there; a sixth keeps a factor of two below the guarantee, for several
    kinks and for curvature. A wrong gradient where the loss is smooth disagrees by far more
    than ``f`` departs from smooth (``eps^4`` and rounding), so it fails; a kink outside the
    step is never looked at. The test trusts ``jax.jvp`` of the forward pass, as the layer and
    total rows trust ``jax.vjp`` and ``jax.grad``.

    Args:
      objective: ``params -> L``, a scalar (the network and loss at fixed inputs).
      params: where to differentiate (floating-point leaves).
      grads: the manual gradient at ``params`` (same tree).
      eps: the step; fd_rtol: the relative tolerance; seed: seed of ``v``.

    Returns:
      The ``"fd"`` row: passed, failed or inconclusive, with a note unless passed.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    # The widest float there is: float64 where enabled (a float32 difference quotient at
    # eps = 1e-3 rounds to ~1e-4 |L|, too coarse to judge small slopes), else float32.
    fd_dtype = jax.dtypes.canonicalize_dtype(jnp.float64)
    # Drawn with numpy: jax.random would compile a sampler for every new parameter shape.
    rng = np.random.default_rng(seed)
    direction = [rng.standard_normal(np.shape(leaf)) for leaf in leaves]
    norm = math.sqrt(sum(float(np.sum(np.square(d))) for d in direction))
    direction = [jnp.asarray(d / norm, fd_dtype) for d in direction]

    def at(step: float) -> Any:
        return jax.tree_util.tree_unflatten(
            treedef, [leaf.astype(fd_dtype) + step * d for leaf, d in zip(leaves, direction)]
        )

    value_array = objective(at(0.0))
    value = float(value_array)
    central = (float(objective(at(eps))) - float(objective(at(-eps)))) / (2 * eps)
    directional = sum(
        float(np.vdot(np.asarray(g, np.float64), np.asarray(d, np.float64)))
        for g, d in zip(jax.tree_util.tree_leaves(grads), direction)
    )
    # The loss's own precision: a network that computes in a narrower dtype rounds to it.
    machine_eps = float(jnp.finfo(jnp.result_type(value_array)).eps)
    abs_err = abs(central - directional)
    scale = max(abs(central), abs(directional))
    rel = abs_err / max(scale, _TINY)

    def row(status: str, note: str = "") -> GradCheckRow:
        return GradCheckRow(
            "fd", None, "network", "directional", (), abs_err, rel, math.nan, fd_rtol, status, note
        )

    if not (math.isfinite(central) and math.isfinite(directional)):
        return row("failed", f"non-finite: central difference {central}, <g, v> {directional}")
    if abs_err <= fd_rtol * scale + 10 * machine_eps * abs(value) / eps:
        return row("passed")

    tangent = jax.tree_util.tree_unflatten(treedef, direction)

    def slope(step: float) -> float:
        """``f'(step)``: forward-mode autodiff of the objective along ``v``."""
        return float(jax.jvp(objective, (at(step),), (tangent,))[1])

    slopes = {t: slope(t) for t in (-eps, -eps / 2, 0.0, eps / 2, eps)}
    simpson = (slopes[-eps] + 4 * slopes[0.0] + slopes[eps]) / 6
    composite = (
        slopes[-eps] + 4 * slopes[-eps / 2] + 2 * slopes[0.0] + 4 * slopes[eps / 2] + slopes[eps]
    ) / 12
    roughness = max(abs(central - simpson), abs(central - composite))
    if not math.isfinite(roughness) or roughness > abs_err / 6:
        rounding = 10 * machine_eps * abs(value) / eps
        reason = (
            "the loss is not smooth within the step (a kink: ReLU at 0, a max over ties, ...)"
            if roughness > rounding
            else f"the loss is not smooth within the step, or the difference is at its "
            f"rounding limit ({rounding:.1e})"
        )
        return row(
            "inconclusive",
            f"{reason}: on [-{eps:g}, {eps:g}] the central difference {central:.6e} differs "
            f"from the quadratures of jax.jvp's slopes ({simpson:.6e}, {composite:.6e}); a "
            f"difference across a kink is no derivative, so it cannot judge <g, v> = "
            f"{directional:.6e}; the layer and total rows decide",
        )
    return row(
        "failed",
        f"the loss is smooth on the step (the quadratures of jax.jvp's slopes match the "
        f"central difference {central:.6e}), yet <g, v> = {directional:.6e}",
    )
