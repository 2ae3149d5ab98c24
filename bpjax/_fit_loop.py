"""``bpjax.trainer.fit``'s epochs: each epoch's jitted scan run in chunks (between them: progress,
the divergence guard and interrupts), its evaluation, early stopping on the monitored metric
(keeping the best parameters), its checkpoint, and at the end the result on the test split.

Several processes (``bpjax.distributed``): metrics are read from each process's own copy, made
the same in all of them (``agree``), so every process stops early, or on a diverged loss, at the
same epoch and step; an interrupt stops them all at the same chunk; a lost process stops the
others with ``bpjax.distributed.ProcessLost``.
"""

import contextlib
import math
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bpjax import distributed
from bpjax._fit_parts import _concat, _is_better, _last_measured, _plan_from, _split_evaluator
from bpjax._fit_result import FitResult, TrainingDiverged
from bpjax._fit_resume import LAST, _Start
from bpjax.checkpoint import CheckpointManager
from bpjax.train import updates_applied

# The chunk lengths each compiled chunk function has dispatched (so compiled), in this process
# (fit's throughput leaves out a chunk that compiled a program); weak: an evicted function is
# forgotten.
_RAN_LENGTHS: "weakref.WeakKeyDictionary[Any, set[int]]" = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def _naming_lost_processes(manager: CheckpointManager | None):
    """Turns a collective that failed because a process went away into ``ProcessLost``, in
    every surviving process; any other error passes as it is."""
    try:
        yield
    except TrainingDiverged:
        raise
    except (ValueError, RuntimeError) as e:
        latest = None if manager is None else manager.latest()
        lost = distributed.process_lost(e, last_checkpoint=latest)
        if lost is None:
            raise
        raise lost from e


def _stopped_by(
    interrupts: distributed.Interrupts, agreed: bool | int = False
) -> distributed.Interrupted:
    """The interrupt that stops every process after the same chunk: this process's own signal
    where it received one (held: ``interrupts``), else the one another process received
    (``agree``'s ``agreed``: a signal's number, or a bool for a plain request), so that every
    process of the job exits alike (128 + the signal)."""
    if interrupts.requested:
        return distributed.Interrupted(interrupts.requested)
    if agreed > 1:  # a signal's number (agree gives a bool for a plain request)
        return distributed.Interrupted(agreed, own=False)
    return distributed.Interrupted()


class _Schedule(NamedTuple):
    """What ``fit``'s epochs follow, fixed for the run (``fit``'s arguments of those names)."""

    epochs: int
    batch_size: int
    plan: tuple[tuple[int, int], ...]  # an epoch's chunks (bpjax.train.chunk_plan)
    eval_every: int
    eval_splits: Sequence[str]
    checkpoint_every: int
    patience: int | None
    monitor: str
    mode: str  # "min" or "max": how the monitor ranks
    config: dict | None
    run_info: dict[str, Any]  # stored in every checkpoint, to recognise the run on resume
    callbacks: Sequence[Callable[[dict[str, Any]], None]]
    on_chunk: Sequence[Callable[[dict[str, Any]], None]]


