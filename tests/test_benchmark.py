"""experiments/benchmark.py end to end: the quick config runs every section and reports every
field and table (never a speed); bad settings are refused before anything compiles.

The benchmark's parts (counting, ISA, targets, grid points, paths, chunked epochs) have their
unit tests in test_benchmark_parts.py.
"""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import once_per_session, run_as_a_user
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SCRIPT = ROOT / "experiments" / "benchmark.py"
MODES = ("manual", "autodiff")
PATHS = ("make_step", "value_and_grad", "custom_vjp")
RULES = ("feedback_alignment", "direct_feedback_alignment", "sign_symmetry", "kolen_pollack")
TIMES = ("step_ms", "step_cpu_ms", "xla_gflops", "lower_s", "compile_s")
MATMUL_FIGURES = (
    "gflops",
    "fraction_of_matmul_peak",
    "fraction_of_matmul_peak_cpu",
    "fraction_of_matmul_only",
)
RATIOS = ("step_ratio", "step_ratio_paired", "step_ratio_cpu", "memory_ratio")
CONTROL = ("control_ratio", "control_ratio_paired", "control_ratio_cpu")
EPOCH_VARIANTS = (
    *(f"{kind}_{mode}" for kind in ("scan", "loop", "host_loop") for mode in MODES),
    "scan_control",
)
PROFILED = "mlp-30"
RULE_PAIR = ("manual", "sign_symmetry")
ESTIMATOR_SUFFIX = {"paired": "_paired", "medians": "", "cpu": "_cpu"}
EPOCH_RATIOS = ("scan_ratio", "scan_ratio_paired", "scan_ratio_cpu", "scan_control_ratio_paired")
ENVIRONMENT_FIELDS = ("device_kind", "device_count", "jax", "jaxlib", "cpu_count", "platform")
# The targets the quick grid (an MLP point with every section, a CNN point) reports.
TARGETS = (
    "step_ratio_median",
    "step_ratio_max",
    *(f"{path}_step_ratio_{stat}" for path in PATHS[1:] for stat in ("median", "max")),
    "peak_memory_ratio_max",
    "cnn_step_ratio_median",
    "cnn_step_ratio_max",
    *(f"cnn_{path}_step_ratio_{stat}" for path in PATHS[1:] for stat in ("median", "max")),
    "cnn_peak_memory_ratio_max",
    "matmul_fraction",
    "epoch_scan_ratio",
    "loop_speedup",
    "cnn_epoch_scan_ratio_max",
    *(f"{rule}_step_ratio_max" for rule in RULES),
    *(f"{rule}_epoch_ratio_max" for rule in RULES),
    "grad_check_cost_manual",
    "grad_check_cost_feedback_alignment",
    "chunked_epoch_ratio_max",
)
# A run of the make_step path at mlp-30 only, with no section beyond the steps.
MINIMAL = (
    "quick_settings.points=[mlp-30]",
    "quick_settings.epoch_only=[]",
    "quick_settings.rules.points=[]",
    "quick_settings.chunked.points=[]",
    "grad_check.point=null",
    "paths=[make_step]",
)


def _load_script():
    spec = importlib.util.spec_from_file_location("benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Loading the script puts experiments/ on sys.path, where its modules (experiments/bench/) live.
benchmark = _load_script()
from bench import env as bench_env  # noqa: E402
from bench import report  # noqa: E402


def quick_config(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="benchmark", overrides=["quick=true", *overrides])


def positive(x):
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, request):
    """One quick run of the script per test session, shared by pytest-xdist's workers through
    its JSON (each worker would otherwise compile and time the same run; they share the CPU).
    Compiled as the suite compiles: the run mostly compiles (77 s of CPU optimized, 57 s so).
    Its epochs are half the quick config's (256 examples: 32 steps of mlp-30, 2 alignment checks
    and 2 chunks): compiled so, resnet-blocks' autodiff epoch as one lax.scan takes ~90 ms a
    step (its loop of steps 2 ms), and timing it and its A/A control was a third of the run
    (quiet: 35-38 -> 28 s). Every section and figure is the same; the tests read the sizes from
    the config."""
    overrides = [f"profile=[{PROFILED}]", "dump_hlo=true", "quick_settings.epoch_examples=256"]

    def run_script(out: Path) -> dict:
        run_as_a_user(
            [sys.executable, str(SCRIPT), "quick=true", *overrides, f"hydra.run.dir={out}"],
            ROOT,
            optimized=False,
        )
        return json.loads((out / "benchmark.json").read_text())

    out, result = once_per_session(request, tmp_path_factory, "benchmark-quick-run", run_script)
    return quick_config(*overrides), result, out


