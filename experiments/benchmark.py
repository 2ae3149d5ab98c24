"""Benchmark: the hand-written backward against autodiff, on this device, in one process.

Convention:

* Every figure comes from ONE process and the variants are interleaved: each timed *round*
  samples every variant once (manual and autodiff side by side, their order swapped every round,
  each pair after its grid point's matmul-only reference; the device's matmul references are
  sampled in the same rounds), so drift and noise from other processes hit all variants alike.
  A *sample* repeats a compiled function for about ``block_seconds`` and divides. Reported
  times are medians over ``repeats`` rounds, after ``warmup`` untimed calls.
* Each sample records wall time (``time.perf_counter``, the headline figure) and this process's
  CPU time (``time.process_time``, all of XLA's threads): on a shared machine other processes
  inflate wall time but hardly CPU time, so the CPU-time ratio is the steadier comparison.
* Ratios are manual / autodiff: ``step_ratio = median(manual) / median(autodiff)`` (wall),
  ``step_ratio_paired`` the median of per-round ratios (each round's pair is adjacent in time),
  ``step_ratio_cpu`` the ratio of CPU-time medians. The targets judge the one named by
  ``targets.ratio`` (default ``paired``): on a shared machine the wall times of a long run are
  often bimodal (another job comes and goes), and a ratio of two medians can then compare
  samples from different modes, while each round's pair was measured milliseconds apart.
* The timed step is ``make_step(net, loss, optax.sgd(lr), grad_mode=mode)`` jitted to return
  ``(new_state, loss)``: the gradients, updates and outputs that ``make_step`` also offers in
  ``aux`` are dropped, as ``make_epoch`` drops them, so XLA need not materialise them. Calls are
  chained (each takes the previous call's state), as in training.
* Every timed function is compiled once with ``jax.jit(f).lower(...).compile()``; that executable
  is the one timed, and its compile time and ``memory_analysis()`` are what is reported.
* FLOPs count matmuls only, ``2 m n k`` each: per dense layer ``n_in -> n_out`` the forward
  ``x @ w`` and the backward ``x.T @ dy`` (dw) and ``dy @ w.T`` (dx), each ``2 batch n_in n_out``,
  except that the first layer has no dx (the input needs no gradient: autodiff never computes it
  and under jit the manual one is dead code). Activations, loss and optimizer are not counted.
* ``fraction_of_matmul_peak`` is achieved GFLOP/s over the best GFLOP/s of the jitted float32
  ``[n, n] @ [n, n]`` references (``matmul_sizes``) timed in the same rounds. ``matmul_only``
  runs the grid point's matmuls alone (no bias, activation, loss or update): the ceiling for
  those shapes.
* An epoch's floor (``matmul_only_scan``): one ``lax.scan`` of the same batches through the
  matmuls and the weight update alone (``_matmul_only_epoch``), the work no SGD step of those
  layers can skip. ``loop_speedup_ceiling`` = loop / floor is the most a scan could gain over
  the loop on this device. Targets that the device bounds (``matmul_fraction``,
  ``loop_speedup``) report that ``ceiling`` and whether it is ``reachable`` at all.
* Epochs (grid points with ``epoch: true``): ``make_epoch`` (one jitted ``lax.scan`` over
  ``epoch_examples // batch`` steps) against a Python loop dispatching one jitted step per batch
  that does what the scan body does (gather the batch by index, update), with the same
  permutation: the same steps, so the same final params (checked); and against the textbook
  loop (``host_loop``): numpy batches sliced on the host and passed to the jitted step.
* What each step compiles to: ``hlo_summary`` counts the optimized HLO's dots, kernels, fusions
  and library calls per mode, and ``cost_stats`` records XLA's static cost analysis (flops,
  transcendentals, bytes accessed: exact, unlike timings). ``dump_hlo=true`` also writes the
  text. ``profile=[point, ...]``
  traces those points' steps with ``jax.profiler`` after the timed rounds and reports per-op
  device time (``trace_ops``): where a step's time goes, to find out why one mode is slower.

This file owns the wiring, timing and printing; the math lives in ``bpjax``.
"""

