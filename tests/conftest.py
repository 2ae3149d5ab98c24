"""Strict test configuration shared by every test module (equinox-style).

* float64 is enabled so hand-written backward passes can be checked to ~1e-10; tests that
  exercise float32 cast explicitly.
* Implicit rank promotion raises, so a broadcasting bug in a backward fails loudly.
* One persistent compilation cache for the whole run (jax's ``JAX_COMPILATION_CACHE_DIR``,
  set before jax is imported, so the xdist workers and every script a test starts share it):
  the suite compiles the same small programs in many processes. Results don't change (the same
  program is the same executable); a user's own ``JAX_COMPILATION_CACHE_DIR`` is kept.
* XLA's backend optimizations are off (jax's ``JAX_DISABLE_MOST_OPTIMIZATIONS``, set the same
  way and inherited the same way; a user's own setting is kept). The suite is bound by compiling
  thousands of small programs, not by running them: this cut its summed test time by a
  quarter (1811 -> 1361 s, quiet, -n 2). LLVM's code generation is plainer, which can move
  float results in their last bits. The few tests that compare with data an optimized program
  wrote (the stored checkpoints) ask for ``optimized_compiler``; runs that train long enough
  to feel it run optimized (``run_as_a_user``).
* For the same reason XLA:CPU emits fused loops with its older emitters, not its MLIR fusion
  emitters (``SUITE_XLA_FLAGS``, in ``XLA_FLAGS``, inherited the same way; ``xla_flags`` gives a
  child process them): compiling takes well under half the time (summed test time, quiet,
  -n 2: 1361 -> 1137 s; the whole suite 11 min 48 s -> 9 min 57 s). The HLO passes are the
  same, but some fusion choices differ: tests of a compiled program's work, operations or
  layouts compile it exactly as a user's process does (``compile_as_users``), and
  ``run_as_a_user`` runs without the suite's settings.
"""

import fcntl
import json
import math
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

# Set by the process pytest starts in (xdist's workers inherit its environment), removed by it.
_JAX_CACHE = pathlib.Path(tempfile.gettempdir()) / f"bpjax-tests-jax-cache-{os.getpid()}"
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(_JAX_CACHE)
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# XLA:CPU's older loop emitters, not its MLIR fusion emitters: well under half the compile time
# (a dozen small value_and_grad programs: 6.0 -> 2.6 s of CPU), the same HLO passes, some
# fusion choices of their own (see compile_as_users). Set in XLA_FLAGS, which XLA reads once,
# when its backend starts.
SUITE_XLA_FLAGS = "--xla_cpu_use_fusion_emitters=false"
if "xla_cpu_use_fusion_emitters" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {SUITE_XLA_FLAGS}".strip()

import jax  # noqa: E402 (after the cache's environment)
import jax.numpy as jnp  # noqa: E402 (after the cache's environment)
import numpy as np  # noqa: E402 (after the cache's environment)
import pytest  # noqa: E402 (after the cache's environment)

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")

# Ctrl-C as at a terminal, however the suite was started. A shell starts a background job
# (`pytest ... &`) with SIGINT ignored, which Python keeps and its subprocesses inherit; the
# tests of Ctrl-C (held by fit, then an interrupt) would then see a signal that never arrives
# (test_an_interrupt_in_the_runs_last_chunk_lets_the_run_end: DID NOT RAISE).
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Tolerances for backward-vs-autodiff comparisons, by dtype.
RTOL = {jnp.float64: 1e-10, jnp.float32: 1e-5}
ATOL = {jnp.float64: 1e-12, jnp.float32: 1e-6}


@pytest.fixture(params=["eager", "jit"])
def maybe_jit(request):
    """Runs a function either eagerly or under ``jax.jit`` (a fixture, since chex.variants
    does not mix with ``pytest.mark.parametrize``)."""
    if request.param == "jit":
        return jax.jit
    return lambda f, **kwargs: f


@pytest.fixture
def optimized_compiler():
    """Compiles with XLA's optimizations on (as users do) for one test, which compares with data
    that an optimized program wrote: plainer code generation may differ in the last bits.
    jax's in-memory caches don't key on the setting, so they are cleared on the way in and out
    (the persistent cache does key on it). The emitters (``SUITE_XLA_FLAGS``) are the
    process's: XLA reads them once."""
    flag = "jax_disable_most_optimizations"
    # as jax reads the variable (its bool_env); conftest set it before jax started
    before = os.environ[flag.upper()].lower() in ("y", "yes", "t", "true", "on", "1")
    jax.config.update(flag, False)
    jax.clear_caches()
    try:
        yield
    finally:
        jax.config.update(flag, before)
        jax.clear_caches()


