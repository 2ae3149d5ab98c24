"""Train a network by hand-written backpropagation, configured by Hydra.

    python experiments/train.py                                   # MLP on real MNIST
    python experiments/train.py experiment=nielsen_ch1            # a preset
    python experiments/train.py dataset=digits model.features=[64,10] optimizer=adam seed=3
    python experiments/train.py -m optimizer.learning_rate=0.3,0.1,0.03   # a sweep

The run directory gets ``metrics.json`` (strict JSON: a value that is not a finite number is
``null``), TensorBoard event files (``tb/<run name>/``) and checkpoints (``checkpoints/``).
``train(cfg)`` does the work and is what tests call; ``main`` is the thin Hydra wrapper that
turns bad configs into one clear line and a non-zero exit, and returns the objective for
sweepers. This script owns printing, the progress bar and wall-clock time; the math lives in
``bpjax``.

What a run says and records:

- Every config key must be read by something (``bpjax.cli.check_keys``): a key its
  ``_target_`` doesn't take, or that no code reads (``+logger.flush_sec=3``), is one ``error:``
  line naming the nearest valid key, exit 2, before any data are loaded. So is a damaged or
  missing data file. In a ``-m`` sweep such a job is recorded as ``"status": "invalid"`` and
  the sweep goes on.
- TensorBoard names each run after its command-line overrides: the events of
  ``train.py -m optimizer=sgd,adam`` go to ``multirun/DATE/TIME/0/tb/optimizer=sgd/`` and
  ``.../1/tb/optimizer=adam/`` (``defaults`` without overrides; bookkeeping overrides such as
  ``trainer.run_dir``, ``trainer.resume``, ``trainer.progress``, ``logger.*`` and ``hydra.*``
  are left out; ``/`` becomes ``_``). A resumed run writes into its run's existing directory,
  so its curves continue. Every run records its hyperparameters for the HParams tab without
  an experiment summary, so TensorBoard lists the union of every run's hyperparameters.
  Events are flushed at the end of every epoch.
- On a terminal, one line per epoch is kept above the progress bar; elsewhere (a log file, a
  pipe) the same lines are printed plainly. In a sweep every line is labelled ``[job N]``.
- A loss that explodes (an epoch's mean training loss above ``bpjax.reporting.EXPLODED``,
  1000, times the loss of the first step trained, i.e. of the untrained network) is warned
  about when it happens, recorded (``loss_exploded`` in ``metrics.json``) and repeated in the
  final line.
- An interrupt (Ctrl-C, SIGTERM) prints the command that resumes the run, with the running
  interpreter, and exits 128 + the signal's number (Ctrl-C 130, SIGTERM 143). In a ``-m``
  sweep it first writes the sweep's summary: the jobs that ended, and this one, interrupted.
  A resume says which checkpoint and epoch it continues from (after the first
  resumed epoch: only then has ``fit`` accepted the checkpoint) and which settings changed; a
  run that already reached ``trainer.epochs`` (or stopped early) has nothing to do and leaves
  ``metrics.json`` as it was. A resume stays in its run directory (``hydra.run.dir`` follows
  ``trainer.run_dir``, see ``conf/config.yaml``).
- Several processes (``trainer.distributed=true``, one per host or per accelerator, each started
  with the same command but for its ``trainer.process_id`` where the cluster doesn't supply
  it): they join before anything else (``bpjax.distributed.initialize``), work in process 0's
  run directory, which all of them must see, and start together or not at all: an error in one
  (a data file missing on its host, say) is every process's ``error:`` line, exit 2. Process 0
  alone writes ``metrics.json`` and TensorBoard events and prints the run's lines; the others
  print only their errors, labelled ``[process N]``. A lost process stops the others within
  seconds (exit 75, ``bpjax.distributed.EXIT_LOST``), with a line naming it; restarting every
  process with ``trainer.resume=true`` continues from the last checkpoint.
"""

