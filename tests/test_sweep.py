"""Tests of `bpjax.sweep`: a multirun's jobs tabulated best-first by their objective.

Job directories are faked with the ``metrics.json`` that ``experiments/train.py`` writes (the
real multirun is in ``test_experiments.py``).
"""

import csv
import json
import math
import pathlib
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from bpjax import cli, sweep

# What each public name of `bpjax.sweep` is tested by (a new name must be added here).
TESTED = {
    "SweepSummary": "test_sweep_summary_callback",
    "collect": "test_collect_*",
    "format_table": "test_format_table",
    "pickle_by_value": "test_pickle_by_value_reaches_a_fresh_interpreter",
    "write_summary": "test_write_summary",
}


def test_tested_covers_public_names():
    assert set(TESTED) == set(sweep.__all__)


def _job(sweep_dir: pathlib.Path, name: str, objective: float, objective_name: str, **extra):
    job = sweep_dir / name
    job.mkdir(parents=True)
    record = {
        "objective": objective,
        "objective_name": objective_name,
        "overrides": [f"optimizer.learning_rate={name}"],
        "status": "completed" if math.isfinite(objective) else "diverged",
        **extra,
    }
    # strict JSON, as train.py writes it: a non-finite objective is null
    (job / "metrics.json").write_text(cli.strict_json(record))


def _sweep(tmp_path, objective_name, objectives):
    for name, objective in objectives.items():
        _job(tmp_path, name, objective, objective_name, test_accuracy=0.5, epochs=3)
    return tmp_path


def test_collect_higher_is_better(tmp_path):
    _sweep(tmp_path, "best_val_accuracy", {"0": 0.8, "1": 0.9, "2": math.nan, "3": 0.7})
    rows = sweep.collect(tmp_path)
    assert [row["job_dir"] for row in rows] == ["1", "0", "3", "2"]  # non-finite last


@pytest.mark.parametrize("objective_name", ["best_val_loss", "best_val_rmse"])
def test_collect_lower_is_better(tmp_path, objective_name):
    _sweep(tmp_path, objective_name, {"0": 0.3, "1": math.inf, "2": 0.1})
    assert [row["job_dir"] for row in sweep.collect(tmp_path)] == ["2", "0", "1"]


def test_an_invalid_job_ranks_last_and_the_objective_comes_from_the_others(tmp_path):
    # train.py records a job whose config was invalid without an objective_name: job 0 here.
    job = tmp_path / "0"
    job.mkdir()
    invalid = {"status": "invalid", "objective": None, "overrides": ["lr=-1"]}
    (job / "metrics.json").write_text(json.dumps(invalid))
    _job(tmp_path, "1", 0.3, "best_val_loss")
    _job(tmp_path, "2", 0.1, "best_val_loss")
    assert [row["job_dir"] for row in sweep.collect(tmp_path)] == ["2", "1", "0"]  # lower first
    table = sweep.write_summary(tmp_path)
    last = table.splitlines()[-1].split(" | ")
    assert "best_val_loss" in table.splitlines()[0] and last[3] == "" and last[-2] == "invalid"
    csv_rows = (tmp_path / "summary.csv").read_text().splitlines()[1:]
    assert all(",best_val_loss," in row for row in csv_rows)


def test_collect_reads_records_with_a_bare_nan(tmp_path):
    # Records written before metrics.json was strict JSON still rank (last).
    _sweep(tmp_path, "best_val_loss", {"0": 0.3})
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "metrics.json").write_text('{"objective": NaN, "status": "diverged"}')
    assert [row["job_dir"] for row in sweep.collect(tmp_path)] == ["0", "1"]


