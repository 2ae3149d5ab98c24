"""``experiments/compare_rules.py``: the same network under several learning rules, on digits
(2 epochs); its table, CSV and plot, the runs' TensorBoard angles and metrics.json, a rule that
can't apply (listed as skipped), bad ``compare.*`` settings, a multirun; the rule presets."""

import csv
import importlib.util
import json
import pathlib
import shlex
import signal
import subprocess
import sys

import hydra
import jax
import numpy as np
import pytest
from conftest import once_per_session, signal_when

from bpjax import credit, train

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "compare_rules.py"
_spec = importlib.util.spec_from_file_location("compare_rules", SCRIPT)
compare_rules = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare_rules)

# A residual block as the hidden activation: feedback alignment goes through it, DFA can't.
RESIDUAL_TANH = (
    "model.activation={_target_:bpjax.layers.residual,block:{_target_:bpjax.layers.tanh}}"
)
TINY = [
    "dataset=digits",
    "model.features=[16,10]",
    "trainer.epochs=2",
    "trainer.progress=false",
    "trainer.grad_check_every=5",
    "trainer.histogram_every=1",
]


def compose(*overrides: str, name: str = "compare_rules", **kwargs):
    with hydra.initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra.compose(name, overrides=list(overrides), **kwargs)


@pytest.fixture(scope="module")
def comparison(tmp_path_factory, request):
    """One comparison per test session, shared by pytest-xdist's workers (this module's tests
    may land on both, which would each run it on a shared CPU)."""
    cfg = compose(
        *TINY,
        RESIDUAL_TANH,
        "logger=tensorboard",
        "compare.rules=[manual,direct_feedback_alignment,feedback_alignment]",
        "compare.seeds=[0,1]",
    )
    root, rows = once_per_session(
        request,
        tmp_path_factory,
        "compare-rules-comparison",
        lambda root: compare_rules.compare(cfg, root / "compare"),
    )
    return root / "compare", rows


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_the_csv_has_a_row_per_rule_and_seed(comparison):
    run_dir, _ = comparison
    rows = read_csv(run_dir / "comparison.csv")
    assert [(r["rule"], r["seed"], r["status"]) for r in rows] == [
        ("manual", "0", "completed"),
        ("manual", "1", "completed"),
        ("direct_feedback_alignment", "0", "skipped"),
        ("direct_feedback_alignment", "1", "skipped"),
        ("feedback_alignment", "0", "completed"),
        ("feedback_alignment", "1", "completed"),
    ]
    for row in rows:
        if row["status"] == "skipped":
            assert "layer 1 (residual(tanh)) is a residual block" in row["reason"]
            assert row["test_accuracy"] == "" and row["alignment/total/angle"] == ""
            assert not (run_dir / row["rule"]).exists()
            continue
        # the values are the run's own, from its metrics.json
        metrics = json.loads((run_dir / row["run_dir"] / "metrics.json").read_text())
        keys = ("test_accuracy", "wall_seconds", "examples_per_second", "alignment/total/angle")
        for key in keys:
            assert float(row[key]) == pytest.approx(metrics[key], rel=1e-12), key
        assert int(row["best_epoch"]) == metrics["best_epoch"]
        assert int(row["compilations"]) == metrics["compilations"]
        assert float(row["epochs_this_call"]) == metrics["epochs"]  # not resumed: every epoch
        assert float(row["test_accuracy"]) > 0.3  # 10 classes: chance is 0.1
        angles = {k for k in row if k.startswith("alignment/") and row[k] != ""}
        assert angles == {k for k in metrics if k.startswith("alignment/")}
    manual = [r for r in rows if r["rule"] == "manual"]
    assert all(float(r["alignment/total/angle"]) < 1e-3 for r in manual)  # the control
    fa = [r for r in rows if r["rule"] == "feedback_alignment"]
    assert all(5.0 < float(r["alignment/layer0/angle"]) < 90.0 for r in fa)
    assert all(r["alignment/layer0/weight_angle"] != "" for r in fa)
    # the seeds are the runs' seeds: different draws, different results
    assert fa[0]["test_accuracy"] != fa[1]["test_accuracy"]


