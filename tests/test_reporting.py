"""Tests of `bpjax.reporting`: console lines and the progress bar, TensorBoard events on disk at
every epoch end (read back by TensorBoard's own reader), the exploding-loss watch, run names.

Epoch records are built by hand, with the keys ``bpjax.fit`` gives its callbacks; the real
script is tested in ``test_experiments.py``.
"""

import io
import math
import pathlib

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from bpjax import reporting
from bpjax.logging import NullLogger, TensorBoardLogger
from bpjax.reporting import EXPLODED, Console, EpochReporter, run_name, tensorboard_dir

# What each public name of `bpjax.reporting` is tested by (a new name must be added here).
TESTED = {
    "EXPLODED": "test_exploding_loss_*",
    "Console": "test_console_*",
    "EpochReporter": "test_events_are_on_disk_after_each_epoch",
    "count": "test_count_is_plural_unless_one",
    "format_number": "test_format_number",
    "run_name": "test_run_name",
    "tensorboard_dir": "test_tensorboard_dir",
}


def test_public_names_are_tested():
    assert set(TESTED) == set(reporting.__all__)


def record(epoch: int, losses, *, steps_per_epoch: int = 4, **extra) -> dict:
    """An epoch record as ``bpjax.fit`` passes it to callbacks."""
    losses = np.asarray(losses, np.float32)
    return {
        "epoch": epoch,
        "step": epoch * steps_per_epoch,
        "train_loss": float(losses.mean()),
        "epoch_seconds": 0.5,
        "examples_per_second": 1000.0,
        "step_metrics": {"loss": losses},
        "params": (),
        "evaluated": True,
        **extra,
    }


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_console_plain_lines_off_a_terminal(capsys):
    console = Console("[job 1] ")
    console.start(3)
    assert console.bar is None  # pytest's stdout is no terminal
    console.say("first\nsecond")
    console.say("oops", err=True)
    console.advance(1, "x")
    console.close()
    out, err = capsys.readouterr()
    assert out == "[job 1] first\n[job 1] second\n"
    assert err == "[job 1] oops\n"


def test_console_keeps_each_line_above_the_bar(monkeypatch):
    terminal = FakeTerminal()
    monkeypatch.setattr("sys.stdout", terminal)
    reporter = EpochReporter(
        NullLogger(), epochs=3, steps_per_epoch=4, schedule=lambda step: 0.1, console=Console()
    )
    reporter.console.start(3 * 4)  # the bar counts steps
    assert reporter.console.bar is not None
    for epoch in (1, 2, 3):
        reporter(record(epoch, [1.0 / epoch] * 4, val_accuracy=0.5 + epoch / 10))
    reporter.close()
    lines = [line.rsplit("\r", 1)[-1] for line in terminal.getvalue().splitlines()]
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert [line.split()[1] for line in epochs] == ["1/3", "2/3", "3/3"]
    assert "val_accuracy 0.8000" in epochs[-1]
    assert "12/12" in terminal.getvalue().rsplit("epoch 3/3", 1)[-1]  # the bar, drawn after it


class RecordingLogger(NullLogger):
    def __init__(self):
        self.scalars_logged = []

    def scalar(self, tag, value, step):
        self.scalars_logged.append((tag, step, value))


def test_chunk_logs_each_step_signal_at_its_step_and_moves_the_bar(monkeypatch):
    terminal = FakeTerminal()
    monkeypatch.setattr("sys.stdout", terminal)
    logger = RecordingLogger()
    reporter = EpochReporter(
        logger, epochs=2, steps_per_epoch=8, schedule=lambda step: 0.1, console=Console()
    )
    reporter.console.start(16)
    rel_err = np.array([np.nan, 1e-7, np.nan, np.nan], np.float32)  # measured at step 9 only
    reporter.chunk(
        {
            "epoch": 2,
            "step": 12,  # after steps 8..11, the first half of epoch 2
            "epoch_step": 4,
            "steps_per_epoch": 8,
            "train_loss": 0.25,
            "step_metrics": {"loss": np.ones(4), "grad_check/layer0/rel_err": rel_err},
        }
    )
    assert logger.scalars_logged == [("gradcheck/layer0/rel_err", 9, pytest.approx(1e-7))]
    assert reporter.console.bar.n == 12
    assert "epoch 2/2  loss 0.2500" in terminal.getvalue()
    reporter.close()