import functools
import gzip
import itertools
import json
import math
import os
import platform
import re
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import hydra
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax
from hydra.core.hydra_config import HydraConfig
from jax import lax
from omegaconf import DictConfig, OmegaConf

from bpjax import layers, losses
from bpjax.grad import relative_error
from bpjax.train import (
    SHUFFLE,
    TrainState,
    encode_targets,
    init_state,
    make_epoch,
    make_step,
)

MODES = ("manual", "autodiff")
# The Python loops an epoch scan is compared with: ``loop`` keeps the data on device and gathers
# each batch by index inside the jitted step (the scan body's work, one dispatch per step);
# ``host_loop`` is the textbook loop: numpy batches sliced on the host, passed to the jitted step.
LOOPS = ("loop", "host_loop")
EPOCH_KINDS = ("scan", *LOOPS)
_relative_error = jax.jit(relative_error)


# --------------------------------------------------------------------------------------------
# what is counted


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


def _busy_time(intervals: list[tuple[float, float]]) -> float:
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
    op_us, busy_us = sum(time_us.values()) / calls, _busy_time(intervals) / calls
    return {
        "ops": sorted(rows, key=lambda row: -row["us_per_call"]),
        "op_us_per_call": op_us,
        "busy_us_per_call": busy_us,
        "concurrent_us_per_call": op_us - busy_us,
    }


_COST_FIELDS = {"flops": "flops", "transcendentals": "transcendentals", "bytes": "bytes accessed"}


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
    return {name: analysis.get(key) for name, key in _COST_FIELDS.items()}


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _load_average() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def environment() -> dict[str, Any]:
    """Device kind and count, library versions, CPU model and count, load average."""
    devices = jax.devices()
    return {
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "gpu_available": any(d.platform in ("gpu", "cuda", "rocm") for d in devices),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "optax": optax.__version__,
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "xla_flags": os.environ.get("XLA_FLAGS"),
        "load_average": _load_average(),
    }


# --------------------------------------------------------------------------------------------
# timing


def _compile(fn: Callable, *args: Any) -> tuple[Any, dict[str, Any]]:
    """``jax.jit(fn).lower(*args).compile()``; returns it with its times and memory stats."""
    start = time.perf_counter()
    lowered = jax.jit(fn).lower(*args)
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


class _Variant:
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


def _round_robin(groups: list[list[_Variant]], repeats: int) -> None:
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


# --------------------------------------------------------------------------------------------
# the variants


def _apply_quick(cfg: DictConfig) -> DictConfig:
    """``cfg`` with ``quick_settings`` applied: fewer repeats, smaller nets and batches."""
    settings = OmegaConf.to_container(cfg.quick_settings, resolve=True)
    max_width, max_batch = settings.pop("max_width"), settings.pop("max_batch")
    max_hidden = settings.pop("max_hidden_layers")
    grid = []
    for point in OmegaConf.to_container(cfg.grid, resolve=True):
        features = list(point["features"])
        hidden = [min(f, max_width) for f in features[1:-1]][:max_hidden]
        features = [features[0], *hidden, features[-1]]
        grid.append({**point, "features": features, "batch": min(point["batch"], max_batch)})
    return OmegaConf.merge(cfg, settings, {"grid": grid})


def _data(cfg: DictConfig, features: Sequence[int], n: int, seed: int):
    """Synthetic MNIST-like data: ``x [n, n_in]`` uniform in [0, 1), targets for ``cfg.loss``.

    Drawn with numpy and put on device, so no small jax programs need compiling.
    """
    rng = np.random.default_rng(seed)
    x = rng.random((n, features[0]), dtype=np.float32)
    labels = rng.integers(0, features[-1], n)
    y = encode_targets(labels, task="classification", loss_name=cfg.loss, n_outputs=features[-1])
    return jnp.asarray(x), jnp.asarray(y)


