"""What is counted: matmul FLOPs, compiled memory, optimized-HLO contents, XLA's cost analysis
and per-op times from a profiler trace. Pure functions of a compiled program or its text."""

import gzip
import itertools
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def step_flops(features: Sequence[int], batch: int) -> int:
    """Matmul FLOPs of one update step, ``2 m n k`` per matmul.

    Per dense layer ``n_in -> n_out``: forward ``x @ w``, backward ``dw = x.T @ dy`` and
    ``dx = dy @ w.T``, each ``2 * batch * n_in * n_out``; the first layer has no ``dx``.

    Args:
      features: layer sizes including the input, e.g. ``[784, 30, 10]``.
      batch: examples per step.
    """
    total = 0
    for i, (n_in, n_out) in enumerate(itertools.pairwise(features)):
        total += 2 * batch * n_in * n_out * (2 if i == 0 else 3)
    return total


_MEMORY_FIELDS = (
    "argument_size_in_bytes",
    "output_size_in_bytes",
    "alias_size_in_bytes",
    "temp_size_in_bytes",
    "generated_code_size_in_bytes",
)


def memory_stats(compiled: Any) -> dict[str, Any]:
    """What ``compiled.memory_analysis()`` reports (None where it reports nothing), plus peak.

    ``peak_bytes = argument + output + temp - alias``: the buffers live during one call.
    """
    try:
        stats = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError):  # a backend without memory analysis
        stats = None
    out: dict[str, Any] = {name: getattr(stats, name, None) for name in _MEMORY_FIELDS}
    argument, output, alias, temp = (out[name] for name in _MEMORY_FIELDS[:4])
    out["available"] = stats is not None
    known = None not in (argument, output, temp)
    out["peak_bytes"] = argument + output + temp - (alias or 0) if known else None
    return out


