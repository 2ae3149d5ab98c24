"""Compiling once and timing: variants sampled in interleaved rounds, paired ratios."""

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax

from .measure import cost_stats, hlo_summary, memory_stats


def compile_timed(fn: Callable, *args: Any, **static: Any) -> tuple[Any, dict[str, Any]]:
    """``jax.jit(fn).lower(*args).compile()``; returns it with its times, memory, HLO and cost.

    An already jitted ``fn`` (one with ``lower``, e.g. ``make_chunk``'s) is lowered as it is,
    with its static keyword arguments ``static``; the executable then takes ``args`` only.
    """
    start = time.perf_counter()
    lowered = (fn if hasattr(fn, "lower") else jax.jit(fn)).lower(*args, **static)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    info = {
        "lower_s": lowered_at - start,
        "compile_s": done - lowered_at,
        "memory": memory_stats(compiled),
        "hlo": hlo_summary(compiled.as_text()),
        "cost": cost_stats(compiled),
    }
    return compiled, info


class Variant:
    """One timed variant: ``call(carry) -> carry`` runs once (asynchronously); calls are chained.

    ``block > 0`` calibrates how many calls make one sample (about ``block`` seconds); ``block ==
    0`` makes every sample a single call (whole epochs). Samples are seconds per call, wall
    (``samples``) and CPU (``cpu_samples``).
    """

    def __init__(self, call: Callable, carry: Any, *, warmup: int, block: float):
        self.call, self.carry = call, carry
        for _ in range(warmup):
            self._run(1)
        self.n = 1
        if block > 0:  # the fastest of a few calls: a burst of noise must not shrink a sample
            single = min(self._run(1)[0] for _ in range(5))
            self.n = max(1, round(block / max(single, 1e-9)))
        self.samples: list[float] = []
        self.cpu_samples: list[float] = []

    def _run(self, n: int) -> tuple[float, float]:
        carry = self.carry
        jax.block_until_ready(carry)
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(n):
            carry = self.call(carry)
        jax.block_until_ready(carry)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        self.carry = carry
        return wall / n, cpu / n

    def sample(self) -> None:
        wall, cpu = self._run(self.n)
        self.samples.append(wall)
        self.cpu_samples.append(cpu)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu_samples)


def round_robin(groups: list[list[Variant]], repeats: int) -> None:
    """Samples every variant once per round, groups in a fixed order, members of each group in
    reversed order every other round.

    A grid point's steps are one group (manual, autodiff, and the A/A control): manual and the
    control swap ends every round, so they see the same neighbours equally often, and the
    control's ratio to autodiff shows how much the position alone moves a ratio. (Reversing the
    whole sequence instead made one mode always follow a variant of its own grid point and the
    other, half the time, a different point's: a bias of 2-5% for small steps.)
    """
    for r in range(repeats):
        flip = r % 2 == 1
        for group in groups:
            for variant in group[::-1] if flip else group:
                variant.sample()


def ms(seconds: float) -> float:
    return 1e3 * seconds


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def paired(a: Variant, b: Variant) -> float:
    """Median of per-round ratios of ``a`` to ``b`` (wall time)."""
    return statistics.median(x / y for x, y in zip(a.samples, b.samples))


def equalize_calls(variants: list[Variant]) -> None:
    """Gives ``variants`` the same number of calls per sample (the most any calibrated), so
    that per-sample overheads match between the variants a ratio compares."""
    calls = max(v.n for v in variants)
    for v in variants:
        v.n = calls


def ratios(a: Variant, b: Variant, name: str) -> dict[str, float | None]:
    """``a`` against ``b`` three ways: ``name`` (median over median, wall), ``name_paired``
    (median of per-round ratios) and ``name_cpu`` (CPU-time medians)."""
    return {
        name: ratio(a.median, b.median),
        f"{name}_paired": paired(a, b),
        f"{name}_cpu": ratio(a.cpu_median, b.cpu_median),
    }
