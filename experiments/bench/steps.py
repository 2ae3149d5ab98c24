"""The timed steps of a grid point on every call path (``paths``), its matmul-only reference;
HLO dumps and profiles of the steps."""

import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from omegaconf import DictConfig

from .floors import matmul_only
from .measure import trace_ops
from .paths import initial_carry, path_step
from .points import MODES, Point, synthetic_data
from .timing import Variant, compile_timed, equalize_calls


def point_steps(cfg: DictConfig, point: Point, seed: int) -> dict[str, Any]:
    """Compiles the point's step on every path of ``cfg.paths``, manual and autodiff, plus the
    A/A control (the autodiff step compiled a second time) with ``cfg.control``; an MLP's
    matmul-only reference too.

    Returns:
      ``paths``: per path, ``variants`` (``manual``, ``autodiff``, ``control``: the three take
      the same calls per sample), ``info`` (compile times, memory, HLO, cost) and
      ``executables``; ``matmul_only``: ``(variant, info)`` or None.
    """
    x, y = synthetic_data(cfg, point.example_shape, point.n_outputs, point.batch, seed)
    names = (*MODES, "control") if cfg.control else MODES
    paths = {}
    for path in cfg.paths:
        variants, info, executables = {}, {}, {}
        carry = initial_carry(path, point)
        for name in names:
            step = path_step(path, point, "autodiff" if name == "control" else name)
            compiled, info[name] = compile_timed(step, carry, x, y)
            executables[name] = compiled
            variants[name] = Variant(
                lambda c, compiled=compiled: compiled(c, x, y)[0],
                carry,
                warmup=cfg.warmup,
                block=cfg.block_seconds,
            )
            if name != "control":
                seconds = info[name]["lower_s"] + info[name]["compile_s"]
                print(f"  compiled {point.name} {path}, {name}: {seconds:.2f} s", flush=True)
        equalize_calls(list(variants.values()))
        paths[path] = {"variants": variants, "info": info, "executables": executables}
    only = None
    if point.is_mlp:
        ws = tuple(p["w"] for p in point.state.params if p)
        rng = np.random.default_rng(seed)
        dy = jnp.asarray(rng.standard_normal((point.batch, point.n_outputs), dtype=np.float32))
        compiled, info = compile_timed(matmul_only, ws, x, dy)
        variant = Variant(
            lambda x_, c=compiled: c(ws, x_, dy)[0], x, warmup=cfg.warmup, block=cfg.block_seconds
        )
        only = (variant, info)
    return {"paths": paths, "matmul_only": only}


def write_hlo(name: str, built: dict, directory: Path) -> dict[str, dict[str, str]]:
    """Writes each path's optimized step HLO per mode to ``directory/<name>.<mode>.txt``
    (``make_step``) and ``directory/<name>.<path>.<mode>.txt`` (the other paths).

    Returns:
      The files written, per path and mode.
    """
    directory.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict[str, str]] = {}
    for path, timed in built["paths"].items():
        stem = name if path == "make_step" else f"{name}.{path}"
        files[path] = {}
        for mode in MODES:
            file = directory / f"{stem}.{mode}.txt"
            file.write_text(timed["executables"][mode].as_text())
            files[path][mode] = str(file)
    return files


def profile(name: str, built: dict, calls: int, directory: Path) -> dict[str, Any]:
    """Traces ``calls`` chained ``make_step`` steps of each mode with ``jax.profiler``; per-op
    times.

    The traces stay in ``directory/<name>/<mode>`` (open them with TensorBoard's profile
    plugin or Perfetto); the summary is ``trace_ops``'s table per mode, plus the wall time per
    call while tracing (the profiler adds overhead, so compare it only with the other mode).
    """
    timed = built["paths"]["make_step"]
    programs = {mode: (timed["variants"][mode], timed["executables"][mode]) for mode in MODES}
    return profile_programs(programs, calls, directory / name)


def profile_programs(
    programs: dict[str, tuple[Variant, Any]], calls: int, directory: Path
) -> dict[str, Any]:
    """``profile`` for any named (variant, compiled program) pairs, e.g. a point's learning-rule
    steps (``bench.rules.rule_steps``' variants and ``executables``): ``calls`` chained calls of
    each traced into ``directory/<name>``; ``{"calls": calls, <name>: trace_ops' table, the
    wall time per call and the trace's directory}``."""
    out: dict[str, Any] = {"calls": calls}
    for mode, (variant, compiled) in programs.items():
        trace_dir = directory / mode
        carry = variant.carry
        jax.block_until_ready(carry)
        with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
            start = time.perf_counter()
            for _ in range(calls):
                carry = variant.call(carry)
            jax.block_until_ready(carry)
            wall = time.perf_counter() - start
        variant.carry = carry  # a donated carry is consumed by the call
        out[mode] = {
            "trace_dir": str(trace_dir),
            "wall_us_per_call": 1e6 * wall / calls,
            **trace_ops(trace_dir, compiled.as_text(), calls),
        }
    return out