@pytest.fixture(params=[jnp.float64, jnp.float32], ids=["f64", "f32"])
def dtype(request):
    return request.param


def tree_cast(tree, dtype):
    """Casts every floating leaf of a pytree to ``dtype``. Concrete leaves cast to float32 or
    float64 are cast by numpy (the same rounding, to nearest even): eagerly, jax compiles a
    conversion for every new shape."""

    def cast(a):
        if not jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating):
            return a
        if isinstance(a, jax.core.Tracer) or jnp.dtype(dtype) not in (jnp.float32, jnp.float64):
            return a.astype(dtype)
        return jnp.asarray(np.asarray(a).astype(dtype))

    return jax.tree_util.tree_map(cast, tree)


def numpy_like(shapes, dtype=jnp.float64, *, seed: int = 0):
    """A pytree of ``shapes`` (``jax.ShapeDtypeStruct`` leaves, e.g. from ``jax.eval_shape``)
    drawn with numpy, ``N(0, 1 / fan_in)`` (``fan_in``: the product of all but the last axis; 1
    for a vector), as ``dtype``. For tests that need some values, not jax's: eager
    ``jax.random`` compiles a sampler for every new shape."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda s: jnp.asarray(
            rng.standard_normal(s.shape) / math.sqrt(math.prod(s.shape[:-1])), dtype
        ),
        shapes,
    )


def init_shapes(layer, in_shape, *, seed: int = 0):
    """``layer.init``'s ``(out_shape, params)`` with ``jax.ShapeDtypeStruct`` params: init
    traced, not run (eagerly, init compiles a sampler for every new shape: seconds for a CNN)."""
    traced = {}

    def init():
        traced["out_shape"], params = layer.init(jax.random.key(seed), in_shape)
        return params

    shapes = jax.eval_shape(init)
    return traced["out_shape"], shapes


def numpy_init(layer, in_shape, *, seed: int = 0):
    """``init_shapes`` with the params drawn as float32 numbers with numpy (``numpy_like``):
    for a test that checks a backward, which holds at any params (init compiled samplers for
    50 s of CPU in test_layers' setups); float32 numbers are exact in either dtype."""
    out_shape, shapes = init_shapes(layer, in_shape, seed=seed)
    return out_shape, numpy_like(shapes, jnp.float32, seed=seed)


def numpy_params(net, in_shape, dtype=jnp.float64, *, seed: int = 0):
    """Params in ``net.init``'s structure and shapes (traced, nothing compiled), drawn by
    ``numpy_like``."""
    return numpy_like(init_shapes(net, in_shape)[1], dtype, seed=seed)


def assert_trees_close(actual, expected, *, rtol, atol=0.0):
    """Compares two pytrees leaf by leaf (structure must match exactly)."""
    assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected)
    for a, e in zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected)):
        assert a.shape == e.shape, (a.shape, e.shape)
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=atol)


def leaves(tree) -> list[np.ndarray]:
    """The leaves of a pytree as numpy arrays."""
    return [np.asarray(a) for a in jax.tree_util.tree_leaves(tree)]


