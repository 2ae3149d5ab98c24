"""experiments/benchmark.py: the quick config runs and reports every field (never a speed)."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SCRIPT = ROOT / "experiments" / "benchmark.py"

MODE_FIELDS = (
    "step_ms",
    "step_cpu_ms",
    "gflops",
    "fraction_of_matmul_peak",
    "fraction_of_matmul_peak_cpu",
    "fraction_of_matmul_only",
    "lower_s",
    "compile_s",
)
RATIO_FIELDS = (
    "step_ratio",
    "step_ratio_paired",
    "step_ratio_cpu",
    "memory_ratio",
    "control_ratio_paired",
    "control_ratio_cpu",
)
EPOCH_VARIANTS = tuple(
    f"{kind}_{mode}" for kind in ("scan", "loop", "host_loop") for mode in ("manual", "autodiff")
)
PROFILED = "mlp-30"
EPOCH_RATIOS = ("scan_ratio", "scan_ratio_paired", "scan_ratio_cpu")
ENVIRONMENT_FIELDS = ("device_kind", "device_count", "jax", "jaxlib", "cpu_count", "platform")
TARGETS = (
    "step_ratio_median",
    "step_ratio_max",
    "peak_memory_ratio_max",
    "matmul_fraction",
    "epoch_scan_ratio",
    "loop_speedup",
)


def _load_script():
    spec = importlib.util.spec_from_file_location("benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Loading the script puts experiments/ on sys.path, where its modules (experiments/bench/) live.
_SCRIPT = _load_script()
from bench import epochs, measure, report, results  # noqa: E402


@pytest.fixture(scope="module")
def benchmark():
    return _SCRIPT


def quick_config(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="benchmark", overrides=["quick=true", *overrides])


def positive(x):
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def quick_run(benchmark, tmp_path_factory):
    out = tmp_path_factory.mktemp("benchmark")
    cfg = quick_config(f"profile=[{PROFILED}]", "dump_hlo=true")
    return cfg, benchmark.run(cfg, output_dir=out), out


def test_quick_run_reports_every_field(quick_run):
    cfg, result, _ = quick_run
    assert all(result["environment"][k] is not None for k in ENVIRONMENT_FIELDS)
    assert positive(result["matmul_reference"]["gflops"])
    assert positive(result["runtime_s"])
    assert list(result["points"]) == [p.name for p in cfg.grid]
    for name, point in result["points"].items():
        assert point["flops_per_step"] > 0, name
        for field in RATIO_FIELDS:
            assert positive(point[field]), (name, field, point[field])
        assert positive(point["matmul_only"]["gflops"]), name
        for mode in ("manual", "autodiff"):
            stats = point["modes"][mode]
            for field in MODE_FIELDS:
                assert positive(stats[field]), (name, mode, field, stats[field])
            assert stats["memory"]["available"] and positive(stats["peak_bytes"])
            assert stats["params_finite"], (name, mode)
    # quick_settings.epoch_only keeps one epoch point; every other point reports None.
    timed = [name for name, point in result["points"].items() if point["epoch"]]
    assert timed == list(cfg.quick_settings.epoch_only)


def test_quick_run_times_epochs_as_scan_and_loop(quick_run):
    cfg, result, _ = quick_run
    point = result["points"][cfg.targets.epoch_point]
    epoch = point["epoch"]
    assert epoch["steps"] == cfg.quick_settings.epoch_examples // point["batch"]
    for variant in EPOCH_VARIANTS:
        assert positive(epoch[variant]["epoch_s"]), variant
        assert positive(epoch[variant]["compile_s"]), variant
        assert epoch[variant]["peak_bytes"] is None or positive(epoch[variant]["peak_bytes"])
    for loop in ("loop", "host_loop"):
        for mode in ("manual", "autodiff"):
            assert positive(epoch[f"{loop}_speedup_{mode}"]), (loop, mode)
            assert positive(epoch[f"{loop}_speedup_ceiling_{mode}"]), (loop, mode)
            # Both Python loops run the scan's steps: the same params come out.
            assert epoch[f"{loop}_vs_scan_params_rel_err_{mode}"] < 1e-5, (loop, mode)
    for field in EPOCH_RATIOS:
        assert positive(epoch[field]), field
    floor = epoch["matmul_only_scan"]
    assert positive(floor["epoch_s"]) and positive(floor["compile_s"])
    assert floor["params_finite"] is True
    for mode in ("manual", "autodiff"):
        assert positive(epoch[f"scan_over_floor_{mode}"]), mode


def test_matmul_only_epoch_is_sgd_on_least_squares_of_the_linear_network(benchmark):
    # The floor does a real gradient step per batch: jax.grad of half the squared error of
    # x @ w0 @ w1 (no biases, no activations), mean over the batch, in the batches' order.
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.random((12, 7), dtype=np.float32))
    t = jnp.asarray(rng.random((12, 3), dtype=np.float32))
    ws = tuple(jnp.asarray(rng.standard_normal(s, dtype=np.float32)) for s in ((7, 5), (5, 3)))
    batches = jnp.asarray(rng.permutation(12).reshape(3, 4))

    def loss(ws, xb, tb):
        return 0.5 * jnp.sum((xb @ ws[0] @ ws[1] - tb) ** 2) / xb.shape[0]

    expected = ws
    for idx in np.asarray(batches):
        grads = jax.grad(loss)(expected, x[idx], t[idx])
        expected = tuple(w - epochs.FLOOR_LR * g for w, g in zip(expected, grads))
    got = jax.jit(epochs.matmul_only_epoch)(ws, x, t, batches)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)
        assert not np.allclose(g, ws[0] if g.shape == ws[0].shape else ws[1])


@pytest.mark.parametrize(
    ("ceiling", "reachable"), [(None, None), (12.0, True), (10.0, True), (2.0, False)]
)
def test_reachable_says_whether_the_ceiling_clears_the_minimum(benchmark, ceiling, reachable):
    assert results.reachable(ceiling, 10.0) == {"ceiling": ceiling, "reachable": reachable}


def test_quick_run_counts_the_same_matmuls_and_no_more_work(quick_run):
    # Per dense layer: forward, dw and dx, but no dx for the first layer (dead code under jit
    # in the manual backward; never computed by autodiff). A manual backward doing more matmul
    # work than autodiff shows up here, whatever the timings.
    _, result, _ = quick_run
    for name, point in result["points"].items():
        layers = len(point["features"]) - 1
        for mode in ("manual", "autodiff"):
            hlo = point["modes"][mode]["hlo"]
            assert hlo["dots"] == 3 * layers - 1, (name, mode, hlo)
            assert hlo["entry_kernels"] > 0 and hlo["instructions"] >= hlo["entry_kernels"]
        assert point["same_dots"] is True, name
        # XLA's exact cost counts: the manual step evaluates no more transcendentals and moves
        # no more bytes than the autodiff step (flops may differ by a few per example).
        for mode in ("manual", "autodiff"):
            cost = point["modes"][mode]["cost"]
            assert positive(cost["flops"]) and positive(cost["bytes"]), (name, mode, cost)
        assert point["cost_ratio"]["transcendentals"] <= 1.0, (name, point["cost_ratio"])
        assert point["cost_ratio"]["bytes"] <= 1.0, (name, point["cost_ratio"])


def test_quick_run_profiles_and_dumps_hlo(quick_run):
    _, result, out = quick_run
    for name, point in result["points"].items():
        for mode, path in point["hlo_files"].items():
            assert Path(path) == out / "hlo" / f"{name}.{mode}.txt"
            text = Path(path).read_text()
            assert text.startswith("HloModule") and "ENTRY" in text
        if name != PROFILED:
            assert point["profile"] is None, name
    profile = result["points"][PROFILED]["profile"]
    assert profile["calls"] > 0
    for mode in ("manual", "autodiff"):
        ops = profile[mode]["ops"]
        assert ops, mode
        assert 0 < profile[mode]["busy_us_per_call"] <= profile[mode]["op_us_per_call"] + 1e-9
        assert positive(profile[mode]["wall_us_per_call"])
        assert Path(profile[mode]["trace_dir"]).is_relative_to(out / "profile")
        assert [op["us_per_call"] for op in ops] == sorted(
            (op["us_per_call"] for op in ops), reverse=True
        )
        # Every traced op is an instruction of that mode's step, with its opcode.
        assert any(op["opcode"] == "dot" or op["library"] for op in ops), ops


def test_quick_run_reports_the_aa_control(quick_run):
    _, result, _ = quick_run
    control = result["control"]
    ratios = [p["control_ratio_paired"] for p in result["points"].values()]
    assert control["paired_min"] == min(ratios) and control["paired_max"] == max(ratios)
    assert control["max_abs_deviation"] == max(abs(r - 1) for r in ratios)


def test_without_control_there_is_no_aa_ratio(benchmark):
    cfg = quick_config("control=false", "epoch_only=[]", "repeats=1")
    result = benchmark.run(cfg)
    assert result["control"] is None
    assert all(p["control_ratio_paired"] is None for p in result["points"].values())


def test_quick_run_says_it_is_not_a_measurement(benchmark, quick_run):
    _, result, _ = quick_run
    assert report.format_tables(result).startswith("QUICK SMOKE RUN")
    full = {**result, "config": {**result["config"], "quick": False}}
    assert report.format_tables(full).startswith("device:")


def test_quick_run_reports_targets_and_writes_json(quick_run):
    _, result, out = quick_run
    for name in TARGETS:
        target = result["targets"][name]
        assert {"measured", "threshold", "met"} <= set(target), name
        assert isinstance(target["met"], bool)
    # The two targets bounded by the device say what the unskippable work alone reaches.
    point = result["points"]
    matmul, loop = result["targets"]["matmul_fraction"], result["targets"]["loop_speedup"]
    only = point[matmul["point"]]["matmul_only"]["fraction_of_matmul_peak"]
    assert matmul["ceiling"] == only
    assert matmul["reachable"] is (only >= matmul["threshold"])
    ceiling = point[loop["point"]]["epoch"]["loop_speedup_ceiling_manual"]
    assert loop["ceiling"] == ceiling
    assert loop["reachable"] is (ceiling >= loop["threshold"])
    assert json.loads((out / "benchmark.json").read_text()) == result


def test_step_flops_counts_three_matmuls_per_layer_but_two_for_the_first(benchmark):
    # 784-30-10, batch 10: first layer forward + dw, second layer forward + dw + dx.
    assert measure.step_flops([784, 30, 10], 10) == 2 * 10 * (784 * 30 * 2 + 30 * 10 * 3)


@pytest.mark.parametrize("analysis", [None, NotImplementedError])
def test_memory_and_cost_stats_without_an_analysis(benchmark, analysis):
    class Compiled:
        def memory_analysis(self):
            if analysis is not None:
                raise analysis("no memory analysis here")
            return None

        cost_analysis = memory_analysis

    stats = measure.memory_stats(Compiled())
    assert stats["available"] is False
    assert stats["peak_bytes"] is None
    assert measure.cost_stats(Compiled()) == {
        "flops": None,
        "transcendentals": None,
        "bytes": None,
    }


def test_cost_stats_of_a_compiled_program(benchmark):
    import jax
    import jax.numpy as jnp

    a = jnp.ones((8, 4), jnp.float32)
    stats = measure.cost_stats(jax.jit(lambda a: jnp.exp(a) @ a.T).lower(a).compile())
    assert stats["transcendentals"] == 32  # one exp per element
    assert stats["flops"] >= 2 * 8 * 8 * 4  # the matmul, at least
    assert stats["bytes"] > 0


@pytest.mark.slow
def test_script_writes_json_to_the_hydra_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    subprocess.run(
        [sys.executable, str(SCRIPT), "quick=true", f"hydra.run.dir={run_dir}"],
        check=True,
        cwd=ROOT,
        capture_output=True,
        timeout=300,
    )
    result = json.loads((run_dir / "benchmark.json").read_text())
    assert result["command"].startswith("python experiments/benchmark.py quick=true")
    assert set(result["points"]) == {p.name for p in quick_config().grid}


# A hand-written optimized-HLO module: two computations besides ENTRY, a library fusion, a
# plain dot, a transpose, a copy and a cuBLAS-style GEMM custom call.
FAKE_HLO = """HloModule jit_step, entry_computation_layout={(f32[4,3]{1,0})->f32[4,2]{1,0}}

