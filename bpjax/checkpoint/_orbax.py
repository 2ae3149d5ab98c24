"""orbax-checkpoint, imported on first use, and what bpjax does around it with files and
processes: renaming aside, deleting, replacing a checkpoint, and a save that an interrupt does not
stop midway."""

from __future__ import annotations

import itertools
import logging
import os
import pathlib
import shutil
import sys
import threading
from collections.abc import Callable
from typing import Any

import jax

ARRAYS = "arrays"  # orbax item: the non-empty leaves, as {"leaf_00000": array, ...}
META = "meta"  # orbax item: one JSON file, META_FILE
META_FILE = "bpjax.json"
TMP_MARK = ".orbax-checkpoint-tmp"  # in the names of orbax's unfinished saves

_barriers = itertools.count()


def ocp() -> Any:
    """``orbax.checkpoint``, imported on first use: it adds a noticeable share to bpjax's
    import time, which every command pays."""
    import orbax.checkpoint

    absl = logging.getLogger("absl")
    if not any(isinstance(f, _QuietOrbax) for f in absl.filters):
        absl.addFilter(_QuietOrbax(os.path.dirname(os.path.dirname(orbax.checkpoint.__file__))))
    return orbax.checkpoint


class _QuietOrbax(logging.Filter):
    """Drops orbax's INFO and DEBUG records: it logs through absl, dozens of lines per save,
    which reach the console wherever the root logger shows INFO (as under Hydra). Its warnings
    and errors, and every other absl user's records, pass."""

    def __init__(self, orbax_dir: str):
        super().__init__()
        self.orbax_dir = os.path.join(orbax_dir, "")

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.pathname.startswith(self.orbax_dir)


def item_handlers() -> dict[str, Any]:
    """The orbax handler of each item of a checkpoint (the same for saving and restoring)."""
    return {
        ARRAYS: ocp().PyTreeCheckpointHandler(),
        META: ocp().JsonCheckpointHandler(filename=META_FILE),
    }


# ----------------------------------------------------------------------------------------------
# Several processes: the primary one renames and deletes, every one waits for it
# ----------------------------------------------------------------------------------------------


def is_primary() -> bool:
    return jax.process_index() == 0


def sync(what: str) -> None:
    """A barrier across processes (nothing in one process). Every process makes the same calls
    in the same order, so the counter gives each barrier the same unique name everywhere."""
    if jax.process_count() > 1:
        ocp().multihost.sync_global_processes(f"bpjax_checkpoint_{what}_{next(_barriers)}")


def set_aside(path: pathlib.Path, tag: str) -> pathlib.Path:
    """Renames ``path`` to ``<name>.<tag>`` (``.<tag>-2``, ... if taken) and returns the new path;
    in several processes the primary renames, after every process has chosen the same name."""
    aside = path.with_name(f"{path.name}.{tag}")
    for n in itertools.count(2):
        if not aside.exists():
            break
        aside = path.with_name(f"{path.name}.{tag}-{n}")
    sync("set_aside_chosen")
    if is_primary():
        path.rename(aside)
    sync("set_aside_done")
    return aside


def remove(path: pathlib.Path) -> None:
    """Deletes a checkpoint (a directory, or a file of the former format); primary only."""
    if is_primary():
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    sync("removed")


def remove_unfinished(path: pathlib.Path) -> None:
    """Deletes what an interrupted orbax save of ``path`` left (``<name>.orbax-checkpoint-tmp-*``)
    in the primary process."""
    if is_primary() and path.parent.is_dir():
        for tmp in path.parent.glob(f"{path.name}{TMP_MARK}*"):
            shutil.rmtree(tmp, ignore_errors=True)
    sync("removed_unfinished")


# ----------------------------------------------------------------------------------------------
# Replacing a checkpoint, and the noise of a failed restore
# ----------------------------------------------------------------------------------------------


def replace(path: pathlib.Path, existing: pathlib.Path | None, write: Callable[[], None]) -> None:
    """Runs ``write`` (an orbax save of ``path``) to completion, in place of ``existing``.

    ``existing`` (the checkpoint ``path`` replaces, if any) is renamed aside first and deleted
    once the new one is complete; if the save fails, what it left is deleted and ``existing``
    put back. A KeyboardInterrupt (Ctrl-C, or a SIGTERM turned into one) does not stop a save
    midway, where it would leave orbax's writer threads filling a directory that the next save
    deletes: it is raised once the save is complete.
    """

    def replace_existing() -> None:
        aside = None if existing is None else set_aside(existing, "replaced")
        try:
            write()
        except BaseException:
            remove_unfinished(path)
            if aside is not None and is_primary() and not existing.exists():
                aside.rename(existing)
            raise
        if aside is not None:
            remove(aside)

    failure: list[BaseException] = []
    done = threading.Event()

    def run() -> None:
        try:
            replace_existing()
        except BaseException as e:
            failure.append(e)
        finally:
            done.set()

    # Signals are handled in the main thread only: the save goes on in another. (Waiting on an
    # Event, not Thread.join: a join interrupted by a signal may mark a running thread stopped.)
    thread = threading.Thread(target=run, name="bpjax-checkpoint-save")
    interrupt = None
    try:
        thread.start()
    except KeyboardInterrupt as e:  # not started (nothing written), or started: waited for
        interrupt = e
        if not thread.ident:
            raise
    while not done.is_set():
        try:
            done.wait()
        except KeyboardInterrupt as e:
            interrupt = e
    if failure:
        raise failure[0]
    if interrupt is not None:
        raise interrupt


def ignore_reads_left_pending() -> None:
    """Silences what a failed orbax restore leaves behind once its first read has failed.

    orbax runs a restore in an event loop of its own, which it closes as soon as the first read
    fails; tensorstore then completes the reads still pending by scheduling their callbacks on
    that closed loop, which raises ``RuntimeError('Event loop is closed')`` in tensorstore's
    threads, reported by ``sys.unraisablehook`` ("Exception ignored in: None") some time later:
    noise after the one clear error. Only that report is dropped; every other goes on to the
    hook that was there before. Installed (once) before the first restore: the pending reads
    can meet the closed loop while orbax's exception is still propagating, before any
    ``except`` clause runs.
    """
    previous = sys.unraisablehook
    if getattr(previous, "_bpjax_closed_loop", False):
        return

    def hook(unraisable: Any) -> None:
        error = unraisable.exc_value
        closed_loop = isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
        if not (closed_loop and unraisable.object is None):
            previous(unraisable)

    hook._bpjax_closed_loop = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook
