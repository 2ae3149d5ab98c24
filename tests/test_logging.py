"""Tests for bpjax.logging: what is written is read back by TensorBoard's own reader."""

import inspect
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator, event_multiplexer
from tensorboard.plugins.hparams import plugin_data_pb2

from bpjax import logging as logging_lib
from bpjax.logging import Logger, NullLogger, TensorBoardLogger, flatten_hparams

# What each public name of `bpjax.logging` is tested by (a new name must be added here).
TESTED = {
    "Logger": "test_loggers_implement_the_protocol",
    "NullLogger": "test_null_logger_does_nothing",
    "TensorBoardLogger": "test_scalars_histograms_text",
    "flatten_hparams": "test_flatten_hparams",
}


def test_public_names_are_tested():
    assert set(TESTED) == set(logging_lib.__all__)


def _protocol_methods() -> list[str]:
    return [n for n, v in vars(Logger).items() if callable(v) and not n.startswith("_")]


@pytest.mark.parametrize("cls", [TensorBoardLogger, NullLogger])
def test_loggers_implement_the_protocol(cls):
    """Both loggers have every method of `Logger`, with the same parameters, and are context
    managers (training code may hold either)."""
    names = _protocol_methods()
    assert set(names) == {"scalar", "scalars", "histogram", "text", "hparams", "flush", "close"}
    for name in names:
        expected = inspect.signature(getattr(Logger, name)).parameters
        actual = inspect.signature(getattr(cls, name)).parameters
        assert [(p.name, p.kind) for p in actual.values()] == [
            (p.name, p.kind) for p in expected.values()
        ], name
    assert hasattr(cls, "__enter__") and hasattr(cls, "__exit__")


SIZE_GUIDANCE = {  # 0: keep every event (the default samples histograms down to one)
    event_accumulator.SCALARS: 0,
    event_accumulator.HISTOGRAMS: 0,
    event_accumulator.TENSORS: 0,
}


def read_run(logdir: pathlib.Path) -> event_accumulator.EventAccumulator:
    accumulator = event_accumulator.EventAccumulator(str(logdir), size_guidance=SIZE_GUIDANCE)
    accumulator.Reload()
    return accumulator


def assert_single_run(logdir: pathlib.Path) -> None:
    """Every event file lives directly in logdir, so TensorBoard sees exactly one run."""
    assert [p for p in logdir.iterdir() if p.is_dir()] == []
    assert all(p.name.startswith("events.out.tfevents.") for p in logdir.iterdir())
    multiplexer = event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    assert list(multiplexer.Runs()) == ["."]


def test_scalars_histograms_text(tmp_path):
    with TensorBoardLogger(tmp_path, flush_secs=1) as log:
        for step in range(3):
            log.scalar("train/loss", jnp.asarray(1.0 / (step + 1)), step)
            log.scalars({"val/loss": np.float32(2.0 * step), "val/acc": 0.5, "lr": 1e-3}, step)
        log.histogram("w", jnp.asarray([[0.0, 1.0], [2.0, jnp.nan], [jnp.inf, 3.0]]), 2)
        log.histogram("all_nan", np.full(4, np.nan), 2)
        log.text("notes", "hello *world*", 0)

    run = read_run(tmp_path)
    tags = run.Tags()
    assert set(tags["scalars"]) == {"train/loss", "val/loss", "val/acc", "lr"}
    train_loss = run.Scalars("train/loss")
    assert [e.step for e in train_loss] == [0, 1, 2]
    np.testing.assert_allclose([e.value for e in train_loss], [1.0, 0.5, 1.0 / 3.0], rtol=1e-6)
    assert [e.value for e in run.Scalars("val/loss")] == [0.0, 2.0, 4.0]

    assert tags["histograms"] == ["w"]  # all-NaN values write nothing
    (histogram,) = run.Histograms("w")
    assert histogram.step == 2
    assert histogram.histogram_value.num == 4  # NaN and inf were dropped
    assert histogram.histogram_value.min == 0.0 and histogram.histogram_value.max == 3.0
    assert histogram.histogram_value.sum == 6.0

    (text,) = run.Tensors("notes/text_summary")
    assert text.tensor_proto.string_val == [b"hello *world*"]
    assert_single_run(tmp_path)


