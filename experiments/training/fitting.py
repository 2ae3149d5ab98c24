"""``fit`` as experiments/train.py calls it: the TensorBoard logger (process 0's), the epoch
reporter with its gradient histograms, and ``fit`` with the config's settings, its outcome
(completed or diverged) returned with the epochs this call trained."""

import pathlib
from collections.abc import Callable, Sequence
from typing import Any

from omegaconf import DictConfig

from bpjax.logging import NullLogger, TensorBoardLogger
from bpjax.reporting import Console, EpochReporter, network_table
from bpjax.train import encode_targets
from bpjax.trainer import TrainingDiverged, fit
from training.build import _jitted_grad
from training.interrupts import _stop_if_interrupted
from training.run_dir import _tensorboard_dir


def make_logger(cfg: DictConfig, run_dir: pathlib.Path, primary: bool) -> Any:
    """TensorBoard's event writer where ``logger.enabled`` and this is process 0, else none."""
    return (
        TensorBoardLogger(_tensorboard_dir(run_dir), flush_secs=cfg.logger.flush_secs)
        if cfg.logger.enabled and primary
        else NullLogger()
    )


def histogram_inputs(
    net: Any, loss: Any, data: Any, loss_name: str, n_out: int, grad_mode: str
) -> tuple[tuple[Any, Any], Callable]:
    """A fixed training batch for gradient histograms, and the jitted gradient they take."""
    hist_n = min(256, data.n_train)
    hist_batch = (
        data.x_train[:hist_n],
        encode_targets(data.y_train[:hist_n], task=data.task, loss_name=loss_name, n_outputs=n_out),
    )
    return hist_batch, _jitted_grad(net, loss, grad_mode)


def make_reporter(
    cfg: DictConfig,
    logger: Any,
    console: Console,
    *,
    schedule: Any,
    steps_per_epoch: int,
    histograms: tuple[tuple[Any, Any], Callable],
    network: tuple[Any, tuple[int, ...]],
    primary: bool,
) -> EpochReporter:
    """The reporter of each epoch's line, TensorBoard scalars and histograms (``network``: the
    net and its input shape, for the per-layer tags' summary)."""
    trainer = cfg.trainer
    hist_batch, grad_fn = histograms
    net, in_shape = network
    return EpochReporter(
        logger,
        epochs=trainer.epochs,
        steps_per_epoch=steps_per_epoch,
        schedule=schedule,
        console=console,
        histogram_every=trainer.histogram_every if primary else 0,
        grad_fn=grad_fn,
        batch=hist_batch,
        explosion_hint=(
            f"the learning rate may be too large "
            f"(optimizer.learning_rate={cfg.optimizer.get('learning_rate')})"
        ),
        # which layer is layer{i} in the per-layer tags: the network, once, as a text summary
        network=network_table(net, in_shape),
    )


def fit_run(
    cfg: DictConfig,
    model: tuple[Any, Any, Any],
    data: Any,
    *,
    monitor: str,
    checkpoint_dir: pathlib.Path,
    config: dict[str, Any],
    reporter: EpochReporter,
    logger: Any,
    callbacks: Sequence[Callable[[dict[str, Any]], None]],
    rule_options: dict[str, Any],
    on_resume: Callable[[dict[str, Any]], None] | None,
) -> tuple[str, str, dict[str, Any], int]:
    """``fit`` of ``model`` (net, loss, optimizer) with the config's settings; returns the
    status (``completed`` or ``diverged``), its message, the metrics and the epochs this call
    trained (fewer than the run's after a resume). The reporter is closed, and the logger too
    where training raised."""
    net, loss, optimizer = model
    trainer = cfg.trainer
    status = "completed"
    message = ""
    trained_here = 0
    try:
        _stop_if_interrupted()  # a signal whose interrupt was swallowed while starting up
        result = fit(
            net,
            loss,
            optimizer,
            data,
            epochs=trainer.epochs,
            batch_size=trainer.batch_size,
            grad_mode=trainer.grad_mode,
            seed=cfg.seed,
            eval_batch_size=trainer.eval_batch_size,
            eval_every=trainer.eval_every,
            monitor=monitor,
            patience=trainer.patience,
            checkpoint_dir=str(checkpoint_dir),
            checkpoint_every=trainer.checkpoint_every,
            keep_checkpoints=trainer.keep_checkpoints,
            resume=trainer.resume,
            config=config,
            grad_check_every=trainer.grad_check_every,
            layer_stats=trainer.layer_stats,
            compute_dtype=trainer.compute_dtype,
            devices=trainer.devices,
            eval_splits=("train", "val", "test"),
            callbacks=[reporter, *callbacks],
            chunk_steps=trainer.chunk_steps,
            on_chunk=[reporter.chunk, _stop_if_interrupted],
            rule_options=rule_options,
            on_resume=on_resume,
        )
        metrics = dict(result.metrics)
        trained_here = len(result.history)
    except TrainingDiverged as e:
        status, message = "diverged", str(e)
        # "epochs" counts completed epochs, as for a completed run; the record says where.
        metrics = {"epochs": e.epoch - 1, "diverged_epoch": e.epoch, "diverged_step": e.step}
    except BaseException:  # a refused resume, an interrupt: flush and release the writer
        logger.close()
        raise
    finally:
        reporter.close()
    return status, message, metrics, trained_here