def test_the_markdown_table_has_a_line_per_rule(comparison):
    run_dir, rows = comparison
    text = (run_dir / "comparison.md").read_text()
    assert text.startswith("# digits: serial(dense(16), residual(tanh), dense(10)), seeds 0, 1")
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    # A trial: the test column (the best epoch's, where the plot shows every epoch) said not
    # which, and the wall time averaged a run that compiled with one that didn't (3.8 ± 4.8 s).
    assert header == [
        "rule",
        "test accuracy (best epoch)",
        "best epoch",
        "total angle (°)",
        "layer0 angle (°)",
        "layer2 angle (°)",
        "train examples/s (no compilation)",
        "wall time (s, compilation included)",
        "seeds",
        "note",
    ]
    table = {
        cells[0]: cells
        for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])
    }
    assert list(table) == ["manual", "direct_feedback_alignment", "feedback_alignment"]
    fa = [r for r in rows if r["rule"] == "feedback_alignment"]
    accuracies = [r["test_accuracy"] for r in fa]
    mean, sd = np.mean(accuracies), np.std(accuracies, ddof=1)
    assert table["feedback_alignment"][1] == f"{mean:.4f} ± {sd:.4f}"
    assert table["feedback_alignment"][2] == ", ".join(str(r["best_epoch"]) for r in fa)
    speeds = [r["examples_per_second"] for r in fa]  # chunks that compiled left out
    assert table["feedback_alignment"][6] == (
        f"{np.mean(speeds):.0f} ± {np.std(speeds, ddof=1):.0f}"
    )
    assert table["feedback_alignment"][8] == "2"
    assert table["manual"][3].startswith("0.00")
    skipped = table["direct_feedback_alignment"]
    assert skipped[1:8] == ["—"] * 7 and skipped[8] == "0"
    assert skipped[9].startswith("skipped: direct_feedback_alignment can't apply")


def test_the_plot_is_a_png_of_both_panels(comparison):
    from matplotlib import image

    run_dir, _ = comparison
    path = run_dir / "comparison.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = image.imread(path)
    assert pixels.shape[0] == 420 and pixels.shape[1] == 1100  # 11 x 4.2 inches at 100 dpi
    assert pixels.std() > 0.05  # drawn on, not blank


