"""Results: per-point step figures, the targets (reported, never asserted), the A/A summary."""

import statistics
from typing import Any

import jax
import numpy as np
from omegaconf import DictConfig

from .measure import COST_FIELDS, step_flops
from .points import MODES
from .timing import ms, paired, ratio


def step_results(point: dict, built: dict, peak: dict[str, float]) -> dict[str, Any]:
    variants, info = built["variants"], built["info"]
    flops = step_flops(point["features"], point["batch"])
    only = variants["matmul_only"]
    only_gflops = flops / only.median / 1e9
    modes = {}
    for mode in MODES:
        v = variants[mode]
        gflops = flops / v.median / 1e9
        modes[mode] = {
            "step_ms": ms(v.median),
            "step_cpu_ms": ms(v.cpu_median),
            "step_ms_samples": [ms(s) for s in v.samples],
            "step_cpu_ms_samples": [ms(s) for s in v.cpu_samples],
            "calls_per_sample": v.n,
            "gflops": gflops,
            "fraction_of_matmul_peak": gflops / peak["gflops"],
            "fraction_of_matmul_peak_cpu": (flops / v.cpu_median / 1e9) / peak["gflops_cpu"],
            "fraction_of_matmul_only": gflops / only_gflops,
            "lower_s": info[mode]["lower_s"],
            "compile_s": info[mode]["compile_s"],
            "memory": info[mode]["memory"],
            "peak_bytes": info[mode]["memory"]["peak_bytes"],
            "hlo": info[mode]["hlo"],
            "cost": info[mode]["cost"],
            "params_finite": all(
                bool(np.all(np.isfinite(leaf)))
                for leaf in jax.tree_util.tree_leaves(v.carry.params)
            ),
        }
    manual, autodiff = variants["manual"], variants["autodiff"]
    return {
        "features": list(point["features"]),
        "batch": point["batch"],
        "activation": point["activation"],
        "flops_per_step": flops,
        "modes": modes,
        "step_ratio": ratio(manual.median, autodiff.median),
        "step_ratio_paired": paired(manual, autodiff),
        "step_ratio_cpu": ratio(manual.cpu_median, autodiff.cpu_median),
        # The A/A control (autodiff against a second autodiff executable, timed the same way):
        # how far from 1 a ratio strays when there is nothing to find.
        "control_ratio_paired": paired(variants["control"], autodiff)
        if "control" in variants
        else None,
        "control_ratio_cpu": ratio(variants["control"].cpu_median, autodiff.cpu_median)
        if "control" in variants
        else None,
        "memory_ratio": ratio(modes["manual"]["peak_bytes"], modes["autodiff"]["peak_bytes"]),
        "same_dots": modes["manual"]["hlo"]["dots"] == modes["autodiff"]["hlo"]["dots"],
        "cost_ratio": {
            name: ratio(modes["manual"]["cost"][name], modes["autodiff"]["cost"][name])
            for name in COST_FIELDS
        },
        "matmul_only": {
            "ms": ms(only.median),
            "gflops": only_gflops,
            "fraction_of_matmul_peak": only_gflops / peak["gflops"],
            "compile_s": info["matmul_only"]["compile_s"],
        },
    }


def target(measured: Any, threshold: float, met: bool, **where: Any) -> dict[str, Any]:
    return {**where, "measured": measured, "threshold": threshold, "met": bool(met)}


def reachable(ceiling: float | None, minimum: float) -> dict[str, Any]:
    """A target's ``ceiling``, what this device reached in the same run doing only the work no
    step can skip, and whether that clears the target's ``minimum`` (``None``: not measured)."""
    return {"ceiling": ceiling, "reachable": None if ceiling is None else ceiling >= minimum}


# Which manual/autodiff ratio the targets judge (``targets.ratio``): the key suffix per estimator.
ESTIMATORS = {"paired": "_paired", "medians": "", "cpu": "_cpu"}


def targets(cfg: DictConfig, points: dict[str, Any]) -> dict[str, Any]:
    """Each target: measured value, threshold, met; manual/autodiff ratios by ``targets.ratio``."""
    t = cfg.targets
    suffix = ESTIMATORS[t.ratio]
    ratios = {name: p["step_ratio" + suffix] for name, p in points.items()}
    median = statistics.median(ratios.values())
    worst = max(ratios, key=ratios.get)
    out = {
        "step_ratio_median": target(
            median, t.step_ratio_median, median <= t.step_ratio_median, estimator=t.ratio
        ),
        "step_ratio_max": target(
            ratios[worst],
            t.step_ratio_max,
            ratios[worst] <= t.step_ratio_max,
            point=worst,
            estimator=t.ratio,
        ),
    }
    memory = {name: p["memory_ratio"] for name, p in points.items()}
    known = {name: m for name, m in memory.items() if m is not None}
    worst = max(known, key=known.get) if known else None
    out["peak_memory_ratio_max"] = target(
        known.get(worst), 1.0, bool(known) and known[worst] <= 1.0, point=worst
    )
    if t.matmul_fraction_point in points:
        modes = points[t.matmul_fraction_point]["modes"]
        fraction = modes["manual"]["fraction_of_matmul_peak"]
        only = points[t.matmul_fraction_point]["matmul_only"]["fraction_of_matmul_peak"]
        out["matmul_fraction"] = target(
            fraction,
            t.matmul_fraction_min,
            fraction >= t.matmul_fraction_min,
            point=t.matmul_fraction_point,
            **reachable(only, t.matmul_fraction_min),
        )
    epoch = (points.get(t.epoch_point) or {}).get("epoch")
    if epoch:
        ratio, speedup = epoch["scan_ratio" + suffix], epoch["loop_speedup_manual"]
        out["epoch_scan_ratio"] = target(
            ratio,
            t.epoch_scan_ratio_max,
            ratio <= t.epoch_scan_ratio_max,
            point=t.epoch_point,
            estimator=t.ratio,
        )
        out["loop_speedup"] = target(
            speedup,
            t.loop_speedup_min,
            speedup >= t.loop_speedup_min,
            point=t.epoch_point,
            **reachable(epoch["loop_speedup_ceiling_manual"], t.loop_speedup_min),
        )
    return out


def control_summary(points: dict[str, Any]) -> dict[str, Any] | None:
    """The spread of the A/A control's paired ratios over the grid (None without a control)."""
    ratios = {n: p["control_ratio_paired"] for n, p in points.items()}
    if any(r is None for r in ratios.values()):
        return None
    return {
        "paired_min": min(ratios.values()),
        "paired_max": max(ratios.values()),
        "paired_median": statistics.median(ratios.values()),
        "max_abs_deviation": max(abs(r - 1) for r in ratios.values()),
    }
