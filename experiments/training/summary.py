"""What a run records and says at its end: its outcome added to the metrics (status,
objective, compilations, time, device), its hyperparameters and final metrics for
TensorBoard's HParams tab, and the final line (with the seconds, examples/s and compilations
of this call); and an interrupted sweep's summary."""

import math
import os
import pathlib
import time
from typing import Any

import jax
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from bpjax import sweep
from bpjax.reporting import Console, EpochReporter, count, format_number
from training.config import _target_name
from training.run_dir import _original_cwd, _task_overrides


def epochs_this_call(metrics: dict[str, Any], resumed: dict[str, Any]) -> float:
    """How many epochs of the run this call trained: all of them, or, after a resume (``fit``'s
    ``on_resume`` account in ``resumed``), those after the checkpoint's step."""
    if not resumed:
        return float(metrics["epochs"])
    done = resumed["epoch"] + resumed["epoch_step"] / resumed["steps_per_epoch"]
    return max(0.0, metrics["epochs"] - done)


def _share(epochs: float, steps_per_epoch: int) -> str:
    """``epochs_this_call`` in words: ``2 epochs``, ``39 steps``, ``10 epochs and 2850 steps``."""
    steps = round(epochs * steps_per_epoch)
    whole, rest = divmod(steps, steps_per_epoch)
    parts = [count(whole, "epoch")] * bool(whole) + [count(rest, "step")] * bool(rest)
    return " and ".join(parts) or "no training"


def _timing(metrics: dict[str, Any]) -> list[str]:
    """The final line's timing: wall seconds and training examples/s (none for a run whose
    every chunk compiled its program: its time is mostly compilation); nothing for the record
    of a run that ended before this call started."""
    if metrics["wall_seconds"] is None:
        return []
    speed = metrics["examples_per_second"]
    rate = (
        "examples/s not timed: every chunk compiled"
        if speed is None
        else f"{speed:,.0f} examples/s"
    )
    return [f"{metrics['wall_seconds']:.1f} s", rate]


def add_outcome(
    metrics: dict[str, Any],
    *,
    status: str,
    message: str,
    objective_name: str,
    exploded: bool,
    compilations: int,
    t_start: float,
) -> None:
    """The run's outcome, added to its ``metrics``: what ``metrics.json`` records beside
    ``fit``'s metrics."""
    objective = metrics.get(objective_name, math.nan)
    metrics.update(
        {
            "status": status,
            "message": message,
            "objective_name": objective_name,
            "objective": objective,
            "loss_exploded": exploded,
            "compilations": compilations,
            "total_seconds": time.perf_counter() - t_start,
            "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
            "processes": jax.process_count(),
            "overrides": _task_overrides(),
        }
    )


def log_hparams(
    logger: Any,
    cfg: DictConfig,
    config: dict[str, Any],
    loss_name: str,
    dataset: str,
    metrics: dict[str, Any],
) -> None:
    """The run's hyperparameters and finite final metrics (TensorBoard's HParams tab), and its
    compilations; then the logger is closed."""
    trainer = cfg.trainer
    hparams = {
        "model": config["model"],
        "loss": loss_name,
        "optimizer": config["optimizer"],
        "schedule": _target_name(cfg.schedule),
        "batch_size": trainer.batch_size,
        "grad_mode": trainer.grad_mode,
        "dataset": dataset,
        "seed": cfg.seed,
    }
    final = {
        f"hparam/{k}": v for k, v in metrics.items() if isinstance(v, float) and math.isfinite(v)
    }
    logger.hparams(hparams, final)
    last_step = metrics.get("steps", metrics.get("diverged_step", 0))
    logger.scalar("perf/compilations", metrics["compilations"], last_step)
    logger.close()


def say_outcome(
    console: Console,
    cfg: DictConfig,
    metrics: dict[str, Any],
    *,
    monitor: str,
    reporter: EpochReporter,
    steps_per_epoch: int,
) -> None:
    """The run's last lines: why it diverged; or that it stopped early, and the final line
    (test metrics, epochs, this call's time and compilations, a loss that exploded). After a
    resume the final line says how much of the run this call trained: the seconds, examples/s
    and compilations are this call's."""
    trainer = cfg.trainer
    if metrics["status"] == "diverged":
        console.say(f"bpjax: {metrics['message']}", err=True)
        return
    if metrics.get("stopped_early"):
        console.say(
            f"bpjax: stopped early after epoch {metrics['epochs']}: no better {monitor} "
            f"in {trainer.patience} evaluations; the best epoch, {metrics['best_epoch']}, "
            f"gives the test metrics"
        )
    summary = "  ".join(
        f"{k} {format_number(metrics[k])}"
        for k in ("test_accuracy", "test_loss", "test_rmse", "test_r2")
        if k in metrics
    )
    this_call = ", ".join([*_timing(metrics), count(metrics["compilations"], "compilation")])
    epochs = count(metrics["epochs"], "epoch")
    if metrics["epochs_this_call"] != metrics["epochs"]:  # resumed: the seconds are this call's
        share = _share(metrics["epochs_this_call"], steps_per_epoch)
        this_call = f"; this call: {share}, {this_call}"
    else:
        this_call = f", {this_call}"
    warning = f"; WARNING: {reporter.explosion()}" if reporter.exploded else ""
    console.say(f"bpjax: {summary}  ({epochs}{this_call}){warning}")


def summarize_interrupted_sweep(message: str) -> pathlib.Path | None:
    """An interrupted multirun's summary (``bpjax.sweep.write_summary``, atomic): the jobs that
    ended, and this one, ``interrupted`` (``message``, why and how to resume, as its reason).
    Hydra's ``SweepSummary`` callback runs only at a multirun's end, which the interrupt (this
    process exits at once) never reaches. Where the summary goes, or None where the sweep has
    none (its ``sweep_summary`` callback removed)."""
    hydra_config = HydraConfig.get()
    targets = [
        OmegaConf.select(callback, "_target_", default=None)
        for callback in (hydra_config.callbacks or {}).values()
    ]
    if "bpjax.sweep.SweepSummary" not in targets:
        return None
    sweep_dir = pathlib.Path(_original_cwd(), hydra_config.sweep.dir)  # as relative to it
    job_dir = os.path.relpath(hydra_config.runtime.output_dir, sweep_dir)
    interrupted = {
        "job_dir": job_dir,
        "status": "interrupted",
        "message": message,
        "objective": None,
        "overrides": _task_overrides(),
    }
    sweep.write_summary(sweep_dir, unfinished=[interrupted])
    return sweep_dir / "summary.md"
