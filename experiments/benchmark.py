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

This file is the entry point; ``experiments/bench/`` holds the measuring, timing, grid points,
steps, epochs, results and report; the math lives in ``bpjax``.
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

from bench.env import environment, load_average
from bench.epochs import EPOCH_KINDS, epoch_results, point_epochs
from bench.points import MODES, apply_quick
from bench.report import format_tables, plain
from bench.results import ESTIMATORS, control_summary, step_results, targets
from bench.steps import point_steps, profile, square_matmul, write_hlo
from bench.timing import ms, round_robin


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
        cfg = apply_quick(cfg)
    env = environment()
    grid = OmegaConf.to_container(cfg.grid, resolve=True)
    names = [p["name"] for p in grid]
    if len(set(names)) != len(names):
        raise ValueError(f"grid point names must be unique, got {names}")
    if cfg.targets.ratio not in ESTIMATORS:
        raise ValueError(
            f"unknown targets.ratio {cfg.targets.ratio!r}; valid: {', '.join(ESTIMATORS)}"
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

    references = [square_matmul(cfg, int(n)) for n in cfg.matmul_sizes]
    steps = {p["name"]: point_steps(cfg, p, cfg.seed + 1 + i) for i, p in enumerate(grid)}
    groups = [[v for v, _ in references]]
    for s in steps.values():
        # manual and the control at either end: the same neighbours, half the rounds each.
        steps_group = [s["variants"].get(name) for name in ("manual", "autodiff", "control")]
        groups += [[s["variants"]["matmul_only"]], [v for v in steps_group if v is not None]]
    print(f"timing steps: {cfg.repeats} interleaved rounds", flush=True)
    round_robin(groups, cfg.repeats)
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
    matmul_reference = {
        "sizes": sizes,
        "size": best["size"],
        "gflops": best["gflops"],
        "gflops_cpu": max(r["gflops_cpu"] for r in sizes),
    }
    points = {p["name"]: step_results(p, steps[p["name"]], matmul_reference) for p in grid}
    run_dir = Path(output_dir) if output_dir is not None else None
    for name, p in points.items():
        p["hlo_files"] = write_hlo(name, steps[name], run_dir / "hlo") if dump else None
        p["profile"] = None
        if name in profiled:
            calls = int(cfg.profile_calls)
            print(f"profiling {name}: {calls} calls per mode", flush=True)
            if run_dir is not None:
                p["profile"] = profile(name, steps[name], calls, run_dir / "profile")
            else:  # nowhere to keep the traces: summarise them, then let them go
                with tempfile.TemporaryDirectory() as scratch:
                    p["profile"] = profile(name, steps[name], calls, Path(scratch))
                for mode in MODES:
                    p["profile"][mode]["trace_dir"] = None
    del steps, references, groups  # free the step executables before the epoch data arrive

    epoch_points = [p for p in grid if p.get("epoch")]
    if cfg.get("epoch_only") is not None:
        epoch_points = [p for p in epoch_points if p["name"] in cfg.epoch_only]
    epochs = {
        p["name"]: point_epochs(cfg, p, cfg.seed + 100 + i) for i, p in enumerate(epoch_points)
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
        round_robin(pairs, cfg.epoch_repeats)
    for name, p in points.items():
        p["epoch"] = epoch_results(epochs[name]) if name in epochs else None

    env["load_average_end"] = load_average()
    result = {
        "command": command,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "environment": env,
        "matmul_reference": matmul_reference,
        "points": points,
        "targets": targets(cfg, points),
        "control": control_summary(points),
    }
    result["runtime_s"] = time.perf_counter() - start
    result = plain(result)
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
