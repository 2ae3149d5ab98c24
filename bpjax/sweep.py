"""Sweep summaries: a Hydra callback that tabulates a multirun's jobs by their objective.

Each job of ``experiments/train.py`` writes ``metrics.json`` (with ``objective``,
``objective_name`` and its ``overrides``) into its own directory. At the end of a multirun,
``SweepSummary`` reads them all, sorts by the objective (best first; lower is better for losses
and RMSE, higher otherwise) and writes ``summary.csv`` and ``summary.md`` into the sweep
directory, and prints the table. A job without a finite objective (``null`` in strict JSON: a
diverged or invalid job; older records may hold a bare ``NaN``) ranks last; an empty cell is a
value the job doesn't have. ``reason`` is why a job did not complete (an invalid job's
``error:`` line, a diverged job's message), on one line. ``loss_exploded`` is the epoch at which a
job's loss exploded (``bpjax.reporting.EXPLODED``), if it did. Overrides are shown as typed on the
command line (``1e30``, not Hydra's ``1e+30``: the sweep's ``multirun.yaml`` holds them as typed),
where each job's value can be told from them; otherwise as Hydra gave them to the job.
"""

import csv
import io
import json
import math
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, Override
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from bpjax._atomic import atomic_write_text

__all__ = ["SweepSummary", "collect", "format_table", "pickle_by_value", "write_summary"]

_COLUMNS = (
    "objective",
    "test_accuracy",
    "test_loss",
    "best_val_loss",
    "epochs",
    "wall_seconds",
    "reason",
    "status",
    "loss_exploded",
)


def _cell(row: dict[str, Any], column: str) -> Any:
    value = row.get(column)
    if column == "loss_exploded":
        return value.get("epoch", "") if isinstance(value, dict) else ""
    if column == "reason":  # why a job did not complete: its message's first line
        message = row.get("message")
        if row.get("status") == "completed" or not isinstance(message, str):
            return ""
        return next((line.strip() for line in message.splitlines() if line.strip()), "")
    return "" if value is None else value


def _md(text: str) -> str:
    """``text`` in a Markdown table's cell: a ``|`` would end the cell."""
    return text.replace("|", "\\|")


def _typed_overrides(sweep_dir: pathlib.Path) -> list[str]:
    """The sweep's overrides as typed on the command line (Hydra's ``multirun.yaml``), or none."""
    try:
        typed = OmegaConf.select(
            OmegaConf.load(sweep_dir / "multirun.yaml"), "hydra.overrides.task"
        )
    except (OSError, yaml.YAMLError, OmegaConfBaseException):  # none, or not Hydra's
        return []
    return [str(o) for o in typed] if typed is not None else []


def _split_top_level(text: str) -> list[str]:
    """``text`` split at its commas outside brackets and quotes (a simple sweep's values)."""
    parts, depth, quote, start, i = [], 0, "", 0, 0
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = ""
        elif c in "'\"":
            quote = c
        elif c in "[({":
            depth += 1
        elif c in "])}":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
        i += 1
    return [*parts, text[start:]]


def _value_str(override: Override) -> str | None:
    return None if override.value() is None else override.get_value_element_as_str()


def _as_typed(overrides: Sequence[str], typed: Sequence[str]) -> list[str]:
    """A job's ``overrides`` (Hydra's, reformatted: ``1e+30``) as the user typed them
    (``typed``: the sweep's, ``1e30`` or ``1e30,0.1``); an override whose typed form can't be
    told (a ``range(...)`` sweep, a sampled value) stays as Hydra gave it."""
    parser = OverridesParser.create()
    try:
        by_key = {o.get_key_element(): o for o in parser.parse_overrides(list(typed))}
        job = parser.parse_overrides(list(overrides))
    except HydraException:
        return list(overrides)
    shown = []
    for given, override in zip(overrides, job, strict=True):
        shown.append(_typed_form(parser, override, by_key.get(override.get_key_element())) or given)
    return shown


