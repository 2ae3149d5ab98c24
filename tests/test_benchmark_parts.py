"""experiments/bench/: the benchmark's parts, each against what it must compute (nothing here
times anything): counting (HLO, cost, traces), the epoch floor, the targets, the ISA record, grid
points, the call paths and fit's chunked epochs (a model point's epochs: the quick run)."""

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from bpjax.layers import is_stateful
from bpjax.train import chunk_plan

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "benchmark.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Loading the script puts experiments/ on sys.path, where its modules (experiments/bench/) live.
benchmark = _load_script()
from bench import chunks, env, floors, measure, paths, points, targets  # noqa: E402


def config(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="benchmark", overrides=list(overrides))


# --------------------------------------------------------------------------------------------
# what is counted


def test_step_flops_counts_three_matmuls_per_layer_but_two_for_the_first():
    # 784-30-10, batch 10: first layer forward + dw, second layer forward + dw + dx.
    assert measure.step_flops([784, 30, 10], 10) == 2 * 10 * (784 * 30 * 2 + 30 * 10 * 3)


@pytest.mark.parametrize("analysis", [None, NotImplementedError])
def test_memory_and_cost_stats_without_an_analysis(analysis):
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


def test_cost_stats_of_a_compiled_program():
    import jax

    a = jnp.ones((8, 4), jnp.float32)
    stats = measure.cost_stats(jax.jit(lambda a: jnp.exp(a) @ a.T).lower(a).compile())
    assert stats["transcendentals"] == 32  # one exp per element
    assert stats["flops"] >= 2 * 8 * 8 * 4  # the matmul, at least
    assert stats["bytes"] > 0


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


def test_hlo_summary_counts_a_known_module():
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


def test_hlo_summary_of_a_compiled_program():
    import jax

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


def test_trace_ops_sums_this_modules_ops_per_call(tmp_path):
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


def test_trace_ops_sums_each_kind_of_op(tmp_path):
    # A second copy (copy.2): the kinds table adds the ops its name shares without the ".<n>".
    hlo = FAKE_HLO.replace("  %gemm", "  %copy.2 = f32[3,4]{1,0} copy(%copy.1)\n  %gemm")
    events = [
        _op_event("copy.1", 4.0),
        _op_event("copy.2", 6.0),
        _op_event("lib_fusion", 3.0),
        _op_event("dot_general.2", 20.0),
    ]
    _write_trace(tmp_path, events)
    kinds = measure.trace_ops(tmp_path, hlo, calls=2)["kinds"]
    assert kinds == [
        {"kind": "dot_general", "ops": 1, "us_per_call": 10.0},
        {"kind": "copy", "ops": 2, "us_per_call": 5.0},
        {"kind": "lib_fusion", "ops": 1, "us_per_call": 1.5},
    ]


def test_trace_ops_without_overlap_reports_no_concurrency(tmp_path):
    # One after another: the busy time is the ops' sum, up to rounding (these durations' sum
    # and their intervals' union differ by -1.1e-16), which must not read as negative overlap.
    timed = [("copy.1", 0.3, 0.1), ("dot_general.2", 0.6, 0.4), ("lib_fusion", 0.1, 1.0)]
    _write_trace(tmp_path, [{**_op_event(op, dur), "ts": ts} for op, dur, ts in timed])
    traced = measure.trace_ops(tmp_path, FAKE_HLO, calls=1)
    assert traced["op_us_per_call"] < traced["busy_us_per_call"]  # the rounding, as said
    assert traced["concurrent_us_per_call"] == 0.0


def test_busy_time_is_the_union_of_intervals():
    assert measure.busy_time([]) == 0.0
    assert measure.busy_time([(0, 10), (5, 15), (20, 25), (21, 22), (30, 30)]) == 20.0


def test_trace_ops_without_a_trace_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        measure.trace_ops(tmp_path, FAKE_HLO, calls=1)


def test_matmul_only_epoch_is_sgd_on_least_squares_of_the_linear_network():
    # The floor does a real gradient step per batch: jax.grad of half the squared error of
    # x @ w0 @ w1 (no biases, no activations), mean over the batch, in the batches' order.
    import jax
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
        expected = tuple(w - floors.FLOOR_LR * g for w, g in zip(expected, grads))
    got = jax.jit(floors.matmul_only_epoch)(ws, x, t, batches)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)
        assert not np.allclose(g, ws[0] if g.shape == ws[0].shape else ws[1])