def _training(cfg: DictConfig, point: dict) -> tuple[layers.Layer, losses.Loss, Any, TrainState]:
    """The grid point's network, loss, optimizer and a starting state (the same for both modes).

    The state has ``init_state``'s structure (from ``jax.eval_shape``) with weights drawn by
    numpy from ``N(0, 1 / n_in)`` and zero biases: timings do not depend on the values, and
    this skips compiling the dozens of small random-number programs an eager init needs.
    """
    net = layers.mlp(list(point["features"][1:]), activation=point["activation"])
    optimizer = optax.sgd(cfg.learning_rate)
    key = jax.random.PRNGKey(cfg.seed)
    in_shape = (int(point["batch"]), int(point["features"][0]))
    shapes = jax.eval_shape(lambda k: init_state(net, optimizer, k, in_shape).params, key)
    rng = np.random.default_rng(cfg.seed)

    def draw(leaf):
        if leaf.ndim < 2:
            return jnp.asarray(np.zeros(leaf.shape, leaf.dtype))
        scale = 1 / math.sqrt(leaf.shape[0])
        return jnp.asarray((scale * rng.standard_normal(leaf.shape)).astype(leaf.dtype))

    params = jax.tree_util.tree_map(draw, shapes)
    step = jnp.asarray(np.zeros((), np.int32))
    state = TrainState(params, optimizer.init(params), step, key)
    return net, losses.get(cfg.loss), optimizer, state


def _loss_only(step: Callable) -> Callable:
    """``step`` returning ``(new_state, loss)``: what a training loop keeps."""

    def f(state, x, y):
        new_state, aux = step(state, x, y)
        return new_state, aux["loss"]

    return f


def _forward_matmuls(ws: tuple, x: jax.Array) -> list[jax.Array]:
    """``[x, x @ w0, x @ w0 @ w1, ...]``: a network's forward matmuls, nothing else."""
    acts = [x]
    for w in ws:
        acts.append(acts[-1] @ w)
    return acts


def _backward_matmuls(ws: tuple, acts: list[jax.Array], dy: jax.Array) -> tuple:
    """The weight gradients ``h.T @ g`` (in ``ws``' order) and the ``g @ w.T`` that carry ``g``
    down; no ``dx`` for the first layer."""
    grads, g = [], dy
    for i in reversed(range(len(ws))):
        grads.append(lax.dot_general(acts[i], g, (((0,), (0,)), ((), ()))))
        if i > 0:
            g = g @ ws[i].T
    return tuple(reversed(grads))


def _matmul_only(ws: tuple, x: jax.Array, dy: jax.Array) -> tuple[jax.Array, tuple]:
    """The step's matmuls alone: forward ``h @ w``; backward ``h.T @ g`` and ``g @ w.T``.

    Returns ``x`` made to depend on the result (so calls chain) and the weight gradients.
    """
    acts = _forward_matmuls(ws, x)
    return x + 0 * acts[-1][:, :1], _backward_matmuls(ws, acts, dy)


# The matmul-only epoch's step size: least squares on MNIST-shaped data is stable there (the
# value changes no work; a diverging or vanishing residual could, through infs or denormals).
_FLOOR_LR = 1e-3


def _matmul_only_epoch(ws: tuple, x: jax.Array, t: jax.Array, batches: jax.Array) -> tuple:
    """An epoch's floor: per batch only what every SGD step of these layers must do.

    One ``lax.scan`` over ``batches`` (``[steps, batch]`` indices): gather the batch, the
    forward, ``dw`` and ``dx`` matmuls, and ``w - lr * dw``. The loss is least squares of the
    network without biases and activations against the targets ``t`` (``[n, n_out]``), so
    ``dy = out - t`` and each step depends on the last, as in training. Returns the final ``ws``.
    """

    def body(ws, idx):
        acts = _forward_matmuls(ws, x[idx])
        grads = _backward_matmuls(ws, acts, acts[-1] - t[idx])
        lr = _FLOOR_LR / idx.shape[0]
        return tuple(w - lr * g for w, g in zip(ws, grads)), None

    return lax.scan(body, ws, batches)[0]