import json
import math
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import hydra
import jax
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf

from bpjax import cli, distributed, sweep
from bpjax.reporting import Console, count
from bpjax.trainer import ResumeError

if str(pathlib.Path(__file__).resolve().parent) not in sys.path:  # as a script, it is there
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from training.build import _build, build_schedule, build_spec
from training.compilations import _COMPILATIONS, _listen_for_compilations, compilations_so_far
from training.config import CONF_DIR, ROOT, SCRIPT, ConfigError, _container
from training.fitting import fit_run, histogram_inputs, make_logger, make_reporter
from training.interrupts import (
    _handle_interrupts,
    _raise_interrupt,
    _resume_every_process,
    _stop_if_interrupted,
    interrupt_status,
    interrupted_message,
    resume_command,
)
from training.preflight import (
    _load_data,
    check_data,
    check_outputs,
    check_rules,
    warn_squashed_twice,
)
from training.processes import (
    _check_devices,
    _join,
    _joined_several,
    _process_label,
    check_same_config,
)
from training.resuming import already_ended, announce_resume, changed_settings
from training.run_dir import (
    _has_checkpoints,
    _job_label,
    _run_dir,
    _task_overrides,
    _write_json_atomic,
    prepare_run_dir,
)
from training.summary import (
    add_outcome,
    epochs_this_call,
    log_hparams,
    say_outcome,
    summarize_interrupted_sweep,
)
from training.validation import check_config_keys, resolve_monitor_and_objective, validate

# What other code reaches through this script (tests, experiments/compare_rules.py); the
# parts live in experiments/training/.
__all__ = [
    "CONF_DIR",
    "ROOT",
    "SCRIPT",
    "_COMPILATIONS",
    "ConfigError",
    "ResumeError",
    "_check_devices",
    "_container",
    "_raise_interrupt",
    "_stop_if_interrupted",
    "build_schedule",
    "changed_settings",
    "check_config_keys",
    "interrupt_status",
    "interrupted_message",
    "main",
    "resolve_monitor_and_objective",
    "resume_command",
    "run",
    "train",
    "validate",
    "worst_objective",
]


def train(
    cfg: DictConfig, *, callbacks: Sequence[Callable[[dict[str, Any]], None]] = ()
) -> dict[str, Any]:
    """Runs one configured experiment; returns its metrics (also written to metrics.json,
    where a non-finite number is ``null``).

    ``callbacks`` are called with each epoch's record after the reporter (``fit``'s
    ``callbacks``): how ``experiments/compare_rules.py`` gets the curves it plots.
    """
    validate(cfg)
    _listen_for_compilations()
    t_start = time.perf_counter()
    compilations_before = compilations_so_far()
    trainer = cfg.trainer
    if trainer.distributed:
        _join(trainer)
    if not _joined_several():
        return _train_joined(cfg, callbacks, t_start, compilations_before)
    # A signal to a process of the job before training starts is held, and stops every process
    # at fit's first chunk, as one during training does (a SIGTERM while the job started up
    # was lost to jax's preemption notifier, or stopped one process and left the others
    # waiting). One after training ended is raised when the job's record is written.
    with distributed.deferred_interrupts() as held:
        metrics = _train_joined(cfg, callbacks, t_start, compilations_before)
    if held.requested:
        raise distributed.Interrupted(held.requested)
    return metrics