def test_quick_run_reports_every_field(quick_run):
    cfg, result, _ = quick_run
    env = result["environment"]
    assert all(env[k] is not None for k in ENVIRONMENT_FIELDS)
    assert env["isa"] == bench_env.effective_isa(env["cpu_isa"], env["xla_cpu_max_isa"])
    assert positive(result["matmul_reference"]["gflops"])
    assert positive(result["runtime_s"])
    assert list(result["points"]) == list(cfg.quick_settings.points)
    for name, point in result["points"].items():
        mlp = point["kind"] == "mlp"
        assert (point["flops_per_step"] > 0) if mlp else point["flops_per_step"] is None, name
        assert positive(point["matmul_only"]["gflops"]) if mlp else point["matmul_only"] is None
        assert list(point["paths"]) == list(PATHS), name
        # The top-level figures are make_step's, as before the other paths existed.
        assert {k: point[k] for k in RATIOS} == {k: point["paths"]["make_step"][k] for k in RATIOS}
        for path, timed in point["paths"].items():
            for field in (*RATIOS, *CONTROL):
                assert positive(timed[field]), (name, path, field, timed[field])
            for mode in MODES:
                stats = timed["modes"][mode]
                for field in TIMES:
                    assert positive(stats[field]), (name, path, mode, field, stats[field])
                for field in MATMUL_FIGURES:  # matmul FLOPs are an MLP's only
                    assert positive(stats[field]) if mlp else stats[field] is None, field
                assert stats["memory"]["available"] and positive(stats["peak_bytes"])
                assert stats["params_finite"], (name, path, mode)
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
        for mode in MODES:
            assert positive(epoch[f"{loop}_speedup_{mode}"]), (loop, mode)
            assert positive(epoch[f"{loop}_speedup_ceiling_{mode}"]), (loop, mode)
            # Both Python loops run the scan's steps: the same params come out.
            assert epoch[f"{loop}_vs_scan_params_rel_err_{mode}"] < 1e-5, (loop, mode)
    for field in EPOCH_RATIOS:
        assert positive(epoch[field]), field
    floor = epoch["matmul_only_scan"]
    assert positive(floor["epoch_s"]) and positive(floor["compile_s"])
    assert floor["params_finite"] is True
    for mode in MODES:
        assert positive(epoch[f"scan_over_floor_{mode}"]), mode
        step_ms = 1e3 * epoch[f"scan_{mode}"]["epoch_s"] / epoch["steps"]
        assert epoch[f"scan_step_ms_{mode}"] == pytest.approx(step_ms)
        alone = point["modes"][mode]["step_ms"]
        assert epoch[f"scan_step_over_step_{mode}"] == pytest.approx(step_ms / alone)


def test_quick_run_times_a_cnn_epoch_as_scan_and_loop(quick_run):
    # A model point: the scan (the step inside XLA's while loop) and the loop of single calls,
    # manual and autodiff, with the scan's A/A control; no host loop, no matmul floor.
    cfg, result, _ = quick_run
    (name,) = [n for n, p in result["points"].items() if p["kind"] == "model" and p["epoch"]]
    # quick_settings.max_blocks keeps one of resnet-blocks' three identical residual blocks
    # (batch norm, relu, conv): the same layers, in smaller programs.
    (spec,) = [s for s in result["config"]["grid"] if s["name"] == name]
    assert [layer["_target_"] for layer in spec["model"]["_args_"]] == [
        "bpjax.layers.residual",
        "bpjax.global_avg_pool",
        "bpjax.dense",
    ]
    point = result["points"][name]
    epoch = point["epoch"]
    assert epoch["kinds"] == ["scan", "loop"]
    assert epoch["steps"] == cfg.quick_settings.epoch_examples // point["batch"]
    for variant in ("scan_manual", "scan_autodiff", "loop_manual", "loop_autodiff", "scan_control"):
        assert positive(epoch[variant]["epoch_s"]) and positive(epoch[variant]["compile_s"])
    for field in EPOCH_RATIOS:
        assert positive(epoch[field]), field
    assert "host_loop_manual" not in epoch and "matmul_only_scan" not in epoch
    for mode in MODES:
        assert positive(epoch[f"loop_speedup_{mode}"])
        # The loop runs the scan's steps (batch norm's statistics included): the same params.
        assert epoch[f"loop_vs_scan_params_rel_err_{mode}"] < 1e-5, mode
        for field in ("host_loop_speedup", "scan_over_floor", "loop_speedup_ceiling"):
            assert epoch[f"{field}_{mode}"] is None, (field, mode)
        step_ms = 1e3 * epoch[f"scan_{mode}"]["epoch_s"] / epoch["steps"]
        assert epoch[f"scan_step_ms_{mode}"] == pytest.approx(step_ms)
        alone = point["modes"][mode]["step_ms"]
        assert epoch[f"scan_step_over_step_{mode}"] == pytest.approx(step_ms / alone)
    target = result["targets"]["cnn_epoch_scan_ratio_max"]
    assert target["point"] == name
    suffix = ESTIMATOR_SUFFIX[target["estimator"]]
    assert target["measured"] == epoch["scan_ratio" + suffix]
    assert target["noise"] == pytest.approx(abs(epoch["scan_control_ratio" + suffix] - 1))


