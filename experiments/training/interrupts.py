"""Interrupts: SIGTERM and Ctrl-C raise ``KeyboardInterrupt`` (raised again where a library
swallowed it), and what an interrupted run says: where its last checkpoint is and the command
that resumes it (every process's, in a job of several)."""

import pathlib
import signal
from typing import Any

import jax
from omegaconf import DictConfig

from bpjax import cli, distributed
from bpjax.checkpoint import CheckpointManager, load_metadata
from bpjax.reporting import count
from training.config import ROOT, SCRIPT
from training.processes import _joined_several
from training.run_dir import (
    _has_checkpoints,
    _original_cwd,
    _override_key,
    _run_dir,
    _task_overrides,
)


def resume_command(cfg: DictConfig) -> str:
    """The command that resumes this run: its overrides, ``trainer.resume=true`` and its run
    directory, run by the interpreter running now (``bpjax.cli.rerun_command``)."""
    overrides = [
        o
        for o in _task_overrides()
        if _override_key(o) not in ("trainer.resume", "trainer.run_dir")
    ]
    resume = ["trainer.resume=true", f"trainer.run_dir={cli.hydra_quote(str(_run_dir(cfg)))}"]
    return cli.rerun_command(SCRIPT, [*overrides, *resume], cwd=_original_cwd(), project_root=ROOT)


def interrupted_message(cfg: DictConfig) -> str:
    """What an interrupted run says: where its last epoch is and the command that resumes it."""
    checkpoint_dir = _run_dir(cfg) / "checkpoints"
    if not _has_checkpoints(checkpoint_dir):
        return "interrupted before the first epoch ended: nothing was checkpointed"
    if _joined_several():
        return (
            f"interrupted: every process stopped after the same step, checkpointed in "
            f"{checkpoint_dir}; {_resume_every_process(cfg)}"
        )
    return f"interrupted: {_last_checkpoint(checkpoint_dir)}; resume with: {resume_command(cfg)}"


def _last_checkpoint(checkpoint_dir: pathlib.Path) -> str:
    """Where the latest checkpoint stands, in words: an epoch's end, or steps into an epoch."""
    try:
        path = CheckpointManager(checkpoint_dir).latest()
        saved = load_metadata(path).get("metrics") or {}
        epoch, step = int(saved["epoch"]), int(saved.get("epoch_step") or 0)
    except (OSError, ValueError, KeyError, TypeError):
        return f"the last checkpoint is in {checkpoint_dir}"
    if step:
        return f"checkpointed {count(step, 'step')} into epoch {epoch} in {path}"
    return f"checkpointed at the end of epoch {epoch} in {path}"


def _resume_every_process(cfg: DictConfig) -> str:
    """How a job of several processes resumes: all of them, each with its own command."""
    return (
        f"resume by starting all {jax.process_count()} processes again, each with its own "
        f"command plus trainer.resume=true trainer.run_dir="
        f"{cli.hydra_quote(str(_run_dir(cfg)))} (process {jax.process_index()}'s: "
        f"{resume_command(cfg)})"
    )


# The interrupts this process received. One raised while a library runs a callback of its own
# (jax's garbage-collection callback, say) is printed as "ignored" and lost; it is raised again
# before training and between chunks (_stop_if_interrupted).
_SIGNALS: list[int] = []


def _raise_interrupt(signum, frame):
    del frame  # unused
    _SIGNALS.append(signum)
    raise distributed.Interrupted(signum)


def interrupt_status(error: KeyboardInterrupt) -> int:
    """The exit status of a process stopped by ``error``: 128 + the number of the signal that
    arrived (the shell's convention: SIGTERM 143, Ctrl-C's SIGINT 130). The signal is the one
    the interrupt carries (``bpjax.distributed.Interrupted``'s ``signum``: ``_raise_interrupt``'s,
    or ``bpjax.fit``'s held one: this process's own, or, where it received none, the one another
    process of the job received, so that all exit alike), else the last one recorded; Ctrl-C
    where neither says (Python's own handler: a plain ``KeyboardInterrupt``)."""
    if isinstance(error, distributed.Interrupted) and error.signum:
        return 128 + error.signum
    return 128 + (_SIGNALS[-1] if _SIGNALS else signal.SIGINT)


def _stop_if_interrupted(*_: Any) -> None:
    """Raises ``KeyboardInterrupt`` again if a signal came and its interrupt was swallowed."""
    if _SIGNALS:
        raise distributed.Interrupted(_SIGNALS[-1])


def _handle_interrupts() -> None:
    """SIGTERM, and Ctrl-C where Python's own handler has it (not where it is ignored, as in a
    background job), raise ``KeyboardInterrupt`` through ``_raise_interrupt``."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _raise_interrupt)