def test_an_epoch_without_a_timed_chunk_shows_no_speed(capsys):
    # examples_per_second is None for an epoch whose every chunk compiled its program: no
    # "ex/s" on its line and no perf/examples_per_second point (a later epoch has both).
    logger = RecordingLogger()
    logger.scalars = lambda mapping, step: logger.scalars_logged.extend(
        (tag, step, value) for tag, value in mapping.items()
    )
    reporter = EpochReporter(logger, epochs=2, steps_per_epoch=4, schedule=lambda step: 0.1)
    reporter(record(1, [1.0] * 4, examples_per_second=None))
    reporter(record(2, [0.5] * 4, examples_per_second=2500.0))
    lines = capsys.readouterr().out.splitlines()
    assert "ex/s" not in lines[0] and lines[1].endswith("2,500 ex/s"), lines
    speeds = [(step, value) for tag, step, value in logger.scalars_logged if "examples" in tag]
    assert speeds == [(8, 2500.0)]


def test_console_bar_starts_where_a_resumed_run_left_off(monkeypatch):
    monkeypatch.setattr("sys.stdout", FakeTerminal())
    console = Console(progress=True)
    console.start(10)
    console.advance(7, "resumed")
    assert console.bar.n == 7
    console.close()
    assert console.bar is None


def test_events_are_on_disk_after_each_epoch(tmp_path):
    # A kill -9 used to lose the last ~10 s of curves (an empty event file after two epochs).
    logger = TensorBoardLogger(tmp_path, flush_secs=3600)  # never by the clock
    reporter = EpochReporter(logger, epochs=2, steps_per_epoch=4, schedule=lambda step: 0.1)
    for epoch in (1, 2):
        reporter(record(epoch, [2.0, 1.0, 1.0, 0.0], val_loss=0.5 * epoch))
        run = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
        run.Reload()  # before close: what a kill -9 now would leave on disk
        assert [(e.step, e.value) for e in run.Scalars("train/loss")][-1] == (4 * epoch, 1.0)
        assert len(run.Scalars("val/loss")) == epoch
        assert {"opt/learning_rate", "perf/examples_per_second"} <= set(run.Tags()["scalars"])
    logger.close()


def _watch(epoch_losses, **kwargs):
    reporter = EpochReporter(
        NullLogger(), epochs=len(epoch_losses), steps_per_epoch=2, schedule=lambda s: 0.1, **kwargs
    )
    for epoch, losses in enumerate(epoch_losses, 1):
        reporter(record(epoch, losses, steps_per_epoch=2))
    return reporter


def test_exploding_loss_is_flagged_once(capsys):
    # the first step's loss is 2.3: 1000x that is 2300
    reporter = _watch([[2.3, 1.0], [2.0, 5000.0], [8e29, 8e29]], explosion_hint="lr 1e6")
    assert reporter.exploded == {
        "epoch": 2,
        "train_loss": 2501.0,
        "first_step_loss": 2.299999952316284,
    }
    err = capsys.readouterr().err
    assert err.count("warning") == 1
    assert (
        "the training loss exploded at epoch 2: 2501, over 1000 times the first step's 2.3" in err
    )
    assert err.rstrip().endswith("; lr 1e6")
    assert reporter.explosion().startswith("the training loss exploded at epoch 2")


@pytest.mark.parametrize(
    "epoch_losses",
    [
        [[2.3, 0.5], [0.001, 0.002], [1e-6, 1e-6], [1e-3, 1e-3]],  # wobbles near zero
        [[1.0, 1.0], [999.0, 999.0]],  # below EXPLODED times the first step
        [[0.0, 0.0], [5.0, 5.0]],  # no scale to compare with
    ],
)
def test_exploding_loss_not_flagged(epoch_losses, capsys):
    reporter = _watch(epoch_losses)
    assert reporter.exploded is None and reporter.explosion() == ""
    assert "warning" not in capsys.readouterr().err
    assert EXPLODED == 1e3 and math.isfinite(EXPLODED)


def test_format_number():
    assert reporting.format_number(0.12345) == "0.1235"
    assert reporting.format_number(825314960644383965184.0) == "8.253e+20"


