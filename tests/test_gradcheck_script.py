"""The gradient-check sweep (experiments/gradcheck.py): composed configs and the real script.

Grids are shrunk with overrides so each test stays within a few seconds; the shipped grid is
covered by running the script itself (about a minute on a 2-core CPU).
"""

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import hydra
import pytest

from bpjax.layers import ACTIVATIONS
from bpjax.losses import LOSSES

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
SCRIPT = ROOT / "experiments" / "gradcheck.py"
SMALL = [
    "image_architectures=[]",
    "architectures=[[4,3]]",
    "activations=[tanh]",
    "losses=[mse,softmax_cross_entropy]",
    "dtypes=[float64]",
]
COLUMNS = [
    "architecture",
    "activation",
    "loss",
    "dtype",
    "x_dtype",
    "inject_bug",
    "check",
    "layer",
    "layer_name",
    "leaf",
    "shape",
    "max_abs_err",
    "rel_err",
    "cosine",
    "tol",
    "status",
    "note",
    "passed",
]


def _load_script():
    spec = importlib.util.spec_from_file_location("gradcheck_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gradcheck = _load_script()


def compose(overrides: list[str]):
    with hydra.initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra.compose("gradcheck", overrides=overrides)


def test_shipped_config_names_real_activations_and_losses():
    cfg = compose([])
    assert set(cfg.activations) <= set(ACTIVATIONS)
    assert set(cfg.losses) <= set(LOSSES)
    assert set(cfg.dtypes) == {"float64", "float32"}
    assert cfg.x_dtype is None  # each combination's own dtype
    assert cfg.inject_bug is None
    assert all(features[-1] >= 2 for features in cfg.architectures)


def test_run_passes_and_writes_csv_and_json(tmp_path, capsys):
    cfg = compose([*SMALL[:-1], "dtypes=[float64,float32]", "losses=[mse,binary_cross_entropy]"])
    result = gradcheck.run(cfg, output_dir=tmp_path)  # float32 must not warn (warnings are errors)

    assert result["passed"], capsys.readouterr().out
    assert (result["n_checks"], result["n_failed"]) == (4, 0)
    assert {row["check"] for row in result["rows"]} == {"loss", "layer", "total", "fd"}
    assert {row["dtype"] for row in result["rows"]} == {"float64", "float32"}
    with open(result["csv"], newline="") as f:
        records = list(csv.DictReader(f))
    assert list(records[0]) == COLUMNS
    assert len(records) == len(result["rows"])
    assert {r["passed"] for r in records} == {"True"} and {r["status"] for r in records} == {
        "passed"
    }
    assert all(r["x_dtype"] == r["dtype"] for r in records)
    assert {r["inject_bug"] for r in records} == {""}  # csv's None
    rows = json.loads(Path(result["json"]).read_text())
    assert len(rows) == len(records) and list(rows[0]) == COLUMNS
    assert {r["inject_bug"] for r in rows} == {None}
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # atomic writes
    assert Path(result["csv"]).parent == tmp_path

    out = capsys.readouterr().out
    assert "float32" in out and "LOOSE" in out
    assert out.rstrip().endswith("4 passed, 0 failed")


def test_injected_bug_is_named(tmp_path, capsys):
    cfg = compose([*SMALL, "inject_bug=tanh"])
    result = gradcheck.run(cfg, output_dir=tmp_path)

    assert not result["passed"] and result["n_failed"] == 2
    # Only tanh's own layer check fails: the layers below it get the same (wrong) dy as jax.vjp.
    failing = [r for r in result["rows"] if not r["passed"] and r["check"] == "layer"]
    assert {(r["layer"], r["layer_name"], r["leaf"]) for r in failing} == {(1, "tanh", "dx")}
    out = capsys.readouterr().out
    assert "first failure: layer 1 (tanh)" in out
    assert out.rstrip().endswith("0 passed, 2 failed")
    # The files say the bug was injected (a failing file of a checker test is not a bug report).
    assert {r["inject_bug"] for r in json.loads(Path(result["json"]).read_text())} == {"tanh"}


IMAGES = [
    "architectures=[]",
    "image_activations=[relu]",
    "image_losses=[softmax_cross_entropy]",
    "dtypes=[float64]",
]


# Each image network of the shipped config and layer kinds its rows must include (together:
# every conv, pool and norm kind).
IMAGE_NETWORKS = {
    "lenet5": {"conv2d", "max_pool"},
    "cnn-bn": {"conv2d", "batch_norm", "max_pool"},
    "resnet": {"conv2d", "residual", "batch_norm"},
    "conv-strided-groups": {"conv2d", "avg_pool", "group_norm"},
}


def test_image_network_kinds_cover_convs_pools_and_norms():
    kinds = set().union(*IMAGE_NETWORKS.values())
    assert {"conv2d", "max_pool", "batch_norm", "residual", "avg_pool", "group_norm"} <= kinds


# One case per network (not one test of all four): the checks of the four networks, each
# compile-bound, spread over the xdist workers.
@pytest.mark.parametrize("name", list(IMAGE_NETWORKS))
def test_image_networks_are_checked_layer_by_layer(tmp_path, capsys, name):
    """Each image network of the shipped config: conv, pool and norm layers (batch norm in
    training mode) all pass against jax.vjp, jax.grad and a finite difference."""
    cfg = compose(IMAGES)
    assert [spec.name for spec in cfg.image_architectures] == list(IMAGE_NETWORKS)
    cfg.image_architectures = [a for a in cfg.image_architectures if a.name == name]
    result = gradcheck.run(cfg, output_dir=tmp_path)
    out = capsys.readouterr().out
    assert result["passed"] and result["n_checks"] == 1, out
    layer_names = {r["layer_name"].split("(")[0] for r in result["rows"] if r["check"] == "layer"}
    assert IMAGE_NETWORKS[name] <= layer_names
    assert {r["architecture"] for r in result["rows"]} == {name}


NO_ACTIVATION = (
    "image_architectures=[{name: t, model: {_target_: bpjax.serial, _args_: ["
    "{_target_: bpjax.conv2d, n_out: 2, kernel_size: 3}, {_target_: bpjax.flatten}, "
    "{_target_: bpjax.dense, n_out: 3}]}, input_shape: [4, 4, 1]}]"
)


@pytest.mark.parametrize(
    ("network", "recorded", "shown"),
    [("conv-strided-groups", "tanh", "tanh"), ("no-activation", None, "-")],
)
def test_a_network_without_an_activation_to_set_records_its_own(
    tmp_path, capsys, network, recorded, shown
):
    """image_activations=[relu]: conv-strided-groups (a fixed tanh) recorded activation=relu in
    its rows and line. A network whose factory takes no activation records what it has of its
    own, in the CSV, the JSON and its line (none: null, "" in the CSV, "-" on the line)."""
    overrides = [*IMAGES, "image_activations=[relu,sigmoid]"]
    cfg = compose(overrides if recorded else [*overrides, NO_ACTIVATION])
    cfg.image_architectures = cfg.image_architectures[-1:]  # conv-strided-groups: the last
    result = gradcheck.run(cfg, output_dir=tmp_path)
    out = capsys.readouterr().out
    assert result["passed"] and result["n_checks"] == 1, out  # once, not per activation
    assert {r["activation"] for r in result["rows"]} == {recorded}
    with open(result["csv"], newline="") as f:
        assert {r["activation"] for r in csv.DictReader(f)} == {recorded or ""}
    assert {r["activation"] for r in json.loads(Path(result["json"]).read_text())} == {recorded}
    name = cfg.image_architectures[0].name
    (line,) = [x for x in out.splitlines() if x.startswith(f"{name} ")]
    assert line.split()[:2] == [name, shown] and "relu" not in line
    once = f"{name}: no activation to set, checked once"
    assert once + (f" with its own, {recorded}" if recorded else ", without one") in out


def test_an_injected_conv_bug_is_named(tmp_path, capsys):
    cfg = compose(IMAGES)
    cfg.image_architectures = cfg.image_architectures[:2]  # lenet5; cnn-bn: convs without bias
    cfg.inject_bug = "conv2d"
    result = gradcheck.run(cfg, output_dir=tmp_path)
    failing = {
        (r["architecture"], r["layer_name"].split("(")[0], r["leaf"])
        for r in result["rows"]
        if r["status"] == "failed"
    }
    assert ("lenet5", "conv2d", "b") in failing and not result["passed"]
    # a conv without a bias (before batch norm) gets a bug too: it used to stop the sweep
    assert ("cnn-bn", "conv2d", "w") in failing
    assert "first failure: layer 3 (conv2d" in capsys.readouterr().out


def test_an_injected_conv_bug_reaches_the_convs_inside_residual_blocks(tmp_path):
    # It reached the stem conv only: a ResNet whose block convs were wrong passed them.
    cfg = compose(IMAGES)
    cfg.image_architectures = [a for a in cfg.image_architectures if a.name == "resnet"]
    net = gradcheck.build_image_net(cfg.image_architectures[0], "relu")
    inner = [
        layer
        for block in net.sublayers
        if block.combinator == "residual"
        for layer in gradcheck.layers_within(block)
        if gradcheck.layer_kind(layer) == "conv2d"
    ]
    assert inner  # the config's resnet has convs inside its blocks
    bugged = gradcheck.inject_bug(net, "conv2d")
    kinds = [gradcheck.layer_kind(layer) for layer in gradcheck.layers_within(bugged)]
    assert kinds == [gradcheck.layer_kind(layer) for layer in gradcheck.layers_within(net)]
    cfg.inject_bug = "conv2d"
    result = gradcheck.run(cfg, output_dir=tmp_path)
    failing = {r["layer_name"].split("(")[0] for r in result["rows"] if r["status"] == "failed"}
    assert "residual" in failing and not result["passed"]


def test_injected_dense_bug_is_named(tmp_path):
    cfg = compose([*SMALL, "inject_bug=dense"])
    result = gradcheck.run(cfg, output_dir=tmp_path)

    failing = {(r["layer_name"], r["leaf"]) for r in result["rows"] if not r["passed"]}
    assert ("dense(3)", "b") in failing and not result["passed"]


def test_unknown_bug_kind_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="valid kinds: dense"):
        gradcheck.run(compose([*SMALL, "inject_bug=conv"]), output_dir=tmp_path)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("activations=[rleu]", "rleu"),
        ("losses=[crossent]", "crossent"),
        ("dtypes=[float8]", r"dtypes: unknown \['float8'\]"),
        ("architectures=[[4,0]]", "not a list of positive sizes"),
        ("x_dtype=int4", r"x_dtype: unknown 'int4'; valid: null .*uint8"),
    ],
)
def test_unknown_names_are_rejected_before_anything_runs(tmp_path, capsys, override, match):
    with pytest.raises(ValueError, match=match):
        gradcheck.run(compose([*SMALL, override]), output_dir=tmp_path)
    assert capsys.readouterr().out == ""  # not even the table's header
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("x_dtype", gradcheck.X_DTYPES)
def test_inputs_of_every_dtype(tmp_path, capsys, x_dtype):
    """uint8, int32 and bool inputs have no gradient: their dx rows are skipped, and say so;
    every other row is checked and passes, in float64 and float32. (One loss: the input's
    dtype meets only the first layer; test_grad checks every utility at every input dtype.)"""
    cfg = compose([*SMALL[:-2], "losses=[mse]", "dtypes=[float64,float32]", f"x_dtype={x_dtype}"])
    result = gradcheck.run(cfg, output_dir=tmp_path)
    out = capsys.readouterr().out

    assert result["passed"] and result["n_failed"] == 0, out
    assert {r["x_dtype"] for r in result["rows"]} == {x_dtype}
    assert {r["dtype"] for r in result["rows"]} == {"float64", "float32"}
    first_dx = [r for r in result["rows"] if r["layer"] == 0 and r["leaf"] == "dx"]
    assert len(first_dx) == 2  # one per combination
    integer = x_dtype in ("uint8", "int32", "bool")
    for r in first_dx:
        if integer:
            assert r["status"] == "skipped" and f"{x_dtype} input: no gradient" in r["note"]
        else:
            assert r["status"] == "passed", r
    assert all(r["status"] == "passed" for r in result["rows"] if r not in first_dx)
    # A skipped row is no failure: filtering on passed finds none (they had passed=False).
    assert all(r["passed"] for r in result["rows"])
    with open(result["csv"], newline="") as f:
        assert {r["passed"] for r in csv.DictReader(f)} == {"True"}
    assert all(r["passed"] for r in json.loads(Path(result["json"]).read_text()))
    assert f"inputs in {x_dtype}" in out
    assert ("dx rows are skipped" in out) == integer
    json.loads(Path(result["json"]).read_text())  # NaN errors of skipped rows are null


