"""``experiments/reproduce.py``: reruns the results table's rows and writes the table with its
provenance into a results file and the README's marked block (on a tiny digits row here)."""

import importlib.util
import pathlib
import re
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

ROOT = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("reproduce", ROOT / "experiments" / "reproduce.py")
reproduce = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reproduce)

TINY = {
    "name": "tiny",
    "overrides": [
        "dataset=digits",
        "model.features=[16,10]",
        "trainer.epochs=1",
        "logger=none",
        "trainer.grad_check_every=0",
    ],
    "network": "64-16-10",
    "reference": "none",
}


def config(*overrides):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("reproduce", overrides=list(overrides))


def test_the_config_rows_are_the_readmes_table():
    readme = (ROOT / "README.md").read_text()
    for row in config().rows:
        command = " ".join(["python experiments/train.py", *row.overrides])
        assert f"`{command}`" in readme, command


@pytest.mark.slow
def test_reproduce_writes_the_table_and_replaces_the_readme_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n{reproduce.START}\nold table\n{reproduce.END}\nafter\n")
    cfg = config("seeds=[0,1]", f"output={tmp_path / 'results.md'}", f"readme={readme}")
    cfg.rows = [TINY]
    text = reproduce.reproduce(cfg, tmp_path / "runs")
    assert (tmp_path / "runs" / "tiny" / "seed1" / "metrics.json").exists()
    lines = text.splitlines()
    header, row = lines[0], lines[-1]
    where = reproduce.provenance()
    for part in (where["commit"], where["jax"], where["cpu_flags"], "Seeds 0, 1"):
        assert part in header
    assert re.search(r"load average reached \d+\.\d", header)  # how busy the machine was
    assert row.startswith("| `python experiments/train.py dataset=digits model.features=[16,10]")
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "64-16-10" and cells[-1] == "none"
    first = float(cells[2].rstrip("%"))
    assert 10 < first <= 100 and "n=2" in cells[3] and cells[4].endswith(" s")
    written = readme.read_text()
    assert written.startswith("# title\n\nbefore\n") and written.endswith("\nafter\n")
    assert "old table" not in written and text in written
    assert (tmp_path / "results.md").read_text() == "# Results\n\n" + text


def test_replace_block_needs_both_markers():
    assert reproduce.replace_block(f"a{reproduce.START}x{reproduce.END}b", "T\n") == (
        f"a{reproduce.START}\nT\n{reproduce.END}b"
    )
    with pytest.raises(ValueError, match="no <!-- results:start -->"):
        reproduce.replace_block("no markers", "T")


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("only=[nope]", r"unknown rows \['nope'\]; valid: nielsen_ch1, default"),
        ("seeds=[]", "seeds"),
    ],
)
def test_bad_rows_or_seeds_are_one_error_line(override, match, tmp_path):
    done = subprocess.run(
        [sys.executable, "experiments/reproduce.py", override, f"hydra.run.dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(match, errors[0]), done.stderr
