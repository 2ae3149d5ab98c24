"""The printed tables, and results made JSON-ready."""

import math
from typing import Any

import numpy as np

from .epochs import EPOCH_KINDS  # noqa: F401
from .measure import COST_FIELDS
from .points import MODES


def _columns(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def format_tables(result: dict[str, Any]) -> str:
    """The step table, the epoch table and the targets, as text."""
    env, peak = result["environment"], result["matmul_reference"]
    refs = ", ".join(
        f"[{r['size']}]^2: {r['ms']:.2f} ms = {r['gflops']:.1f} GFLOP/s" for r in peak["sizes"]
    )
    quick = bool((result.get("config") or {}).get("quick"))
    lines = [
        *(["QUICK SMOKE RUN (quick=true: shrunk nets and batches): not a measurement"] * quick),
        f"device: {env['device_kind']} x{env['device_count']} ({env['cpu_model']}, "
        f"{env['cpu_count']} cores), jax {env['jax']}; load average {env['load_average']}",
        f"matmul references (float32): {refs}; peak {peak['gflops']:.1f} GFLOP/s",
        "",
    ]
    rows = [
        (
            "point",
            "act",
            "batch",
            "mode",
            "ms/step",
            "cpu ms",
            "ratio",
            "paired",
            "cpu",
            "A/A",
            "GFLOP/s",
            "%peak",
            "%mm-only",
            "compile s",
            "peak MB",
        )
    ]
    for name, p in result["points"].items():
        for mode in MODES:
            m = p["modes"][mode]
            manual = mode == "manual"
            rows.append(
                (
                    name,
                    p["activation"],
                    str(p["batch"]),
                    mode,
                    f"{m['step_ms']:.4f}",
                    f"{m['step_cpu_ms']:.4f}",
                    _fmt(p["step_ratio"], ".3f") if manual else "",
                    _fmt(p["step_ratio_paired"], ".3f") if manual else "",
                    _fmt(p["step_ratio_cpu"], ".3f") if manual else "",
                    _fmt(p["control_ratio_paired"], ".3f") if manual else "",
                    f"{m['gflops']:.1f}",
                    f"{100 * m['fraction_of_matmul_peak']:.1f}",
                    f"{100 * m['fraction_of_matmul_only']:.1f}",
                    f"{m['lower_s'] + m['compile_s']:.2f}",
                    _fmt(m["peak_bytes"] and m["peak_bytes"] / 2**20, ".3f"),
                )
            )
    lines += _columns(rows)
    lines.append(
        "(ratio, paired, cpu: manual / autodiff; A/A: a second autodiff executable / autodiff,"
        " paired; %peak: of the best matmul reference)"
    )
    epochs = [(name, p["epoch"]) for name, p in result["points"].items() if p["epoch"]]
    if epochs:
        rows = [
            (
                "point",
                "steps",
                "mode",
                "scan s",
                "loop s",
                "loop/scan",
                "host loop s",
                "host/scan",
                "scan ratio",
                "cpu",
                "floor s",
                "scan/floor",
                "loop/floor",
            )
        ]
        for name, e in epochs:
            for mode in MODES:
                manual = mode == "manual"
                rows.append(
                    (
                        name,
                        str(e["steps"]),
                        mode,
                        f"{e['scan_' + mode]['epoch_s']:.3f}",
                        f"{e['loop_' + mode]['epoch_s']:.3f}",
                        _fmt(e["loop_speedup_" + mode], ".1f") + "x",
                        f"{e['host_loop_' + mode]['epoch_s']:.3f}",
                        _fmt(e["host_loop_speedup_" + mode], ".1f") + "x",
                        _fmt(e["scan_ratio"], ".3f") if manual else "",
                        _fmt(e["scan_ratio_cpu"], ".3f") if manual else "",
                        f"{e['matmul_only_scan']['epoch_s']:.3f}" if manual else "",
                        _fmt(e["scan_over_floor_" + mode], ".2f") + "x",
                        _fmt(e["loop_speedup_ceiling_" + mode], ".1f") + "x",
                    )
                )
        lines += ["", *_columns(rows)]
        lines.append(
            "(loop: data on device, batch gathered by index in the jitted step; host loop: numpy"
            " batches sliced on the host; floor: one scan of the same batches through the"
            " matmuls and weight updates alone)"
        )
    rows = [
        (
            "point",
            "mode",
            "dots",
            "kernels",
            "fusions",
            "library fusions",
            "instructions",
            "XLA flops",
            "transcendentals",
            "bytes accessed",
        )
    ]
    for name, p in result["points"].items():
        for mode in MODES:
            h, cost = p["modes"][mode]["hlo"], p["modes"][mode]["cost"]
            library = ", ".join(f"{k} x{v}" for k, v in h["library_fusions"].items()) or "-"
            rows.append(
                (
                    name,
                    mode,
                    str(h["dots"]),
                    str(h["entry_kernels"]),
                    str(h["fusions"]),
                    library,
                    str(h["instructions"]),
                    *(_fmt(cost[field], ".0f") for field in COST_FIELDS),
                )
            )
    lines += ["", "optimized HLO of each step, and XLA's cost analysis:", *_columns(rows)]
    for name, p in result["points"].items():
        if not p.get("profile"):
            continue
        prof = p["profile"]
        rows = [("mode", "op", "opcode", "library", "us/call", "% of call")]
        for mode in MODES:
            wall = prof[mode]["wall_us_per_call"]
            for op in prof[mode]["ops"][: result["config"]["profile_top"]]:
                rows.append(
                    (
                        mode,
                        op["op"],
                        op["opcode"],
                        op["library"] or "",
                        f"{op['us_per_call']:.1f}",
                        f"{100 * op['us_per_call'] / wall:.1f}",
                    )
                )
        calls = prof["calls"]
        walls = "; ".join(
            f"{m} {prof[m]['wall_us_per_call']:.1f} us wall, ops {prof[m]['op_us_per_call']:.1f}"
            f" us, busy {prof[m]['busy_us_per_call']:.1f} us"
            for m in MODES
        )
        lines += ["", f"profile of {name} ({calls} traced calls; per call: {walls}):"]
        lines += _columns(rows)
    rows = [("target", "point", "measured", "threshold", "met", "ratio", "ceiling", "reachable")]
    for name, t in result["targets"].items():
        met = "yes" if t["met"] else "NO"
        reachable = {True: "yes", False: "NO", None: ""}[t.get("reachable")]
        rows.append(
            (
                name,
                t.get("point") or "",
                _fmt(t["measured"], ".3f"),
                f"{t['threshold']:g}",
                met,
                t.get("estimator") or "",
                _fmt(t.get("ceiling"), ".3f") if "ceiling" in t else "",
                reachable,
            )
        )
    lines += ["", *_columns(rows)]
    if any("ceiling" in t for t in result["targets"].values()):
        lines.append(
            "(ceiling: the same measure for the work no step can skip, this run: the point's"
            " matmuls alone; the loop over a scan of matmuls and weight updates alone)"
        )
    control = result.get("control")
    if control:
        lines.append(
            f"A/A control (autodiff / autodiff, paired): {control['paired_min']:.3f} to "
            f"{control['paired_max']:.3f} over the grid; manual/autodiff differences within "
            f"about {control['max_abs_deviation']:.1%} are not resolved by this run"
        )
    lines += ["", f"runtime: {result['runtime_s']:.1f} s"]
    return "\n".join(lines)


def plain(x: Any) -> Any:
    """JSON-ready: numpy scalars to Python, NaN and inf to None."""
    if isinstance(x, dict):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [plain(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
