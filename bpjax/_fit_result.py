"""What ``bpjax.trainer.fit`` returns and raises: ``FitResult``, ``ResumeError`` and
``TrainingDiverged``, public as ``bpjax.trainer``'s (defined here so that the private modules
``fit`` is made of can raise them without importing ``bpjax.trainer``). Their ``__module__`` is
``bpjax.trainer``, where users import them from: tracebacks and reprs name them there, and
pickles refer to them there."""

from typing import Any, NamedTuple

from bpjax._summaries import tree_summary
from bpjax.reporting import count
from bpjax.train import TrainState


class FitResult(NamedTuple):
    """What ``fit`` returns.

    Attributes:
      state: the final TrainState (after the last epoch run).
      best_params: the parameters with the best validation metric (``state.params`` without
        a validation split); the test metrics are computed with these.
      metrics: final summary: ``test_*``, ``best_val_*``, ``train_loss``, ``epochs``,
        ``best_epoch``, ``stopped_early``, ``wall_seconds`` (this call, evaluation included),
        ``train_seconds`` and ``examples_per_second`` (training steps only, timed over the
        chunks whose program had already run in this process; both ``None`` when every chunk
        compiled its program, e.g. a single epoch in one chunk), ``steps`` (minibatch steps taken)
        and ``updates`` (optimizer updates applied: fewer than ``steps`` under gradient
        accumulation, ``optax.MultiSteps``); with
        ``grad_check_every``, the run's last measured alignment (a resumed run's from before
        its checkpoint, until it measures again),
        ``alignment/layer{i}/angle``, ``alignment/layer{i}/weight_angle`` (feedback rules) and
        ``alignment/total/angle``, in degrees (see ``bpjax.train.make_epoch``).
      history: one record per epoch run by this call.
      best_net_state: the network's state (batch norm's running statistics) that goes with
        ``best_params``; ``()`` for a network without state.
    """

    state: TrainState
    best_params: Any
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    best_net_state: Any = ()

    def __repr__(self) -> str:
        # The metrics, and the arrays counted, not printed (the default repr printed them all)
        state = self.state
        if isinstance(state, TrainState):
            state = f"TrainState(step {int(state.step)}, params: {tree_summary(state.params)})"
        return (
            f"FitResult(metrics={self.metrics!r}, history=[{count(len(self.history), 'epoch')}], "
            f"state={state}, best_params: {tree_summary(self.best_params)}, "
            f"best_net_state: {tree_summary(self.best_net_state)})"
        )


class ResumeError(ValueError):
    """``fit`` can't continue what ``checkpoint_dir`` holds: checkpoints of a run that this
    call would overwrite (``resume=False``) or that is not this run (another seed, batch size,
    monitor, loss, dataset, network or optimizer), or an unreadable checkpoint. Raised before
    anything is compiled; nothing is deleted."""


class TrainingDiverged(RuntimeError):
    """A non-finite training loss; ``.epoch``/``.step`` say where, ``.result`` what was kept."""

    def __init__(self, message: str, *, epoch: int, step: int, result: FitResult):
        super().__init__(message)
        self.epoch, self.step, self.result = epoch, step, result

    def __reduce__(self) -> tuple[Any, ...]:
        # Its keyword-only arguments: the default (``cls(*args)``) could not unpickle it.
        return _training_diverged, (str(self), self.epoch, self.step, self.result)


def _training_diverged(message: str, epoch: int, step: int, result: FitResult) -> TrainingDiverged:
    return TrainingDiverged(message, epoch=epoch, step=step, result=result)


for _public in (FitResult, ResumeError, TrainingDiverged):
    _public.__module__ = "bpjax.trainer"  # re-exported there, their public home
del _public