# Zero biases and two ReLUs per hidden layer: for some examples both units of the first
# layer are dead, so the second layer's pre-activations are exactly 0, on the kink.
KINKED = [
    "image_architectures=[]",
    "architectures=[[2,2,3]]",
    "activations=[relu]",
    "losses=[mse]",
    "dtypes=[float64,float32]",
    "b_init=zeros",
]


def test_an_fd_row_at_a_kink_is_inconclusive_not_failed(tmp_path, capsys):
    result = gradcheck.run(compose(KINKED), output_dir=tmp_path)
    out = capsys.readouterr().out

    assert result["passed"] and result["n_failed"] == 0, out
    assert result["n_inconclusive"] == 2
    fd = [r for r in result["rows"] if r["check"] == "fd"]
    assert [r["status"] for r in fd] == ["inconclusive", "inconclusive"]
    # inconclusive is no failure: passed (false for failed rows only), the status says why
    assert all("not smooth within the step" in r["note"] and r["passed"] for r in fd)
    assert "inconcl." in out and "fd inconclusive: the loss is not smooth" in out
    assert out.rstrip().endswith("2 passed (2 with an inconclusive fd row), 0 failed")


def test_script_reports_a_bad_name_in_one_line(tmp_path):
    proc = _script(tmp_path, "activations=[rleu]")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "rleu" in errors[0] and "Traceback" not in proc.stderr


