"""The printed tables (steps, call paths, HLO and cost, profiles, targets), and results made
JSON-ready. The tables of epochs and training paths are in ``report_training``."""

import math
from typing import Any

import numpy as np

from .measure import COST_FIELDS
from .points import MODES
from .report_training import (
    chunked_table,
    epoch_table,
    grad_check_table,
    rule_epochs_table,
    rules_table,
)
from .tables import columns, fmt, mb


def _header(result: dict[str, Any]) -> list[str]:
    env, peak = result["environment"], result["matmul_reference"]
    refs = ", ".join(
        f"[{r['size']}]^2: {r['ms']:.2f} ms = {r['gflops']:.1f} GFLOP/s" for r in peak["sizes"]
    )
    quick = bool((result.get("config") or {}).get("quick"))
    cap = env.get("xla_cpu_max_isa")
    isa = (
        f"ISA: {env.get('isa')} (XLA_FLAGS --xla_cpu_max_isa={cap} caps XLA's generated code;"
        f" the host has {env.get('cpu_isa')})"
        if cap
        else f"ISA: {env.get('isa')} (the host's; XLA_FLAGS sets no --xla_cpu_max_isa)"
    )
    return [
        *(["QUICK SMOKE RUN (quick=true: shrunk nets and batches): not a measurement"] * quick),
        f"device: {env['device_kind']} x{env['device_count']} ({env['cpu_model']}, "
        f"{env['cpu_count']} cores), jax {env['jax']}; load average {env['load_average']}",
        isa,
        f"matmul references (float32): {refs}; peak {peak['gflops']:.1f} GFLOP/s",
        "",
    ]


def _step_table(result: dict[str, Any]) -> list[str]:
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
            "XLA GFLOP/s",
            "compile s",
            "peak MB",
        )
    ]
    for name, p in result["points"].items():
        for mode in MODES:
            m = p["modes"][mode]
            manual = mode == "manual"
            fractions = (m["fraction_of_matmul_peak"], m["fraction_of_matmul_only"])
            rows.append(
                (
                    name,
                    p["activation"] or "-",
                    str(p["batch"]),
                    mode,
                    f"{m['step_ms']:.4f}",
                    f"{m['step_cpu_ms']:.4f}",
                    fmt(p["step_ratio"], ".3f") if manual else "",
                    fmt(p["step_ratio_paired"], ".3f") if manual else "",
                    fmt(p["step_ratio_cpu"], ".3f") if manual else "",
                    fmt(p["control_ratio_paired"], ".3f") if manual else "",
                    fmt(m["gflops"], ".1f"),
                    *(fmt(None if f is None else 100 * f, ".1f") for f in fractions),
                    fmt(m["xla_gflops"], ".1f"),
                    f"{m['lower_s'] + m['compile_s']:.2f}",
                    fmt(mb(m["peak_bytes"]), ".3f"),
                )
            )
    return [
        "the step (make_step):",
        *columns(rows),
        "(ratio, paired, cpu: manual / autodiff; A/A: a second autodiff executable / autodiff,"
        " paired; GFLOP/s, %peak (of the best matmul reference), %mm-only: matmul FLOPs, MLP"
        " points only; XLA GFLOP/s: XLA's cost-analysis flops, every point)",
    ]


def _paths_table(result: dict[str, Any]) -> list[str]:
    rows = [
        (
            "point",
            "path",
            "manual ms",
            "autodiff ms",
            "ratio",
            "paired",
            "cpu",
            "A/A",
            "peak MB (man/auto)",
            "XLA flops m/a",
            "bytes m/a",
            "dots m/a",
            "compile s (m/a)",
        )
    ]
    for name, p in result["points"].items():
        for path, r in p["paths"].items():
            m, a = r["modes"]["manual"], r["modes"]["autodiff"]
            rows.append(
                (
                    name,
                    path,
                    f"{m['step_ms']:.4f}",
                    f"{a['step_ms']:.4f}",
                    fmt(r["step_ratio"], ".3f"),
                    fmt(r["step_ratio_paired"], ".3f"),
                    fmt(r["step_ratio_cpu"], ".3f"),
                    fmt(r["control_ratio_paired"], ".3f"),
                    f"{fmt(mb(m['peak_bytes']), '.3f')} / {fmt(mb(a['peak_bytes']), '.3f')}",
                    fmt(r["cost_ratio"]["flops"], ".4f"),
                    fmt(r["cost_ratio"]["bytes"], ".4f"),
                    f"{m['hlo']['dots']} / {a['hlo']['dots']}",
                    f"{m['lower_s'] + m['compile_s']:.2f} / {a['lower_s'] + a['compile_s']:.2f}",
                )
            )
    return [
        "",
        "every call path, manual / autodiff (make_step; value_and_grad: jit of"
        " bpjax.value_and_grad + optax update, the README's; custom_vjp: jax.grad of a loss"
        " through bpjax.as_custom_vjp, or through the forward):",
        *columns(rows),
        "(A/A: each path's own second autodiff executable / autodiff, paired; m/a: manual /"
        " autodiff, XLA's cost analysis)",
    ]


