"""``bpjax.grad.check_grads``' rows and result: the statuses, ``GradCheckWarning``,
``default_tolerances``, ``GradCheckRow`` and ``GradCheckResult`` with its table (re-exported by
``bpjax._gradcheck``, whose docstring states what a status means, and by ``bpjax.grad``). Their
``__module__`` is ``bpjax._gradcheck``, where they were defined: pickles refer to them there."""

import dataclasses
import math
from typing import Any

import jax.numpy as jnp

STATUSES = ("passed", "failed", "inconclusive", "skipped")
_SHOWN = {"passed": "ok", "failed": "FAIL", "inconclusive": "INCONCLUSIVE", "skipped": "skipped"}


class GradCheckWarning(UserWarning):
    """Gradient checking at a precision too low for tight agreement (e.g. float32)."""


def default_tolerances(dtype: Any) -> dict[str, float]:
    """Relative tolerances and finite-difference step for gradient checks in ``dtype``.

    ``rtol`` bounds manual-vs-autodiff relative error; ``fd_rtol`` bounds the finite-difference
    witness, whose own truncation (~eps^2) and rounding (~machine_eps/eps) errors are larger, and
    which also judges a gradient that was rounded to ``dtype``. The float32 step is small (1e-3)
    so the difference rarely straddles a ReLU kink; the rounding allowance in the check covers
    the larger rounding error (the difference itself runs in float64 where jax_enable_x64 is
    on). Where a kink does fall within the step, the finite-difference row is reported
    inconclusive, not failed (``finite_difference_row``). That kink test has no threshold of
    its own per dtype: it compares the loss's departure from smoothness over the step with the
    disagreement it would have to explain (a sixth of it), so it scales with whatever the
    dtype's ``fd_rtol`` and rounding allowance let through.

    Raises:
      ValueError: ``dtype`` is not a floating-point dtype.
    """
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float64:
        return {"rtol": 1e-10, "fd_rtol": 1e-6, "eps": 1e-6}
    if dtype == jnp.float32:
        return {"rtol": 1e-4, "fd_rtol": 3e-2, "eps": 1e-3}
    if dtype == jnp.float16:
        return {"rtol": 1e-2, "fd_rtol": 3e-1, "eps": 1e-1}
    if dtype == jnp.bfloat16:
        return {"rtol": 5e-2, "fd_rtol": 3e-1, "eps": 1e-1}
    raise ValueError(f"gradient checks need floating-point params, got {dtype}")


@dataclasses.dataclass(frozen=True)
class GradCheckRow:
    """One comparison of a hand-written gradient with its reference.

    ``check`` is ``"loss"`` (loss backward vs jax.grad of the loss), ``"layer"`` (a layer's
    backward vs jax.vjp of that layer's forward, same upstream gradient), ``"total"`` (the
    whole manual gradient vs jax.grad) or ``"fd"`` (directional derivative vs a central finite
    difference; ``max_abs_err`` is then |fd - <g, v>| and ``cosine`` is NaN). ``status`` is one
    of ``STATUSES`` (see the module docstring) and ``note`` says why, where there is a why;
    a skipped row's errors are NaN.
    """

    check: str
    layer: int | None
    layer_name: str
    leaf: str
    shape: tuple[int, ...]
    max_abs_err: float
    rel_err: float
    cosine: float
    tol: float
    status: str
    note: str = ""

    @property
    def passed(self) -> bool:
        """The row did not fail: its comparison agreed, or could not be made or judged
        (``status`` ``"skipped"`` or ``"inconclusive"``), as ``GradCheckResult.passed`` means
        for the whole result. ``status == "passed"`` is the comparison agreed."""
        return self.status != "failed"

    @property
    def failed(self) -> bool:
        return self.status == "failed"