def _square_matmul(cfg: DictConfig, n: int) -> tuple[_Variant, dict[str, Any]]:
    """A device reference: a chained jitted float32 ``a @ b``, ``b`` norm-preserving."""
    rng = np.random.default_rng(cfg.seed)
    a = jnp.asarray(rng.standard_normal((n, n), dtype=np.float32))
    b = jnp.asarray(rng.standard_normal((n, n), dtype=np.float32) / np.float32(math.sqrt(n)))
    compiled, info = _compile(lambda a, b: a @ b, a, b)
    variant = _Variant(lambda a: compiled(a, b), a, warmup=cfg.warmup, block=cfg.block_seconds)
    return variant, {"size": n, "flops": 2 * n**3, "compile_s": info["compile_s"]}


def _point_steps(cfg: DictConfig, point: dict, seed: int) -> dict[str, Any]:
    """Compiles the grid point's manual and autodiff steps and its matmul-only reference."""
    features, batch = list(point["features"]), int(point["batch"])
    x, y = _data(cfg, features, batch, seed)
    variants, info = {}, {}
    net, loss, optimizer, state = _training(cfg, point)
    executables = {}
    for mode in MODES:
        step = _loss_only(make_step(net, loss, optimizer, grad_mode=mode))
        compiled, info[mode] = _compile(step, state, x, y)
        executables[mode] = compiled
        variants[mode] = _Variant(
            lambda s, c=compiled: c(s, x, y)[0], state, warmup=cfg.warmup, block=cfg.block_seconds
        )
        seconds = info[mode]["lower_s"] + info[mode]["compile_s"]
        print(f"  compiled {point['name']} step, {mode}: {seconds:.2f} s", flush=True)
    if cfg.control:  # an A/A control: the autodiff step compiled and timed a second time
        step = _loss_only(make_step(net, loss, optimizer, grad_mode="autodiff"))
        compiled, info["control"] = _compile(step, state, x, y)
        variants["control"] = _Variant(
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
    compiled, info["matmul_only"] = _compile(_matmul_only, ws, x, dy)
    variants["matmul_only"] = _Variant(
        lambda x_, c=compiled: c(ws, x_, dy)[0], x, warmup=cfg.warmup, block=cfg.block_seconds
    )
    return {"variants": variants, "info": info, "executables": executables}


def _write_hlo(name: str, built: dict, directory: Path) -> dict[str, str]:
    """Writes each mode's optimized step HLO to ``directory/<name>.<mode>.txt``."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for mode in MODES:
        path = directory / f"{name}.{mode}.txt"
        path.write_text(built["executables"][mode].as_text())
        paths[mode] = str(path)
    return paths


def _profile(name: str, built: dict, calls: int, directory: Path) -> dict[str, Any]:
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


@functools.partial(jax.jit, static_argnums=(2, 3))
def _epoch_order(key: jax.Array, epoch_index: jax.Array, n: int, batch: int) -> jax.Array:
    """The permutation ``make_epoch`` draws for epoch ``epoch_index``: ``[n // batch, batch]``."""
    steps = n // batch
    shuffle_key = jax.random.fold_in(jax.random.fold_in(key, SHUFFLE), epoch_index)
    return jax.random.permutation(shuffle_key, n)[: steps * batch].reshape(steps, batch)


def _point_epochs(cfg: DictConfig, point: dict, seed: int) -> dict[str, Any]:
    """Compiles the scan epoch and the Python-loop epoch of a grid point, both modes."""
    features, batch = list(point["features"]), int(point["batch"])
    n = int(cfg.epoch_examples)
    x, y = _data(cfg, features, n, seed)
    epoch_index = jnp.zeros((), jnp.int32)
    variants, info, check = {}, {}, {}
    net, loss, optimizer, state = _training(cfg, point)
    batches = list(_epoch_order(state.key, epoch_index, n, batch))
    host_x, host_y, host_batches = np.asarray(x), np.asarray(y), [np.asarray(b) for b in batches]
    for mode in MODES:
        epoch = make_epoch(net, loss, optimizer, batch_size=batch, grad_mode=mode)
        scan, info[f"scan_{mode}"] = _compile(epoch, state, x, y, epoch_index)
        step = _loss_only(make_step(net, loss, optimizer, grad_mode=mode))

        def loop_step(state, x, y, idx, step=step):
            return step(state, x[idx], y[idx])

        looped, info[f"loop_{mode}"] = _compile(loop_step, state, x, y, batches[0])
        plain, info[f"host_loop_{mode}"] = _compile(step, state, x[:batch], y[:batch])

        def loop_epoch(state, looped=looped):
            for idx in batches:
                state = looped(state, x, y, idx)[0]
            return state

        def host_loop_epoch(state, plain=plain):
            for idx in host_batches:
                state = plain(state, host_x[idx], host_y[idx])[0]
            return state

        def scan_epoch(state, scan=scan):
            return scan(state, x, y, epoch_index)[0]

        # Same steps, same result: one epoch of each from the same state (also a warm-up).
        from_scan = scan_epoch(state)
        for kind, call in (
            ("scan", scan_epoch),
            ("loop", loop_epoch),
            ("host_loop", host_loop_epoch),
        ):
            if kind != "scan":
                check[f"{kind}_{mode}"] = float(
                    _relative_error(from_scan.params, call(state).params)
                )
            variants[f"{kind}_{mode}"] = _Variant(call, state, warmup=cfg.epoch_warmup, block=0)
        print(f"  compiled {point['name']} epochs, {mode} ({len(batches)} steps)", flush=True)
    # The floor: the same batches through the matmuls and weight updates alone.
    ws = tuple(p["w"] for p in state.params if p)
    t = y if y.ndim == 2 else jax.nn.one_hot(y, features[-1], dtype=x.dtype)
    order = jnp.stack(batches)
    floor, info["matmul_only_scan"] = _compile(_matmul_only_epoch, ws, x, t, order)
    variants["matmul_only_scan"] = _Variant(
        lambda ws, floor=floor: floor(ws, x, t, order), ws, warmup=cfg.epoch_warmup, block=0
    )
    return {"variants": variants, "info": info, "check": check, "steps": len(batches)}


# --------------------------------------------------------------------------------------------
# results


def _ms(seconds: float) -> float:
    return 1e3 * seconds


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def _paired(a: _Variant, b: _Variant) -> float:
    """Median of per-round ratios of ``a`` to ``b`` (wall time)."""
    return statistics.median(x / y for x, y in zip(a.samples, b.samples))


def _step_results(point: dict, built: dict, peak: dict[str, float]) -> dict[str, Any]:
    variants, info = built["variants"], built["info"]
    flops = step_flops(point["features"], point["batch"])
    only = variants["matmul_only"]
    only_gflops = flops / only.median / 1e9
    modes = {}
    for mode in MODES:
        v = variants[mode]
        gflops = flops / v.median / 1e9
        modes[mode] = {
            "step_ms": _ms(v.median),
            "step_cpu_ms": _ms(v.cpu_median),
            "step_ms_samples": [_ms(s) for s in v.samples],
            "step_cpu_ms_samples": [_ms(s) for s in v.cpu_samples],
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
        "step_ratio": _ratio(manual.median, autodiff.median),
        "step_ratio_paired": _paired(manual, autodiff),
        "step_ratio_cpu": _ratio(manual.cpu_median, autodiff.cpu_median),
        # The A/A control (autodiff against a second autodiff executable, timed the same way):
        # how far from 1 a ratio strays when there is nothing to find.
        "control_ratio_paired": _paired(variants["control"], autodiff)
        if "control" in variants
        else None,
        "control_ratio_cpu": _ratio(variants["control"].cpu_median, autodiff.cpu_median)
        if "control" in variants
        else None,
        "memory_ratio": _ratio(modes["manual"]["peak_bytes"], modes["autodiff"]["peak_bytes"]),
        "same_dots": modes["manual"]["hlo"]["dots"] == modes["autodiff"]["hlo"]["dots"],
        "cost_ratio": {
            name: _ratio(modes["manual"]["cost"][name], modes["autodiff"]["cost"][name])
            for name in _COST_FIELDS
        },
        "matmul_only": {
            "ms": _ms(only.median),
            "gflops": only_gflops,
            "fraction_of_matmul_peak": only_gflops / peak["gflops"],
            "compile_s": info["matmul_only"]["compile_s"],
        },
    }


def _epoch_results(built: dict) -> dict[str, Any]:
    variants, info = built["variants"], built["info"]
    out: dict[str, Any] = {"steps": built["steps"]}
    for name, v in variants.items():
        out[name] = {
            "epoch_s": v.median,
            "epoch_cpu_s": v.cpu_median,
            "epoch_s_samples": list(v.samples),
            "lower_s": info[name]["lower_s"],
            "compile_s": info[name]["compile_s"],
            "memory": info[name]["memory"],
            "peak_bytes": info[name]["memory"]["peak_bytes"],
        }
    floor = variants["matmul_only_scan"]
    out["matmul_only_scan"]["params_finite"] = all(
        bool(np.all(np.isfinite(w))) for w in floor.carry
    )
    scan_manual, scan_autodiff = variants["scan_manual"], variants["scan_autodiff"]
    out["scan_ratio"] = _ratio(scan_manual.median, scan_autodiff.median)
    out["scan_ratio_paired"] = _paired(scan_manual, scan_autodiff)
    out["scan_ratio_cpu"] = _ratio(scan_manual.cpu_median, scan_autodiff.cpu_median)
    for mode in MODES:
        scan = variants[f"scan_{mode}"]
        out[f"scan_over_floor_{mode}"] = _ratio(scan.median, floor.median)
        for loop in LOOPS:
            loop_s = variants[f"{loop}_{mode}"].median
            out[f"{loop}_speedup_{mode}"] = _ratio(loop_s, scan.median)
            # No scan of these layers can beat the floor: the most its loop/scan could reach
            # (generous: the loop itself would speed up with a faster step).
            out[f"{loop}_speedup_ceiling_{mode}"] = _ratio(loop_s, floor.median)
            out[f"{loop}_vs_scan_params_rel_err_{mode}"] = built["check"][f"{loop}_{mode}"]
    return out


def _target(measured: Any, threshold: float, met: bool, **where: Any) -> dict[str, Any]:
    return {**where, "measured": measured, "threshold": threshold, "met": bool(met)}


def _reachable(ceiling: float | None, minimum: float) -> dict[str, Any]:
    """A target's ``ceiling``, what this device reached in the same run doing only the work no
    step can skip, and whether that clears the target's ``minimum`` (``None``: not measured)."""
    return {"ceiling": ceiling, "reachable": None if ceiling is None else ceiling >= minimum}


# Which manual/autodiff ratio the targets judge (``targets.ratio``): the key suffix per estimator.
_ESTIMATORS = {"paired": "_paired", "medians": "", "cpu": "_cpu"}


def _targets(cfg: DictConfig, points: dict[str, Any]) -> dict[str, Any]:
    """Each target: measured value, threshold, met; manual/autodiff ratios by ``targets.ratio``."""
    t = cfg.targets
    suffix = _ESTIMATORS[t.ratio]
    ratios = {name: p["step_ratio" + suffix] for name, p in points.items()}
    median = statistics.median(ratios.values())
    worst = max(ratios, key=ratios.get)
    out = {
        "step_ratio_median": _target(
            median, t.step_ratio_median, median <= t.step_ratio_median, estimator=t.ratio
        ),
        "step_ratio_max": _target(
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
    out["peak_memory_ratio_max"] = _target(
        known.get(worst), 1.0, bool(known) and known[worst] <= 1.0, point=worst
    )
    if t.matmul_fraction_point in points:
        modes = points[t.matmul_fraction_point]["modes"]
        fraction = modes["manual"]["fraction_of_matmul_peak"]
        only = points[t.matmul_fraction_point]["matmul_only"]["fraction_of_matmul_peak"]
        out["matmul_fraction"] = _target(
            fraction,
            t.matmul_fraction_min,
            fraction >= t.matmul_fraction_min,
            point=t.matmul_fraction_point,
            **_reachable(only, t.matmul_fraction_min),
        )
    epoch = (points.get(t.epoch_point) or {}).get("epoch")
    if epoch:
        ratio, speedup = epoch["scan_ratio" + suffix], epoch["loop_speedup_manual"]
        out["epoch_scan_ratio"] = _target(
            ratio,
            t.epoch_scan_ratio_max,
            ratio <= t.epoch_scan_ratio_max,
            point=t.epoch_point,
            estimator=t.ratio,
        )
        out["loop_speedup"] = _target(
            speedup,
            t.loop_speedup_min,
            speedup >= t.loop_speedup_min,
            point=t.epoch_point,
            **_reachable(epoch["loop_speedup_ceiling_manual"], t.loop_speedup_min),
        )
    return out


def _control_summary(points: dict[str, Any]) -> dict[str, Any] | None:
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
                    *(_fmt(cost[field], ".0f") for field in _COST_FIELDS),
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


def _plain(x: Any) -> Any:
    """JSON-ready: numpy scalars to Python, NaN and inf to None."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


# --------------------------------------------------------------------------------------------
# entry points


def run(
    cfg: DictConfig, output_dir: str | Path | None = None, *, command: str | None = None
) -> dict[str, Any]:
    """Runs the benchmark described by ``cfg``; writes ``benchmark.json`` into ``output_dir``.

    Args:
      cfg: the composed ``conf/benchmark.yaml``.
      output_dir: where to write ``benchmark.json`` (None: don't write).
      command: the command line that produced ``cfg``, recorded in the results.

    Returns:
      The results: ``environment``, ``matmul_reference``, ``points`` (per grid point: FLOPs; per
      mode step time, GFLOP/s, fractions of the matmul peak, compile time, memory; the ratios;
      ``epoch`` or None), ``targets`` and ``runtime_s``.
    """
    start = time.perf_counter()
    if cfg.quick:
        cfg = _apply_quick(cfg)
    env = environment()
    grid = OmegaConf.to_container(cfg.grid, resolve=True)
    names = [p["name"] for p in grid]
    if len(set(names)) != len(names):
        raise ValueError(f"grid point names must be unique, got {names}")
    if cfg.targets.ratio not in _ESTIMATORS:
        raise ValueError(
            f"unknown targets.ratio {cfg.targets.ratio!r}; valid: {', '.join(_ESTIMATORS)}"
        )
    profiled = cfg.get("profile") or []
    profiled = [profiled] if isinstance(profiled, str) else list(profiled)
    unknown = [name for name in profiled if name not in names]
    if unknown:
        raise ValueError(f"profile: unknown grid points {unknown}; the grid has {names}")
    dump = bool(cfg.get("dump_hlo"))
    if dump and output_dir is None:
        raise ValueError("dump_hlo=true needs an output directory to write the HLO into")
    print(f"benchmark: {len(grid)} grid points on {env['device_kind']} (jax {env['jax']})")
    if cfg.quick:
        print("benchmark: quick=true is a smoke run (shrunk nets and batches): not a measurement")

    references = [_square_matmul(cfg, int(n)) for n in cfg.matmul_sizes]
    steps = {p["name"]: _point_steps(cfg, p, cfg.seed + 1 + i) for i, p in enumerate(grid)}
    groups = [[v for v, _ in references]]
    for s in steps.values():
        # manual and the control at either end: the same neighbours, half the rounds each.
        steps_group = [s["variants"].get(name) for name in ("manual", "autodiff", "control")]
        groups += [[s["variants"]["matmul_only"]], [v for v in steps_group if v is not None]]
    print(f"timing steps: {cfg.repeats} interleaved rounds", flush=True)
    _round_robin(groups, cfg.repeats)
    sizes = [
        {
            "size": ref["size"],
            "ms": _ms(v.median),
            "gflops": ref["flops"] / v.median / 1e9,
            "gflops_cpu": ref["flops"] / v.cpu_median / 1e9,
            "ms_samples": [_ms(s) for s in v.samples],
            "compile_s": ref["compile_s"],
        }
        for v, ref in references
    ]
    best = max(sizes, key=lambda r: r["gflops"])
    matmul_reference = {
        "sizes": sizes,
        "size": best["size"],
        "gflops": best["gflops"],
        "gflops_cpu": max(r["gflops_cpu"] for r in sizes),
    }
    points = {p["name"]: _step_results(p, steps[p["name"]], matmul_reference) for p in grid}
    run_dir = Path(output_dir) if output_dir is not None else None
    for name, p in points.items():
        p["hlo_files"] = _write_hlo(name, steps[name], run_dir / "hlo") if dump else None
        p["profile"] = None
        if name in profiled:
            calls = int(cfg.profile_calls)
            print(f"profiling {name}: {calls} calls per mode", flush=True)
            if run_dir is not None:
                p["profile"] = _profile(name, steps[name], calls, run_dir / "profile")
            else:  # nowhere to keep the traces: summarise them, then let them go
                with tempfile.TemporaryDirectory() as scratch:
                    p["profile"] = _profile(name, steps[name], calls, Path(scratch))
                for mode in MODES:
                    p["profile"][mode]["trace_dir"] = None
    del steps, references, groups  # free the step executables before the epoch data arrive

    epoch_points = [p for p in grid if p.get("epoch")]
    if cfg.get("epoch_only") is not None:
        epoch_points = [p for p in epoch_points if p["name"] in cfg.epoch_only]
    epochs = {
        p["name"]: _point_epochs(cfg, p, cfg.seed + 100 + i) for i, p in enumerate(epoch_points)
    }
    if epochs:
        print(f"timing epochs: {cfg.epoch_repeats} interleaved rounds", flush=True)
        pairs = [
            group
            for e in epochs.values()
            for group in (
                [e["variants"]["matmul_only_scan"]],
                *([e["variants"][f"{kind}_{mode}"] for mode in MODES] for kind in EPOCH_KINDS),
            )
        ]
        _round_robin(pairs, cfg.epoch_repeats)
    for name, p in points.items():
        p["epoch"] = _epoch_results(epochs[name]) if name in epochs else None

    env["load_average_end"] = _load_average()
    result = {
        "command": command,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "environment": env,
        "matmul_reference": matmul_reference,
        "points": points,
        "targets": _targets(cfg, points),
        "control": _control_summary(points),
    }
    result["runtime_s"] = time.perf_counter() - start
    result = _plain(result)
    print(format_tables(result))
    if output_dir is not None:
        path = Path(output_dir) / "benchmark.json"
        path.write_text(json.dumps(result, indent=2))
        print(f"wrote {path}")
    return result


@hydra.main(config_path="../conf", config_name="benchmark", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Runs the benchmark; ``benchmark.json`` lands in Hydra's run directory."""
    command = shlex.join(["python", "experiments/benchmark.py", *sys.argv[1:]])
    run(cfg, output_dir=HydraConfig.get().runtime.output_dir, command=command)


if __name__ == "__main__":
    main()
