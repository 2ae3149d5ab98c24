"""TensorBoard logging through tensorboardX, and a no-op logger with the same interface.

Convention: a logger writes one TensorBoard *run*: every event file lives directly in its
``logdir``, including the HParams record (tensorboardX's ``SummaryWriter.add_hparams`` and
``add_scalars`` would create subdirectories, which TensorBoard shows as extra runs, so they are
not used). The HParams record is the run's session only, never an experiment summary, so that
TensorBoard shows the union of the hyperparameters of all the runs it reads (``hparams``).
Values may be Python, numpy or jax scalars; steps are integers. Which tags exist is up to the
caller.

Whatever the values (a diverging run's NaN, inf or 1e25 weights), logging never raises and
prints nothing: a non-finite scalar is written as it is (TensorBoard shows NaN and inf), and a
histogram bins every finite value and counts the others (``TensorBoardLogger.histogram``).
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Protocol, Self

import jax
import numpy as np
import tensorboardX
from tensorboardX.proto.summary_pb2 import Summary
from tensorboardX.summary import (
    _clean_tag,  # a tag cleaned as its own summaries clean it
    make_histogram,
)
from tensorboardX.summary import hparams as hparams_summaries

__all__ = ["Logger", "NullLogger", "TensorBoardLogger", "flatten_hparams"]


class Logger(Protocol):
    """What training code may call on a logger."""

    def scalar(self, tag: str, value: Any, step: int) -> None: ...
    def scalars(self, mapping: Mapping[str, Any], step: int) -> None: ...
    def histogram(self, tag: str, values: Any, step: int) -> None: ...
    def text(self, tag: str, text: str, step: int) -> None: ...
    def hparams(
        self, hparams: Mapping[str, Any], metrics: Mapping[str, Any], *, step: int | None = None
    ) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


def _hparam_value(value: Any) -> bool | int | float | str:
    """Converts a value to one of the types TensorBoard's HParams plugin accepts."""
    if isinstance(value, np.generic | np.ndarray | jax.Array):
        arr = np.asarray(value)
        value = arr.item() if arr.ndim == 0 else arr.tolist()
    if isinstance(value, bool | int | float | str):
        return value
    return str(value)  # None -> "None", lists -> "[1, 2]", ...


def flatten_hparams(hparams: Mapping[str, Any], *, sep: str = ".") -> dict[str, Any]:
    """Flattens nested mappings to ``{"a.b.c": value}`` with TensorBoard-compatible values.

    Args:
        hparams: possibly nested mapping, e.g. ``OmegaConf.to_container(cfg, resolve=True)``.
        sep: separator joining nested keys.

    Returns:
        A flat dict whose values are bool, int, float or str (numpy/jax scalars are unwrapped;
        anything else, including None and lists, becomes its ``str``).
    """
    flat: dict[str, Any] = {}

    def visit(prefix: str, node: Any) -> None:
        if isinstance(node, Mapping):
            for key, child in node.items():
                visit(f"{prefix}{sep}{key}" if prefix else str(key), child)
        else:
            flat[prefix] = _hparam_value(node)

    visit("", hparams)
    return flat


def _float(value: Any) -> float:
    return float(np.asarray(value))


# Equal-width bins of a histogram whose values lie outside TensorBoard's default bins.
_WIDE_BINS = 30


def _bin_edges(x: np.ndarray, default: Any) -> Any:
    """Bin edges covering every value of ``x`` (finite, not empty): ``default`` (TensorBoard's
    bins, fine from 1e-12 to 1e20 in magnitude) if they hold every value, else ``_WIDE_BINS``
    equal-width bins from the smallest value to the largest."""
    lo, hi = float(x.min()), float(x.max())
    if default is not None and len(default) and default[0] <= lo and hi <= default[-1]:
        return default
    if lo == hi:  # one bin: the value and its neighbour towards 0 (finite)
        other = float(np.nextafter(lo, 0.0) if lo else np.nextafter(0.0, 1.0))
        return [min(lo, other), max(lo, other)]
    scale = max(abs(lo), abs(hi))  # scaled first: hi - lo may overflow (-1e308 .. 1e308)
    edges = np.linspace(lo / scale, hi / scale, _WIDE_BINS + 1) * scale
    edges[0], edges[-1] = lo, hi
    return np.clip(edges, lo, hi)  # rounding may not leave them increasing


