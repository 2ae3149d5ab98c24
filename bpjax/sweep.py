"""Sweep summaries: a Hydra callback that tabulates a multirun's jobs by their objective.

Each job of ``experiments/train.py`` writes ``metrics.json`` (with ``objective``,
``objective_name`` and its ``overrides``) into its own directory. At the end of a multirun,
``SweepSummary`` reads them all, sorts by the objective (best first; lower is better for losses
and RMSE, higher otherwise) and writes ``summary.csv`` and ``summary.md`` into the sweep
directory, and prints the table. A job without a finite objective (``null`` in strict JSON: a
diverged or invalid job; older records may hold a bare ``NaN``) ranks last; an empty cell is a
value the job doesn't have. ``loss_exploded`` is the epoch at which a job's loss exploded
(``bpjax.reporting.EXPLODED``), if it did.
"""

import csv
import io
import json
import math
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from bpjax._atomic import atomic_write_text

__all__ = ["SweepSummary", "collect", "format_table", "write_summary"]

_COLUMNS = (
    "objective",
    "test_accuracy",
    "test_loss",
    "best_val_loss",
    "epochs",
    "wall_seconds",
    "status",
    "loss_exploded",
)


def _cell(row: dict[str, Any], column: str) -> Any:
    value = row.get(column)
    if column == "loss_exploded":
        return value.get("epoch", "") if isinstance(value, dict) else ""
    return "" if value is None else value


def _lower_is_better(name: str) -> bool:
    return name.endswith(("loss", "rmse"))


def _objective_name(rows: Sequence[dict[str, Any]]) -> str:
    """The sweep's objective: the first job that names it (an invalid job may not)."""
    return next((row["objective_name"] for row in rows if row.get("objective_name")), "")


def collect(sweep_dir: str | pathlib.Path) -> list[dict[str, Any]]:
    """Reads every ``*/metrics.json`` under ``sweep_dir``, best objective first (a job
    without a finite objective last)."""
    rows = []
    for path in sorted(pathlib.Path(sweep_dir).glob("*/metrics.json")):
        record = json.loads(path.read_text())
        record["job_dir"] = path.parent.name
        rows.append(record)
    if not rows:
        return rows
    sign = 1.0 if _lower_is_better(_objective_name(rows)) else -1.0

    def key(row):
        value = row.get("objective")
        if not isinstance(value, int | float) or not math.isfinite(value):
            return (1, 0.0)
        return (0, sign * value)

    return sorted(rows, key=key)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table: one line per job, best first."""
    if not rows:
        return "(no finished jobs)"
    name = _objective_name(rows) or "objective"
    header = ["rank", "job", "overrides", *(name if c == "objective" else c for c in _COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for rank, row in enumerate(rows, 1):
        cells = [str(rank), row["job_dir"], " ".join(row.get("overrides", []))]
        for column in _COLUMNS:
            value = _cell(row, column)
            cells.append(f"{value:.4g}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_summary(sweep_dir: str | pathlib.Path) -> str:
    """Writes ``summary.csv`` and ``summary.md`` into ``sweep_dir`` (atomically: a sweep
    killed while writing keeps the previous summary); returns the table."""
    sweep_dir = pathlib.Path(sweep_dir)
    rows = collect(sweep_dir)
    table = format_table(rows)
    atomic_write_text(sweep_dir / "summary.md", table + "\n")
    with io.StringIO(newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["rank", "job", "overrides", "objective_name", *_COLUMNS])
        for rank, row in enumerate(rows, 1):
            writer.writerow(
                [
                    rank,
                    row["job_dir"],
                    " ".join(row.get("overrides", [])),
                    _objective_name(rows),
                ]
                + [_cell(row, c) for c in _COLUMNS]
            )
        atomic_write_text(sweep_dir / "summary.csv", f.getvalue())
    return table


class SweepSummary(Callback):
    """Hydra callback: after a multirun, a summary table of its jobs sorted by objective."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = pathlib.Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        table = write_summary(sweep_dir)
        print(f"\nsweep summary ({sweep_dir / 'summary.md'}):\n{table}", flush=True)
        rows = collect(sweep_dir)
        if rows and all(row.get("status") == "invalid" for row in rows):
            # An error in what the jobs share (a missing path, say): fail as a single run does.
            print("error: every job of the sweep was invalid", file=sys.stderr, flush=True)
            sys.exit(2)