@pytest.mark.parametrize(
    ("ceiling", "reachable"), [(None, None), (12.0, True), (10.0, True), (2.0, False)]
)
def test_reachable_says_whether_the_ceiling_clears_the_minimum(ceiling, reachable):
    assert targets.reachable(ceiling, 10.0) == {"ceiling": ceiling, "reachable": reachable}


# --------------------------------------------------------------------------------------------
# targets


def _timed(ratio, control, memory=1.0):
    return {
        **{f"step_ratio{s}": ratio for s in ("", "_paired", "_cpu")},
        **{f"control_ratio{s}": control for s in ("", "_paired", "_cpu")},
        "memory_ratio": memory,
    }


def fake_point(kind="mlp", ratios=None, control=1.0, memory=1.0, **sections):
    """A point's results as targets() reads them: per path a ratio (all three estimators)."""
    by_path = {path: _timed(r, control, memory) for path, r in (ratios or {}).items()}
    return {
        "kind": kind,
        "paths": by_path,
        **by_path.get("make_step", {}),
        **{k: None for k in ("epoch", "rules", "grad_check", "chunked")},
        **sections,
    }


def test_ratio_targets_give_the_median_the_worst_point_and_their_noise():
    values = {"a": (1.02, 0.99), "b": (0.97, 1.03), "c": (1.2, None)}
    out = targets.ratio_targets("x", values, 1.0, 1.1, "paired")
    assert out["x_median"] == {
        "estimator": "paired",
        "noise": None,  # c has no control: the median's noise is unknown
        "measured": 1.02,
        "threshold": 1.0,
        "met": False,
    }
    assert out["x_max"]["point"] == "c" and out["x_max"]["met"] is False
    two = targets.ratio_targets("x", {"a": (1.02, 0.99), "b": (0.97, 1.03)}, None, 1.1, "cpu")
    assert list(two) == ["x_max"]
    assert two["x_max"]["noise"] == pytest.approx(0.01)  # at the worst point, a


@pytest.mark.parametrize(
    ("estimator", "median", "worst"),
    [("paired", 0.99, ("b", 1.0)), ("medians", 1.1, ("b", 1.15)), ("cpu", 0.95, ("a", 0.97))],
)
def test_targets_judge_the_configured_ratio(estimator, median, worst):
    cfg = config(f"targets.ratio={estimator}")

    def point(medians, paired, cpu):
        p = fake_point(ratios={"make_step": medians})
        p["paths"]["make_step"].update(step_ratio_paired=paired, step_ratio_cpu=cpu)
        return p

    found = targets.targets(cfg, {"a": point(1.05, 0.98, 0.97), "b": point(1.15, 1.0, 0.93)})
    assert found["step_ratio_median"]["measured"] == pytest.approx(median)
    assert found["step_ratio_median"]["estimator"] == estimator
    point_name, value = worst
    assert found["step_ratio_max"]["point"] == point_name
    assert found["step_ratio_max"]["measured"] == pytest.approx(value)
    assert found["step_ratio_median"]["met"] is (median <= 1.0)


def test_targets_per_family_and_path_with_their_own_thresholds():
    cfg = config()
    ratios = {"make_step": 1.04, "value_and_grad": 1.08, "custom_vjp": 0.99}
    found = targets.targets(
        cfg,
        {
            "m": fake_point("mlp", ratios, memory=1.0),
            "c": fake_point("model", ratios, memory=0.8),
        },
    )
    # The MLP family keeps the original names; the other paths and the CNN family have theirs.
    assert found["step_ratio_max"]["met"] is True  # 1.04 <= 1.10
    assert found["value_and_grad_step_ratio_max"]["threshold"] == cfg.targets.path_step_ratio_max
    assert found["cnn_step_ratio_max"]["met"] is True  # 1.04 <= 1.05
    assert found["cnn_value_and_grad_step_ratio_max"]["met"] is False  # 1.08 > 1.05
    assert found["cnn_custom_vjp_step_ratio_median"]["met"] is True
    # Peak memory: make_step's for the MLPs (as before the paths), every path for the CNNs.
    assert found["peak_memory_ratio_max"]["point"] == "m"
    assert found["cnn_peak_memory_ratio_max"]["measured"] == pytest.approx(0.8)
    assert "epoch_scan_ratio" not in found and "chunked_epoch_ratio_max" not in found


