"""When a process of the job is lost, and when the job is told to stop: every process must learn
it, and at the same point, or the others wait forever in a collective."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import jax

from bpjax._errors import first_line
from bpjax.distributed._agree import _client, _exchanges
from bpjax.distributed._service import alive_wait
from bpjax.distributed._start import cluster

# Exit status of a process whose job lost another process (EX_TEMPFAIL: "try again later"):
# restarting every process with trainer.resume=true continues from the last checkpoint.
EXIT_LOST = 75

# How a collective reports a peer that went away (gloo on CPU; NCCL and transports elsewhere).
_TRANSPORT_FAILURE = re.compile(
    r"gloo|nccl|connection (reset|closed|refused)|broken pipe|socket closed|peer", re.IGNORECASE
)


class ProcessLost(RuntimeError):
    """A process of the job is gone (killed, crashed, its host down) and this one cannot go on.

    Raised by ``bpjax.trainer.fit`` in every surviving process when a collective fails because
    a peer went away. The job can't continue with fewer processes (the collectives need them
    all); checkpoints already written are complete and the job resumes from the last one when
    every process is started again (``resume=True``; ``trainer.resume=true``).

    End the process with ``bpjax.distributed.exit_now`` rather than a normal exit: at a normal
    exit jax waits for every process, the lost one included, and then aborts with a stack trace.

    Attributes:
        lost: the ids of the processes that did not answer.
        process_id, num_processes: this process's id, and the job's size.
    """

    def __init__(self, message: str, *, lost: tuple[int, ...], process_id: int, num_processes: int):
        super().__init__(message)
        self.lost, self.process_id, self.num_processes = lost, process_id, num_processes


def _lost_after(error: BaseException) -> tuple[int, ...] | None:
    """Which processes are gone, once a collective failed with ``error``: None if ``error`` is
    not a transport failure, or every process answers.

    Every survivor posts itself to the coordination service and waits, a third of the heartbeat
    timeout at most (so that this ends before jax's own verdict, which aborts), for the others'
    posts; those that don't post are lost. The survivors all get here: each of them was in the
    collective that failed. A coordination service that does not answer is the loss of
    process 0, its host.
    """
    if jax.process_count() == 1 or not isinstance(error, ValueError | RuntimeError):
        return None
    if not _TRANSPORT_FAILURE.search(str(error)):
        return None
    count, me = jax.process_count(), jax.process_index()
    _exchanges["alive"] += 1
    directory = f"bpjax/alive/{_exchanges['alive']}/"
    wait = alive_wait(cluster().heartbeat_timeout)
    try:
        client = _client()
        client.key_value_set(f"{directory}{me}", "1")
        deadline = time.monotonic() + wait
        while True:
            alive = {int(k.rsplit("/", 1)[-1]) for k, _ in client.key_value_dir_get(directory)}
            if len(alive) == count or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    except Exception:  # any failure to reach the service: the service is gone
        return (0,)
    lost = tuple(i for i in range(count) if i not in alive)
    return lost or None


def process_lost(error: BaseException, *, last_checkpoint: Any = None) -> ProcessLost | None:
    """A ``ProcessLost`` for ``error`` if it is a collective that failed because a process went
    away (see ``ProcessLost``), else None; every surviving process must call it (it waits for
    them, briefly, to tell who is alive).

    Args:
        error: what a jax call raised.
        last_checkpoint: the last complete checkpoint, named in the message.
    """
    lost = _lost_after(error)
    if lost is None:
        return None
    count, me = jax.process_count(), jax.process_index()
    names = ", ".join(str(i) for i in lost)
    role = " (the coordinator)" if lost == (0,) else ""
    first = first_line(error, 200) or type(error).__name__
    if last_checkpoint is not None:
        kept = f"the last checkpoint, {last_checkpoint}, is complete"
        again = f"start all {count} processes again, resuming, to continue"
    else:
        kept = "no checkpoint was written yet"
        again = f"start all {count} processes again to run it from the start"
    return ProcessLost(
        f"process {names}{role} of {count} was lost (it stopped answering after a collective "
        f"failed: {first}); this process ({me}) stops too: {kept}; {again}",
        lost=lost,
        process_id=me,
        num_processes=count,
    )


def exit_now(status: int) -> None:
    """Ends this process at once with ``status``, standard streams flushed, skipping the exit
    handlers: jax's would wait for a lost process to leave the job, then abort."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


class Interrupted(KeyboardInterrupt):
    """A ``KeyboardInterrupt`` that knows the signal behind it, for the exit status (128 + the
    signal: SIGTERM 143, Ctrl-C's SIGINT 130).

    Attributes:
        signum: the signal's number; 0 where no process is known to have received one.
        own: whether this process received it, or another process of the job did (``fit``
            stops every process after the same chunk, and each exits as the others do).

    Its text is ``signal N``, with ``(received by another process of the job)`` where not own.
    """

    def __init__(self, signum: int = 0, *, own: bool = True):
        self.signum, self.own = int(signum), bool(own)
        if not self.signum:
            text = "interrupted (a signal to a process of the job)"
        elif self.own:
            text = f"signal {self.signum}"
        else:
            text = f"signal {self.signum} (received by another process of the job)"
        super().__init__(text)

    def __reduce__(self):  # pickled (a sweep's launcher): rebuilt from its fields, not its text
        return _interrupted, (type(self), self.signum, self.own)


def _interrupted(cls: type[Interrupted], signum: int, own: bool) -> Interrupted:
    return cls(signum, own=own)


class Interrupts:
    """What ``deferred_interrupts`` caught: ``requested`` is the first signal's number, or 0."""

    requested: int = 0


# The deferred_interrupts contexts open on the main thread, innermost last.
_HOLDING: list[Interrupts] = []


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[Interrupts]:
    """Holds Ctrl-C (SIGINT) and SIGTERM back until every process can stop at the same point.

    In a job of several processes, a signal that raises ``KeyboardInterrupt`` at once would stop
    each process somewhere else (the processes get it at different moments), leaving the others
    in a collective that never completes. Inside this context, SIGINT, and SIGTERM where a
    Python handler makes it an interrupt (``experiments/train.py`` does), only set
    ``requested``; the caller shares it with the others (``agree``'s ``stop``) and stops where
    they all see it. A second signal interrupts at once, as before.

    In one process it holds them too, so that an interrupt never lands between two statements
    that must go together (``bpjax.fit`` updates its state and its count of steps done, then
    checkpoints both). Off the main thread (where signals can't be handled) it does nothing.

    Nested, an inner context starts with the signal its outer one holds (a job's start-up held
    it; ``fit``'s context stops every process at its first chunk).
    """
    state = Interrupts()
    if threading.current_thread() is not threading.main_thread():
        yield state
        return
    if _HOLDING:
        state.requested = _HOLDING[-1].requested

    def hold(signum: int, frame: Any) -> None:
        del frame  # unused: only the signal matters
        if state.requested:
            raise Interrupted(signum)
        state.requested = signum

    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(signum)
        if callable(handler):  # a Python handler (SIG_DFL would end the process, SIG_IGN not)
            previous[signum] = handler
            signal.signal(signum, hold)
    _HOLDING.append(state)
    try:
        yield state
    finally:
        _HOLDING.pop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
