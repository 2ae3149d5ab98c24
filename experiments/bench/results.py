"""Per-point step results: each path's times, ratios, A/A control, memory, HLO and cost."""

from typing import Any

import jax
import numpy as np

from .measure import COST_FIELDS, step_flops
from .paths import carry_params
from .points import MODES, Point
from .timing import Variant, ms, ratio, ratios


def finite(tree: Any) -> bool:
    """Whether every leaf of ``tree`` is finite (a timed run that diverged is not a timing)."""
    return all(bool(np.all(np.isfinite(leaf))) for leaf in jax.tree_util.tree_leaves(tree))


def variant_stats(v: Variant, info: dict[str, Any]) -> dict[str, Any]:
    """A timed step's figures: medians (wall and CPU ms), samples, compile, memory, HLO, cost.

    ``xla_gflops`` is XLA's cost-analysis flops (every floating-point op) per second of wall
    time, which any network has; the matmul GFLOP/s of an MLP point are separate.
    """
    flops = info["cost"]["flops"]
    return {
        "step_ms": ms(v.median),
        "step_cpu_ms": ms(v.cpu_median),
        "step_ms_samples": [ms(s) for s in v.samples],
        "step_cpu_ms_samples": [ms(s) for s in v.cpu_samples],
        "calls_per_sample": v.n,
        "xla_gflops": None if flops is None else flops / v.median / 1e9,
        "lower_s": info["lower_s"],
        "compile_s": info["compile_s"],
        "memory": info["memory"],
        "peak_bytes": info["memory"]["peak_bytes"],
        "hlo": info["hlo"],
        "cost": info["cost"],
    }


def epoch_stats(v: Variant, info: dict[str, Any]) -> dict[str, Any]:
    """A timed epoch's figures: medians (wall and CPU s), samples, compile time and memory."""
    return {
        "epoch_s": v.median,
        "epoch_cpu_s": v.cpu_median,
        "epoch_s_samples": list(v.samples),
        "lower_s": info["lower_s"],
        "compile_s": info["compile_s"],
        "memory": info["memory"],
        "peak_bytes": info["memory"]["peak_bytes"],
    }


def control_ratios(variants: dict[str, Variant], reference: str) -> dict[str, float | None]:
    """The A/A control's ratios to ``reference`` (the same executable compiled twice: how far
    from 1 a ratio strays when there is nothing to find); None without a control."""
    if "control" not in variants:
        return {"control_ratio": None, "control_ratio_paired": None, "control_ratio_cpu": None}
    return ratios(variants["control"], variants[reference], "control_ratio")


_MATMUL_FIELDS = (
    "gflops",
    "fraction_of_matmul_peak",
    "fraction_of_matmul_peak_cpu",
    "fraction_of_matmul_only",
)


def _matmul_figures(v: Variant, flops: int, peak: dict[str, float], only_gflops: float):
    gflops = flops / v.median / 1e9
    return {
        "gflops": gflops,
        "fraction_of_matmul_peak": gflops / peak["gflops"],
        "fraction_of_matmul_peak_cpu": (flops / v.cpu_median / 1e9) / peak["gflops_cpu"],
        "fraction_of_matmul_only": gflops / only_gflops,
    }


def path_results(
    timed: dict[str, Any],
    flops: int | None,
    peak: dict[str, float],
    only_gflops: float | None,
) -> dict[str, Any]:
    """One path's figures per mode and its manual/autodiff ratios (``step_ratio``,
    ``_paired``, ``_cpu``), A/A control, memory and cost ratios.

    ``flops`` (an MLP's matmul FLOPs; None for a model point) adds GFLOP/s and fractions of the
    matmul peak and of the point's matmuls alone; a model point reports None there.
    """
    variants, info = timed["variants"], timed["info"]
    modes = {}
    for mode in MODES:
        v = variants[mode]
        matmul = dict.fromkeys(_MATMUL_FIELDS)
        if flops is not None:
            matmul = _matmul_figures(v, flops, peak, only_gflops)
        modes[mode] = {
            **variant_stats(v, info[mode]),
            **matmul,
            "params_finite": finite(carry_params(v.carry)),
        }
    manual, autodiff = modes["manual"], modes["autodiff"]
    return {
        "modes": modes,
        **ratios(variants["manual"], variants["autodiff"], "step_ratio"),
        **control_ratios(variants, "autodiff"),
        "memory_ratio": ratio(manual["peak_bytes"], autodiff["peak_bytes"]),
        "same_dots": manual["hlo"]["dots"] == autodiff["hlo"]["dots"],
        "cost_ratio": {
            name: ratio(manual["cost"][name], autodiff["cost"][name]) for name in COST_FIELDS
        },
    }


def step_results(point: Point, built: dict[str, Any], peak: dict[str, float]) -> dict[str, Any]:
    """A point's step figures: its description, ``make_step``'s figures at the top level (as
    before the other paths existed), every path's under ``paths``, the matmul-only reference
    (MLP; None for a model point)."""
    spec = point.spec
    flops = step_flops(spec["features"], point.batch) if point.is_mlp else None
    only, only_gflops = None, None
    if built["matmul_only"] is not None:
        variant, info = built["matmul_only"]
        only_gflops = flops / variant.median / 1e9
        only = {
            "ms": ms(variant.median),
            "gflops": only_gflops,
            "fraction_of_matmul_peak": only_gflops / peak["gflops"],
            "compile_s": info["compile_s"],
        }
    paths = {
        path: path_results(timed, flops, peak, only_gflops)
        for path, timed in built["paths"].items()
    }
    described = (
        {"features": list(spec["features"]), "batch": point.batch}
        if point.is_mlp
        else {
            "model": spec["model"],
            "input_shape": list(point.example_shape),
            "batch": point.batch,
        }
    )
    return {
        "kind": "mlp" if point.is_mlp else "model",
        **described,
        "activation": spec.get("activation"),
        "flops_per_step": flops,
        **paths["make_step"],
        "matmul_only": only,
        "paths": paths,
    }