_FREE_OPS = frozenset({"parameter", "constant", "get-tuple-element", "tuple", "bitcast"})
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = .*? ([a-z][\w\-]*)\(")


def _instructions(hlo_text: str) -> list[tuple[str, str, bool]]:
    """``(name, opcode, in_entry)`` for every instruction of an HLO module's text."""
    out, in_entry = [], False
    for line in hlo_text.splitlines():
        if line and not line[0].isspace():  # a computation header (or the module line)
            in_entry = line.startswith("ENTRY")
            continue
        match = _INSTRUCTION.match(line)
        if match:
            out.append((match.group(1), match.group(2), in_entry))
    return out


def hlo_summary(hlo_text: str) -> dict[str, Any]:
    """What the compiled program does, counted from its optimized HLO text.

    ``instructions`` counts all instructions (fused computations included); ``entry_kernels``
    the top-level ones that do work (not parameters, constants, tuples or bitcasts): roughly
    the kernels one call launches. ``dots``, ``transposes`` and ``copies`` count those opcodes
    anywhere (``dots`` also counts GEMM/matmul custom calls, e.g. cuBLAS on GPU); ``fusions``
    counts fusion instructions, ``library_fusions`` the fusions handed to a library, by kind
    (e.g. ``__ynn_fusion`` on CPU), and ``custom_calls`` the custom calls, by target.
    """
    ops = _instructions(hlo_text)
    opcodes = [op for _, op, _ in ops]

    def counts(pattern: str) -> dict[str, int]:
        found: dict[str, int] = {}
        for name in re.findall(pattern, hlo_text):
            found[name] = found.get(name, 0) + 1
        return dict(sorted(found.items()))

    calls = counts(r'custom_call_target="([^"]+)"')
    return {
        "instructions": len(ops),
        "entry_kernels": sum(1 for _, op, entry in ops if entry and op not in _FREE_OPS),
        "fusions": opcodes.count("fusion"),
        "dots": opcodes.count("dot")
        + opcodes.count("convolution")
        + sum(n for target, n in calls.items() if re.search("gemm|matmul", target, re.IGNORECASE)),
        "transposes": opcodes.count("transpose"),
        "copies": opcodes.count("copy"),
        "library_fusions": counts(r'"kind":"(__\w+)"'),
        "custom_calls": calls,
    }


def busy_time(intervals: list[tuple[float, float]]) -> float:
    """The length of the union of ``(start, end)`` intervals."""
    busy, end = 0.0, -math.inf
    for start, stop in sorted(intervals):
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    return busy


def trace_ops(trace_dir: str | Path, hlo_text: str, calls: int) -> dict[str, Any]:
    """Per-op device time of one compiled program, from a ``jax.profiler`` trace of ``calls`` calls.

    Reads the Perfetto trace that ``jax.profiler.trace(..., create_perfetto_trace=True)`` wrote
    under ``trace_dir`` and sums the events XLA tags with an ``hlo_op`` of this module (the
    module is named on the text's first line).

    Returns:
      ``ops``: one row per op, slowest first: ``op``, ``opcode``, ``library`` (a library
      fusion's kind, e.g. ``__ynn_fusion``, else None), ``us_per_call``, ``events_per_call``.
      ``kinds``: the same summed by kind (the op's name without its ``.<n>``: every ``copy``,
      every ``ynn_fusion``), slowest first: ``kind``, ``ops``, ``us_per_call``.
      ``op_us_per_call``: the rows' sum. ``busy_us_per_call``: the time at least one op ran
      (the union of their intervals); runtimes that run independent ops concurrently (XLA's CPU
      thunk executor does) make it shorter than the sum, by ``concurrent_us_per_call``.
    """
    files = sorted(Path(trace_dir).rglob("perfetto_trace.json.gz"))
    if not files:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
    with gzip.open(files[-1]) as f:
        events = json.load(f)["traceEvents"]
    module = re.match(r"HloModule ([\w.\-]+)", hlo_text)
    module = module.group(1) if module else None
    opcodes = {name: op for name, op, _ in _instructions(hlo_text)}
    libraries = dict(re.findall(r'%([\w.\-]+) = [^\n]*"kind":"(__\w+)"', hlo_text))
    time_us: dict[str, float] = {}
    count: dict[str, int] = {}
    intervals: list[tuple[float, float]] = []
    for event in events:
        args = event.get("args") or {}
        op = args.get("hlo_op")
        if event.get("ph") != "X" or op not in opcodes:
            continue
        if module is not None and args.get("hlo_module") not in (None, module):
            continue
        start, duration = float(event.get("ts", 0.0)), float(event.get("dur", 0.0))
        time_us[op] = time_us.get(op, 0.0) + duration
        count[op] = count.get(op, 0) + 1
        intervals.append((start, start + duration))
    rows = [
        {
            "op": op,
            "opcode": opcodes[op],
            "library": libraries.get(op),
            "us_per_call": total / calls,
            "events_per_call": count[op] / calls,
        }
        for op, total in time_us.items()
    ]
    op_us, busy_us = sum(time_us.values()) / calls, busy_time(intervals) / calls
    kinds: dict[str, list] = {}
    for row in rows:  # XLA names an op <kind>.<n> (``copy.3``, ``multiply_add_fusion.12``)
        kind = kinds.setdefault(re.sub(r"\.\d+$", "", row["op"]), [0, 0.0])
        kind[0], kind[1] = kind[0] + 1, kind[1] + row["us_per_call"]
    return {
        "ops": sorted(rows, key=lambda row: -row["us_per_call"]),
        "kinds": [
            {"kind": kind, "ops": n, "us_per_call": us}
            for kind, (n, us) in sorted(kinds.items(), key=lambda item: -item[1][1])
        ],
        "op_us_per_call": op_us,
        "busy_us_per_call": busy_us,
        "concurrent_us_per_call": max(0.0, op_us - busy_us),  # not -3e-14 for none
    }


COST_FIELDS = {"flops": "flops", "transcendentals": "transcendentals", "bytes": "bytes accessed"}


def cost_stats(compiled: Any) -> dict[str, Any]:
    """XLA's own static count of a compiled program's work (``compiled.cost_analysis()``).

    ``flops`` (every floating-point op, not only matmuls), ``transcendentals`` (exp, log, ...)
    and ``bytes`` accessed, None where the backend reports nothing. Unlike a timing these are
    exact and free of noise: a manual backward that does more work than autodiff shows here.
    """
    try:
        analysis = compiled.cost_analysis()
    except (NotImplementedError, RuntimeError):
        analysis = None
    if isinstance(analysis, list | tuple):  # one per program in older jax versions
        analysis = analysis[0] if analysis else None
    analysis = analysis or {}
    return {name: analysis.get(key) for name, key in COST_FIELDS.items()}
