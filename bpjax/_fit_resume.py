"""Where ``bpjax.trainer.fit`` starts: its checkpoint directory opened and checked (another
run's checkpoints, or a run's that ``resume=False`` would overwrite, raise ``ResumeError`` before
anything is compiled), and the state, epoch and best so far restored from its checkpoints.

Resume is exact: the epoch's shuffle and every dropout draw are functions of the run key and
the epoch/step counters stored in the checkpoint, so an interrupted and resumed run ends with the
same parameters as one that never stopped (bit-identical on CPU). A learning rule's state (its
feedback weights, ``bpjax.credit``) is part of the checkpointed ``TrainState``, so it resumes
exactly too, Kolen-Pollack's evolving feedback included. A Kolen-Pollack checkpoint written
before the trainer held ``B`` as a ``bpjax.credit.KolenPollackState`` (it stored ``B`` itself)
is read as it was written and converted (``kolen_pollack_state``: the same ``B``).
"""

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from bpjax import credit
from bpjax._fit_result import ResumeError
from bpjax.checkpoint import (
    CheckpointManager,
    DamagedCheckpointWarning,
    UnreadableCheckpoint,
    _to_json,
    load_metadata,
)
from bpjax.checkpoint import restore as checkpoint_restore
from bpjax.reporting import count
from bpjax.train import TrainState


def _open_checkpoints(
    checkpoint_dir: str | None,
    *,
    keep: int,
    mode: str,
    config: dict | None,
    resume: bool,
    run_info: dict[str, Any],
) -> tuple[CheckpointManager | None, bool]:
    """``(manager, resume_from)``: the manager of ``checkpoint_dir`` (None: no checkpoints) and
    whether this run continues from a checkpoint there (``_resume_point``)."""
    if checkpoint_dir is None:
        return None, False
    _to_json(config)  # a config that can't be stored fails now, not at the first checkpoint
    manager = CheckpointManager(checkpoint_dir, keep=keep, metric="monitor", mode=mode)
    return manager, _resume_point(manager, resume, run_info)


def _resume_point(manager: CheckpointManager, resume: bool, run: dict[str, Any]) -> bool:
    """Whether this run continues from a checkpoint, once the latest is known to be this run's:
    its ``run`` metadata (when it has one) must match ``run``."""
    steps = manager.all_steps()
    if not steps:
        return False
    if not resume:
        names = ", ".join(manager.path_for(s).name for s in steps[-3:])
        raise ResumeError(
            f"{manager.directory} already holds checkpoints of a run ({names}): resume to "
            f"continue it, or start the new run in an empty directory (nothing was deleted)"
        )
    path = manager.latest()
    try:
        saved = load_metadata(path).get("run")
    except UnreadableCheckpoint:
        return True  # damaged: restore_latest passes over it, warning, and fit checks the run
    except (OSError, ValueError) as e:
        raise ResumeError(f"cannot resume: {e}") from e
    _check_run(path, saved, run)
    return True


def _check_run(path: Any, saved: dict[str, Any] | None, run: dict[str, Any]) -> None:
    if saved is not None:
        differ = [
            f"{key} {saved[key]!r} there, {value!r} here"
            for key, value in run.items()
            if key in saved and saved[key] != value
        ]
        if differ:
            raise ResumeError(
                f"cannot resume from {path}: another run saved it ({'; '.join(differ)}); use "
                f"that run's settings, or start the new run in an empty directory"
            )


def _restore(restore: Callable, like: TrainState) -> tuple[TrainState, dict[str, Any]]:
    """``restore(like)``; for Kolen-Pollack, a checkpoint that holds ``B`` itself (written
    before ``KolenPollackState``) is read as such and converted to it. Any other mismatch
    raises ``restore``'s own error."""
    try:
        return restore(like)
    except ValueError as error:
        if not isinstance(like.rule_state, credit.KolenPollackState):
            raise
        try:  # B itself has the offset's structure, shapes and dtypes
            state, meta = restore(like._replace(rule_state=like.rule_state.offset))
        except ValueError:
            raise error from None
    held = credit.kolen_pollack_state(state.params, state.rule_state)
    return state._replace(rule_state=held), meta