def assert_trees_equal(a, b):
    """Bit-identical pytrees (same structure, every leaf equal)."""
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(leaves(a), leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def trees_differ(a, b) -> bool:
    return any(not np.array_equal(x, y) for x, y in zip(leaves(a), leaves(b), strict=True))


# XLA's defaults, as overrides of one compilation: what a user's process compiles with (the
# suite compiles plainer, for speed: see the module's docstring).
USERS_COMPILER = {
    "xla_cpu_use_fusion_emitters": True,
    "xla_backend_optimization_level": 3,
    "xla_llvm_disable_expensive_passes": False,
}


def compile_as_users(fn, *args):
    """``jax.jit(fn)`` compiled for ``args`` as a user's process compiles it (XLA's default
    emitters and optimizations: the same optimized HLO text), not as the suite does: for tests
    of a compiled program's work, operations and layouts, which the emitters' fusion decisions
    move (``tests/test_losses.py`` checks it against a user's process)."""
    return jax.jit(fn).lower(*args).compile(compiler_options=USERS_COMPILER)


def xla_cost(fn, *args) -> dict[str, float]:
    """XLA's static cost analysis of ``jax.jit(fn)`` compiled for ``args``: exact counts of
    ``flops``, ``transcendentals`` and ``bytes`` accessed (0 where XLA reports none), as a
    user's process compiles it."""
    analysis = compile_as_users(fn, *args).cost_analysis()
    if isinstance(analysis, list | tuple):  # one dict per program in older jax versions
        analysis = analysis[0]
    keys = {"flops": "flops", "transcendentals": "transcendentals", "bytes": "bytes accessed"}
    return {name: float(analysis.get(key, 0.0)) for name, key in keys.items()}


def assert_no_more_work(ours: dict[str, float], theirs: dict[str, float], *, extra_flops=0.0):
    """``xla_cost`` counts: ours evaluate no more transcendentals, access no more bytes and do no
    more flops (beyond ``extra_flops``) than theirs."""
    assert ours["transcendentals"] <= theirs["transcendentals"], (ours, theirs)
    assert ours["bytes"] <= theirs["bytes"], (ours, theirs)
    assert ours["flops"] <= theirs["flops"] + extra_flops, (ours, theirs)


def xla_flags(n_devices: int | None = None) -> str:
    """``XLA_FLAGS`` for a child process: the suite's compile-time flags (whatever else the
    suite's process was started with is dropped), with XLA's host platform showing
    ``n_devices`` CPU devices (None: XLA's default, one)."""
    flags = [SUITE_XLA_FLAGS] if SUITE_XLA_FLAGS in os.environ.get("XLA_FLAGS", "") else []
    if n_devices is not None:
        flags.append(f"--xla_force_host_platform_device_count={n_devices}")
    return " ".join(flags)


def run_on_host_devices(code: str, n_devices: int, *, timeout: float = 600) -> dict:
    """Runs ``code`` in a fresh interpreter whose CPU shows ``n_devices`` devices (XLA's host
    platform device count is fixed when jax starts, so it can't be set in this process), from
    the repository root, and returns the JSON object its last line of output prints."""
    env = {**os.environ, "XLA_FLAGS": xla_flags(n_devices), "JAX_PLATFORMS": "cpu"}
    child = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=pathlib.Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert child.returncode == 0, child.stderr
    return json.loads(child.stdout.strip().splitlines()[-1])


def run_as_a_user(
    args: list[str], cwd: pathlib.Path, *, optimized: bool = True, timeout: float = 600
) -> str:
    """Runs ``args`` (a Python command line) in a fresh interpreter as a user would, the suite's
    compilation cache shared. ``optimized``: XLA optimizing with its default emitters, as for a
    user (for a run that trains long enough to feel the suite's setting: the README's fit
    example takes 20 s of CPU so, 41 s as the suite compiles); else compiled as the suite
    compiles (for a run that mostly compiles: the benchmark's quick run, 77 -> 57 s of CPU).
    Asserts it succeeded; returns its stdout."""
    env = dict(os.environ)
    if optimized:
        env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "0"
        env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(SUITE_XLA_FLAGS, "").strip()
    done = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def signal_when(proc: subprocess.Popen, ready, signum: int, *, timeout: float = 240) -> str:
    """Sends ``signum`` to ``proc`` once ``ready()`` is true (polled every 0.2 s; the test fails
    if ``proc`` ends first or ``timeout`` seconds pass), waits for it to end and returns its
    stderr; ``proc`` is killed if anything goes wrong."""
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, f"not ready in {timeout} s"
            time.sleep(0.2)
        proc.send_signal(signum)
        return proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def once_per_session(request, tmp_path_factory, name: str, make) -> tuple[pathlib.Path, Any]:
    """``make(directory)``'s result (JSON-able), made once per test session however many
    pytest-xdist workers ask: the first makes it in ``directory`` while holding a lock, the
    others wait and read its JSON. For a module fixture whose tests may land on both workers,
    each of which would otherwise run the same processes or training on a shared CPU.

    Returns:
        ``(directory, the result as read back from its JSON)``: the same in every worker.
    """
    # xdist's worker id, without needing its plugin (``-p no:xdist``): "master" outside workers
    worker_id = getattr(request.config, "workerinput", {}).get("workerid", "master")
    session = tmp_path_factory.getbasetemp()
    directory = (session if worker_id == "master" else session.parent) / name
    directory.mkdir(exist_ok=True)
    record = directory / f"{name}.result.json"
    with open(directory.parent / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not record.exists():
            made = make(directory)
            record.write_text(json.dumps(made))
            # What make() returned is what the others read: the JSON round trip loses nothing.
            assert json.loads(record.read_text()) == made
    return directory, json.loads(record.read_text())


def pytest_sessionfinish(session, exitstatus):
    """The process that set the run's compilation cache (not an xdist worker) removes it."""
    if _OWN_CACHE and not hasattr(session.config, "workerinput"):
        shutil.rmtree(_JAX_CACHE, ignore_errors=True)
