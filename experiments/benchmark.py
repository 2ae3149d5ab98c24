"""Benchmark: the hand-written backward against autodiff, on this device, in one process.

Convention (the method):

* Every figure comes from ONE process and the variants are interleaved: each timed *round*
  samples every variant once, group by group (a grid point's matmul-only reference; per call
  path its manual step, autodiff step and A/A control; its learning rules' steps; the device's
  matmul references), the members of each group in reversed order every other round, so drift
  and noise from other processes hit all variants alike. A *sample* repeats a compiled function
  for about ``block_seconds`` and divides (an epoch is one call). Reported times are medians
  over ``repeats`` rounds (``epoch_repeats`` for epochs), after ``warmup`` untimed calls.
* Each sample records wall time (``time.perf_counter``, the headline figure) and this process's
  CPU time (``time.process_time``, all of XLA's threads): on a shared machine other processes
  inflate wall time but hardly CPU time, so the CPU-time ratio is the steadier comparison.
* Ratios are subject / reference (manual / autodiff; rule / manual; chunked / whole; with the
  alignment signal / without): ``<name>`` = median over median (wall), ``<name>_paired`` the
  median of per-round ratios (each round's pair is adjacent in time), ``<name>_cpu`` the ratio
  of CPU-time medians. Targets judge the one ``targets.ratio`` names (default ``paired``): on a
  shared machine the wall times of a long run are often bimodal (another job comes and goes),
  and a ratio of two medians can then compare samples from different modes.
* Every comparison has an A/A control (``control``): the reference compiled a second time and
  timed in the same group, subject and control at either end. Its ratio to the reference is how
  far a ratio strays from 1 when there is nothing to find; targets report it as ``noise``.
* Grid points are MLPs (``features``) or any network (``model:``, instantiated as
  ``conf/model/*.yaml``, with ``input_shape``): ``bench.points``. An MLP's FLOPs count matmuls
  only, ``2 m n k`` each: per dense layer ``n_in -> n_out`` the forward ``x @ w`` and the
  backward ``x.T @ dy`` (dw) and ``dy @ w.T`` (dx), each ``2 batch n_in n_out``, except that the
  first layer has no dx. ``fraction_of_matmul_peak`` is achieved GFLOP/s over the best GFLOP/s
  of the jitted float32 ``[n, n] @ [n, n]`` references (``matmul_sizes``) timed in the same
  rounds; ``matmul_only`` runs the point's matmuls alone. For every point, ``xla_gflops`` is
  XLA's cost-analysis flops (every floating-point op) per second.
* Call paths (``paths``, ``bench.paths``): ``make_step`` (jitted to return ``(new_state,
  loss)``, as ``make_epoch`` uses it), the README's ``jax.jit`` of ``bpjax.value_and_grad`` +
  an optax update, and ``jax.grad`` of a loss through ``bpjax.as_custom_vjp`` (its autodiff
  counterpart: through the forward). A point's top-level figures are ``make_step``'s; every
  path's are under ``paths``. Calls are chained (each takes the previous call's carry).
* Every timed function is compiled once with ``jax.jit(f).lower(...).compile()``; that
  executable is the one timed, and its compile time, ``memory_analysis()``, optimized-HLO
  summary (``hlo_summary``) and ``cost_analysis()`` (exact, unlike timings) are reported.
* Epochs (points with ``epoch: true``, ``bench.epochs``): ``make_epoch`` (one jitted
  ``lax.scan``) against Python loops dispatching one jitted step per batch, the same steps, the
  same final params (checked); for an MLP the floor (the matmuls and weight updates alone, one
  scan) and the ceilings it sets.
* Learning rules (``rules``, ``bench.rules``): each rule's ``make_step`` against the manual
  step on the MLP points, and (``rules.epochs``) each rule's epoch as ``fit`` trains it
  against manual's. The alignment signal's cost and the chunked epochs
  (``grad_check``, ``chunked``, ``bench.chunks``): epochs as ``fit`` runs them, in chunks.
* ``max_isa`` caps XLA's CPU code generation (``XLA_FLAGS=--xla_cpu_max_isa``) for the run, so
  an AVX-512 host runs as if on an older ISA; the environment records the ISA used
  (``bench.env``). ``dump_hlo`` writes the HLO text, ``profile`` traces chosen points (and
  their rule steps, where they are ``rules`` points).

This file is the entry point; ``experiments/bench/`` holds the parts; the math is ``bpjax``'s.
"""