def _restore_whole_epoch(manager, like, epoch: int, saved: dict, epochs: int):
    """The checkpoint of whole epoch ``epoch`` (``restore``'s ``(state, meta)``), for a resume
    whose latest checkpoint is ``saved["epoch_step"]`` steps past it, beyond ``epochs``.

    Raises:
      ResumeError: that epoch's checkpoint is not kept (or can't be read).
    """
    path = manager.path_for(epoch)
    try:
        return _restore(lambda like: checkpoint_restore(path, like), like)
    except (FileNotFoundError, UnreadableCheckpoint) as e:
        raise ResumeError(
            f"cannot resume with trainer.epochs={epochs}: the run's latest checkpoint is "
            f"{count(saved['epoch_step'], 'step')} into epoch {epoch + 1} and epoch {epoch}'s "
            f"({path.name}) "
            f"is not kept ({e}); resume with epochs={epoch + 1} or more"
        ) from None


# A checkpoint's metrics name the run's last measured angles "last_alignment/...".
LAST = "last_"


class _Start(NamedTuple):
    """Where ``fit``'s epochs start: a fresh state, or what a resume restored."""

    state: TrainState
    best_params: Any  # the parameters of the best epoch so far,
    best_net_state: Any  # and the network state that goes with them
    epoch: int = 0  # the epochs completed
    epoch_step: int = 0  # the steps done of the next epoch (when it was saved mid-epoch)
    epoch_loss_sum: float = 0.0  # their summed loss
    best: float | None = None  # the best monitored value so far (None: none yet)
    best_epoch: int = -1
    bad_evals: int = 0  # evaluations without improvement since the best
    # the last measured angles, (name, degrees) pairs: a measurement made before the
    # checkpoint stays the run's last until the resumed run measures again
    last_alignment: tuple[tuple[str, float], ...] = ()


def _start(
    state: TrainState,
    manager: CheckpointManager | None,
    resume_from: bool,
    *,
    replicated: jax.sharding.NamedSharding,
    run_info: dict[str, Any],
    epochs: int,
    steps_per_epoch: int,
    on_resume: Callable[[dict[str, Any]], None] | None,
) -> _Start:
    """Where the run starts: ``state`` (freshly initialised, on the devices) unless it resumes
    from ``manager``'s latest readable checkpoint (a damaged one is renamed aside, with a
    ``DamagedCheckpointWarning`` that points at the code that called ``fit``), with the best
    parameters kept there. Called by ``fit`` only."""
    if not resume_from:
        return _Start(state, state.params, state.net_state)
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DamagedCheckpointWarning)  # others: as filtered
            return _resumed(
                state,
                manager,
                replicated=replicated,
                run_info=run_info,
                epochs=epochs,
                steps_per_epoch=steps_per_epoch,
                on_resume=on_resume,
            )
    finally:
        _warn_from_fit(caught)


def _warn_from_fit(caught: list[warnings.WarningMessage]) -> None:
    """Emits the warnings ``_start`` caught: a ``DamagedCheckpointWarning`` again, under the
    caller's filters, at the line that called ``fit`` (the user's code, where bpjax's other
    warnings point; the manager's own ``stacklevel`` points inside bpjax); any other, which
    the caller's filters already let through, shown as it was raised."""
    for w in caught:
        if issubclass(w.category, DamagedCheckpointWarning):
            warnings.warn(w.message, w.category, stacklevel=4)  # here, _start, fit, its caller
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)


# What a checkpoint's state holds, part by part: what differs when a part doesn't match.
_PARTS = {
    ".params": "this run's network differs (its layers or sizes)",
    ".net_state": "this run's network differs (its normalization layers' state)",
    ".opt_state": "this run's optimizer differs (its kind, or what it keeps per parameter)",
    ".rule_state": "this run's learning rule differs (its feedback weights)",
}