def test_hparams_are_written_into_the_same_run(tmp_path):
    config = {
        "optimizer": {"name": "adam", "learning_rate": np.float64(1e-3), "nesterov": False},
        "model": {"sizes": [784, 128, 10], "dropout": None},
        "batch": np.int64(32),
        "seed": jnp.asarray(0),
    }
    with TensorBoardLogger(tmp_path) as log:
        for step in range(5):
            log.scalar("val/loss", 1.0 / (step + 1), step)
        log.hparams(config, {"val/loss": jnp.asarray(0.2), "hparams/best_acc": np.float32(0.75)})

    assert_single_run(tmp_path)
    run = read_run(tmp_path)
    content = run.PluginTagToContent("hparams")
    # No experiment summary: TensorBoard would take the first it finds for every run.
    assert set(content) == {"_hparams_/session_start_info", "_hparams_/session_end_info"}
    start = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/session_start_info"]
    ).session_start_info
    values = {k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    assert values == {
        "optimizer.name": "adam",
        "optimizer.learning_rate": 1e-3,
        "optimizer.nesterov": False,
        "model.sizes": "[784, 128, 10]",
        "model.dropout": "None",
        "batch": 32.0,
        "seed": 0.0,
    }
    experiment = hparams_experiment(tmp_path)  # as the HParams tab builds it
    assert {h.name for h in experiment.hparam_infos} == set(values)
    assert {"val/loss", "hparams/best_acc"} <= {m.name.tag for m in experiment.metric_infos}
    # Final metrics are scalars of this run, at the last step logged.
    (best_acc,) = run.Scalars("hparams/best_acc")
    assert (best_acc.step, best_acc.value) == (4, 0.75)
    val_loss = run.Scalars("val/loss")
    assert val_loss[-1].step == 4
    assert val_loss[-1].value == pytest.approx(0.2)


def hparams_experiment(logdir: pathlib.Path):
    """The experiment (the HParams tab's columns) that TensorBoard's hparams plugin builds for
    every run under ``logdir``, through the plugin's own backend."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import backend_context

    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, str(logdir))
    hparams = backend_context.Context(
        base_plugin.TBContext(data_provider=provider, multiplexer=multiplexer, logdir=str(logdir))
    )
    request = context.RequestContext()
    return hparams.experiment_from_metadata(
        request,
        "",
        True,
        hparams.hparams_metadata(request, ""),
        hparams.hparams_from_data_provider(request, "", limit=None),
    )


def test_hparams_tab_shows_the_union_of_all_runs(tmp_path):
    # Runs that each declared their own experiment showed only the first run's columns
    # (a sweep over sgd and adam lost adam's b1, b2, eps).
    for name, optimizer in (("sgd", {"lr": 0.1}), ("adam", {"lr": 1e-3, "b1": 0.9, "eps": 1e-8})):
        with TensorBoardLogger(tmp_path / name) as log:
            log.scalar("val/loss", 1.0, 3)
            log.hparams({"optimizer": {"name": name, **optimizer}}, {"hparam/acc": 0.5})
    experiment = hparams_experiment(tmp_path)
    columns = {h.name: h for h in experiment.hparam_infos}
    assert set(columns) == {"optimizer.name", "optimizer.lr", "optimizer.b1", "optimizer.eps"}
    assert sorted(columns["optimizer.name"].domain_discrete) == ["adam", "sgd"]
    assert columns["optimizer.lr"].domain_interval.min_value == pytest.approx(1e-3)
    assert {"hparam/acc", "val/loss"} <= {m.name.tag for m in experiment.metric_infos}


def test_hparams_metric_step_may_be_given(tmp_path):
    with TensorBoardLogger(tmp_path) as log:
        log.scalar("loss", 1.0, 3)
        log.hparams({"lr": 0.1}, {"hparams/final": 0.5}, step=9)
        log.scalar("later", 2.0, 4)
    run = read_run(tmp_path)
    assert [(e.step, e.value) for e in run.Scalars("hparams/final")] == [(9, 0.5)]
    assert_single_run(tmp_path)


def test_flatten_hparams():
    nested = {"a": {"b": {"c": 1}, "d": (1, 2)}, "e": np.bool_(True), "f": 2.5, "g": None}
    assert flatten_hparams(nested) == {
        "a.b.c": 1,
        "a.d": "(1, 2)",
        "e": True,
        "f": 2.5,
        "g": "None",
    }
    assert flatten_hparams({"a": {"b": "x"}}, sep="/") == {"a/b": "x"}


def test_flush_makes_events_visible_before_close(tmp_path):
    log = TensorBoardLogger(tmp_path, flush_secs=3600)
    log.scalar("x", 1.5, 7)
    log.flush()
    assert [(e.step, e.value) for e in read_run(tmp_path).Scalars("x")] == [(7, 1.5)]
    log.scalar("x", 2.5, 8)  # still usable after a flush
    log.flush()
    assert [(e.step, e.value) for e in read_run(tmp_path).Scalars("x")] == [(7, 1.5), (8, 2.5)]
    log.close()
    log.close()  # closing twice is fine
    with pytest.raises(ValueError, match="closed"):
        log.scalar("x", 3.5, 9)
    assert len(list(tmp_path.iterdir())) == 1  # a closed logger opens no new event file


def test_a_logger_that_logged_nothing_leaves_no_file(tmp_path):
    # A run refused before its first epoch (another run's directory, say) wrote an empty
    # event file into that directory, and kept a writer thread alive until exit.
    logdir = tmp_path / "tb"
    logger = TensorBoardLogger(logdir)
    logger.flush()
    logger.close()
    assert not logdir.exists()
    with TensorBoardLogger(logdir) as used:
        used.scalar("a", 1.0, 0)
    assert len(list(logdir.glob("events.out.tfevents.*"))) == 1


def test_null_logger_does_nothing(tmp_path):
    with NullLogger() as log:
        log.scalar("x", 1.0, 0)
        log.scalars({"x": jnp.asarray(1.0)}, 0)
        log.histogram("h", np.ones(3), 0)
        log.text("t", "s", 0)
        log.hparams({"a": {"b": 1}}, {"m": 0.0})
        log.flush()
    log.close()
    assert list(tmp_path.iterdir()) == []