def _train_joined(
    cfg: DictConfig,
    callbacks: Sequence[Callable[[dict[str, Any]], None]],
    t_start: float,
    compilations_before: int,
) -> dict[str, Any]:
    """``train`` once this process is in its job (of one process, or several)."""
    trainer = cfg.trainer
    primary = distributed.is_primary()
    _check_devices(trainer)
    run_dir = prepare_run_dir(cfg)
    checkpoint_dir = run_dir / "checkpoints"
    # Data first: a missing or damaged file is reported before anything is compiled.
    data = _load_data(cfg)
    monitor, objective_name = check_data(cfg, data)
    console = Console(_job_label(), progress=trainer.progress, quiet=not primary)
    warn_squashed_twice(cfg, console)
    steps_per_epoch = data.n_train // trainer.batch_size
    total_steps = steps_per_epoch * trainer.epochs
    net, loss, optimizer, schedule = _build(
        json.dumps(build_spec(cfg, total_steps), sort_keys=True)
    )
    loss_name = loss.name
    n_out = check_outputs(cfg, net, data, loss_name)
    in_shape = (trainer.batch_size, *data.input_shape)
    rule_options = check_rules(trainer, net, in_shape)
    config = _container(cfg)
    logger = make_logger(cfg, run_dir, primary)
    histograms = histogram_inputs(net, loss, data, loss_name, n_out, trainer.grad_mode)
    console.start(total_steps)
    console.say(f"bpjax: {data.summary()}")
    console.say(
        f"bpjax: {net.name}, loss {loss_name}, grad_mode {trainer.grad_mode}, "
        f"{count(trainer.epochs, 'epoch')} of {count(steps_per_epoch, 'step')}; "
        f"run dir {run_dir}"
    )
    resumed: dict[str, Any] = {}  # where fit resumed, once it has accepted a checkpoint
    on_resume = announce_resume(cfg, console, checkpoint_dir, config, total_steps, resumed)
    reporter = make_reporter(
        cfg,
        logger,
        console,
        schedule=schedule,
        steps_per_epoch=steps_per_epoch,
        histograms=histograms,
        network=(net, in_shape),
        primary=primary,
    )
    check_same_config(config)  # every process got this far, with the same settings, or none
    status, message, metrics, trained_here = fit_run(
        cfg,
        (net, loss, optimizer),
        data,
        monitor=monitor,
        checkpoint_dir=checkpoint_dir,
        config=config,
        reporter=reporter,
        logger=logger,
        callbacks=callbacks,
        rule_options=rule_options,
        on_resume=on_resume,
    )
    # Only a resume of a run that had already ended trains no epoch.
    if status == "completed" and not trained_here:
        record = already_ended(trainer, run_dir, metrics, logger, console)
        if record is not None:
            return record
    metrics.setdefault("epochs_this_call", epochs_this_call(metrics, resumed))
    add_outcome(
        metrics,
        status=status,
        message=message,
        objective_name=objective_name,
        exploded=reporter.exploded,
        compilations=compilations_so_far() - compilations_before,
        t_start=t_start,
    )
    log_hparams(logger, cfg, config, loss_name, data.name, metrics)
    if primary:  # the run's one record, however many processes
        _write_json_atomic(run_dir / "metrics.json", metrics)
    say_outcome(
        console,
        cfg,
        metrics,
        monitor=monitor,
        reporter=reporter,
        steps_per_epoch=steps_per_epoch,
    )
    return metrics


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    _handle_interrupts()  # again: a sweep's launcher may run the job in a process of its own
    multirun = HydraConfig.get().mode.name == "MULTIRUN"
    label = _job_label()
    try:
        metrics = train(cfg)
    except ResumeError as e:  # about this job's directory, not a swept value: fatal in a sweep
        distributed.announce_failure(str(e))  # to the other processes of a job, if any
        # A refused resume names the settings that changed since the checkpoint, if any.
        changed = (
            changed_settings(_run_dir(cfg) / "checkpoints", _container(cfg))
            if cfg.trainer.resume
            else []
        )
        since = f"; changed since its checkpoint: {'; '.join(changed)}" if changed else ""
        print(
            f"{label}{_process_label()}error: {e}{since}\n(trainer.resume=true continues a run; "
            f"trainer.run_dir=<dir> picks the directory)",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(2)
    except distributed.ProcessLost as e:
        print(f"{label}{_process_label()}error: {e}", file=sys.stderr, flush=True)
        survivors = [i for i in range(e.num_processes) if i not in e.lost]
        if e.process_id == min(survivors) and _has_checkpoints(_run_dir(cfg) / "checkpoints"):
            # the lost process's error names the last checkpoint; this, how to go on from it
            # (said by process 0, or, where it was lost, by the first process left)
            print(f"{label}{_resume_every_process(cfg)}", file=sys.stderr, flush=True)
        distributed.exit_now(distributed.EXIT_LOST)  # a normal exit would wait for the lost one
    except (
        ConfigError,
        FileNotFoundError,
        distributed.ProcessFailed,
        distributed.JobMismatch,
    ) as e:
        distributed.announce_failure(str(e))
        print(f"{label}{_process_label()}error: {e}", file=sys.stderr, flush=True)
        if not multirun:
            sys.exit(2)
        # One invalid job (a sampled learning rate out of range, say) does not end a sweep: it
        # is recorded, like a diverged one, and ranks last in the summary (a sweep of nothing
        # but invalid jobs exits 2: see bpjax.sweep.SweepSummary).
        record = pathlib.Path(HydraConfig.get().runtime.output_dir) / "metrics.json"
        # Never over a finished run's record; in a job of several processes, process 0's.
        if not record.exists() and not (_joined_several() and jax.process_index() > 0):
            invalid = {
                "status": "invalid",
                "message": str(e),
                "objective": None,
                "overrides": _task_overrides(),
            }
            _write_json_atomic(record, invalid)
        return worst_objective()
    except KeyboardInterrupt as e:
        if not _joined_several() or distributed.is_primary():  # one message for the job
            message = interrupted_message(cfg)
            print(f"\n{label}{message}", file=sys.stderr, flush=True)
            try:  # Hydra's summary callback runs only at a multirun's end
                summary = summarize_interrupted_sweep(message) if multirun else None
            except (OSError, ValueError) as error:  # a damaged record: the exit still follows
                print(f"{label}no sweep summary: {error}", file=sys.stderr, flush=True)
                summary = None
            if summary is not None:
                print(f"{label}sweep summary so far: {summary}", file=sys.stderr, flush=True)
        status = interrupt_status(e)  # 128 + the signal: SIGTERM 143, Ctrl-C 130
        if not _joined_several():
            # Out at once: a second Ctrl-C can leave XLA's threads running a computation that
            # the interpreter's teardown then crashes under (a segfault, 1 run in 3 on MNIST).
            # Checkpoints are on disk when saved, and the logger was closed.
            distributed.exit_now(status)
        sys.exit(status)
    if metrics["status"] == "diverged" and not multirun:
        sys.exit(1)
    objective = metrics.get("objective")
    if isinstance(objective, int | float) and math.isfinite(objective):
        return float(objective)
    return worst_objective() if multirun else math.nan


def worst_objective() -> float:
    """What a failed sweep job returns: the worst value for the sweeper's ``direction``
    (Optuna's; it refuses NaN, and a crash would end the study), or NaN without one."""
    direction = OmegaConf.select(HydraConfig.get(), "sweeper.direction", default=None)
    if isinstance(direction, ListConfig | list | tuple):
        direction = direction[0] if len(direction) == 1 else None
    return {"minimize": math.inf, "maximize": -math.inf}.get(str(direction), math.nan)


def run() -> None:
    """The command line: ``main``, with Hydra's refusals of the command line itself as one
    ``error:`` line naming the nearest valid choice, exit 2 (``bpjax.cli.run_command_line``),
    like every other config error. Any other exception keeps its traceback."""
    _handle_interrupts()
    sweep.pickle_by_value("training")  # for submitit's jobs
    try:
        cli.run_command_line(main, CONF_DIR)
    except KeyboardInterrupt as e:  # before main's own handling: Hydra composing the config
        print("\ninterrupted before training started: nothing to resume", file=sys.stderr)
        sys.exit(interrupt_status(e))


if __name__ == "__main__":
    run()