def test_quick_run_times_every_learning_rule_against_manual(quick_run):
    cfg, result, _ = quick_run
    for name, point in result["points"].items():
        if name not in cfg.quick_settings.rules.points:
            assert point["rules"] is None, name
            continue
        rules = point["rules"]
        assert list(rules["modes"]) == ["manual", *RULES]
        assert list(rules["vs_manual"]) == list(RULES)
        for mode, stats in rules["modes"].items():
            assert positive(stats["step_ms"]) and positive(stats["compile_s"]), mode
            assert stats["params_finite"], mode
        for rule, ratios in rules["vs_manual"].items():
            for field in ("step_ratio", "step_ratio_paired", "step_ratio_cpu"):
                assert positive(ratios[field]), (rule, field)
        assert all(positive(rules[field]) for field in CONTROL)
        # The rules change the backward only: the same forward matmuls, some fewer dx (DFA).
        dots = {mode: stats["hlo"]["dots"] for mode, stats in rules["modes"].items()}
        assert dots["feedback_alignment"] == dots["manual"], dots
        assert dots["direct_feedback_alignment"] <= dots["manual"], dots


def test_quick_run_times_every_learning_rule_as_fit_trains_it(quick_run):
    cfg, result, _ = quick_run
    for name, point in result["points"].items():
        if name not in cfg.quick_settings.rules.points:
            assert point["rule_epochs"] is None, name
            continue
        epochs = point["rule_epochs"]
        assert epochs["steps"] == cfg.quick_settings.epoch_examples // point["batch"]
        assert list(epochs["modes"]) == ["manual", *RULES]
        for mode, stats in epochs["modes"].items():
            assert positive(stats["epoch_s"]) and positive(stats["compile_s"]), mode
            assert stats["params_finite"], mode
        for rule, ratios in epochs["vs_manual"].items():
            for field in ("epoch_ratio", "epoch_ratio_paired", "epoch_ratio_cpu"):
                assert positive(ratios[field]), (rule, field)
            target = result["targets"][f"{rule}_epoch_ratio_max"]
            suffix = ESTIMATOR_SUFFIX[target["estimator"]]
            assert target["measured"] == ratios["epoch_ratio" + suffix]
        assert all(positive(epochs[field]) for field in CONTROL)


def test_quick_run_times_the_alignment_signal_as_fit_runs_it(quick_run):
    cfg, result, _ = quick_run
    check = result["points"][cfg.grad_check.point]["grad_check"]
    every = cfg.quick_settings.grad_check.every
    assert check["every"] == every
    batch = result["points"][cfg.grad_check.point]["batch"]
    assert check["steps"] == cfg.quick_settings.epoch_examples // batch
    assert check["checks_per_epoch"] == math.ceil(check["steps"] / every)
    assert list(check["modes"]) == ["manual", cfg.grad_check.rule]
    for mode, timed in check["modes"].items():
        for variant in ("on", "off", "control"):
            assert positive(timed[variant]["epoch_s"]), (mode, variant)
        for field in ("cost_ratio", "cost_ratio_paired", "cost_ratio_cpu", *CONTROL):
            assert positive(timed[field]), (mode, field)
    others = [name for name, p in result["points"].items() if p["grad_check"]]
    assert others == [cfg.grad_check.point]