@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        ([], "defaults"),
        (
            ["optimizer=adam", "optimizer.learning_rate=0.1"],
            "optimizer=adam,optimizer.learning_rate=0.1",
        ),
        (
            [
                "dataset=npz",
                "dataset.path=/data/x.npz",
                "trainer.run_dir=/r",
                "trainer.resume=true",
            ],
            "dataset=npz,dataset.path=_data_x.npz",
        ),
        (["logger=tensorboard", "logger.flush_secs=3", "trainer.progress=false"], "defaults"),
        (["+trainer.resume=true", "~model.w_init", "seed=3"], "~model.w_init,seed=3"),
    ],
)
def test_run_name(overrides, name):
    assert run_name(overrides) == name


def test_run_name_is_a_file_name():
    name = run_name([f"model.features=[{','.join(['100'] * 100)}]"])
    assert len(name.encode()) <= 200 and "/" not in name
    assert name != run_name([f"model.features=[{','.join(['100'] * 101)}]"])  # the hash differs


def test_tensorboard_dir(tmp_path):
    assert tensorboard_dir(tmp_path, "seed=1") == tmp_path / "tb" / "seed=1"
    (tmp_path / "tb" / "seed=1").mkdir(parents=True)
    # a resume (other overrides, e.g. trainer.epochs) continues the run's own curves
    assert tensorboard_dir(tmp_path, "seed=1,trainer.epochs=9") == tmp_path / "tb" / "seed=1"
    old = pathlib.Path(tmp_path / "old")
    (old / "tb").mkdir(parents=True)
    (old / "tb" / "events.out.tfevents.1.host").write_bytes(b"")
    assert tensorboard_dir(old, "seed=1") == old / "tb"  # a run from before run names


def test_network_table_names_each_layer_tag():
    import bpjax

    table = reporting.network_table(bpjax.lenet5(), (2, 28, 28, 1)).splitlines()
    assert table[0] == "| tag | layer | params | output |"
    assert table[2].startswith("| layer0 | `conv2d(6, 5x5") and table[2].endswith(
        "| 156 | (2, 28, 28, 6) |"
    )
    assert table[4] == "| layer2 | `max_pool(2x2)` | 0 | (2, 14, 14, 6) |"
    assert table[-1] == "| | total | 61,706 | |"


def test_histograms_of_a_diverged_network_do_not_end_the_run(tmp_path):
    # digits, sgd, a learning rate growing 1e4-fold an epoch: the weights reached ~1e25 and the
    # epoch's histograms raised tensorboardX's "The histogram is empty" (exit 1, no record).
    params = ({"w": np.full((3, 2), 1e25, np.float32), "b": np.array([np.nan, 1.0])},)
    grads = ({"w": np.full((3, 2), -np.inf), "b": np.full(2, 3e38, np.float32)},)
    logger = TensorBoardLogger(tmp_path)
    reporter = EpochReporter(
        logger,
        epochs=1,
        steps_per_epoch=4,
        schedule=lambda step: 1e4,
        histogram_every=1,
        grad_fn=lambda params, x, y, state, feedback: (np.float32(1e30), grads),
        batch=(np.zeros((1, 3)), np.zeros(1)),
    )
    reporter(record(1, [1e25] * 4, params=params))
    logger.close()
    run = event_accumulator.EventAccumulator(
        str(tmp_path), size_guidance={"scalars": 0, "histograms": 0}
    )
    run.Reload()
    assert set(run.Tags()["histograms"]) == {
        "weights/layer0/w",
        "weights/layer0/b",
        "grads/layer0/b",
    }  # grads/layer0/w: no finite value
    assert run.Histograms("weights/layer0/w")[0].histogram_value.max == np.float32(1e25)
    nonfinite = {
        tag: [e.value for e in run.Scalars(tag)]
        for tag in run.Tags()["scalars"]
        if tag.endswith("/nonfinite")
    }
    assert nonfinite == {"weights/layer0/b/nonfinite": [1.0], "grads/layer0/w/nonfinite": [6.0]}


def test_count_is_plural_unless_one():
    assert [reporting.count(n, "step") for n in (0, 1, 2)] == ["0 steps", "1 step", "2 steps"]