def test_the_runs_log_the_angles_to_tensorboard(comparison):
    """The live signal: ``alignment/...`` at the measured steps (every 5th: 0, 5, ..., 30 of
    2 x 17), per layer, with weight angles for feedback alignment; the last is metrics.json's."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = comparison
    for rule in ("manual", "feedback_alignment"):
        tb = next((run_dir / rule / "seed0" / "tb").rglob("events.out.tfevents.*")).parent
        events = EventAccumulator(str(tb), {"scalars": 0})
        events.Reload()
        tags = set(events.Tags()["scalars"])
        expected = {"alignment/layer0/angle", "alignment/layer2/angle", "alignment/total/angle"}
        if rule == "feedback_alignment":
            expected |= {"alignment/layer0/weight_angle", "alignment/layer2/weight_angle"}
        assert {t for t in tags if t.startswith("alignment/")} == expected
        assert bool({t for t in tags if t.startswith("gradcheck/")}) == (rule == "manual")
        metrics = json.loads((run_dir / rule / "seed0" / "metrics.json").read_text())
        for tag in expected:
            scalars = events.Scalars(tag)
            assert [e.step for e in scalars] == list(range(0, 34, 5))
            assert scalars[-1].value == pytest.approx(metrics[tag], rel=1e-6)
        first = events.Scalars("alignment/layer0/angle")[0].value
        assert first > 45.0 if rule == "feedback_alignment" else first < 1e-3


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("compare.rules=[manual,backprop]", "compare.rules must be distinct modes"),
        ("compare.rules=[manual,manual]", "compare.rules must be distinct modes"),
        ("compare.rules=[]", r"^compare.rules is empty: name at least one of manual, autodiff, "),
        ("compare.seeds=[-1]", "compare.seeds must be distinct non-negative integers"),
        # a bare string was read letter by letter: got ['m', 'a', 'n', 'u', 'a', 'l'] (trial)
        ("compare.rules=manual", r"compare.rules must be a list, e.g. compare.rules=\[manual,"),
        ("compare.seeds=3", r"compare.seeds must be a list, e.g. compare.seeds=\[0,1,2\]; got 3"),
        # a key that nothing reads was ignored (+compare.rulez ran all five rules)
        (
            "+compare.rulez=[manual]",
            r"^compare.rulez is not a setting, and nothing reads it: did you mean compare.rules\? "
            r"\(compare settings: rules, seeds\)$",
        ),
        (
            "+compare.zzzz=1",
            r"^compare.zzzz is not a setting, and nothing reads it "
            r"\(compare settings: rules, seeds\)$",
        ),
    ],
)
def test_bad_compare_settings_raise_before_any_run(override, match, tmp_path):
    with pytest.raises(compare_rules.CompareConfigError, match=match):
        compare_rules.compare(compose(*TINY, override), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_comparison_where_no_rule_applies_raises_before_any_run(tmp_path):
    # It trained nothing, exited 0 and warned about angles measured at step 0 (trial).
    cfg = compose(*TINY, RESIDUAL_TANH, "compare.rules=[direct_feedback_alignment]")
    with pytest.raises(compare_rules.CompareConfigError) as raised:
        compare_rules.compare(cfg, tmp_path / "run")
    assert str(raised.value).startswith(
        "no rule of compare.rules applies to this network: direct_feedback_alignment can't "
        "apply to this network: layer 1 (residual(tanh)) is a residual block"
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("override", "instead"),
    [
        ("seed=5", "compare.seeds"),
        ("+seed=5", "compare.seeds"),
        ("trainer.grad_mode=kolen_pollack", "compare.rules"),
    ],
)
def test_what_each_run_gets_from_compare_is_refused_on_the_command_line(override, instead):
    # seed=5 ran seed 0, and trainer.grad_mode=... the listed rules, silently (trial).
    with pytest.raises(compare_rules.CompareConfigError) as raised:
        compare_rules.check_overrides(["dataset=digits", override])
    key = override.lstrip("+").split("=")[0]
    assert str(raised.value) == (
        f"{override}: compare_rules sets {key} for each run; give {instead}=[...] instead"
    )
    compare_rules.check_overrides(["dataset=digits", "compare.seeds=[5]", "trainer.epochs=1"])


def test_a_bad_train_setting_raises_before_any_run(tmp_path):
    script = compare_rules.train_script()
    with pytest.raises(script.ConfigError, match="learning_rate"):
        compare_rules.compare(compose(*TINY, "optimizer.learning_rate=-1"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_missing_dataset_is_a_file_not_found_error(tmp_path):
    overrides = [o for o in TINY if not o.startswith("dataset=")]
    cfg = compose(*overrides, "dataset=idx", f"dataset.path={tmp_path / 'nowhere'}")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        compare_rules.compare(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_the_config_composes_with_every_preset():
    cfg = compose("experiment=fa_mnist", return_hydra_config=True)
    assert list(cfg.compare.rules) == ["manual", *credit.RULES]
    assert list(cfg.compare.seeds) == [0]
    assert cfg.model.features == [1000, 10] and cfg.trainer.grad_check_every == 100
    # train.py's sweep summary does not run on a comparison's sweep
    assert cfg.hydra.callbacks.sweep_summary._target_ == "hydra.experimental.callback.Callback"
    cfg = compose("experiment=fa_mnist")  # as the job gets it: without hydra's own config
    job = compare_rules.rule_config(cfg, "kolen_pollack", 3, pathlib.Path("/tmp/x"))
    assert "compare" not in job and job.seed == 3
    assert job.trainer.grad_mode == "kolen_pollack" and job.trainer.run_dir == "/tmp/x"
    assert cfg.trainer.grad_mode == "manual"  # the composed config is left alone


@pytest.mark.parametrize(
    ("preset", "rule", "n_in", "hidden"),
    [
        ("fa_mnist", "feedback_alignment", 784, [1000]),
        ("dfa_mnist", "direct_feedback_alignment", 784, [800, 800]),
    ],
)
def test_rule_presets_build_and_their_rule_applies(preset, rule, n_in, hidden):
    cfg = compose(f"experiment={preset}", f"trainer.grad_mode={rule}", name="config")
    compare_rules.train_script().validate(cfg)
    net = hydra.utils.instantiate(cfg.model, _convert_="all")
    assert list(cfg.model.features) == [*hidden, 10] and cfg.model.activation == "tanh"
    assert train.check_rule(rule, net, (cfg.trainer.batch_size, n_in)) == train.RULE_OPTIONS
    # The state's shapes, traced (eval_shape): drawing a 784 x 1000 network's weights and
    # feedback eagerly compiled a sampler per shape, for shapes alone.
    state = jax.eval_shape(
        lambda key: train.init_state(
            net,
            hydra.utils.instantiate(cfg.optimizer)(learning_rate=1e-3),
            key,
            (cfg.trainer.batch_size, n_in),
            grad_mode=rule,
        ),
        jax.random.PRNGKey(0),
    )
    feedback = [b.shape for b in jax.tree_util.tree_leaves(state.rule_state)]
    if rule == "feedback_alignment":
        assert feedback == [(784, 1000), (1000, 10)]
    else:  # one [n_outputs, units] per hidden layer
        assert feedback == [(10, 800), (10, 800)]


def test_script_multirun_writes_one_comparison_per_job(tmp_path):
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "-m",
            # no alignment checks: what this test reads is the files each job writes (the
            # angles are the comparison fixture's, in-process); they were a fifth of its time
            *(o for o in TINY if not o.startswith("trainer.grad_check_every=")),
            "trainer.grad_check_every=0",
            "trainer.epochs=1",
            "logger=none",
            "compare.rules=[manual,sign_symmetry]",
            "trainer.batch_size=16,32",  # (seed=0,1 swept nothing: each run's is compare's)
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    for job in ("0", "1"):
        assert {p.name for p in (sweep / job).glob("comparison.*")} == {
            "comparison.md",
            "comparison.csv",
            "comparison.png",
        }
        rules = [r["rule"] for r in read_csv(sweep / job / "comparison.csv")]
        assert rules == ["manual", "sign_symmetry"]
        assert "Angles: not measured (trainer.grad_check_every=0)." in (
            (sweep / job / "comparison.md").read_text()
        )
    assert not (sweep / "summary.md").exists()  # train.py's sweep summary is off


def test_script_bad_setting_is_one_error_line(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *TINY, "compare.rules=[feedback_alignmnet]"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: compare.rules must be distinct modes of "
        f"{', '.join(['manual', 'autodiff', *credit.RULES])}, got ['feedback_alignmnet']"
    ]


def test_script_interrupted_says_how_to_continue_and_continues(tmp_path):
    # A trial: Ctrl-C ended in a raw KeyboardInterrupt traceback, with no way on.
    run_dir = tmp_path / "compare"
    args = [*TINY[:1], "model.features=[16,10]", "trainer.progress=false", "logger=none",
            "compare.rules=[manual]", "compare.seeds=[0]", "trainer.batch_size=16"]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), *args, "trainer.epochs=100000", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    checkpoints = run_dir / "manual" / "seed0" / "checkpoints"
    # SIGTERM (Ctrl-C's SIGINT is the same path): it killed the comparison, nothing said
    stderr = signal_when(proc, (checkpoints / "ckpt_000001").exists, signal.SIGTERM)
    assert proc.returncode == 143, stderr  # 128 + SIGTERM
    assert "Traceback" not in stderr, stderr
    message = stderr.strip().splitlines()[-1]
    said = f"interrupted: the runs done so far are in {run_dir}; continue with: "
    assert message.startswith(said), message
    command = shlex.split(message.split("continue with: ", 1)[1])
    assert "trainer.resume=true" in command and f"hydra.run.dir={run_dir}" in command
    assert "trainer.epochs=100000" in command  # this call's overrides, as given
    # Continued with fewer epochs, it ends and writes the comparison.
    command = [c for c in command if not c.startswith("trainer.epochs=")] + ["trainer.epochs=2"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert [r["status"] for r in read_csv(run_dir / "comparison.csv")] == ["completed"]
    # The plot's curve has the epochs run before the interrupt too (a trial: it had only those
    # after the resume, and none for a run found finished), and the table says whose timings
    # cover only the part after the resume.
    curves = json.loads((run_dir / "manual" / "seed0" / "curves.json").read_text())
    assert {1, 2} <= {epoch for epoch, _ in curves["epochs"]}
    table = (run_dir / "comparison.md").read_text()
    manual = next(line for line in table.splitlines() if line.startswith("| manual |"))
    assert manual.count(" †") == 2, manual  # examples/s and wall time
    assert "† resumed: examples/s and wall time count the part run after the resume" in table


def test_curves_persist_and_a_chunk_run_again_counts_once(tmp_path):
    path = tmp_path / "curves.json"

    def record(epoch, step, angles, test=None):
        out = {"epoch": epoch, "step": step, "step_metrics": {
            "loss": np.zeros(len(angles)), "alignment/total/angle": np.array(angles)}}  # fmt: skip
        return out if test is None else {**out, "test_accuracy": test}

    first = compare_rules.Curves("accuracy", steps_per_epoch=4, path=path)
    first(record(1, 2, [80.0, np.nan]))  # steps 0-1 of epoch 1: step 0 measured
    first(record(1, 4, [np.nan, 60.0], test=0.5))
    # Resumed from a checkpoint before the second chunk: it runs again, then epoch 2.
    again = compare_rules.Curves("accuracy", steps_per_epoch=4, path=path)
    assert again.epochs == [(1, 0.5)] and again.angles == [(0.0, 80.0), (0.75, 60.0)]
    again(record(1, 4, [np.nan, 60.0], test=0.5))
    again(record(2, 8, [np.nan, 40.0, np.nan, np.nan], test=0.7))
    assert again.epochs == [(1, 0.5), (2, 0.7)]
    assert again.angles == [(0.0, 80.0), (0.75, 60.0), (1.25, 40.0)]
    saved = json.loads(path.read_text())
    assert saved == {"epochs": [[1, 0.5], [2, 0.7]], "angles": [[0.0, 80.0], [0.75, 60.0],
                                                                 [1.25, 40.0]]}  # fmt: skip
    assert compare_rules.Curves("accuracy", 4).epochs == []  # no path: nothing read
