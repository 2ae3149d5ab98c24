"""Self-contained parts of ``bpjax.trainer.fit``'s epochs (``bpjax._fit_loop``): a resumed
epoch's chunks, an epoch's per-step metrics, the monitor's ranking and the evaluation of a
split."""

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from bpjax import distributed


def _plan_from(plan: tuple[tuple[int, int], ...], done: int) -> list[tuple[int, int]]:
    """The chunks of ``plan`` after the first ``done`` steps (a resumed epoch), starting with the
    rest of a chunk when ``done`` falls inside one (a plan made with another chunk size)."""
    rest = []
    for start, length in plan:
        if start + length <= done:
            continue
        if start < done:
            rest.append((done, start + length - done))
        else:
            rest.append((start, length))
    return rest


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-step metrics of an epoch's chunks, joined (empty arrays for a resumed epoch whose
    steps were all done before the interrupt)."""
    if not parts:
        return {"loss": np.zeros((0,), np.float32)}
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _last_measured(step_metrics: dict[str, np.ndarray], prefix: str) -> dict[str, float]:
    """The last finite value of each per-step metric named ``prefix...`` (NaN where the step
    measured nothing)."""
    last = {}
    for name, values in step_metrics.items():
        finite = np.flatnonzero(np.isfinite(values))
        if name.startswith(prefix) and finite.size:
            last[name] = float(values[finite[-1]])
    return last


def _is_better(value: float, best: float | None, mode: str) -> bool:
    if not math.isfinite(value):
        return False
    return best is None or (value < best if mode == "min" else value > best)


def _split_evaluator(evaluate: Callable, eval_inputs: dict[str, Any]) -> Callable:
    """``run_eval(params, net_state, split)``: ``split``'s metrics, ``{split}_{metric}``."""

    def run_eval(params, net_state, split):
        # Process 0's values everywhere, for the decisions taken from them (early stopping).
        metrics, _ = distributed.agree(
            distributed.host_copy(evaluate(params, *eval_inputs[split], net_state))
        )
        return {f"{split}_{k}": float(v) for k, v in metrics.items()}

    return run_eval
