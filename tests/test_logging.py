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
    # and the counts of the histograms' non-finite values
    assert set(tags["scalars"]) == {
        *("train/loss", "val/loss", "val/acc", "lr"),
        *("w/nonfinite", "all_nan/nonfinite"),
    }
    train_loss = run.Scalars("train/loss")
    assert [e.step for e in train_loss] == [0, 1, 2]
    np.testing.assert_allclose([e.value for e in train_loss], [1.0, 0.5, 1.0 / 3.0], rtol=1e-6)
    assert [e.value for e in run.Scalars("val/loss")] == [0.0, 2.0, 4.0]

    assert tags["histograms"] == ["w"]  # all-NaN values write no histogram
    assert [(e.step, e.value) for e in run.Scalars("w/nonfinite")] == [(2, 2.0)]
    assert [(e.step, e.value) for e in run.Scalars("all_nan/nonfinite")] == [(2, 4.0)]
    (histogram,) = run.Histograms("w")
    assert histogram.step == 2
    assert histogram.histogram_value.num == 4  # NaN and inf were dropped
    assert histogram.histogram_value.min == 0.0 and histogram.histogram_value.max == 3.0
    assert histogram.histogram_value.sum == 6.0

    (text,) = run.Tensors("notes/text_summary")
    assert text.tensor_proto.string_val == [b"hello *world*"]
    assert_single_run(tmp_path)


def _bucket_total(histogram) -> float:
    return sum(histogram.histogram_value.bucket)


@pytest.mark.parametrize(
    "values",
    [
        pytest.param(np.full((8, 4), 1e25, np.float32), id="all-above-the-default-bins"),
        pytest.param(np.array([-3e38, -1e25, 2.0, 1e21]), id="some-above-the-default-bins"),
        pytest.param(np.array([1e-5, 1e25]), id="one-above-the-default-bins"),
        pytest.param(np.array([-1e200, 1e200, 0.5]), id="sum-of-squares-overflows"),
        pytest.param(np.array([0.0, 1e-13, -1e-14]), id="below-the-smallest-bin"),
        pytest.param(np.array([7.0]), id="one-value"),
    ],
)
def test_histogram_bins_every_finite_value_whatever_its_size(tmp_path, values):
    """A diverging run's weights (1e25: beyond TensorBoard's default bins, which end near 1e20)
    used to raise tensorboardX's "The histogram is empty" and end the run, or be left out of
    the bins while counted in ``num``. Every finite value now lies in a bin."""
    with TensorBoardLogger(tmp_path) as log:
        log.histogram("w", values, 3)
    run = read_run(tmp_path)
    (histogram,) = run.Histograms("w")
    assert histogram.step == 3
    assert histogram.histogram_value.num == values.size == _bucket_total(histogram)
    assert histogram.histogram_value.min == values.min()
    assert histogram.histogram_value.max == values.max()
    assert "w/nonfinite" not in run.Tags()["scalars"]  # only finite values: no count


def test_histogram_counts_nonfinite_values_from_the_first_on(tmp_path):
    """NaN and inf are left out of the histogram and counted in ``<tag>/nonfinite``, written
    from the first histogram of the tag that had one on (0 once all are finite again); a tag
    whose values stay finite has no count; empty values write nothing."""
    steps = {
        1: np.array([1.0, 2.0]),
        2: np.array([np.nan, 1e30, np.inf, -np.inf]),
        3: np.full(3, np.nan),  # nothing to bin: the count alone
        4: np.array([3.0, 4.0, 5.0]),
        5: np.zeros((0, 2)),  # empty: nothing at all
    }
    with TensorBoardLogger(tmp_path) as log:
        for step, values in steps.items():
            log.histogram("weights/layer0/w", values, step)
            log.histogram("finite", np.arange(3.0), step)
            log.histogram("empty", np.array([]), step)
    run = read_run(tmp_path)
    assert set(run.Tags()["histograms"]) == {"weights/layer0/w", "finite"}
    assert run.Tags()["scalars"] == ["weights/layer0/w/nonfinite"]
    counts = [(e.step, e.value) for e in run.Scalars("weights/layer0/w/nonfinite")]
    assert counts == [(2, 3.0), (3, 3.0), (4, 0.0)]
    histograms = {e.step: e.histogram_value for e in run.Histograms("weights/layer0/w")}
    assert sorted(histograms) == [1, 2, 4]
    assert histograms[2].num == 1 and histograms[2].min == histograms[2].max == 1e30


def test_nonfinite_scalars_are_written_silently(tmp_path, capfd, caplog):
    """NaN and inf scalars (a diverged run's losses, its final metrics) are written as they are,
    without tensorboardX's "NaN or Inf found in input tensor." warning for each."""
    with TensorBoardLogger(tmp_path) as log:
        log.scalar("train/loss", np.float32(np.nan), 0)
        log.scalars({"train/loss": np.inf, "val/loss": -np.inf}, 1)
        log.hparams({"lr": 1e6}, {"val/loss": np.nan, "hparams/best": np.float64(np.inf)})
    run = read_run(tmp_path)
    train = [e.value for e in run.Scalars("train/loss")]
    assert np.isnan(train[0]) and train[1] == np.inf
    assert [e.value for e in run.Scalars("hparams/best")] == [np.inf]
    assert [e.step for e in run.Scalars("val/loss")] == [1, 1]
    assert np.isnan(run.Scalars("val/loss")[-1].value)
    out, err = capfd.readouterr()
    assert "NaN or Inf" not in out + err + caplog.text


def test_tags_are_cleaned_as_tensorboardx_does(tmp_path):
    # the summaries are built here, not by tensorboardX: same tags as its add_scalar would write
    with TensorBoardLogger(tmp_path) as log:
        log.scalar("/a b/c:d", 1.0, 0)
        log.histogram("/h (x)", np.ones(2), 0)
    tags = read_run(tmp_path).Tags()
    assert tags["scalars"] == ["a_b/c_d"] and tags["histograms"] == ["h__x_"]


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
