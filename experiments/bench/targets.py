"""Targets: each a measured value, a threshold and whether it is met (reported, never asserted).

Ratios are judged by the estimator ``targets.ratio`` names (``paired`` by default; see the
method in benchmark.py). Every ratio target also reports ``noise``: how far the A/A control
strayed from 1 at the judged point, by the same estimator (for a median over points, the largest
such deviation among them). A difference within it is not resolved by the run. Only
``chunked_epoch_ratio_max`` counts it in ``met`` (its target is "no measurable slowdown":
measured <= threshold + noise; ``within_noise: true``).

Families of points: MLP points (``features``) keep the targets' original names; points given by
a ``model:`` node (the grid's CNNs) have their own, prefixed ``cnn_``. Paths other than
``make_step`` are prefixed by their name.
"""

import statistics
from typing import Any

from omegaconf import DictConfig

# Which ratio the targets judge (``targets.ratio``): the key suffix per estimator.
ESTIMATORS = {"paired": "_paired", "medians": "", "cpu": "_cpu"}


def target(measured: Any, threshold: float, met: bool, **where: Any) -> dict[str, Any]:
    return {**where, "measured": measured, "threshold": threshold, "met": bool(met)}


def reachable(ceiling: float | None, minimum: float) -> dict[str, Any]:
    """A target's ``ceiling``, what this device reached in the same run doing only the work no
    step can skip, and whether that clears the target's ``minimum`` (``None``: not measured)."""
    return {"ceiling": ceiling, "reachable": None if ceiling is None else ceiling >= minimum}


def deviation(control: float | None) -> float | None:
    """How far an A/A ratio is from 1 (None without a control)."""
    return None if control is None else abs(control - 1)


