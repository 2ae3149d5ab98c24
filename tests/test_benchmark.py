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
RATIO_FIELDS = ("step_ratio", "step_ratio_paired", "step_ratio_cpu", "memory_ratio")
EPOCH_VARIANTS = ("scan_manual", "scan_autodiff", "loop_manual", "loop_autodiff")
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


@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def quick_config(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="benchmark", overrides=["quick=true", *overrides])


def positive(x):
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def quick_run(benchmark, tmp_path_factory):
    out = tmp_path_factory.mktemp("benchmark")
    cfg = quick_config()
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
    for field in (*EPOCH_RATIOS, "loop_speedup_manual", "loop_speedup_autodiff"):
        assert positive(epoch[field]), field
    # The Python loop runs the scan's steps: the same params come out.
    for mode in ("manual", "autodiff"):
        assert epoch[f"loop_vs_scan_params_rel_err_{mode}"] < 1e-5


def test_quick_run_reports_targets_and_writes_json(quick_run):
    _, result, out = quick_run
    for name in TARGETS:
        target = result["targets"][name]
        assert {"measured", "threshold", "met"} <= set(target), name
        assert isinstance(target["met"], bool)
    assert json.loads((out / "benchmark.json").read_text()) == result


def test_step_flops_counts_three_matmuls_per_layer_but_two_for_the_first(benchmark):
    # 784-30-10, batch 10: first layer forward + dw, second layer forward + dw + dx.
    assert benchmark.step_flops([784, 30, 10], 10) == 2 * 10 * (784 * 30 * 2 + 30 * 10 * 3)


@pytest.mark.parametrize("analysis", [None, NotImplementedError])
def test_memory_stats_without_an_analysis(benchmark, analysis):
    class Compiled:
        def memory_analysis(self):
            if analysis is not None:
                raise analysis("no memory analysis here")
            return None

    stats = benchmark.memory_stats(Compiled())
    assert stats["available"] is False
    assert stats["peak_bytes"] is None


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