import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

if str(Path(__file__).resolve().parent) not in sys.path:  # run as a script, it is already there
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench.chunks import chunked_epochs, chunked_results, grad_check_epochs, grad_check_results
from bench.config import check_config, names_of, rule_modes, rule_points
from bench.env import environment, load_average, request_max_isa
from bench.epochs import epoch_results, point_epochs, relate_to_step
from bench.floors import square_matmul
from bench.points import MODES, Point, apply_quick, build, epoch_examples, synthetic_data
from bench.report import format_tables, plain
from bench.results import step_results
from bench.rules import rule_epoch_results, rule_epochs, rule_results, rule_steps
from bench.steps import point_steps, profile, profile_programs, write_hlo
from bench.targets import control_summary, targets
from bench.timing import ms, round_robin

from bpjax._atomic import atomic_write_text
from bpjax.cli import check_keys, run_command_line, schema_from_conf

ROOT = Path(__file__).resolve().parent.parent


def _matmul_reference(references: list) -> dict[str, Any]:
    sizes = [
        {
            "size": ref["size"],
            "ms": ms(v.median),
            "gflops": ref["flops"] / v.median / 1e9,
            "gflops_cpu": ref["flops"] / v.cpu_median / 1e9,
            "ms_samples": [ms(s) for s in v.samples],
            "compile_s": ref["compile_s"],
        }
        for v, ref in references
    ]
    best = max(sizes, key=lambda r: r["gflops"])
    return {
        "sizes": sizes,
        "size": best["size"],
        "gflops": best["gflops"],
        "gflops_cpu": max(r["gflops_cpu"] for r in sizes),
    }


def _time_steps(cfg: DictConfig, built: dict[str, Point], grid: list[dict]) -> tuple[dict, dict]:
    """Compiles and times every point's steps (every path) and rule steps, one set of rounds.

    Returns:
      The points' results (without epochs) and the compiled steps (for HLO dumps, profiles).
    """
    references = [square_matmul(cfg, int(n)) for n in cfg.matmul_sizes]
    # Each point's data seed is its grid index's: its steps and rule steps see the same batch.
    seeds = {name: cfg.seed + 1 + i for i, name in enumerate(built)}
    steps = {name: point_steps(cfg, point, seeds[name]) for name, point in built.items()}
    ruled = {
        name: rule_steps(cfg, built[name], seeds[name], rule_modes(cfg))
        for name in rule_points(cfg, grid)
    }
    groups = [[v for v, _ in references]]
    for name, s in steps.items():
        if s["matmul_only"] is not None:
            groups.append([s["matmul_only"][0]])
        for timed in s["paths"].values():
            # manual and the control at either end: the same neighbours, half the rounds each.
            variants = timed["variants"]
            groups.append([variants[n] for n in (*MODES, "control") if n in variants])
        groups += ruled[name]["groups"] if name in ruled else []
    print(f"timing steps: {cfg.repeats} interleaved rounds", flush=True)
    round_robin(groups, cfg.repeats)
    peak = _matmul_reference(references)
    points = {name: step_results(point, steps[name], peak) for name, point in built.items()}
    for name, point in points.items():
        point["rules"] = rule_results(ruled[name]) if name in ruled else None
        steps[name]["rule_steps"] = ruled.get(name)  # profiled with the point's steps
    return {"points": points, "matmul_reference": peak}, steps