def _what_differs(error: str) -> str:
    """`` (this run's network differs ...)`` for a mismatch naming a leaf of ``error``'s first
    part (params, net_state, opt_state, rule_state); empty for any other error."""
    if "mismatch" not in error:
        return ""
    found = [(error.find(part), text) for part, text in _PARTS.items() if part in error]
    return f" ({min(found)[1]})" if found else " (this run's network or optimizer differs)"


def _resumed(
    state: TrainState,
    manager: CheckpointManager,
    *,
    replicated: jax.sharding.NamedSharding,
    run_info: dict[str, Any],
    epochs: int,
    steps_per_epoch: int,
    on_resume: Callable[[dict[str, Any]], None] | None,
) -> _Start:
    """``_start``'s resume: the state, epoch and best so far restored from ``manager``."""
    try:  # the latest readable checkpoint: a damaged one is renamed aside, with a warning
        state, meta = _restore(manager.restore_latest, state)
    except ValueError as e:
        raise ResumeError(f"cannot resume: {e}{_what_differs(str(e))}") from e
    _check_run(manager.path_for(int(meta["step"])), meta.get("run"), run_info)
    state = jax.device_put(state, replicated)
    saved = meta["metrics"]
    start_epoch = int(saved.get("epoch", meta["step"]))
    if saved.get("epoch_step") and start_epoch - 1 >= epochs:
        # Saved mid-epoch beyond the epochs asked for: nothing to train, and the run's
        # result is its last whole epoch's, not that of the steps after it.
        state, meta = _restore_whole_epoch(manager, state, start_epoch - 1, saved, epochs)
        state = jax.device_put(state, replicated)
        saved = meta["metrics"]
        start_epoch = int(saved.get("epoch", meta["step"]))
    resumed_steps, resumed_loss_sum = 0, 0.0
    if saved.get("epoch_step"):  # saved mid-epoch: the steps done of the next epoch
        resumed_steps = int(saved["epoch_step"])
        resumed_loss_sum = float(saved["epoch_loss_sum"])
        start_epoch -= 1
    if on_resume is not None:
        on_resume(
            {
                "path": manager.path_for(int(meta["step"])),
                "epoch": start_epoch,
                "epoch_step": resumed_steps,
                "steps_per_epoch": steps_per_epoch,
            }
        )
    best_epoch, bad_evals = int(saved["best_epoch"]), int(saved["bad_evals"])
    best = None if best_epoch < 0 else float(saved["best"])
    resumed = _Start(
        state,
        state.params,
        state.net_state,
        start_epoch,
        resumed_steps,
        resumed_loss_sum,
        best,
        best_epoch,
        bad_evals,
        tuple(
            (name.removeprefix(LAST), float(value))
            for name, value in saved.items()
            if name.startswith(LAST + "alignment/")
        ),
    )
    return _with_best_kept(resumed, manager, replicated)


def _with_best_kept(
    resumed: _Start, manager: CheckpointManager, replicated: jax.sharding.NamedSharding
) -> _Start:
    """``resumed`` with the best parameters of the run's best checkpoint, when one is kept."""
    if manager.best() is None or resumed.best_epoch < 0:
        return resumed
    best_state, best_meta = _restore(manager.restore_best, resumed.state)
    best_state = jax.device_put(best_state, replicated)
    resumed = resumed._replace(best_params=best_state.params, best_net_state=best_state.net_state)
    kept = best_meta["metrics"]
    if int(kept.get("epoch", best_meta["step"])) != resumed.best_epoch:
        # the recorded best was damaged and set aside: the next best stands in for it
        best_epoch, best = int(kept.get("epoch", best_meta["step"])), float(kept["monitor"])
        resumed = resumed._replace(best_epoch=best_epoch, best=best)
    return resumed