def _hlo_table(result: dict[str, Any]) -> list[str]:
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
                    *(fmt(cost[field], ".0f") for field in COST_FIELDS),
                )
            )
    return ["", "optimized HLO of each step (make_step), and XLA's cost analysis:", *columns(rows)]


def _profile_tables(result: dict[str, Any]) -> list[str]:
    lines = []
    top = result["config"]["profile_top"]
    for name, p in result["points"].items():
        if p.get("profile"):
            lines += _profile_table(f"profile of {name}", p["profile"], top)
        if (p.get("rules") or {}).get("profile"):
            lines += _profile_table(f"profile of {name}'s rule steps", p["rules"]["profile"], top)
    return lines


def _profile_table(title: str, prof: dict[str, Any], top: int) -> list[str]:
    """One profile's table: each mode's ``top`` slowest ops (``bench.steps.profile_programs``)."""
    modes = [mode for mode in prof if mode != "calls"]
    rows = [("mode", "op", "opcode", "library", "us/call", "% of call")]
    for mode in modes:
        wall = prof[mode]["wall_us_per_call"]
        for op in prof[mode]["ops"][:top]:
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
    walls = "; ".join(
        f"{m} {prof[m]['wall_us_per_call']:.1f} us wall, ops {prof[m]['op_us_per_call']:.1f}"
        f" us, busy {prof[m]['busy_us_per_call']:.1f} us"
        for m in modes
    )
    kinds = [("mode", "kind", "ops", "us/call", "% of call")]
    for mode in modes:
        wall = prof[mode]["wall_us_per_call"]
        kinds += [
            (
                mode,
                k["kind"],
                str(k["ops"]),
                f"{k['us_per_call']:.1f}",
                f"{100 * k['us_per_call'] / wall:.1f}",
            )
            for k in prof[mode]["kinds"][:top]
        ]
    return [
        "",
        f"{title} ({prof['calls']} traced calls; per call: {walls}):",
        *columns(rows),
        f"{title}, by kind (the op's name without its .<n>), the {top} slowest per mode:",
        *columns(kinds),
    ]


def _targets_table(result: dict[str, Any]) -> list[str]:
    rows = [
        (
            "target",
            "point",
            "measured",
            "threshold",
            "met",
            "ratio",
            "noise (A/A)",
            "ceiling",
            "reachable",
        )
    ]
    for name, t in result["targets"].items():
        met = "yes" if t["met"] else "NO"
        reachable = {True: "yes", False: "NO", None: ""}[t.get("reachable")]
        noise = fmt(t["noise"], ".3f") if "noise" in t else ""
        rows.append(
            (
                name,
                t.get("point") or "",
                fmt(t["measured"], ".3f"),
                f"{t['threshold']:g}" + (" + noise" if t.get("within_noise") else ""),
                met,
                t.get("estimator") or "",
                noise,
                fmt(t.get("ceiling"), ".3f") if "ceiling" in t else "",
                reachable,
            )
        )
    lines = ["", "targets (reported, never asserted):", *columns(rows)]
    lines.append(
        "(noise: |A/A control - 1| at that point by the same estimator (for a median: the"
        " largest over its points); differences within it are not resolved by this run)"
    )
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
    return lines


def format_tables(result: dict[str, Any]) -> str:
    """Every table of a run, as text: steps, call paths, epochs, HLO and cost, profiles, the
    learning rules, the alignment signal's cost, chunked epochs and the targets."""
    lines = [
        *_header(result),
        *_step_table(result),
        *_paths_table(result),
        *epoch_table(result),
        *_hlo_table(result),
        *_profile_tables(result),
        *rules_table(result),
        *rule_epochs_table(result),
        *grad_check_table(result),
        *chunked_table(result),
        *_targets_table(result),
        "",
        f"runtime: {result['runtime_s']:.1f} s",
    ]
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