def _dump_and_profile(cfg: DictConfig, points: dict, steps: dict, run_dir: Path | None) -> None:
    profiled = names_of(cfg.get("profile"))
    for name, p in points.items():
        files = write_hlo(name, steps[name], run_dir / "hlo") if cfg.get("dump_hlo") else None
        p["hlo_files"] = files and files["make_step"]
        for path, r in p["paths"].items():
            r["hlo_files"] = files and files[path]
        p["profile"] = None
        if p.get("rules") is not None:
            p["rules"]["profile"] = None
        if name not in profiled:
            continue
        calls = int(cfg.profile_calls)
        print(f"profiling {name}: {calls} calls per mode", flush=True)
        ruled = steps[name].get("rule_steps")
        with tempfile.TemporaryDirectory() as scratch:  # nowhere to keep the traces: let them go
            directory = run_dir / "profile" if run_dir is not None else Path(scratch)
            p["profile"] = profile(name, steps[name], calls, directory)
            if ruled is not None:  # the rule steps, manual's beside them
                programs = {
                    mode: (ruled["variants"][mode], ruled["executables"][mode])
                    for mode in ruled["variants"]
                    if mode != "control"
                }
                p["rules"]["profile"] = profile_programs(
                    programs, calls, directory / name / "rules"
                )
        if run_dir is None:
            for prof in (p["profile"], (p["rules"] or {}).get("profile")):
                for mode in (m for m in prof or {} if m != "calls"):
                    prof[mode]["trace_dir"] = None


def _time_epochs(cfg: DictConfig, built: dict[str, Point], grid: list[dict], points: dict) -> None:
    """Compiles and times the epochs, the alignment signal's epochs and the chunked epochs,
    one set of rounds; adds ``epoch``, ``grad_check`` and ``chunked`` to each point."""
    epoch_names = [s["name"] for s in grid if s.get("epoch")]
    if cfg.get("epoch_only") is not None:
        epoch_names = [name for name in epoch_names if name in cfg.epoch_only]
    chunk_names = names_of(cfg.chunked.points)
    data = {}  # one training set per point, shared by its sections

    def data_of(point: Point) -> tuple:
        if point.name not in data:
            # The seed of an epoch point's data is its index among the epoch points (as before
            # the other sections existed); other points' follow.
            index = (
                epoch_names.index(point.name)
                if point.name in epoch_names
                else len(epoch_names) + list(built).index(point.name)
            )
            n = epoch_examples(cfg, point)
            seed = cfg.seed + 100 + index
            data[point.name] = synthetic_data(cfg, point.example_shape, point.n_outputs, n, seed)
        return data[point.name]

    epochs, checks, chunked, ruled, groups = {}, {}, {}, {}, []
    rule_epoch_names = rule_points(cfg, grid) if cfg.rules.epochs else []
    for name, point in built.items():
        if name in epoch_names:
            epochs[name] = point_epochs(cfg, point, data_of(point))
            groups += epochs[name]["groups"]
        if name == cfg.grad_check.point:
            checks[name] = grad_check_epochs(cfg, point, data_of(point))
            groups += checks[name]["groups"]
        if name in chunk_names:
            chunked[name] = chunked_epochs(cfg, point, data_of(point))
            groups += chunked[name]["groups"]
        if name in rule_epoch_names:
            ruled[name] = rule_epochs(cfg, point, data_of(point), rule_modes(cfg))
            groups += ruled[name]["groups"]
    if groups:
        print(f"timing epochs: {cfg.epoch_repeats} interleaved rounds", flush=True)
        round_robin(groups, cfg.epoch_repeats)
    for name, p in points.items():
        p["epoch"] = epoch_results(epochs[name]) if name in epochs else None
        if p["epoch"]:
            relate_to_step(p["epoch"], p)
        p["grad_check"] = grad_check_results(checks[name]) if name in checks else None
        p["chunked"] = chunked_results(chunked[name], cfg) if name in chunked else None
        p["rule_epochs"] = rule_epoch_results(ruled[name]) if name in ruled else None


class BenchmarkConfigError(ValueError):
    """A setting the benchmark refuses, before anything compiles (the script: one line, exit 2)."""