class TensorBoardLogger:
    """Writes scalars, histograms, text and HParams of one run to a TensorBoard ``logdir``.

    Usable as a context manager, which closes (and so flushes) the writer on exit. The event
    file (and ``logdir``) is created by the first thing logged: a run that fails before it
    logs anything leaves no file behind, in its own directory or in one it was refused.

    Args:
        logdir: directory of the run's event files; created if missing, when first written.
        flush_secs: how often pending events are written to disk, in seconds.
    """

    def __init__(self, logdir: str | os.PathLike, *, flush_secs: int = 10) -> None:
        self.logdir = pathlib.Path(logdir)
        self._flush_secs = flush_secs
        self._writer_or_none: tensorboardX.SummaryWriter | None = None
        self._last_step = 0
        self._closed = False
        self._nonfinite_tags: set[str] = set()  # histograms that have had non-finite values

    @property
    def _writer(self) -> tensorboardX.SummaryWriter:
        if self._writer_or_none is None:
            self.logdir.mkdir(parents=True, exist_ok=True)
            self._writer_or_none = tensorboardX.SummaryWriter(
                logdir=str(self.logdir), flush_secs=self._flush_secs
            )
        return self._writer_or_none

    def _seen(self, step: int) -> int:
        self._check_open()
        step = int(step)
        self._last_step = max(self._last_step, step)
        return step

    def _add(self, value: Summary.Value, step: int) -> None:
        self._writer._get_file_writer().add_summary(Summary(value=[value]), step)

    def scalar(self, tag: str, value: Any, step: int) -> None:
        """Logs one scalar (Python, numpy or jax; a jax value is copied to the host).

        NaN and +-inf are written as they are, silently (tensorboardX's ``add_scalar`` would
        print a warning for each).
        """
        value, step = _float(value), self._seen(step)
        self._add(Summary.Value(tag=_clean_tag(tag), simple_value=value), step)

    def scalars(self, mapping: Mapping[str, Any], step: int) -> None:
        """Logs each ``tag: value`` of ``mapping`` as its own scalar, all at ``step``."""
        for tag, value in mapping.items():
            self.scalar(tag, value, step)

    def histogram(self, tag: str, values: Any, step: int) -> None:
        """Logs a histogram of ``values`` (any shape; flattened), of every finite value.

        Bins: TensorBoard's default ones (finer near 0, from 1e-12 to 1e20 in magnitude) if
        they hold every value, else 30 equal-width bins from the smallest value to the largest
        (a diverging run's weights, e.g. 1e25), so that no finite value is left out. The sum
        and sum of squares of huge values may be inf.

        Non-finite values (NaN, +-inf) cannot be binned: they are left out of the histogram
        and counted in the scalar ``<tag>/nonfinite`` (how many of ``values`` are NaN or inf),
        at ``step``. That scalar is written from the first histogram of ``tag`` with a
        non-finite value on, at each histogram of ``tag`` (0 once they are all finite again):
        a run whose values stay finite has none, and one whose weights became NaN shows when,
        and how many. If no value is finite, only that scalar is written; if ``values`` is
        empty, nothing is.
        """
        step = self._seen(step)
        x = np.asarray(values, dtype=np.float64).ravel()
        finite = np.isfinite(x)
        nonfinite = int(x.size - np.count_nonzero(finite))
        if nonfinite:
            self._nonfinite_tags.add(tag)
        if tag in self._nonfinite_tags and x.size:
            self.scalar(f"{tag}/nonfinite", nonfinite, step)
        x = x[finite]
        if x.size == 0:
            return
        bins = _bin_edges(x, getattr(self._writer, "default_bins", None))
        with np.errstate(over="ignore"):  # the sum (of squares) of huge values: inf
            histo = make_histogram(x, bins)
        self._add(Summary.Value(tag=_clean_tag(tag), histo=histo), step)

    def text(self, tag: str, text: str, step: int) -> None:
        """Logs a (Markdown) text."""
        self._writer.add_text(tag, text, self._seen(step))

    def hparams(
        self, hparams: Mapping[str, Any], metrics: Mapping[str, Any], *, step: int | None = None
    ) -> None:
        """Writes this run's hyperparameters for the HParams tab, and its final metrics.

        Only the run's session (its hyperparameters' values, start and end) is written, no
        *experiment summary*: TensorBoard takes the experiment (the tab's columns) from the
        first experiment summary it finds in any run, so runs that declared their own would
        show only one run's hyperparameters (``-m optimizer=sgd,adam``: adam's b1, b2, eps
        missing). Without one, TensorBoard builds the experiment from every run's session: the
        columns are the union of all runs' hyperparameters (a run without one shows a blank),
        and the metric columns are the runs' scalar tags.

        Args:
            hparams: possibly nested mapping, flattened by ``flatten_hparams``.
            metrics: ``{tag: final value}``, each logged as a scalar of this run (the HParams
                tab shows a metric's latest scalar). A tag may be one already logged by
                ``scalar`` (that curve then ends with this value), or a new one.
            step: step of the metric scalars; defaults to the largest step logged so far.
        """
        self._check_open()
        flat = flatten_hparams(hparams)
        final = {str(tag): _float(value) for tag, value in metrics.items()}
        _, session_start, session_end = hparams_summaries(flat, final)
        # The same writer's event file: add_hparams would open a new one in a subdirectory.
        file_writer = self._writer._get_file_writer()
        for summary in (session_start, session_end):
            file_writer.add_summary(summary)
        metric_step = self._last_step if step is None else self._seen(step)
        for tag, value in final.items():
            self.scalar(tag, value, metric_step)

    def flush(self) -> None:
        """Writes every event logged so far to disk."""
        self._check_open()
        if self._writer_or_none is None:  # nothing logged yet
            return
        event_writer = getattr(self._writer._get_file_writer(), "event_writer", None)
        worker = getattr(event_writer, "_worker", None)
        if hasattr(worker, "stop") and all(
            hasattr(event_writer, name) for name in ("_event_queue", "_ev_writer", "_flush_secs")
        ):
            # tensorboardX's flush() only flushes what its writer thread has already taken off
            # the queue. Stopping the thread (it exits after every event queued before the stop
            # signal) and starting a fresh one drains the queue.
            worker.stop()
            event_writer._worker = type(worker)(
                event_writer._event_queue, event_writer._ev_writer, event_writer._flush_secs
            )
            event_writer._worker.start()
        self._writer.flush()

    def close(self) -> None:
        """Writes pending events and closes the event file; later calls (but ``close``) raise."""
        if not self._closed:
            if self._writer_or_none is not None:  # nothing logged: no file to close
                self._writer_or_none.close()
            self._closed = True

    def _check_open(self) -> None:
        # A closed tensorboardX writer silently reopens a new event file; refuse instead.
        if self._closed:
            raise ValueError(f"TensorBoardLogger({str(self.logdir)!r}) is closed")

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class NullLogger:
    """A logger that accepts every call and does nothing (logging disabled, tests)."""

    def scalar(self, tag: str, value: Any, step: int) -> None:
        del tag, value, step  # unused: logging is disabled

    def scalars(self, mapping: Mapping[str, Any], step: int) -> None:
        del mapping, step  # unused: logging is disabled

    def histogram(self, tag: str, values: Any, step: int) -> None:
        del tag, values, step  # unused: logging is disabled

    def text(self, tag: str, text: str, step: int) -> None:
        del tag, text, step  # unused: logging is disabled

    def hparams(
        self, hparams: Mapping[str, Any], metrics: Mapping[str, Any], *, step: int | None = None
    ) -> None:
        del hparams, metrics, step  # unused: logging is disabled

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        del exc_type, exc, traceback  # unused: nothing to close