def test_script_refuses_a_key_no_file_holds_in_one_line(tmp_path):
    # A trial: Hydra's raw multi-line "Could not override 'batchsize'", exit 1
    proc = _script(tmp_path, "batchsize=4")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: batchsize is not a setting: did you mean batch? (nothing reads it)"
    ]


def _script(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *SMALL, *overrides, f"hydra.run.dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_a_multirun_runs_every_job_and_exits_with_the_worst(tmp_path):
    # A trial: the first failing (or invalid) job ended the sweep, and the jobs after it
    # never ran. Job 0 is invalid (an unknown activation), job 1 fails (a wrong tanh backward).
    sweep = ["activations=[tanhh],[tanh]", "inject_bug=tanh", f"hydra.sweep.dir={tmp_path}"]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "-m", *SMALL[:2], "losses=[mse]", "dtypes=[float64]", *sweep],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    statuses = [json.loads((tmp_path / job / "gradcheck_status.json").read_text()) for job in "01"]
    assert statuses[0]["status"] == "invalid" and "tanhh" in statuses[0]["message"]
    assert statuses[1] == {"status": "failed", "message": ""}
    assert (tmp_path / "1" / "gradcheck.csv").is_file()  # the job after the invalid one ran
    assert proc.stdout.strip().splitlines()[-1] == (
        f"gradcheck sweep {tmp_path}: 0 jobs passed, 1 job failed (1), 1 job invalid (0)"
    )


