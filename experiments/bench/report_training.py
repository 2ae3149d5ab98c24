"""The printed tables of the epochs, the learning rules' steps, the alignment signal's cost and
the chunked epochs (each empty where the run did not measure it)."""

from typing import Any

from .points import MODES
from .tables import columns, fmt, mb


def _times(x: float | None, spec: str) -> str:
    """A speedup or a multiple, ``2.2x``; ``n/a`` where it was not measured."""
    return fmt(x, spec) + ("" if x is None else "x")


def _epoch_s(e: dict[str, Any], name: str) -> str:
    return fmt((e.get(name) or {}).get("epoch_s"), ".3f")


def epoch_table(result: dict[str, Any]) -> list[str]:
    epochs = [(name, p["epoch"]) for name, p in result["points"].items() if p["epoch"]]
    if not epochs:
        return []
    rows = [
        (
            "point",
            "steps",
            "mode",
            "scan s",
            "ms/step",
            "in scan/alone",
            "loop s",
            "loop/scan",
            "host loop s",
            "host/scan",
            "scan ratio",
            "paired",
            "cpu",
            "A/A",
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
                    _epoch_s(e, f"scan_{mode}"),
                    fmt(e[f"scan_step_ms_{mode}"], ".3f"),
                    fmt(e.get(f"scan_step_over_step_{mode}"), ".2f"),
                    _epoch_s(e, f"loop_{mode}"),
                    _times(e[f"loop_speedup_{mode}"], ".1f"),
                    _epoch_s(e, f"host_loop_{mode}"),
                    _times(e[f"host_loop_speedup_{mode}"], ".1f"),
                    fmt(e["scan_ratio"], ".3f") if manual else "",
                    fmt(e["scan_ratio_paired"], ".3f") if manual else "",
                    fmt(e["scan_ratio_cpu"], ".3f") if manual else "",
                    fmt(e["scan_control_ratio_paired"], ".3f") if manual else "",
                    _epoch_s(e, "matmul_only_scan") if manual else "",
                    _times(e[f"scan_over_floor_{mode}"], ".2f"),
                    _times(e[f"loop_speedup_ceiling_{mode}"], ".1f"),
                )
            )
    return [
        "",
        "whole epochs (make_epoch: one lax.scan) against Python loops of the jitted step:",
        *columns(rows),
        "(ms/step: the scan epoch / steps; in scan/alone: that over the step timed alone; loop:"
        " data on device, batch gathered by index in the jitted step; host loop: numpy batches"
        " sliced on the host (MLP points); scan ratio, paired, cpu: manual / autodiff; A/A: a"
        " second autodiff scan / autodiff, paired; floor: one scan of the same batches through"
        " the matmuls and weight updates alone (MLP points))",
    ]


def _rule_rows(ruled: list, ratio: str, figures: Any, after: Any = None) -> list[tuple]:
    """A row per point and mode: ``figures(r, m)`` (the section's own columns), the ``ratio``
    to manual (medians, paired, cpu), on manual's row the A/A control's, then ``after(m)``."""
    rows = []
    for name, r in ruled:
        for mode, m in r["modes"].items():
            vs = r["vs_manual"].get(mode)
            rows.append(
                (
                    name,
                    mode,
                    *figures(r, m),
                    fmt(vs and vs[ratio], ".3f"),
                    fmt(vs and vs[ratio + "_paired"], ".3f"),
                    fmt(vs and vs[ratio + "_cpu"], ".3f"),
                    fmt(r["control_ratio_paired"], ".3f") if mode == "manual" else "",
                    *(after(m) if after else ()),
                )
            )
    return rows


_RULES_NOTE = (
    "(/manual, paired, cpu: rule / manual; A/A: a second manual executable / manual, paired)"
)