def _checked(cfg: DictConfig, output_dir: str | Path | None) -> tuple[DictConfig, list[dict]]:
    """The config to run (``quick_settings`` applied) and its grid, every setting checked.

    Raises:
      ValueError: a key nothing reads (a typo: ``+profil=[mlp-30]``), then as ``run``.
    """
    config = OmegaConf.to_container(cfg, resolve=False)
    config.pop("hydra", None)  # Hydra checks its own
    unread = check_keys(config, schema_from_conf(ROOT / "conf", "benchmark"))
    if unread:
        raise ValueError("; ".join(unread))
    request_max_isa(cfg.get("max_isa"))  # before anything starts XLA's backend
    if cfg.quick:
        cfg = apply_quick(cfg)
    grid = OmegaConf.to_container(cfg.grid, resolve=True)
    check_config(cfg, grid)
    if cfg.get("dump_hlo") and output_dir is None:
        raise ValueError("dump_hlo=true needs an output directory to write the HLO into")
    return cfg, grid


def run(
    cfg: DictConfig, output_dir: str | Path | None = None, *, command: str | None = None
) -> dict[str, Any]:
    """Runs the benchmark described by ``cfg``; writes ``benchmark.json`` into ``output_dir``.

    Args:
      cfg: the composed ``conf/benchmark.yaml``.
      output_dir: where to write ``benchmark.json`` (None: don't write).
      command: the command line that produced ``cfg``, recorded in the results.

    Returns:
      The results: ``environment``, ``matmul_reference``, ``points`` (per grid point: its
      description and FLOPs; ``make_step``'s step figures per mode and ratios at the top level;
      ``paths`` (every call path's); ``matmul_only``; ``epoch``, ``rules``, ``grad_check``,
      ``chunked`` or None; ``hlo_files``, ``profile``), ``targets``, ``control`` and
      ``runtime_s``.

    Raises:
      BenchmarkConfigError (a ValueError): any bad setting (a key nothing reads,
        ``bench.config.check_config``, ``max_isa``), before any compilation.
    """
    start = time.perf_counter()
    try:
        cfg, grid = _checked(cfg, output_dir)
    except ValueError as e:
        raise BenchmarkConfigError(str(e)) from e
    env = environment()
    print(f"benchmark: {len(grid)} grid points on {env['device_kind']} (jax {env['jax']})")
    if cfg.quick:
        print("benchmark: quick=true is a smoke run (shrunk nets and batches): not a measurement")
    built = {spec["name"]: build(cfg, spec) for spec in grid}
    stepped, steps = _time_steps(cfg, built, grid)
    points = stepped["points"]
    run_dir = Path(output_dir) if output_dir is not None else None
    _dump_and_profile(cfg, points, steps, run_dir)
    del steps  # free the step executables before the epoch data arrive
    _time_epochs(cfg, built, grid, points)
    env["load_average_end"] = load_average()
    result = {
        "command": command,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "environment": env,
        "matmul_reference": stepped["matmul_reference"],
        "points": points,
        "targets": targets(cfg, points),
        "control": control_summary(points),
    }
    result["runtime_s"] = time.perf_counter() - start
    result = plain(result)
    print(format_tables(result))
    if output_dir is not None:
        path = Path(output_dir) / "benchmark.json"
        atomic_write_text(path, json.dumps(result, indent=2, allow_nan=False))
        print(f"wrote {path}")
    return result


@hydra.main(config_path="../conf", config_name="benchmark", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Runs the benchmark; ``benchmark.json`` lands in Hydra's run directory. A bad setting is
    one ``error:`` line, exit 2, before anything compiles."""
    command = shlex.join(["python", "experiments/benchmark.py", *sys.argv[1:]])
    try:
        run(cfg, output_dir=HydraConfig.get().runtime.output_dir, command=command)
    except BenchmarkConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    # Hydra's own refusals of the command line (bad syntax, a key without its +): one line too.
    run_command_line(main, ROOT / "conf", config_name="benchmark")