@pytest.mark.slow
def test_script_exits_zero_when_all_pass(tmp_path):
    proc = _script(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 passed, 0 failed" in proc.stdout
    assert (tmp_path / "gradcheck.csv").is_file() and (tmp_path / "gradcheck.json").is_file()


@pytest.mark.slow
def test_script_exits_zero_when_the_only_doubt_is_a_kink(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *KINKED, f"hydra.run.dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 passed (2 with an inconclusive fd row), 0 failed" in proc.stdout


@pytest.mark.slow
def test_script_exits_nonzero_and_names_the_injected_layer(tmp_path):
    proc = _script(tmp_path, "inject_bug=tanh")
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "FAIL  first failure: layer 1 (tanh)" in proc.stdout
    assert "0 passed, 2 failed" in proc.stdout
    assert (tmp_path / "gradcheck.csv").is_file()


@pytest.mark.parametrize(
    ("kind", "leaf"), [("batch_norm", "scale"), ("max_pool", "dx"), ("residual", None)]
)
def test_an_injected_bug_in_any_layer_kind_is_a_failure_not_a_crash(tmp_path, capsys, kind, leaf):
    """batch norm (scale/offset), a residual block (nested gradients) and a pooling layer (its
    dx then has the wrong shape) each get a bug that the check names; none crashes it."""
    cfg = compose(IMAGES)
    arch = {"batch_norm": "cnn-bn", "max_pool": "cnn-bn", "residual": "resnet"}[kind]
    cfg.image_architectures = [a for a in cfg.image_architectures if a.name == arch]
    cfg.inject_bug = kind
    result = gradcheck.run(cfg, output_dir=tmp_path)
    failing = {
        (r["layer_name"].split("(")[0], r["leaf"])
        for r in result["rows"]
        if r["status"] == "failed" and r["check"] == "layer"
    }
    assert not result["passed"]
    assert {name for name, _ in failing} == {kind}, failing
    if leaf is not None:
        assert (kind, leaf) in failing
    if kind == "max_pool":  # the console's line says why: the shapes (it said "rel_err nan")
        out = capsys.readouterr().out
        assert "check of dx: shape (" in out and "but the reference's is" in out, out
        assert " nan " in out  # the layer column: no error measured, not 0.0e+00


def test_an_empty_sweep_is_refused_naming_the_empty_lists(tmp_path, capsys):
    # architectures=[] with image_architectures=[] used to print a "0 architectures x ..."
    # header and "0 passed, 0 failed": a sweep that checked nothing, reported as a pass.
    with pytest.raises(ValueError, match="nothing to check: activations, image_architectures are"):
        gradcheck.run(compose([*SMALL, "activations=[]"]), output_dir=tmp_path)
    assert capsys.readouterr().out == "" and not list(tmp_path.iterdir())


def test_the_header_counts_only_the_grids_that_run():
    lines = {
        "mlp": gradcheck._header(compose(SMALL), 2, {}),
        "images": gradcheck._header(compose(IMAGES), 4, {}),
    }
    one = gradcheck._header(compose([*SMALL, "losses=[mse]"]), 1, {})
    assert one.startswith("gradient check sweep: 1 architectures x 1 activations x 1 losses x ")
    assert " = 1 combination (batch=" in one  # was "1 combinations"
    assert lines["mlp"].startswith(
        "gradient check sweep: 1 architectures x 1 activations x 2 losses x 1 dtypes "
        "= 2 combinations"
    )
    assert lines["images"].startswith(
        "gradient check sweep: 4 image_architectures x 1 image_activations x 1 image_losses "
        "x 1 dtypes (conv-strided-groups: no activation to set, checked once with its own, "
        "tanh) = 4 combinations"
    )


def test_an_injected_kind_a_network_lacks_is_said_on_its_line(tmp_path, capsys):
    cfg = compose([*SMALL, "activations=[tanh,relu]", "losses=[mse]", "inject_bug=relu"])
    result = gradcheck.run(cfg, output_dir=tmp_path)
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("10-4-3")]
    assert result["n_failed"] == 1 and len(lines) == 2, lines
    tanh, relu = lines
    assert "PASS" in tanh and tanh.endswith("(no relu layer here: nothing injected)")
    assert "FAIL" in relu and "nothing injected" not in relu


TINY_CONV = (
    "image_architectures=[{name: t, model: {_target_: bpjax.serial, _args_: ["
    "{_target_: bpjax.conv2d, n_out: 2, kernel_size: 3}, {_target_: bpjax.flatten}, "
    "{_target_: bpjax.dense, n_out: 3}]}, input_shape: [4, 4, 1]}]"
)
TINY_CNN = (
    "image_architectures=[{name: c, model: {_target_: bpjax.cnn, channels: [2], hidden: [], "
    "n_classes: 3}, input_shape: [4, 4, 1]}]"
)


@pytest.mark.parametrize(
    ("overrides", "refused"),
    [
        # the kind is in a grid that has no combination: nothing would fail, exit 0
        ([*SMALL, TINY_CONV, "image_losses=[]", "inject_bug=conv2d"], "valid kinds: dense, tanh"),
        (
            [*SMALL, "architectures=[]", TINY_CONV, "image_activations=[relu]",
             "image_losses=[mse]", "inject_bug=tanh"],
            "valid kinds: conv2d, dense, flatten",
        ),
        # an empty image grid: it used to index image_activations[0] (a traceback)
        ([*SMALL, TINY_CONV, "image_activations=[]", "inject_bug=tanh"], None),
        # tanh only at the image grid's second activation: it was refused
        (
            [*SMALL, "activations=[relu]", TINY_CNN, "image_activations=[relu,tanh]",
             "image_losses=[mse]", "inject_bug=tanh"],
            None,
        ),
    ],
)  # fmt: skip
def test_inject_bug_is_checked_against_the_networks_that_run(overrides, refused):
    cfg = compose(overrides)
    if refused is None:
        gradcheck.validate(cfg)
    else:
        with pytest.raises(ValueError, match=f"matches no layer of the sweep; {refused}$"):
            gradcheck.validate(cfg)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "architectures=[4,3]",
            r"architectures: 4 is not a list of sizes: .*\(not architectures=\[4,3\]\)",
        ),
        ("architectures=null", "architectures must be a list, e.g. .*; got None"),
        ("image_architectures=null", "image_architectures must be a list"),
        (
            "dtypes=float64",
            r"dtypes must be a list, e.g. dtypes=\[float64, float32\]; got 'float64'",
        ),
    ],
)
def test_lists_of_the_wrong_shape_are_one_error_line(override, message):
    # each was a Python traceback (TypeError: 'int' object is not iterable), exit 1
    with pytest.raises(ValueError, match=message):
        gradcheck.validate(compose([*SMALL, override]))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("batch=-3", "batch must be a positive integer, got -3"),
        ("batch=0", "batch must be a positive integer, got 0"),
        ("n_in=abc", "n_in must be a positive integer, got 'abc'"),
        ("seed=abc", "seed must be a non-negative integer, got 'abc'"),
        ("+fd_eps.float64=abc", "fd_eps.float64 must be a positive number, got 'abc'"),
        ("+fd_eps.float64=-1", "fd_eps.float64 must be a positive number, got -1"),
        ("+fd_eps.float8=1e-3", "fd_eps: unknown dtype 'float8'; valid: float64, float32"),
        ("fd_eps=3", r"fd_eps must map dtypes to steps, e.g. \+fd_eps.float32=1e-3; got 3"),
        # keys that nothing reads were accepted (+bogus=1 ran the default sweep)
        ("+bogus=1", "bogus is not a setting"),
        ("+batchsize=4", "batchsize is not a setting: did you mean batch"),
    ],
)
def test_bad_numbers_are_one_error_line(override, message):
    # a trial: tracebacks (batch=-3, seed=abc, n_in=abc, an fd_eps string), a run of nan
    # differences (batch=0), or silently accepted (a negative step, an unknown dtype)
    with pytest.raises(ValueError, match=message):
        gradcheck.validate(compose([*SMALL, override]))


def test_the_header_says_which_networks_run_once():
    cfg = compose([])  # the shipped sweep: conv-strided-groups takes no activation
    header = gradcheck._header(cfg, len(gradcheck.combinations(cfg)), {}).splitlines()[0]
    assert "2 image_activations x 2 image_losses x 2 dtypes (conv-strided-groups: no " in header
    assert "= 298 combinations" in header  # 270 + 3 x 2 x 2 x 2 + 1 x 1 x 2 x 2


def test_an_interrupted_sweep_keeps_the_rows_it_checked(tmp_path, capsys, monkeypatch):
    # A trial: Ctrl-C was a traceback, and the rows already checked were lost.
    check_one, calls = gradcheck.check_one, []

    def interrupted_at_the_second(*args, **kwargs):
        calls.append(None)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return check_one(*args, **kwargs)

    monkeypatch.setattr(gradcheck, "check_one", interrupted_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        gradcheck.run(compose(SMALL), output_dir=tmp_path)
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("interrupted after 1 of 2 combinations: their ")
    rows = json.loads((tmp_path / "gradcheck.json").read_text())
    assert rows and {r["loss"] for r in rows} == {"mse"}  # the first combination's, complete
    assert all(r["passed"] for r in rows)