def test_quick_run_chunks_an_epoch_as_fit_does_with_the_same_result(quick_run):
    cfg, result, _ = quick_run
    (name,) = cfg.quick_settings.chunked.points
    chunked = result["points"][name]["chunked"]
    steps = cfg.quick_settings.epoch_examples // result["points"][name]["batch"]
    chunk_steps = cfg.quick_settings.chunked.chunk_steps
    assert (chunked["steps"], chunked["chunks"]) == (steps, steps // chunk_steps)
    assert chunked["chunk_lengths"] == [chunk_steps] and chunked["chunk_executables"] == 1
    # make_chunk's promise: the same steps give bit-identical params and losses on CPU.
    assert chunked["params_identical"] is True and chunked["losses_identical"] is True
    assert chunked["params_max_abs_diff"] == 0.0
    for variant in ("chunked", "whole", "control"):
        assert positive(chunked[variant]["epoch_s"]), variant
    for field in ("chunked_ratio", "chunked_ratio_paired", "chunked_ratio_cpu", *CONTROL):
        assert positive(chunked[field]), field


def test_quick_run_counts_the_same_matmuls_and_no_more_work(quick_run):
    # Per dense layer: forward, dw and dx, but no dx for the first layer (dead code under jit
    # in the manual backward; never computed by autodiff), on every path. A manual backward
    # doing more matmul work than autodiff shows up here, whatever the timings.
    _, result, _ = quick_run
    for name, point in result["points"].items():
        for path, timed in point["paths"].items():
            for mode in MODES:
                hlo = timed["modes"][mode]["hlo"]
                if point["kind"] == "mlp":
                    assert hlo["dots"] == 3 * (len(point["features"]) - 1) - 1, (name, path)
                assert hlo["entry_kernels"] > 0 and hlo["instructions"] >= hlo["entry_kernels"]
                cost = timed["modes"][mode]["cost"]
                assert positive(cost["flops"]) and positive(cost["bytes"]), (name, mode, cost)
            assert timed["same_dots"] is True, (name, path)
            # XLA's exact cost counts: the manual step evaluates no more transcendentals and
            # moves no more bytes than the autodiff step (flops may differ by a few per example).
            assert timed["cost_ratio"]["transcendentals"] <= 1.0, (name, path, timed)
            assert timed["cost_ratio"]["bytes"] <= 1.0, (name, path, timed["cost_ratio"])


def test_quick_run_profiles_and_dumps_hlo(quick_run):
    _, result, out = quick_run
    for name, point in result["points"].items():
        for path, timed in point["paths"].items():
            stem = name if path == "make_step" else f"{name}.{path}"
            for mode, file in timed["hlo_files"].items():
                assert Path(file) == out / "hlo" / f"{stem}.{mode}.txt"
                text = Path(file).read_text()
                assert text.startswith("HloModule") and "ENTRY" in text
        assert point["hlo_files"] == point["paths"]["make_step"]["hlo_files"]
        if name != PROFILED:
            assert point["profile"] is None, name
    profile = result["points"][PROFILED]["profile"]
    assert profile["calls"] > 0
    for mode in MODES:
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
    # The point's learning-rule steps are profiled too, manual's beside them (issue 12: where a
    # rule's step spends its time), their traces under the point's own.
    rules = result["points"][PROFILED]["rules"]
    ruled = rules["profile"]
    assert ruled["calls"] == profile["calls"]
    assert [m for m in ruled if m != "calls"] == ["manual", *rules["vs_manual"]]
    for mode, prof in ((m, p) for m, p in ruled.items() if m != "calls"):
        assert prof["ops"] and 0 < prof["busy_us_per_call"] <= prof["op_us_per_call"] + 1e-9
        assert Path(prof["trace_dir"]) == out / "profile" / PROFILED / "rules" / mode
        assert any(op["opcode"] == "dot" or op["library"] for op in prof["ops"]), mode
    for name, point in result["points"].items():
        if name != PROFILED and point["rules"] is not None:
            assert point["rules"]["profile"] is None, name


def test_quick_run_reports_the_aa_control(quick_run):
    _, result, _ = quick_run
    control = result["control"]
    ratios = [p["control_ratio_paired"] for p in result["points"].values()]
    assert control["paired_min"] == min(ratios) and control["paired_max"] == max(ratios)
    assert control["max_abs_deviation"] == max(abs(r - 1) for r in ratios)


def test_quick_run_prints_every_table(quick_run):
    _, result, _ = quick_run
    text = report.format_tables(result)
    assert text.startswith("QUICK SMOKE RUN")
    full = {**result, "config": {**result["config"], "quick": False}}
    assert report.format_tables(full).startswith("device:")
    for heading in (
        "ISA: ",
        "the step (make_step):",
        "every call path, manual / autodiff",
        "whole epochs (make_epoch: one lax.scan)",
        "optimized HLO of each step",
        f"profile of {PROFILED}",
        f"profile of {PROFILED}'s rule steps",
        "learning rules: make_step(grad_mode=rule) against the manual step (state donated):",
        "learning rules as fit trains them:",
        "the alignment signal's cost:",
        "epochs as fit runs them",
        "targets (reported, never asserted):",
    ):
        assert heading in text, heading
    lines = text.splitlines()
    for name, point in result["points"].items():
        for path in point["paths"]:
            assert any(line.split()[:2] == [name, path] for line in lines), (name, path)
    for name in result["targets"]:
        assert any(line.startswith(name + " ") for line in lines), name


def test_quick_run_reports_targets_and_writes_json(quick_run):
    _, result, out = quick_run
    assert list(result["targets"]) == sorted(result["targets"], key=TARGETS.index)
    assert set(result["targets"]) == set(TARGETS)
    for name, target in result["targets"].items():
        assert {"measured", "threshold", "met"} <= set(target), name
        assert isinstance(target["met"], bool)
        if "estimator" in target:  # a ratio: its A/A noise beside it
            assert target["noise"] is None or target["noise"] >= 0, name
    # The two targets bounded by the device say what the unskippable work alone reaches.
    point = result["points"]
    matmul, loop = result["targets"]["matmul_fraction"], result["targets"]["loop_speedup"]
    only = point[matmul["point"]]["matmul_only"]["fraction_of_matmul_peak"]
    assert matmul["ceiling"] == only
    assert matmul["reachable"] is (only >= matmul["threshold"])
    ceiling = point[loop["point"]]["epoch"]["loop_speedup_ceiling_manual"]
    assert loop["ceiling"] == ceiling
    assert loop["reachable"] is (ceiling >= loop["threshold"])
    # "No measurable slowdown": the chunked epoch is judged within its A/A noise.
    chunked = result["targets"]["chunked_epoch_ratio_max"]
    assert chunked["within_noise"] is True
    assert chunked["met"] is (chunked["measured"] <= chunked["threshold"] + chunked["noise"])
    text = (out / "benchmark.json").read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON
    assert result["command"] == (
        f"python experiments/benchmark.py quick=true 'profile=[{PROFILED}]' dump_hlo=true "
        f"quick_settings.epoch_examples=256 hydra.run.dir={out}"
    )


@pytest.mark.slow
def test_without_control_every_section_runs_and_reports_no_aa_ratio():
    cfg = quick_config(
        "control=false",
        "quick_settings.points=[mlp-30]",
        "quick_settings.rules.points=[mlp-30]",
        "rules.modes=[sign_symmetry]",
        "grad_check.rule=sign_symmetry",
        "paths=[make_step,custom_vjp]",
    )
    result = benchmark.run(cfg)
    assert result["command"] is None  # run() from Python: no command line
    assert result["control"] is None
    point = result["points"]["mlp-30"]
    for path in ("make_step", "custom_vjp"):
        assert all(point["paths"][path][field] is None for field in CONTROL), path
    assert point["epoch"]["scan_control_ratio_paired"] is None
    assert "scan_control" not in point["epoch"]
    assert all(point["rules"][field] is None for field in CONTROL)
    for timed in point["grad_check"]["modes"].values():
        assert "control" not in timed and timed["control_ratio_paired"] is None
    assert point["chunked"]["control_ratio_paired"] is None
    assert point["chunked"]["params_identical"] is True
    assert result["targets"]["chunked_epoch_ratio_max"]["noise"] is None
    assert result["targets"]["step_ratio_max"]["noise"] is None


def test_profile_without_an_output_directory_summarises_and_keeps_no_traces():
    minimal = [o for o in MINIMAL if not o.startswith("quick_settings.rules.")]
    rules = ("rules.modes=[sign_symmetry]", "rules.epochs=false")
    cfg = quick_config(f"profile=[{PROFILED}]", *rules, *minimal)
    point = benchmark.run(cfg)["points"][PROFILED]
    for profile, modes in ((point["profile"], MODES), (point["rules"]["profile"], RULE_PAIR)):
        for mode in modes:
            assert profile[mode]["trace_dir"] is None
            assert profile[mode]["ops"] and profile[mode]["op_us_per_call"] > 0


@pytest.mark.slow
def test_script_writes_json_to_the_hydra_run_dir_and_caps_the_isa(tmp_path):
    run_dir = tmp_path / "run"
    subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "quick=true",
            "max_isa=avx2",
            f"hydra.run.dir={run_dir}",
            *MINIMAL,
        ],
        check=True,
        cwd=ROOT,
        capture_output=True,
        timeout=300,
    )
    result = json.loads((run_dir / "benchmark.json").read_text())
    assert result["command"].startswith("python experiments/benchmark.py quick=true max_isa=")
    assert set(result["points"]) == {"mlp-30"}
    env = result["environment"]
    assert env["xla_cpu_max_isa"] == "AVX2"
    assert "--xla_cpu_max_isa=AVX2" in env["xla_flags"]
    assert env["isa"] == bench_env.effective_isa(env["cpu_isa"], "AVX2")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("profile=[mlp-3o]",), r"profile: unknown grid points \['mlp-3o'\].*mlp-30"),
        (("dump_hlo=true",), "dump_hlo=true needs an output directory"),
        (("targets.ratio=mean",), r"unknown targets\.ratio 'mean'; valid: paired, medians"),
        (("paths=[value_and_grad]",), "make_step included"),
        (("paths=[make_step,vjp]",), r"paths must name each of .*got \['make_step', 'vjp'\]"),
        (("quick_settings.rules.points=[resnet-blocks]",), r"MLP points; \['resnet-blocks'\]"),
        (("quick_settings.rules.points=[mlp-3o]",), r"rules.points: unknown grid points"),
        (
            ("rules.modes=[backprop]",),
            r"unknown learning rule 'backprop'; valid: feedback_alignment, ",
        ),
        (("+rules.options.scale=huge",), r"rules.modes \(mlp-30\): .*scale"),
        (("grad_check.point=mlp-3o",), r"grad_check.point: unknown grid points"),
        (("quick_settings.grad_check.every=0",), r"grad_check.every must be >= 1, got 0"),
        (("grad_check.rule=manual",), r"grad_check.rule: unknown learning rule 'manual'"),
        (("quick_settings.chunked.points=[mlp-3o]",), r"chunked.points: unknown grid points"),
        (("chunked.mode=backprop",), r"chunked.mode: unknown mode 'backprop'"),
        (("quick_settings.chunked.chunk_steps=-1",), r"chunk_steps must be .*, got -1"),
        (("max_isa=AVX3",), r"max_isa: unknown ISA 'AVX3' \(XLA would only log"),
        (("profile=[mlp-30]", "profile_calls=0"), r"profile_calls must be a positive integer"),
        # a full-grid point in a quick run read as if it did not exist (trial)
        (("profile=[lenet5]",), r"\['lenet5'\].*\(quick=true keeps quick_settings.points only\)"),
        (("profile=[mlp-30,mlp-30]",), r"profile: each grid point at most once, got \['mlp-30'\]"),
        (("profile=[mlp-30]", "profile_top=-1"), r"profile_top must be a positive integer"),
        # a key nothing reads was ignored: +profil=[mlp-30] ran without profiling (trial)
        (("+profil=[mlp-30]",), r"^profil is not a setting: did you mean profile\? \(top-level"),
        (
            ("+rules.pointz=[mlp-30]",),
            r"^rules.pointz is not a setting, .*did you mean rules\.points",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else v[0],
)
def test_a_bad_setting_is_one_error_before_anything_compiles(overrides, message, capsys):
    with pytest.raises(ValueError, match=message):
        benchmark.run(quick_config(*overrides))
    assert "compiled" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("override", "line"),
    [
        ("profile=[mlp-3o]", "error: profile: unknown grid points ['mlp-3o']"),
        # Hydra's refusal (no +); +profil=... is check_keys' (in-process above)
        ("profil=[mlp-30]", "error: profil is not a setting: did you mean profile?"),
    ],
)
def test_the_script_says_a_bad_setting_in_one_line(override, line, tmp_path):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "quick=true", override, f"hydra.run.dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.startswith(line) and len(done.stderr.strip().splitlines()) == 1
    assert "Traceback" not in done.stderr and not (tmp_path / "benchmark.json").exists()


def test_max_isa_in_a_process_whose_backend_started_says_how_to_run_it():
    import jax.numpy as jnp

    jnp.zeros(1).block_until_ready()  # XLA's backend has started, without a cap
    with pytest.raises(ValueError, match=r"fresh process .*max_isa=AVX2"):
        benchmark.run(quick_config("max_isa=AVX2", *MINIMAL))