def test_the_chunked_epoch_is_judged_within_its_noise_and_the_rules_by_their_worst_point():
    cfg = config()
    chunked = {
        "chunked_ratio_paired": 1.015,
        "control_ratio_paired": 0.98,  # 2% of noise: a 1.5% slowdown is not measurable
    }
    rules = {
        "vs_manual": {"sign_symmetry": {"step_ratio_paired": 1.2}},
        "control_ratio_paired": 1.01,
    }
    rules_b = {
        "vs_manual": {"sign_symmetry": {"step_ratio_paired": 1.05}},
        "control_ratio_paired": 1.0,
    }
    check = {"modes": {"manual": {"cost_ratio_paired": 1.2, "control_ratio_paired": 1.0}}}
    found = targets.targets(
        cfg,
        {
            "a": fake_point(ratios={"make_step": 1.0}, chunked=chunked, rules=rules),
            "b": fake_point(ratios={"make_step": 1.0}, rules=rules_b, grad_check=check),
        },
    )
    target = found["chunked_epoch_ratio_max"]
    assert target["met"] is True and target["within_noise"] is True
    assert target["noise"] == pytest.approx(0.02)
    assert found["sign_symmetry_step_ratio_max"]["point"] == "a"
    assert found["sign_symmetry_step_ratio_max"]["met"] is False
    assert found["grad_check_cost_manual"]["point"] == "b"
    assert found["grad_check_cost_manual"]["met"] is False  # 1.2 > 1.10
    chunked["chunked_ratio_paired"] = 1.03
    assert (
        targets.targets(cfg, {"a": fake_point(ratios={"make_step": 1.0}, chunked=chunked)})[
            "chunked_epoch_ratio_max"
        ]["met"]
        is False
    )


# --------------------------------------------------------------------------------------------
# the instruction set


@pytest.mark.parametrize(
    ("flags", "isa"),
    [
        ({"sse4_2", "avx", "avx2", "fma"}, "AVX2"),
        ({"sse4_2", "avx", "avx2", "avx512f", "avx512_vnni"}, "AVX512_VNNI"),
        ({"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16"}, "AMX"),
        ({"fp", "asimd", "sve"}, "SVE"),
        ({"fpu", "sse2"}, None),
        (set(), None),
    ],
)
def test_cpu_isa_is_the_newest_the_flags_show(flags, isa):
    assert env.cpu_isa(flags) == isa


@pytest.mark.parametrize(
    ("host", "cap", "isa"),
    [
        ("AVX512", "AVX2", "AVX2"),
        ("AVX2", "AVX512", "AVX2"),  # a cap above the host changes nothing
        ("AMX", None, "AMX"),
        (None, "AVX2", "AVX2"),
        ("SVE2", "NEON", "NEON"),
        (None, None, None),
    ],
)
def test_effective_isa_is_the_older_of_host_and_cap(host, cap, isa):
    assert env.effective_isa(host, cap) == isa


def test_parse_max_isa_reads_the_last_flag_and_refuses_what_xla_would_ignore():
    assert env.parse_max_isa(None) is None
    assert env.parse_max_isa("--xla_cpu_use_thunk_runtime=true") is None
    assert env.parse_max_isa("--xla_cpu_max_isa=avx2") == "AVX2"
    assert env.parse_max_isa("--xla_cpu_max_isa=AVX512 --xla_cpu_max_isa=SSE4_2") == "SSE4_2"
    with pytest.raises(ValueError, match=r"unknown ISA 'AVX3' \(XLA would only log"):
        env.parse_max_isa("--xla_cpu_max_isa=AVX3")