class _Epochs:
    """The training of one ``fit`` call, from ``start``: ``run()`` trains the epochs (the
    attributes hold the state, the best so far and the history as they go), ``result()`` is
    ``fit``'s result."""

    def __init__(
        self,
        schedule: _Schedule,
        start: _Start,
        manager: CheckpointManager | None,
        compiled: tuple[Callable, Callable, Callable],
        train_data: tuple[Any, Any],
        n_train: int,
        eval_inputs: dict[str, Any],
    ):
        self.schedule, self.start, self.manager = schedule, start, manager
        self.order_fn, self.chunk_fn, evaluate = compiled
        self.train_data, self.n_train, self.eval_inputs = train_data, n_train, eval_inputs
        self.run_eval = _split_evaluator(evaluate, eval_inputs)
        self.steps_per_epoch = n_train // schedule.batch_size
        self.state = start.state
        self.best, self.best_epoch, self.bad_evals = start.best, start.best_epoch, start.bad_evals
        self.best_params, self.best_net_state = start.best_params, start.best_net_state
        self.history: list[dict[str, Any]] = []
        # the last measured angles (grad_check_every), kept in checkpoints
        self.last_alignment: dict[str, float] = dict(start.last_alignment)
        # A run that stopped early stays stopped when resumed (unless patience was raised).
        self.stopped_early = schedule.patience is not None and self.bad_evals >= schedule.patience
        # Training throughput is timed over the chunks whose program had already been compiled
        # in this process (a chunk's length picks its program; a sweep's later jobs reuse the
        # earlier ones' programs): a chunk in which a program compiled is left out, so that a
        # short run's examples/s is not its compilation's.
        self.train_seconds, self.trained_examples = 0.0, 0
        self.ran_lengths = _RAN_LENGTHS.setdefault(self.chunk_fn, set())
        self.t_start = time.perf_counter()
        self.epoch = start.epoch
        # The epoch being trained, between its chunks: {"epoch_step", "epoch_loss_sum"}.
        self.in_progress: dict[str, Any] = {}
        self.saved_epoch = None  # the last epoch checkpointed whole
        self.stop = False  # an interrupt, agreed by every process

    def checkpoint(self, record, **in_progress):
        """Saves ``state`` as checkpoint ``record["epoch"]``: the state after that epoch, or,
        with ``in_progress``, after its first ``epoch_step`` steps (``epoch_loss_sum`` their
        summed loss). An epoch saved mid-way is saved again, whole, once it ends."""
        if self.manager is None:
            return
        monitor = self.schedule.monitor
        monitor_value = record.get(monitor, math.nan) if record.get("evaluated") else math.nan
        self.manager.save(
            self.state,
            step_or_epoch=int(record["epoch"]),
            metrics={
                "monitor": monitor_value,
                "best": math.nan if self.best is None else self.best,
                "best_epoch": self.best_epoch,
                "bad_evals": self.bad_evals,
                **{k: v for k, v in record.items() if isinstance(v, int | float)},
                **{LAST + name: value for name, value in self.last_alignment.items()},
                **in_progress,
            },
            config=self.schedule.config,
            run=self.schedule.run_info,
        )

    def run(self) -> None:
        """Trains the epochs after ``start`` up to ``epochs`` (fewer when stopped early); an
        interrupt checkpoints what was trained and passes on."""
        last_epoch = self.start.epoch if self.stopped_early else self.schedule.epochs
        # One process stops where all do: a lost process stops the others, an interrupt stops
        # all at the same chunk (bpjax.distributed).
        with (
            _naming_lost_processes(self.manager),
            distributed.deferred_interrupts() as interrupts,
        ):
            try:
                for epoch in range(self.start.epoch + 1, last_epoch + 1):
                    self.epoch = epoch
                    record = self.train_epoch(epoch, interrupts)
                    self.end_epoch(record, interrupts)
                    if self.stopped_early:
                        break
            except KeyboardInterrupt as interrupt:
                if self.in_progress:
                    unfinished = {"epoch": self.epoch, "step": int(self.state.step)}
                    self.checkpoint(unfinished, **self.in_progress)
                elif self.history and self.history[-1]["epoch"] != self.saved_epoch:
                    self.checkpoint(self.history[-1])
                if interrupts.requested and not (
                    isinstance(interrupt, distributed.Interrupted) and interrupt.own
                ):
                    # This process's own signal came (held) while it stopped for another's: the
                    # interrupt names it, as the exit status does (128 + it).
                    raise _stopped_by(interrupts) from None
                raise

    def train_epoch(self, epoch: int, interrupts: distributed.Interrupts) -> dict[str, Any]:
        """Trains ``epoch``'s steps (those a resume left to do), chunk by chunk; its record."""
        t0 = time.perf_counter()
        done, loss_sum = 0, 0.0
        if epoch == self.start.epoch + 1:
            done, loss_sum = self.start.epoch_step, self.start.epoch_loss_sum
        order = self.order_fn(self.state, self.n_train, jnp.int32(epoch))
        chunks = _plan_from(self.schedule.plan, done)
        parts, timed_seconds, timed_examples = [], 0.0, 0
        # Chunk k + 1 is dispatched from chunk k's state (pending: jax dispatches asynchronously)
        # before the host waits for chunk k's metrics, so that the device trains while the host
        # reads, checks and reports them: one more state in flight. Not past the epoch's last
        # chunk (its evaluation and checkpoint need the epoch's end).
        # A chunk's time: from the previous chunk's metrics on the host (the first: from its
        # dispatch) to its own; the times add up to the epoch's training, overlaps included. A
        # chunk is timed when no program was compiled in it: neither its own (compiled at its
        # dispatch) nor its successor's (dispatched within its time).
        t_ready = time.perf_counter()
        following = self.dispatch(self.state, order, *chunks[0]) if chunks else None
        for k, (start, length) in enumerate(chunks):
            (new_state, chunk_metrics), timed = following
            following = None
            try:
                if k + 1 < len(chunks):
                    following = self.dispatch(new_state, order, *chunks[k + 1])
                    timed = timed and following[1]
                step_before = int(self.state.step)
                # Process 0's metrics everywhere, and whether any process was interrupted.
                chunk_metrics, self.stop = distributed.agree(
                    distributed.host_copy(chunk_metrics), stop=interrupts.requested
                )
                now = time.perf_counter()
                if timed:
                    timed_seconds += now - t_ready
                    timed_examples += length * self.schedule.batch_size
                t_ready = now
                self.check_finite(chunk_metrics["loss"], epoch, start, step_before)
                chunk_sum = loss_sum + float(np.sum(chunk_metrics["loss"], dtype=np.float64))
                # One assignment, no call inside it: an interrupt (a second Ctrl-C, which is
                # not held) can't land between the state and the steps counted.
                self.state, done, loss_sum, self.in_progress = (
                    new_state,
                    start + length,
                    chunk_sum,
                    {"epoch_step": start + length, "epoch_loss_sum": chunk_sum},
                )
                parts.append(chunk_metrics)
                # per chunk: a checkpoint mid-epoch has the angles measured before it
                self.last_alignment.update(_last_measured(chunk_metrics, "alignment/"))
                chunk_record = {
                    "epoch": epoch,
                    "step": int(self.state.step),
                    "epoch_step": done,
                    "steps_per_epoch": self.steps_per_epoch,
                    "train_loss": loss_sum / done,
                    "step_metrics": chunk_metrics,
                }
                for callback in self.schedule.on_chunk:
                    callback(chunk_record)
                if self.stop and done < self.steps_per_epoch:  # every process, the same chunk
                    raise _stopped_by(interrupts, self.stop)
            except BaseException:
                # Chunk k + 1 is discarded (not counted, not saved), once it has run: no
                # computation is left in flight when the process exits, and in a job every
                # process has dispatched it (they stop after the same chunk k), so that its
                # collectives complete. Its own error, if it has one, is the one raised.
                if following is not None:
                    jax.block_until_ready(following[0])
                raise
        seconds = time.perf_counter() - t0
        self.train_seconds += timed_seconds
        self.trained_examples += timed_examples
        step_metrics = _concat(parts)
        return {
            "epoch": epoch,
            "step": int(self.state.step),
            "train_loss": loss_sum / self.steps_per_epoch,
            "epoch_seconds": seconds,
            # as the run's: None for an epoch with no chunk timed (each compiled a program)
            "examples_per_second": (timed_examples / timed_seconds if timed_examples else None),
            "step_metrics": step_metrics,
            "params": self.state.params,
            "net_state": self.state.net_state,
            "rule_state": self.state.rule_state,
            "evaluated": False,
        }

    def dispatch(self, state, order, start: int, length: int):
        """The chunk of ``length`` steps from ``start`` trained from ``state``, dispatched (its
        ``(state, metrics)``, pending), and whether it reused a compiled program: a chunk of
        that length was dispatched before, in this process (the first compiled it)."""
        reused = length in self.ran_lengths
        out = self.chunk_fn(state, *self.train_data, order, jnp.int32(start), length=length)
        self.ran_lengths.add(length)
        return out, reused

    def check_finite(self, losses: np.ndarray, epoch: int, start: int, step_before: int):
        """The divergence guard: raises ``TrainingDiverged`` on a chunk's non-finite loss."""
        if not np.all(np.isfinite(losses)):
            bad = int(np.argmin(np.isfinite(losses)))
            result = FitResult(self.state, self.best_params, {}, self.history, self.best_net_state)
            latest = None if self.manager is None else self.manager.latest()
            raise TrainingDiverged(
                f"training diverged: non-finite loss ({losses[bad]}) at epoch {epoch}, "
                f"step {step_before + bad + 1} (step {start + bad + 1} of "
                f"{self.steps_per_epoch} in the epoch); last finite checkpoint: "
                f"{latest or 'none yet'}",
                epoch=epoch,
                step=step_before + bad + 1,
                result=result,
            )

    def end_epoch(self, record: dict[str, Any], interrupts: distributed.Interrupts) -> None:
        """Evaluates a trained epoch when due, records it, checkpoints it when due and
        stops at an interrupt."""
        schedule, epoch = self.schedule, record["epoch"]
        if epoch % schedule.eval_every == 0 or epoch == schedule.epochs:
            self.evaluate(record)
        # From here on the epoch is recorded: an interrupt before this line (in a chunk or
        # while evaluating) checkpoints the steps done, mid-epoch.
        self.history.append(record)
        self.in_progress = {}
        for callback in schedule.callbacks:
            callback(record)
        self.stopped_early = schedule.patience is not None and self.bad_evals >= schedule.patience
        # A new best is saved too, so that a resumed run can restore the best params; so is
        # the last epoch of a run stopped early.
        if (
            epoch % schedule.checkpoint_every == 0
            or epoch == schedule.epochs
            or self.best_epoch == epoch
            or self.stopped_early
        ):
            self.checkpoint(record)
            self.saved_epoch = epoch
        # An interrupt in the epoch's last chunk, its evaluation or its callbacks stops
        # here, with the epoch whole (held until now: the state and the steps counted
        # always agree in a checkpoint). After the run's last epoch nothing is left to stop:
        # the run ends as it would have (its test metrics), not as one to resume.
        _, self.stop = distributed.agree({}, stop=self.stop or interrupts.requested)
        if self.stop and epoch < schedule.epochs and not self.stopped_early:
            raise _stopped_by(interrupts, self.stop)

    def evaluate(self, record: dict[str, Any]) -> None:
        """Adds the evaluated splits' metrics to ``record`` and follows the best epoch."""
        monitor = self.schedule.monitor
        record["evaluated"] = True
        for split in self.schedule.eval_splits:
            if split in self.eval_inputs:
                # "train_loss" stays the epoch's mean minibatch loss.
                evaluated = self.run_eval(self.state.params, self.state.net_state, split)
                evaluated.pop("train_loss", None)
                record.update(evaluated)
        value = record.get(monitor, record["train_loss"])
        if _is_better(value, self.best, self.schedule.mode):
            self.best, self.best_epoch, self.bad_evals = value, record["epoch"], 0
            self.best_params, self.best_net_state = self.state.params, self.state.net_state
        else:
            self.bad_evals += 1
        record["best_" + monitor] = self.best

    def result(self, n_val: int) -> FitResult:
        """``fit``'s result: the final metrics of the best parameters (the test split's, and
        the validation split's when there are ``n_val`` examples) and of the final state."""
        with _naming_lost_processes(self.manager):  # an interrupt here stops at once
            wall = time.perf_counter() - self.t_start
            final = self.run_eval(self.best_params, self.best_net_state, "test")
            if n_val:
                best_val = self.run_eval(self.best_params, self.best_net_state, "val")
                final.update({f"best_{k}": v for k, v in best_val.items()})
            final.update(self.run_eval(self.state.params, self.state.net_state, "train"))
            timed = self.trained_examples
            final.update(
                {
                    "epochs": int(self.history[-1]["epoch"]) if self.history else self.start.epoch,
                    "best_epoch": self.best_epoch,
                    "stopped_early": self.stopped_early,
                    "wall_seconds": wall,
                    "train_seconds": self.train_seconds if timed else None,
                    "examples_per_second": timed / self.train_seconds if timed else None,
                    "steps": int(self.state.step),
                    "updates": int(updates_applied(self.state)),
                    **self.last_alignment,
                }
            )
            return FitResult(self.state, self.best_params, final, self.history, self.best_net_state)
