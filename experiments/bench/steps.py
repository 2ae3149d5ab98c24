"""The timed steps of a grid point, its matmul-only reference, the device's matmul reference;
HLO dumps and profiles of the steps."""

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from omegaconf import DictConfig

from bpjax.train import make_step

from .measure import trace_ops
from .points import MODES, synthetic_data, training
from .timing import Variant, compile_timed


def loss_only(step: Callable) -> Callable:
    """``step`` returning ``(new_state, loss)``: what a training loop keeps."""

    def f(state, x, y):
        new_state, aux = step(state, x, y)
        return new_state, aux["loss"]

    return f


def forward_matmuls(ws: tuple, x: jax.Array) -> list[jax.Array]:
    """``[x, x @ w0, x @ w0 @ w1, ...]``: a network's forward matmuls, nothing else."""
    acts = [x]
    for w in ws:
        acts.append(acts[-1] @ w)
    return acts


def backward_matmuls(ws: tuple, acts: list[jax.Array], dy: jax.Array) -> tuple:
    """The weight gradients ``h.T @ g`` (in ``ws``' order) and the ``g @ w.T`` that carry ``g``
    down; no ``dx`` for the first layer."""
    grads, g = [], dy
    for i in reversed(range(len(ws))):
        grads.append(lax.dot_general(acts[i], g, (((0,), (0,)), ((), ()))))
        if i > 0:
            g = g @ ws[i].T
    return tuple(reversed(grads))


def matmul_only(ws: tuple, x: jax.Array, dy: jax.Array) -> tuple[jax.Array, tuple]:
    """The step's matmuls alone: forward ``h @ w``; backward ``h.T @ g`` and ``g @ w.T``.

    Returns ``x`` made to depend on the result (so calls chain) and the weight gradients.
    """
    acts = forward_matmuls(ws, x)
    return x + 0 * acts[-1][:, :1], backward_matmuls(ws, acts, dy)


# The matmul-only epoch's step size: least squares on MNIST-shaped data is stable there (the


def square_matmul(cfg: DictConfig, n: int) -> tuple[Variant, dict[str, Any]]:
    """A device reference: a chained jitted float32 ``a @ b``, ``b`` norm-preserving."""
    rng = np.random.default_rng(cfg.seed)
    a = jnp.asarray(rng.standard_normal((n, n), dtype=np.float32))
    b = jnp.asarray(rng.standard_normal((n, n), dtype=np.float32) / np.float32(math.sqrt(n)))
    compiled, info = compile_timed(lambda a, b: a @ b, a, b)
    variant = Variant(lambda a: compiled(a, b), a, warmup=cfg.warmup, block=cfg.block_seconds)
    return variant, {"size": n, "flops": 2 * n**3, "compile_s": info["compile_s"]}


def point_steps(cfg: DictConfig, point: dict, seed: int) -> dict[str, Any]:
    """Compiles the grid point's manual and autodiff steps and its matmul-only reference."""
    features, batch = list(point["features"]), int(point["batch"])
    x, y = synthetic_data(cfg, features, batch, seed)
    variants, info = {}, {}
    net, loss, optimizer, state = training(cfg, point)
    executables = {}
    for mode in MODES:
        step = loss_only(make_step(net, loss, optimizer, grad_mode=mode))
        compiled, info[mode] = compile_timed(step, state, x, y)
        executables[mode] = compiled
        variants[mode] = Variant(
            lambda s, c=compiled: c(s, x, y)[0], state, warmup=cfg.warmup, block=cfg.block_seconds
        )
        seconds = info[mode]["lower_s"] + info[mode]["compile_s"]
        print(f"  compiled {point['name']} step, {mode}: {seconds:.2f} s", flush=True)
    if cfg.control:  # an A/A control: the autodiff step compiled and timed a second time
        step = loss_only(make_step(net, loss, optimizer, grad_mode="autodiff"))
        compiled, info["control"] = compile_timed(step, state, x, y)
        variants["control"] = Variant(
            lambda s, c=compiled: c(s, x, y)[0], state, warmup=cfg.warmup, block=cfg.block_seconds
        )
    ws = tuple(p["w"] for p in state.params if p)
    rng = np.random.default_rng(seed)
    dy = jnp.asarray(rng.standard_normal((batch, features[-1]), dtype=np.float32))
    # The steps take the same number of calls per sample, so per-sample overheads match.
    timed = [variants[name] for name in (*MODES, "control") if name in variants]
    calls = max(v.n for v in timed)
    for v in timed:
        v.n = calls
    compiled, info["matmul_only"] = compile_timed(matmul_only, ws, x, dy)
    variants["matmul_only"] = Variant(
        lambda x_, c=compiled: c(ws, x_, dy)[0], x, warmup=cfg.warmup, block=cfg.block_seconds
    )
    return {"variants": variants, "info": info, "executables": executables}


def write_hlo(name: str, built: dict, directory: Path) -> dict[str, str]:
    """Writes each mode's optimized step HLO to ``directory/<name>.<mode>.txt``."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for mode in MODES:
        path = directory / f"{name}.{mode}.txt"
        path.write_text(built["executables"][mode].as_text())
        paths[mode] = str(path)
    return paths


def profile(name: str, built: dict, calls: int, directory: Path) -> dict[str, Any]:
    """Traces ``calls`` chained steps of each mode with ``jax.profiler``; per-op times.

    The traces stay in ``directory/<name>/<mode>`` (open them with TensorBoard's profile
    plugin or Perfetto); the summary is ``trace_ops``'s table per mode, plus the wall time per
    call while tracing (the profiler adds overhead, so compare it only with the other mode).
    """
    out: dict[str, Any] = {"calls": calls}
    for mode in MODES:
        variant, compiled = built["variants"][mode], built["executables"][mode]
        trace_dir = directory / name / mode
        carry = variant.carry
        jax.block_until_ready(carry)
        with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
            start = time.perf_counter()
            for _ in range(calls):
                carry = variant.call(carry)
            jax.block_until_ready(carry)
            wall = time.perf_counter() - start
        out[mode] = {
            "trace_dir": str(trace_dir),
            "wall_us_per_call": 1e6 * wall / calls,
            **trace_ops(trace_dir, compiled.as_text(), calls),
        }
    return out