%fused_computation (param_0: f32[4,3], param_1: f32[3,2]) -> f32[4,2] {
  %param_0 = f32[4,3]{1,0} parameter(0)
  %param_1 = f32[3,2]{1,0} parameter(1)
  ROOT %dot.1 = f32[4,2]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}
}

%region_0 (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %add = f32[] add(%a, %b)
}

ENTRY %main.3 (x: f32[4,3], w: f32[3,2]) -> (f32[4,2], f32[3,4]) {
  %x = f32[4,3]{1,0} parameter(0)
  %w = f32[3,2]{1,0} parameter(1)
  %c = f32[] constant(0)
  %lib_fusion = f32[4,2]{1,0} fusion(%x, %w), kind=kCustom, calls=%fused_computation, {CONFIG}
  %dot_general.2 = f32[3,2]{1,0} dot(%x, %lib_fusion), lhs_contracting_dims={0}
  %transpose.1 = f32[3,4]{0,1} transpose(%x), dimensions={1,0}
  %copy.1 = f32[3,4]{1,0} copy(%transpose.1)
  %gemm = (f32[4,2]{1,0}, s8[0]{0}) custom-call(%x, %w), custom_call_target="__cublas$gemm"
  %gte = f32[4,2]{1,0} get-tuple-element(%gemm), index=0
  ROOT %tuple = (f32[4,2]{1,0}, f32[3,4]{1,0}) tuple(%gte, %copy.1)
}
""".replace("{CONFIG}", 'backend_config={"fusion_config":{"kind":"__ynn_fusion"}}')


def test_hlo_summary_counts_a_known_module(benchmark):
    summary = measure.hlo_summary(FAKE_HLO)
    assert summary == {
        "instructions": 16,
        # fusion, dot, transpose, copy, custom-call: not parameters, constants, gte or tuple
        "entry_kernels": 5,
        "fusions": 1,
        "dots": 3,  # the fused dot, the plain dot and the GEMM custom call
        "transposes": 1,
        "copies": 1,
        "library_fusions": {"__ynn_fusion": 1},
        "custom_calls": {"__cublas$gemm": 1},
    }


def test_hlo_summary_of_a_compiled_program(benchmark):
    import jax
    import jax.numpy as jnp

    a = jnp.ones((8, 4), jnp.float32)
    b = jnp.ones((4, 3), jnp.float32)
    one = measure.hlo_summary(jax.jit(lambda a, b: a @ b).lower(a, b).compile().as_text())
    two = measure.hlo_summary(
        jax.jit(lambda a, b: (a @ b, a.T @ (a @ b))).lower(a, b).compile().as_text()
    )
    assert one["dots"] == 1 and two["dots"] == 2
    assert one["entry_kernels"] >= 1


def _write_trace(directory, events):
    import gzip

    run = directory / "plugins" / "profile" / "2026_01_01_00_00_00"
    run.mkdir(parents=True)
    with gzip.open(run / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"displayTimeUnit": "ns", "traceEvents": events}, f)


def _op_event(op, dur, module="jit_step", ph="X"):
    return {"ph": ph, "name": op, "dur": dur, "args": {"hlo_op": op, "hlo_module": module}}


def test_trace_ops_sums_this_modules_ops_per_call(benchmark, tmp_path):
    events = [
        *[_op_event("lib_fusion", 30.0) for _ in range(2)],
        *[_op_event("dot_general.2", 5.0) for _ in range(4)],  # twice per call
        _op_event("copy.1", 1.0),
        _op_event("copy.1", 100.0, module="jit_other"),  # another program: ignored
        _op_event("not_an_op", 100.0),  # not an instruction of this module: ignored
        _op_event("lib_fusion", 100.0, ph="i"),  # not a complete event: ignored
        {"ph": "X", "name": "ThunkExecutor::Execute", "dur": 500.0, "args": {}},
    ]
    _write_trace(tmp_path, events)
    traced = measure.trace_ops(tmp_path, FAKE_HLO, calls=2)
    rows = traced["ops"]
    assert [row["op"] for row in rows] == ["lib_fusion", "dot_general.2", "copy.1"]
    lib, dot, copy = rows
    assert lib == {
        "op": "lib_fusion",
        "opcode": "fusion",
        "library": "__ynn_fusion",
        "us_per_call": 30.0,
        "events_per_call": 1.0,
    }
    assert (dot["opcode"], dot["library"], dot["us_per_call"], dot["events_per_call"]) == (
        "dot",
        None,
        10.0,
        2.0,
    )
    assert copy["us_per_call"] == 0.5
    assert traced["op_us_per_call"] == 30.0 + 10.0 + 0.5
    # Every event above starts at ts 0 (none given): they all overlap the 30 us ones.
    assert traced["busy_us_per_call"] == 15.0
    assert traced["concurrent_us_per_call"] == 40.5 - 15.0


def test_busy_time_is_the_union_of_intervals(benchmark):
    assert measure.busy_time([]) == 0.0
    assert measure.busy_time([(0, 10), (5, 15), (20, 25), (21, 22), (30, 30)]) == 20.0


def test_trace_ops_without_a_trace_says_where_it_looked(benchmark, tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        measure.trace_ops(tmp_path, FAKE_HLO, calls=1)


def test_unknown_profile_point_lists_the_grid_before_any_timing(benchmark, capsys):
    cfg = quick_config("profile=[mlp-3o]")
    with pytest.raises(ValueError, match=r"unknown grid points \['mlp-3o'\].*mlp-30"):
        benchmark.run(cfg)
    assert "timing" not in capsys.readouterr().out


def test_dump_hlo_needs_an_output_directory(benchmark):
    with pytest.raises(ValueError, match="dump_hlo=true needs an output directory"):
        benchmark.run(quick_config("dump_hlo=true"))


def _fake_point(medians, paired, cpu):
    return {"step_ratio": medians, "step_ratio_paired": paired, "step_ratio_cpu": cpu,
            "memory_ratio": 1.0}  # fmt: skip


@pytest.mark.parametrize(
    ("estimator", "median", "worst"),
    [("paired", 0.99, ("b", 1.0)), ("medians", 1.1, ("b", 1.15)), ("cpu", 0.95, ("a", 0.97))],
)
def test_targets_judge_the_configured_ratio(benchmark, estimator, median, worst):
    cfg = quick_config(f"targets.ratio={estimator}")
    points = {"a": _fake_point(1.05, 0.98, 0.97), "b": _fake_point(1.15, 1.0, 0.93)}
    targets = results.targets(cfg, points)
    assert targets["step_ratio_median"]["measured"] == pytest.approx(median)
    assert targets["step_ratio_median"]["estimator"] == estimator
    point, value = worst
    assert targets["step_ratio_max"]["point"] == point
    assert targets["step_ratio_max"]["measured"] == pytest.approx(value)
    assert targets["step_ratio_median"]["met"] is (median <= 1.0)


def test_unknown_ratio_estimator_lists_the_valid_ones(benchmark):
    with pytest.raises(ValueError, match=r"unknown targets\.ratio 'mean'; valid: paired, medians"):
        benchmark.run(quick_config("targets.ratio=mean"))


def test_profile_without_an_output_directory_summarises_and_keeps_no_traces(benchmark):
    cfg = quick_config(f"profile=[{PROFILED}]", "epoch_only=[]", "repeats=1")
    profile = benchmark.run(cfg)["points"][PROFILED]["profile"]
    for mode in ("manual", "autodiff"):
        assert profile[mode]["trace_dir"] is None
        assert profile[mode]["ops"] and profile[mode]["op_us_per_call"] > 0