def test_loss_exploded_column(tmp_path):
    _sweep(tmp_path, "best_val_accuracy", {"0": 0.8})
    exploded = {"epoch": 3, "train_loss": 8e29, "first_step_loss": 2.3}
    _job(tmp_path, "1", 0.1, "best_val_accuracy", loss_exploded=exploded)
    table = sweep.write_summary(tmp_path).splitlines()
    assert table[0].endswith("| status | loss_exploded |")
    assert table[2].endswith("| completed |  |") and table[3].endswith("| completed | 3 |")
    with open(tmp_path / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["loss_exploded"] for row in rows] == ["", "3"]


def test_collect_ignores_unfinished_jobs(tmp_path):
    _sweep(tmp_path, "best_val_accuracy", {"0": 0.8})
    (tmp_path / "1").mkdir()  # a job that was killed before writing metrics.json
    assert [row["job_dir"] for row in sweep.collect(tmp_path)] == ["0"]
    assert sweep.collect(tmp_path / "1") == []


def test_format_table(tmp_path):
    _sweep(tmp_path, "best_val_accuracy", {"0": 0.8, "1": 0.9})
    lines = sweep.format_table(sweep.collect(tmp_path)).splitlines()
    assert lines[0].startswith("| rank | job | overrides | best_val_accuracy |")
    assert len(lines) == 4 and lines[1].startswith("|---|")
    assert lines[2].startswith("| 1 | 1 | optimizer.learning_rate=1 | 0.9 |")
    assert sweep.format_table([]) == "(no finished jobs)"


def test_write_summary(tmp_path):
    _sweep(tmp_path, "best_val_loss", {"0": 0.3, "1": 0.1, "2": 0.2})
    table = sweep.write_summary(tmp_path)
    assert (tmp_path / "summary.md").read_text() == table + "\n"
    with open(tmp_path / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(row["rank"], row["job"]) for row in rows] == [("1", "1"), ("2", "2"), ("3", "0")]
    assert [float(row["objective"]) for row in rows] == [0.1, 0.2, 0.3]
    assert {row["objective_name"] for row in rows} == {"best_val_loss"}
    assert rows[0]["overrides"] == "optimizer.learning_rate=1"


def test_sweep_summary_callback(tmp_path, capsys):
    _sweep(tmp_path, "best_val_accuracy", {"0": 0.8, "1": 0.9})
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    sweep.SweepSummary().on_multirun_end(config=config)
    assert (tmp_path / "summary.csv").is_file() and (tmp_path / "summary.md").is_file()
    assert "sweep summary" in capsys.readouterr().out
    # a sweep directory that was never created (every job failed early): nothing to do
    missing = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "none")}}})
    sweep.SweepSummary().on_multirun_end(config=missing)
    assert not (tmp_path / "none").exists()


# A fresh interpreter, as submitit's job is, without the package's folder on sys.path.
_UNPICKLE = "import pickle, sys; print(pickle.loads(sys.stdin.buffer.read())(20))"


def test_pickle_by_value_reaches_a_fresh_interpreter(tmp_path, monkeypatch):
    cloudpickle = pytest.importorskip("cloudpickle")
    for package in ("parts_by_reference", "parts_by_value"):  # one of each: both fresh
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("def double(n):\n    return 2 * n\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import parts_by_reference
    import parts_by_value

    sweep.pickle_by_value("parts_by_value")
    try:

        def unpickled(function) -> subprocess.CompletedProcess:
            return subprocess.run(
                [sys.executable, "-c", _UNPICKLE],
                input=cloudpickle.dumps(function),
                capture_output=True,
                cwd=tmp_path.parent,
                check=False,
            )

        assert unpickled(parts_by_value.double).stdout.strip() == b"40"
        by_reference = unpickled(parts_by_reference.double)  # what the launcher did before
        assert b"No module named 'parts_by_reference'" in by_reference.stderr
    finally:
        cloudpickle.unregister_pickle_by_value(parts_by_value)
        for package in ("parts_by_reference", "parts_by_value"):
            sys.modules.pop(package)
    with pytest.raises(ValueError, match="pickle_by_value: not imported: parts_by_value"):
        sweep.pickle_by_value("parts_by_value")