def _typed_form(parser: OverridesParser, job: Override, typed: Override | None) -> str | None:
    """How ``job`` (one job's override) was typed in ``typed`` (the sweep's), if it can tell."""
    if typed is None:
        return None
    value = _value_str(job)
    if not typed.is_sweep_override():
        return typed.input_line if _value_str(typed) == value else None
    if not isinstance(typed.value(), ChoiceSweep) or not typed.value().simple_form:
        return None
    key = typed.get_key_element()
    for part in _split_top_level(typed.get_value_string()):
        try:
            element = parser.parse_override(f"{key}={part}")
        except HydraException:
            return None
        if not element.is_sweep_override() and _value_str(element) == value:
            return f"{key}={part}"
    return None


def _lower_is_better(name: str) -> bool:
    return name.endswith(("loss", "rmse"))


def _objective_name(rows: Sequence[dict[str, Any]]) -> str:
    """The sweep's objective: the first job that names it (an invalid job may not)."""
    return next((row["objective_name"] for row in rows if row.get("objective_name")), "")


def collect(
    sweep_dir: str | pathlib.Path, *, unfinished: Sequence[dict[str, Any]] = ()
) -> list[dict[str, Any]]:
    """Reads every ``*/metrics.json`` under ``sweep_dir``, best objective first (a job
    without a finite objective last). ``unfinished``: rows of jobs that wrote no record (an
    interrupted job: its ``job_dir``, ``status``, ``message``, ``overrides``), in place of any
    record their directory holds."""
    typed = _typed_overrides(pathlib.Path(sweep_dir))
    rows = [dict(row) for row in unfinished]
    for path in sorted(pathlib.Path(sweep_dir).glob("*/metrics.json")):
        if path.parent.name in {row["job_dir"] for row in unfinished}:
            continue
        record = json.loads(path.read_text())
        record["job_dir"] = path.parent.name
        rows.append(record)
    for row in rows:
        row["overrides"] = _as_typed(row.get("overrides", []), typed)
    rows.sort(key=lambda row: row["job_dir"])  # as the paths sort: ties keep this order
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
        cells = [str(rank), row["job_dir"], _md(" ".join(row.get("overrides", [])))]
        for column in _COLUMNS:
            value = _cell(row, column)
            cells.append(f"{value:.4g}" if isinstance(value, float) else _md(str(value)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_summary(
    sweep_dir: str | pathlib.Path, *, unfinished: Sequence[dict[str, Any]] = ()
) -> str:
    """Writes ``summary.csv`` and ``summary.md`` into ``sweep_dir`` (atomically: a sweep
    killed while writing keeps the previous summary); returns the table. ``unfinished``: as
    ``collect``'s (an interrupted sweep's job)."""
    sweep_dir = pathlib.Path(sweep_dir)
    rows = collect(sweep_dir, unfinished=unfinished)
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


def pickle_by_value(*module_names: str) -> None:
    """Has cloudpickle pickle the named modules by value, as it pickles an entry script's
    ``main`` (``__main__``'s): a Hydra launcher that unpickles each job in a fresh interpreter
    (submitit's) can then run a script whose parts live in a package beside it
    (``experiments/training/``), whose folder is not on that interpreter's ``sys.path``.
    (joblib's workers share the launching process's ``sys.path`` and pickle with a cloudpickle
    of joblib's own: they import the modules.) Without cloudpickle installed there is no
    launcher that needs it, and nothing to do.

    Args:
        module_names: modules already imported (``sys.modules``' names), e.g. ``"training"``.

    Raises:
        ValueError: a module that is not imported.
    """
    missing = [name for name in module_names if name not in sys.modules]
    if missing:
        raise ValueError(f"pickle_by_value: not imported: {', '.join(missing)}")
    try:
        import cloudpickle
    except ImportError:  # without it, no launcher that would need it
        return
    for name in module_names:
        cloudpickle.register_pickle_by_value(sys.modules[name])