def rules_table(result: dict[str, Any]) -> list[str]:
    ruled = [(name, p["rules"]) for name, p in result["points"].items() if p.get("rules")]
    if not ruled:
        return []
    header = ("point", "mode", "ms/step", "cpu ms", "/manual", "paired", "cpu", "A/A", "peak MB")
    rows = _rule_rows(
        ruled,
        "step_ratio",
        lambda r, m: (f"{m['step_ms']:.4f}", f"{m['step_cpu_ms']:.4f}"),
        lambda m: (fmt(mb(m["peak_bytes"]), ".3f"),),
    )
    return [
        "",
        "learning rules: make_step(grad_mode=rule) against the manual step"
        + (" (state donated):" if result["config"]["rules"].get("donate") else ":"),
        *columns([header, *rows]),
        _RULES_NOTE,
    ]


def rule_epochs_table(result: dict[str, Any]) -> list[str]:
    ruled = [(n, p["rule_epochs"]) for n, p in result["points"].items() if p.get("rule_epochs")]
    if not ruled:
        return []
    header = ("point", "mode", "steps", "epoch s", "cpu s", "/manual", "paired", "cpu", "A/A")
    rows = _rule_rows(
        ruled,
        "epoch_ratio",
        lambda r, m: (str(r["steps"]), f"{m['epoch_s']:.3f}", f"{m['epoch_cpu_s']:.3f}"),
    )
    return [
        "",
        "learning rules as fit trains them: fit's epoch (make_chunk, no signal) against manual's:",
        *columns([header, *rows]),
        _RULES_NOTE,
    ]


def grad_check_table(result: dict[str, Any]) -> list[str]:
    checked = [(n, p["grad_check"]) for n, p in result["points"].items() if p.get("grad_check")]
    if not checked:
        return []
    rows = [("point", "mode", "every", "checks", "off s", "on s", "on/off", "paired", "cpu", "A/A")]
    for name, g in checked:
        for mode, c in g["modes"].items():
            rows.append(
                (
                    name,
                    mode,
                    str(g["every"]),
                    f"{g['checks_per_epoch']} of {g['steps']}",
                    f"{c['off']['epoch_s']:.3f}",
                    f"{c['on']['epoch_s']:.3f}",
                    fmt(c["cost_ratio"], ".3f"),
                    fmt(c["cost_ratio_paired"], ".3f"),
                    fmt(c["cost_ratio_cpu"], ".3f"),
                    fmt(c["control_ratio_paired"], ".3f"),
                )
            )
    return [
        "",
        "the alignment signal's cost: fit's epoch with grad_check_every against without:",
        *columns(rows),
        "(checks: steps of the epoch with a reference gradient and the angles; A/A: a second"
        " executable of the epoch without the signal / the first, paired)",
    ]


def chunked_table(result: dict[str, Any]) -> list[str]:
    chunked = [(n, p["chunked"]) for n, p in result["points"].items() if p.get("chunked")]
    if not chunked:
        return []
    rows = [
        (
            "point",
            "mode",
            "steps",
            "chunks",
            "whole s",
            "chunked s",
            "ratio",
            "paired",
            "cpu",
            "A/A",
            "params, losses",
        )
    ]
    for name, c in chunked:
        lengths = " + ".join(str(n) for n in c["chunk_lengths"])
        identical = {True: "identical", False: "DIFFER"}
        rows.append(
            (
                name,
                c["mode"],
                str(c["steps"]),
                f"{c['chunks']} (of {lengths})",
                f"{c['whole']['epoch_s']:.3f}",
                f"{c['chunked']['epoch_s']:.3f}",
                fmt(c["chunked_ratio"], ".3f"),
                fmt(c["chunked_ratio_paired"], ".3f"),
                fmt(c["chunked_ratio_cpu"], ".3f"),
                fmt(c["control_ratio_paired"], ".3f"),
                f"{identical[c['params_identical']]}, {identical[c['losses_identical']]}",
            )
        )
    return [
        "",
        "epochs as fit runs them (make_chunk + chunk_plan, each chunk's metrics fetched)"
        " against the whole-epoch scan (make_epoch), the same steps:",
        *columns(rows),
        "(ratio, paired, cpu: chunked / whole; A/A: a second whole-epoch executable / whole,"
        " paired; params, losses: the final params and per-step losses of one epoch of each)",
    ]
