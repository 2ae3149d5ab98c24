"""compare_rules' outputs: the curves a run records (``Curves``, kept in ``curves.json``), the
Markdown table, the CSV and the plot. Re-exported by ``experiments/compare_rules.py``."""

import csv
import io
import json
import math
import pathlib
import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np

from bpjax._atomic import atomic_write, atomic_write_text


class Curves:
    """A ``fit`` callback: the test metric per epoch, and the total angle at each step that
    measured it, at ``step / steps_per_epoch`` (step 0: before the first update).

    With ``path``, the curves are kept in that JSON file, rewritten (atomically) after every
    record and read back by a resumed run, so a comparison continued with
    ``trainer.resume=true`` plots every epoch, not only those run after the resume. Points are
    keyed by epoch and step: a chunk that ran before an interrupt and runs again after the
    resume (from the checkpoint before it) gives the same point once.
    """

    def __init__(self, metric: str, steps_per_epoch: int, path: pathlib.Path | None = None):
        self.metric, self.steps_per_epoch, self.path = metric, steps_per_epoch, path
        self._epochs: dict[int, float] = {}
        self._angles: dict[float, float] = {}  # fractional epoch -> degrees
        if path is not None and path.exists():
            saved = json.loads(path.read_text())
            self._epochs = {int(e): float(v) for e, v in saved["epochs"]}
            self._angles = {float(x): float(v) for x, v in saved["angles"]}

    @property
    def epochs(self) -> list[tuple[int, float]]:
        return sorted(self._epochs.items())

    @property
    def angles(self) -> list[tuple[float, float]]:
        return sorted(self._angles.items())

    def __call__(self, record: dict[str, Any]) -> None:
        step_metrics = record["step_metrics"]
        if f"test_{self.metric}" in record:
            self._epochs[int(record["epoch"])] = float(record[f"test_{self.metric}"])
        angles = np.asarray(step_metrics.get("alignment/total/angle", []))
        first = record["step"] - len(step_metrics["loss"])  # the epoch's first step
        for j in np.flatnonzero(np.isfinite(angles)):
            self._angles[(first + j) / self.steps_per_epoch] = float(angles[j])
        if self.path is not None:
            curves = {"epochs": self.epochs, "angles": self.angles}
            atomic_write_text(self.path, json.dumps(curves, allow_nan=False))


def _layer_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    names = {k for row in rows for k in row if k.startswith("alignment/layer")}
    return sorted(
        (n for n in names if n.endswith("/angle")),
        key=lambda n: int(n.split("/")[1].removeprefix("layer")),
    )


def _summary(values: list[float], digits: int) -> str:
    values = [v for v in values if isinstance(v, int | float) and math.isfinite(v)]
    if not values:
        return "—"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def format_table(rows: Sequence[dict[str, Any]], rules: Sequence[str], metric: str) -> str:
    """The Markdown table: one line per rule, the mean (± sd) over its seeds."""
    layers = _layer_columns(rows)
    header = [
        "rule",
        # not the best of the plot's curve: the test metric of the best epoch's parameters
        f"test {metric} (best epoch)",
        "best epoch",
        "total angle (°)",
        *(f"{n.split('/')[1]} angle (°)" for n in layers),
        # a seed's run may compile its programs and another reuse them: its wall time can't
        # be averaged with theirs (it was 3.8 ± 4.8 s); examples/s leaves compilation out
        "train examples/s (no compilation)",
        "wall time (s, compilation included)",
        "seeds",
        "note",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for rule in rules:
        runs = [r for r in rows if r["rule"] == rule]
        done = [r for r in runs if r["status"] == "completed"]
        notes = sorted(
            {f"{r['status']}: {r['reason']}" for r in runs if r["status"] != "completed"}
        )
        cells = [
            rule,
            _summary([r.get(f"test_{metric}") for r in done], 4),
            ", ".join(str(r["best_epoch"]) for r in done if r.get("best_epoch") is not None) or "—",
            _summary([r.get("alignment/total/angle") for r in done], 2),
            *(_summary([r.get(n) for r in done], 2) for n in layers),
            _summary([r.get("examples_per_second") for r in done], 0) + _resumed_mark(done),
            _summary([r.get("wall_seconds") for r in done], 1) + _resumed_mark(done),
            str(len(done)),
            "; ".join(notes).replace("|", "/").replace("\n", " "),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if any(_resumed_mark([r]) for r in rows if r["status"] == "completed"):
        lines.append(
            "\n† resumed: examples/s and wall time count the part run after the resume only "
            "(comparison.csv's epochs_this_call says how much)."
        )
    return "\n".join(lines)


def _resumed_mark(runs: Sequence[dict[str, Any]]) -> str:
    """`` †`` where a run was resumed (its ``epochs_this_call`` short of its ``epochs``)."""
    resumed = any(
        isinstance(r.get("epochs_this_call"), int | float)
        and isinstance(r.get("epochs"), int | float)
        and r["epochs_this_call"] != r["epochs"]
        for r in runs
    )
    return " †" if resumed else ""


def write_csv(path: pathlib.Path, rows: Sequence[dict[str, Any]], metric: str) -> None:
    fixed = ["rule", "seed", "status", "reason", f"test_{metric}", "best_epoch",
             "alignment/total/angle"]  # fmt: skip
    angles = sorted({k for row in rows for k in row if k.startswith("alignment/")} - set(fixed))
    timing = ["examples_per_second", "wall_seconds", "compilations", "epochs_this_call"]
    columns = [*fixed, *angles, *timing, "run_dir"]
    with io.StringIO(newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(path, f.getvalue())


def _mean_over_seeds(curves: list[list[tuple[float, float]]]) -> tuple[list, list[float]]:
    """Every x any seed's curve has, and the mean of the seeds' values there."""
    xs = sorted({x for curve in curves for x, _ in curve})
    return xs, [statistics.fmean([v for c in curves for x, v in c if x == at]) for at in xs]


def plot(path: pathlib.Path, curves: dict[str, list[Curves]], metric: str, title: str) -> None:
    """Test metric and total alignment angle vs epoch, one line per rule (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for rule, runs in curves.items():
        for axis, curve in (
            (left, [run.epochs for run in runs]),
            (right, [r.angles for r in runs]),
        ):
            xs, means = _mean_over_seeds(curve)
            if xs:
                axis.plot(xs, means, marker="o", markersize=3, label=rule)
    # every epoch's parameters, where the table has the best epoch's: said in the title
    left.set(xlabel="epoch", ylabel=f"test {metric}", title=f"test {metric} after every epoch")
    right.set(
        xlabel="epoch",
        ylabel="angle to the true gradient (°)",
        title="alignment: all parameters",
        ylim=(0, 95),
    )
    for axis in (left, right):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs: no 1.25 ticks
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    figure.suptitle(title)
    figure.tight_layout()
    atomic_write(path, lambda file: figure.savefig(file, dpi=100, format=path.suffix[1:]))
    plt.close(figure)
