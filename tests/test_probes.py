"""The measuring scripts beside the benchmark: experiments/scale_processes.py (issue 13's
examples/s at 1, 2, 4 processes) and experiments/readme_step_probe.py (issue 10 #18)."""

import importlib.util
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


scale_processes = _load("scale_processes")
readme_step_probe = _load("readme_step_probe")


def test_scale_processes_runs_a_job_and_writes_its_row(tmp_path, capsys):
    code = scale_processes.main(
        [
            "--processes",
            "1",
            "--out",
            str(tmp_path),
            "--",
            "dataset=digits",
            "model.features=[16,10]",
            "trainer.epochs=1",
            "trainer.batch_size=32",
            # 35 steps in chunks of 7: examples/s is timed over the four chunks after the first
            # (which compiles); an epoch in one chunk has none ("not timed")
            "trainer.chunk_steps=7",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    row = next(line for line in out.splitlines() if line.startswith("| 1 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[1]) > 0 and 0.1 < float(cells[2]) <= 1.0  # examples/s, test accuracy
    assert (tmp_path / "processes-1" / "metrics.json").exists()


def test_scale_processes_refuses_a_non_positive_count(capsys):
    with pytest.raises(SystemExit) as e:
        scale_processes.main(["--processes", "0"])
    assert e.value.code == 2
    assert "--processes must be positive" in capsys.readouterr().err


def test_a_failed_job_is_a_failed_row(tmp_path, capsys):
    code = scale_processes.main(
        ["--processes", "1", "--out", str(tmp_path), "--", "dataset=no_such_dataset"]
    )
    captured = capsys.readouterr()
    assert code == 1
    assert "| 1 | failed |" in captured.out
    assert "no_such_dataset" in captured.err


def test_readme_step_probe_times_every_variant_and_writes_the_two_hlo(
    tmp_path, capsys, monkeypatch
):
    argv = ["probe", "--widths", "8", "4", "--batch", "4", "--rounds", "2", "--calls", "2"]
    monkeypatch.setattr(sys, "argv", [*argv, "--hlo", str(tmp_path)])
    readme_step_probe.main()
    out = capsys.readouterr().out
    for name in ("readme manual", "readme autodiff", "readme manual + counter", "make_step manual"):
        assert f"  {name} " in out
    hlo = {p.name: p.read_text() for p in tmp_path.iterdir()}
    assert set(hlo) == {"readme_manual.hlo", "readme_manual_with_counter.hlo"}
    # the counter is one more parameter of the entry computation

    def entry_parameters(text: str) -> int:
        return text[text.index("\nENTRY") :].count("parameter(")

    with_counter = entry_parameters(hlo["readme_manual_with_counter.hlo"])
    assert with_counter == entry_parameters(hlo["readme_manual.hlo"]) + 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rounds", "0"], "--rounds must be at least 1"),
        (["--calls", "0"], "--calls must be at least 1"),
        (["--batch", "0"], "--batch must be at least 1"),
        (["--activation", "foo"], "unknown --activation 'foo'; valid: "),
    ],
)
def test_readme_step_probe_refuses_bad_arguments(monkeypatch, capsys, argv, message):
    monkeypatch.setattr(sys, "argv", ["probe", *argv])
    with pytest.raises(SystemExit) as e:
        readme_step_probe.main()
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_scale_processes_timeout_is_a_failed_row_not_a_traceback(tmp_path, capsys):
    code = scale_processes.main(
        ["--processes", "1", "--timeout", "0.5", "--out", str(tmp_path), "--", "dataset=digits"]
    )
    captured = capsys.readouterr()
    assert code == 1
    assert "| 1 | failed |" in captured.out
    assert "ran past --timeout 0.5 s" in captured.err
