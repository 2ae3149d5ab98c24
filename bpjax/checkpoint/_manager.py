"""``CheckpointManager``: the checkpoints of one run in one directory, through orbax's own
``CheckpointManager`` (which writes, coordinates processes and deletes what bpjax's policy
drops)."""

from __future__ import annotations

import math
import pathlib
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax
import numpy as np

from bpjax.checkpoint import _format, _orbax
from bpjax.checkpoint._records import PathLike, UnreadableCheckpoint, absolute


class DamagedCheckpointWarning(UserWarning):
    """``CheckpointManager.restore_latest`` passed over an unreadable checkpoint (renamed aside
    to ``<name>.damaged``) to restore an older one."""


class _KeepLastAndBest:
    """orbax preservation policy: the last ``keep`` steps, plus the step ``best_of`` picks."""

    def __init__(self, keep: int, best_of: Any):
        self.keep, self.best_of = keep, best_of

    def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> list[bool]:
        del context  # unused: the policy needs only the steps
        steps = [info.step for info in checkpoints]
        kept = set(sorted(steps)[-self.keep :])
        best = self.best_of(steps)
        if best is not None:
            kept.add(best)
        return [step in kept for step in steps]


class CheckpointManager:
    """Keeps the last ``keep`` checkpoints of a run in one directory, plus the best one.

    Checkpoints are directories ``ckpt_{step:06d}`` written by orbax's ``CheckpointManager``
    (synchronously: when ``save`` returns, the checkpoint is complete on disk), each with the
    metadata ``{"step": int, "metrics": {...}, "config": {...}}``, and ``"run": {...}`` if
    given. The best checkpoint is the one with the smallest (``mode="min"``) or largest
    (``mode="max"``) finite ``metrics[metric]``, the earliest on ties; it is never deleted while
    it is best, and is found again from the checkpoints' metadata when a new manager opens the
    directory. A checkpoint whose metadata cannot be read is never ranked best. Nothing else is
    deleted: files of the former ``.npz`` format (``ckpt_{step:06d}.npz``) are listed and
    restored like the others, but never deleted; foreign files are left alone.

    One job writes to a directory at a time. In a job of several processes (after
    ``jax.distributed.initialize``), every process creates its manager on the same directory,
    which all of them must see (a shared filesystem), and calls ``save`` and ``restore_*`` at the
    same points with the same arguments: orbax then writes each process's shards of sharded
    arrays from that process, process 0 writes the metadata, renames and deletes, and barriers
    keep the others in step. Restoring needs a template whose jax arrays carry the global
    shardings the state should have.

    Args:
        directory: where checkpoints live; created by the first ``save`` (opening a manager
            to look, e.g. ``all_steps()`` or ``latest()``, creates nothing). ``~`` is expanded
            and a relative path is made absolute against the current directory, once, here
            (``self.directory`` is absolute).
        keep: how many of the most recent checkpoints to keep (>= 1).
        metric: key of ``metrics`` that ranks checkpoints, or None to keep only the recent ones.
        mode: ``"min"`` if lower ``metric`` is better, ``"max"`` if higher is better.

    Raises:
        ValueError: ``keep`` < 1 or an unknown ``mode``.
    """

    _LEGACY = re.compile(r"ckpt_(\d+)\.npz")

    def __init__(
        self,
        directory: PathLike,
        *,
        keep: int = 3,
        metric: str | None = None,
        mode: Literal["min", "max"] = "min",
    ) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.directory = absolute(directory)
        self.keep = keep
        self.metric = metric
        self.mode = mode

    def path_for(self, step: int) -> pathlib.Path:
        """The checkpoint directory ``save`` writes for ``step``."""
        return self.directory / f"ckpt_{step:06d}"

    def _name_format(self) -> Any:
        return _orbax.ocp().step.standard_name_format(
            step_prefix="ckpt", step_format_fixed_length=6
        )

    def _paths(self) -> dict[int, pathlib.Path]:
        """{step: path} of the checkpoints present: orbax's finished steps (an interrupted
        save's ``*.orbax-checkpoint-tmp-*`` is none), then the former format's files."""
        if not self.directory.is_dir():
            return {}
        paths = {}
        for entry in self.directory.iterdir():
            match = self._LEGACY.fullmatch(entry.name)
            if match and entry.is_file():
                paths[int(match.group(1))] = entry
        for found in self._name_format().find_all(self.directory):
            paths[found.step] = pathlib.Path(str(found.path))  # a directory shadows a .npz
        return dict(sorted(paths.items()))

    def all_steps(self) -> list[int]:
        """Steps (or epochs) of the checkpoints present, ascending."""
        return list(self._paths())

    def latest(self) -> pathlib.Path | None:
        """Path of the checkpoint with the highest step, or None if there is none."""
        paths = self._paths()
        return paths[max(paths)] if paths else None

    def best(self) -> pathlib.Path | None:
        """Path of the best checkpoint by ``metric``, or None (no metric, or no finite value)."""
        paths = self._paths()
        step = self._best_step(list(paths), paths)
        return None if step is None else paths[step]

    def _best_step(self, steps: Sequence[int], paths: Mapping[int, pathlib.Path]) -> int | None:
        if self.metric is None:
            return None
        best_step, best_value = None, math.nan
        for step in sorted(steps):
            try:
                metadata = _format.load_metadata(paths.get(step, self.path_for(step)))
            except (OSError, ValueError):
                continue
            value = (metadata.get("metrics") or {}).get(self.metric)
            if not isinstance(value, int | float) or not math.isfinite(value):
                continue
            better = value < best_value if self.mode == "min" else value > best_value
            if best_step is None or better:
                best_step, best_value = step, value
        return best_step

    def _orbax_manager(self) -> Any:
        ocp = _orbax.ocp()
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=False,  # a returned save is on disk
            step_name_format=self._name_format(),
            preservation_policy=_KeepLastAndBest(
                self.keep, lambda steps: self._best_step(steps, {})
            ),
            lightweight_initialize=True,  # bpjax ranks by its own metadata, not orbax's
            cleanup_tmp_directories=True,  # what an interrupted save left
            save_root_metadata=False,
            create=True,
        )
        return ocp.CheckpointManager(
            self.directory, options=options, item_handlers=_orbax.item_handlers()
        )

    def save(
        self,
        tree: Any,
        *,
        step_or_epoch: int,
        metrics: Mapping[str, Any] | None = None,
        config: Mapping[str, Any] | None = None,
        run: Mapping[str, Any] | None = None,
    ) -> pathlib.Path:
        """Atomically writes a checkpoint, then deletes those no longer kept.

        Args:
            tree: the pytree to save (e.g. a ``TrainState``).
            step_or_epoch: number identifying the checkpoint; a checkpoint with the same
                number is replaced (renamed aside, the new one written, then the old one
                deleted; a failed save puts it back). A KeyboardInterrupt during the save is
                raised once the save is complete.
            metrics: scalars to store (numpy/jax scalars become Python floats); ``metric``
                is looked up here.
            config: the run's configuration, e.g. ``OmegaConf.to_container(cfg, resolve=True)``.
            run: what identifies the run, for a resume to check that it continues the same one
                (``fit`` stores its seed, batch size, monitor, loss and dataset); stored as
                ``metadata["run"]`` when given.

        Returns:
            The path of the new checkpoint.

        Raises:
            ValueError: a negative ``step_or_epoch`` (nothing is written).
            TypeError: metadata without a JSON form, or a non-numeric leaf (nothing is written).
        """
        step = int(step_or_epoch)
        if step < 0:
            raise ValueError(f"step_or_epoch must be >= 0, got {step}")
        metadata = {
            "step": step,
            "metrics": {str(k): _scalar(v) for k, v in (metrics or {}).items()},
            "config": dict(config or {}),
        }
        if run is not None:
            metadata["run"] = dict(run)
        args = _format.save_args(tree, metadata)
        path = self.path_for(step)

        def write() -> None:
            manager = self._orbax_manager()
            try:
                manager.save(step, args=args, force=True)  # force: any step, not only a later one
            finally:
                manager.close()

        _orbax.replace(path, self._paths().get(step), write)
        return path

    def restore_latest(self, like: Any) -> tuple[Any, dict[str, Any]]:
        """``restore`` of the newest checkpoint that can be read.

        A newer checkpoint that cannot be read (damaged files: a copy cut short, a disk that
        lost the last write) is never skipped silently: it is renamed aside to
        ``<name>.damaged``, kept for inspection, with a ``DamagedCheckpointWarning`` naming it
        and the checkpoint restored instead.

        Raises:
            FileNotFoundError: there is no checkpoint.
            UnreadableCheckpoint: no checkpoint can be read; the message lists each and why,
                and nothing is renamed or deleted.
            ValueError: the newest readable checkpoint does not fit ``like`` (see ``restore``).
        """
        paths = self._paths()
        if not paths:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        damaged: list[UnreadableCheckpoint] = []
        for step in sorted(paths, reverse=True):
            try:
                restored = _format.restore(paths[step], like)
            except UnreadableCheckpoint as e:
                damaged.append(e)
                continue
            for error in damaged:
                aside = _orbax.set_aside(error.path, "damaged")
                warnings.warn(
                    f"{error}; renamed to {aside.name} (kept), resuming from {paths[step].name}",
                    DamagedCheckpointWarning,
                    stacklevel=2,
                )
            return restored
        reasons = "; ".join(str(e) for e in damaged)
        raise UnreadableCheckpoint(
            self.directory,
            "",
            message=(
                f"{self.directory}: none of its {len(damaged)} checkpoints can be read "
                f"({reasons}); nothing was renamed or deleted: move them out of "
                f"{self.directory} to start afresh"
            ),
        )

    def restore_best(self, like: Any) -> tuple[Any, dict[str, Any]]:
        """``restore`` of ``best()``, the best checkpoint that can be read.

        As ``restore_latest``: a best checkpoint whose arrays cannot be read is renamed aside to
        ``<name>.damaged`` with a ``DamagedCheckpointWarning`` naming it, and the next best is
        restored.

        Raises:
            FileNotFoundError: there is no best checkpoint (none left readable).
            ValueError: the best readable checkpoint does not fit ``like`` (see ``restore``).
        """
        while (path := self.best()) is not None:
            try:
                return _format.restore(path, like)
            except UnreadableCheckpoint as error:
                aside = _orbax.set_aside(error.path, "damaged")
                warnings.warn(
                    f"{error}; renamed to {aside.name} (kept), using the next best checkpoint",
                    DamagedCheckpointWarning,
                    stacklevel=2,
                )
        raise FileNotFoundError(f"no best checkpoint (metric={self.metric!r}) in {self.directory}")


def _scalar(value: Any) -> Any:
    """A metric as a Python number (floats for numpy/jax scalars); other values pass through."""
    if isinstance(value, bool | int | float):
        return value
    if isinstance(value, np.generic | np.ndarray | jax.Array) and np.ndim(value) == 0:
        arr = np.asarray(value)
        return bool(arr) if arr.dtype == np.bool_ else float(arr)
    return value