def test_request_max_isa_sets_agrees_or_refuses(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_max_isa=AVX2")
    env.request_max_isa("avx2")  # already so: nothing to do
    env.request_max_isa(None)
    with pytest.raises(ValueError, match="XLA_FLAGS already sets --xla_cpu_max_isa=AVX2"):
        env.request_max_isa("AVX512")
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_max_isa=AVX9")
    with pytest.raises(ValueError, match="unknown ISA 'AVX9'"):
        env.request_max_isa(None)
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/nowhere")
    monkeypatch.setattr(env, "_backend_started", lambda: False)
    env.request_max_isa("AVX")
    assert env.parse_max_isa(env.os.environ["XLA_FLAGS"]) == "AVX"
    assert env.os.environ["XLA_FLAGS"].startswith("--xla_dump_to=/nowhere ")


def test_environment_records_the_isa(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_max_isa=SSE4_2")
    record = env.environment()
    assert record["xla_cpu_max_isa"] == "SSE4_2"
    assert record["isa"] == env.effective_isa(record["cpu_isa"], "SSE4_2")
    assert set(record["cpu_isa_flags"]) <= set(env._CPU_FLAG.values())
    json.dumps(record, allow_nan=False)


# --------------------------------------------------------------------------------------------
# grid points


TINY_CNN = {
    "name": "tiny-cnn",
    "model": {
        "_target_": "bpjax.serial",
        "_args_": [
            {"_target_": "bpjax.conv2d", "n_out": 3, "kernel_size": 3, "use_bias": False},
            {"_target_": "bpjax.batch_norm"},
            {"_target_": "bpjax.relu"},
            {"_target_": "bpjax.global_avg_pool"},
            {"_target_": "bpjax.dense", "n_out": 4},
        ],
    },
    "input_shape": [5, 5, 2],
    "batch": 4,
    "epoch_examples": 16,
}
TINY_MLP = {"name": "tiny-mlp", "features": [6, 5, 3], "batch": 4, "activation": "tanh"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"batch": 0}, "batch must be a positive integer, got 0"),
        ({"features": [6, 3], "model": TINY_CNN["model"]}, "either features .* or model"),
        ({"features": [6]}, r"features are layer sizes .*got \[6\]"),
        ({"activation": None}, "an MLP point needs an activation"),
        ({"epoch_examples": 3}, "epoch_examples must be at least batch, got 3"),
        ({"name": None}, "every grid point needs a name"),
    ],
)
def test_check_grid_refuses_a_bad_mlp_point(change, message):
    with pytest.raises(ValueError, match=message):
        points.check_grid([{**TINY_MLP, **change}])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"input_shape": None}, "a model point needs input_shape"),
        ({"model": {"_target_": "bpjax.no_such_layer"}}, "'tiny-cnn'.*model:"),
        ({"model": {"_target_": "builtins.dict"}}, "instantiates to dict, not a bpjax Layer"),
        (
            {"model": {"_target_": "bpjax.conv2d", "n_out": 2, "kernel_size": 3}},
            r"output is \(4, 5, 5, 2\); .*\[batch, n_outputs\]",
        ),
    ],
)
def test_check_grid_refuses_a_bad_model_point(change, message):
    with pytest.raises(ValueError, match=message):
        points.check_grid([{**TINY_CNN, **change}])
    with pytest.raises(ValueError, match="names must be unique"):
        points.check_grid([TINY_MLP, TINY_MLP])


def test_the_grid_holds_the_issues_points_and_every_spec_checks():
    grid = OmegaConf.to_container(config().grid, resolve=True)
    points.check_grid(grid)  # lenet5 and resnet-blocks instantiate, each to [batch, 10]
    specs = {spec["name"]: spec for spec in grid}
    # issue 10 #18: mlp([256] * 10 + [10]) relu at batch 64, mlp([100, 10]) relu at batch 128
    deep, small = specs["deep-10x256"], specs["mlp-100-relu"]
    assert (deep["features"], deep["activation"], deep["batch"]) == (
        [784, *[256] * 10, 10],
        "relu",
        64,
    )
    assert (small["features"], small["activation"], small["batch"]) == ([784, 100, 10], "relu", 128)
    # issue 11: LeNet-5 at batch 128 on 28x28x1; residual blocks with batch norm at 64 on 32x32x16
    assert (specs["lenet5"]["input_shape"], specs["lenet5"]["batch"]) == ([28, 28, 1], 128)
    resnet = specs["resnet-blocks"]
    assert (resnet["input_shape"], resnet["batch"]) == ([32, 32, 16], 64)
    net = points.instantiate_model(resnet)
    assert [layer.combinator for layer in net.sublayers[:3]] == ["residual"] * 3
    assert is_stateful(net)
    # issue 10 #13: mlp-30's epoch is 6000 steps, 30 chunks of the default 200
    cfg = config()
    steps = cfg.epoch_examples // specs["mlp-30"]["batch"]
    assert len(chunk_plan(steps, cfg.chunked.chunk_steps)) == 30


def test_apply_quick_keeps_its_points_and_shrinks_images_batches_and_epochs():
    cfg = config("quick=true", "quick_settings.points=[tiny-cnn]")
    cfg.grid = [TINY_MLP, TINY_CNN]
    quick = points.apply_quick(cfg)
    (spec,) = OmegaConf.to_container(quick.grid)
    assert spec["input_shape"] == [5, 5, 2]  # below max_image_size: unchanged
    assert spec["batch"] == 4 and "epoch_examples" not in spec
    cfg.quick_settings.max_image_size, cfg.quick_settings.max_batch = 3, 2
    (spec,) = OmegaConf.to_container(points.apply_quick(cfg).grid)
    assert spec["input_shape"] == [3, 3, 2] and spec["batch"] == 2  # channels kept
    assert quick.rules.points == list(cfg.quick_settings.rules.points)  # nested keys merge
    assert quick.rules.modes is None


# --------------------------------------------------------------------------------------------
# the call paths and fit's chunked epochs


def _run_once(step, carry, x, y):
    return jax.jit(step)(carry, x, y)[0]


@pytest.mark.parametrize("spec", [TINY_MLP, TINY_CNN], ids=["mlp", "cnn-with-batch-norm"])
def test_every_path_takes_the_same_sgd_step_in_both_modes(spec):
    cfg = config()
    point = points.build(cfg, spec)
    x, y = points.synthetic_data(cfg, point.example_shape, point.n_outputs, point.batch, 0)
    reference = _run_once(paths.path_step("make_step", point, "autodiff"), point.state, x, y)
    for path in paths.PATHS:
        for mode in ("manual", "autodiff"):
            carry = _run_once(
                paths.path_step(path, point, mode), paths.initial_carry(path, point), x, y
            )
            got = paths.carry_params(carry)
            for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(reference)):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"{path} {mode}")
            moved = jax.tree_util.tree_leaves(point.state.params)
            assert any(
                not np.array_equal(a, b) for a, b in zip(moved, jax.tree_util.tree_leaves(got))
            )
            if path != "make_step" and len(carry) == 4:  # batch norm's statistics moved too
                np.testing.assert_allclose(
                    jax.tree_util.tree_leaves(carry[2])[0],
                    jax.tree_util.tree_leaves(reference.net_state)[0],
                    rtol=1e-5,
                )
    with pytest.raises(ValueError, match="unknown path 'vjp'"):
        paths.path_step("vjp", point, "manual")


def test_fit_epoch_in_uneven_chunks_is_the_whole_epoch_bit_for_bit():
    # A rule with its state and the alignment signal mid-chunk: the hardest case for the
    # chunking (the quick run checks manual without the signal, in even chunks).
    mode, grad_check_every = "feedback_alignment", 3
    cfg = config()
    point = points.build(cfg, TINY_MLP)
    n = 13 * point.batch  # 13 steps: chunks of at most 8 are 8 + 5, two executables
    data = points.synthetic_data(cfg, point.example_shape, point.n_outputs, n, 0)
    state = points.state_for(point, mode)
    options = {
        "grad_check_every": grad_check_every,
        "with_layer_stats": False,
        "rule_options": None,
    }
    chunked, info, plan = chunks.fit_epoch(
        point, state, data, n, mode=mode, chunk_steps=8, options=options
    )
    whole, _ = chunks.whole_epoch(point, state, data, mode=mode, options=options)
    assert plan == ((0, 8), (8, 5)) and info["chunk_executables"] == 2
    (a, losses_a), (b, losses_b) = chunked(state), whole(state)
    assert losses_a.shape == (13,)
    np.testing.assert_array_equal(losses_a, losses_b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(x, y)
    assert int(a.step) == 13