@dataclasses.dataclass(frozen=True)
class GradCheckResult:
    """The outcome of ``check_grads``: rows in backward-pass order, then totals, then FD."""

    rows: tuple[GradCheckRow, ...]
    dtype: str
    rtol: float
    fd_rtol: float
    eps: float
    value: float

    @property
    def passed(self) -> bool:
        """No row failed (every row's ``passed``): every conclusive comparison agreed."""
        return not self.failures

    @property
    def failures(self) -> tuple[GradCheckRow, ...]:
        return tuple(row for row in self.rows if row.failed)

    @property
    def inconclusive(self) -> tuple[GradCheckRow, ...]:
        return tuple(row for row in self.rows if row.status == "inconclusive")

    @property
    def skipped(self) -> tuple[GradCheckRow, ...]:
        return tuple(row for row in self.rows if row.status == "skipped")

    @property
    def first_failure(self) -> GradCheckRow | None:
        """The first failing row in backward-pass order: where the backward first goes wrong."""
        return next(iter(self.failures), None)

    def to_records(self) -> list[dict[str, Any]]:
        """Rows as plain dicts (for CSV/JSON), with ``passed`` (the row did not fail: false
        for failures only; ``status`` tells an agreement from a skipped or inconclusive row)."""
        return [
            {
                **dataclasses.asdict(row),
                "shape": "x".join(map(str, row.shape)) or "scalar",
                "passed": row.passed,
            }
            for row in self.rows
        ]

    def raise_if_failed(self) -> "GradCheckResult":
        if not self.passed:
            raise AssertionError(str(self))
        return self

    def __str__(self) -> str:
        header = ("check", "layer", "leaf", "shape", "max_abs_err", "rel_err", "cosine", "status")
        lines = [header]
        for r in self.rows:
            lines.append(
                (
                    r.check,
                    _layer_column(r),
                    r.leaf,
                    "x".join(map(str, r.shape)) or "()",
                    "-" if math.isnan(r.max_abs_err) else f"{r.max_abs_err:.2e}",
                    "-" if math.isnan(r.rel_err) else f"{r.rel_err:.2e}",
                    "-" if math.isnan(r.cosine) else f"{r.cosine:.8f}",
                    _SHOWN[r.status],
                )
            )
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        text = "\n".join(
            "  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines
        )
        notes = [
            f"  {r.check} {_layer_column(r)} {r.leaf}: {_SHOWN[r.status]}: {r.note}"
            for r in self.rows
            if r.note
        ]
        if notes:
            text += "\nnotes:\n" + "\n".join(notes)
        n_conclusive = sum(r.status in ("passed", "failed") for r in self.rows)
        others = []
        if self.inconclusive:
            others.append(f"{len(self.inconclusive)} inconclusive")
        if self.skipped:
            others.append(f"{len(self.skipped)} skipped")
        aside = f" ({', '.join(others)}: see the notes)" if others else ""
        first = self.first_failure
        if first is None:
            verdict = f"PASSED: {n_conclusive} of {n_conclusive} conclusive checks{aside}"
        else:
            verdict = (
                f"FAILED: {len(self.failures)} of {n_conclusive} conclusive checks{aside}; the "
                f"backward first goes wrong at {_where(first)} ({first.layer_name}, "
                f"{first.check} check of {first.leaf})"
            )
        return (
            f"gradient check ({self.dtype}, rtol={self.rtol:g}, fd_rtol={self.fd_rtol:g}, "
            f"eps={self.eps:g}, loss={self.value:.6g})\n{text}\n{verdict}"
        )


def _layer_column(row: GradCheckRow) -> str:
    return row.layer_name if row.layer is None else f"{row.layer}:{row.layer_name}"


def _where(row: GradCheckRow) -> str:
    return row.layer_name if row.layer is None else f"layer {row.layer}"


for _public in (GradCheckWarning, default_tolerances, GradCheckRow, GradCheckResult):
    _public.__module__ = "bpjax._gradcheck"  # re-exported there, their home before the split
del _public