def _largest(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return max(known) if len(known) == len(values) and known else None


def ratio_targets(
    name: str,
    values: dict[str, tuple[float, float | None]],
    median_max: float | None,
    worst_max: float,
    estimator: str,
) -> dict[str, Any]:
    """``{name}_median`` (if ``median_max`` is given) and ``{name}_max`` of ``values``: per
    point, a ratio and its A/A control's ratio."""
    ratios = {point: value for point, (value, _) in values.items()}
    noise = {point: deviation(control) for point, (_, control) in values.items()}
    out = {}
    if median_max is not None:
        median = statistics.median(ratios.values())
        out[f"{name}_median"] = target(
            median,
            median_max,
            median <= median_max,
            estimator=estimator,
            noise=_largest(list(noise.values())),
        )
    worst = max(ratios, key=ratios.get)
    out[f"{name}_max"] = target(
        ratios[worst],
        worst_max,
        ratios[worst] <= worst_max,
        point=worst,
        estimator=estimator,
        noise=noise[worst],
    )
    return out


def _memory(name: str, values: dict[str, float | None]) -> dict[str, Any]:
    known = {point: m for point, m in values.items() if m is not None}
    worst = max(known, key=known.get) if known else None
    return {name: target(known.get(worst), 1.0, bool(known) and known[worst] <= 1.0, point=worst)}


def _step_targets(cfg: DictConfig, points: dict[str, Any], suffix: str) -> dict[str, Any]:
    """Per family and path: the step ratio's median and worst point; peak memory."""
    t, out = cfg.targets, {}
    families = {
        "": [n for n, p in points.items() if p["kind"] == "mlp"],
        "cnn_": [n for n, p in points.items() if p["kind"] == "model"],
    }
    for family, names in families.items():
        if not names:
            continue
        for path in points[names[0]]["paths"]:
            if family:
                limits = (t.cnn_step_ratio_median, t.cnn_step_ratio_max)
            elif path == "make_step":
                limits = (t.step_ratio_median, t.step_ratio_max)
            else:
                limits = (t.path_step_ratio_median, t.path_step_ratio_max)
            timed = {n: points[n]["paths"][path] for n in names}
            values = {
                n: (p["step_ratio" + suffix], p["control_ratio" + suffix]) for n, p in timed.items()
            }
            label = family + ("" if path == "make_step" else f"{path}_") + "step_ratio"
            out.update(ratio_targets(label, values, *limits, t.ratio))
        memory = {
            (n if path == "make_step" else f"{n} ({path})"): p["memory_ratio"]
            for n in names
            for path, p in points[n]["paths"].items()
            if family or path == "make_step"  # the MLP target is make_step's, as it was
        }
        out.update(_memory(f"{family}peak_memory_ratio_max", memory))
    return out


def _epoch_targets(cfg: DictConfig, points: dict[str, Any], suffix: str) -> dict[str, Any]:
    """The MLP epoch point's scan ratio and loop speedup; the CNN points' worst scan ratio."""
    t, out = cfg.targets, {}
    epoch = (points.get(t.epoch_point) or {}).get("epoch")
    if epoch:
        ratio, speedup = epoch["scan_ratio" + suffix], epoch["loop_speedup_manual"]
        out["epoch_scan_ratio"] = target(
            ratio,
            t.epoch_scan_ratio_max,
            ratio <= t.epoch_scan_ratio_max,
            point=t.epoch_point,
            estimator=t.ratio,
            noise=deviation(epoch["scan_control_ratio" + suffix]),
        )
        out["loop_speedup"] = target(
            speedup,
            t.loop_speedup_min,
            speedup >= t.loop_speedup_min,
            point=t.epoch_point,
            **reachable(epoch["loop_speedup_ceiling_manual"], t.loop_speedup_min),
        )
    cnn = {
        n: (p["epoch"]["scan_ratio" + suffix], p["epoch"]["scan_control_ratio" + suffix])
        for n, p in points.items()
        if p["kind"] == "model" and p["epoch"]
    }
    if cnn:
        out.update(
            ratio_targets("cnn_epoch_scan_ratio", cnn, None, t.cnn_epoch_scan_ratio_max, t.ratio)
        )
    return out


def _training_targets(cfg: DictConfig, points: dict[str, Any], suffix: str) -> dict[str, Any]:
    """The rules' steps against manual, the alignment signal's cost, the chunked epoch."""
    t, out = cfg.targets, {}
    for section, ratio in (("rules", "step_ratio"), ("rule_epochs", "epoch_ratio")):
        ruled = {n: p[section] for n, p in points.items() if p.get(section)}
        for rule in next(iter(ruled.values()))["vs_manual"] if ruled else ():
            values = {
                n: (r["vs_manual"][rule][ratio + suffix], r["control_ratio" + suffix])
                for n, r in ruled.items()
            }
            out.update(
                ratio_targets(f"{rule}_{ratio}", values, None, t.rule_step_ratio_max, t.ratio)
            )
    for name, p in points.items():
        for mode, cost in ((p.get("grad_check") or {}).get("modes") or {}).items():
            measured = cost["cost_ratio" + suffix]
            out[f"grad_check_cost_{mode}"] = target(
                measured,
                t.grad_check_cost_max,
                measured <= t.grad_check_cost_max,
                point=name,
                estimator=t.ratio,
                noise=deviation(cost["control_ratio" + suffix]),
            )
    chunked = {n: p["chunked"] for n, p in points.items() if p.get("chunked")}
    if chunked:
        values = {
            n: (c["chunked_ratio" + suffix], c["control_ratio" + suffix])
            for n, c in chunked.items()
        }
        found = ratio_targets(
            "chunked_epoch_ratio", values, None, t.chunked_epoch_ratio_max, t.ratio
        )["chunked_epoch_ratio_max"]
        allowed = t.chunked_epoch_ratio_max + (found["noise"] or 0.0)
        out["chunked_epoch_ratio_max"] = {
            **found,
            "met": bool(found["measured"] <= allowed),
            "within_noise": True,
        }
    return out


def targets(cfg: DictConfig, points: dict[str, Any]) -> dict[str, Any]:
    """Every target that the run measured (a section not run has none): the steps per family
    and path, peak memory, the MLP matmul fraction, the epochs, the learning rules, the
    alignment signal and the chunked epoch."""
    t = cfg.targets
    suffix = ESTIMATORS[t.ratio]
    out = _step_targets(cfg, points, suffix)
    if t.matmul_fraction_point in points and points[t.matmul_fraction_point]["kind"] == "mlp":
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
    out.update(_epoch_targets(cfg, points, suffix))
    out.update(_training_targets(cfg, points, suffix))
    return out


def control_summary(points: dict[str, Any]) -> dict[str, Any] | None:
    """The spread of the ``make_step`` A/A control's paired ratios over the grid (None without
    a control)."""
    ratios = {n: p["control_ratio_paired"] for n, p in points.items()}
    if any(r is None for r in ratios.values()):
        return None
    return {
        "paired_min": min(ratios.values()),
        "paired_max": max(ratios.values()),
        "paired_median": statistics.median(ratios.values()),
        "max_abs_deviation": max(abs(r - 1) for r in ratios.values()),
    }
