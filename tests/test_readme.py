"""The README's Python examples run as written (issue: "the README example runs as written")."""

import pathlib
import re
import sys

import pytest
from conftest import run_as_a_user

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_has_the_examples():
    assert len(BLOCKS) == 3
    assert "check_grads" in BLOCKS[0] and "apply_updates" in BLOCKS[0]
    assert "batch_norm" in BLOCKS[1] and "residual" in BLOCKS[1]
    assert "bpjax.fit" in BLOCKS[2]


def _run(code: str, tmp_path: pathlib.Path, *, optimized: bool = False) -> str:
    # A fresh interpreter, as a reader would run it: conftest's x64 setting must not leak in.
    # Compiled as the suite compiles, except the fit example, which trains long enough to be
    # faster optimized (20 s of CPU, 41 s as the suite compiles; the others: 10 -> 4, 15 -> 5 s).
    return run_as_a_user([sys.executable, "-c", code], tmp_path, optimized=optimized)


def test_ten_line_example(tmp_path):
    assert len([line for line in BLOCKS[0].splitlines() if line.strip()]) <= 12
    out = _run(BLOCKS[0], tmp_path)
    assert "PASSED" in out
    before, after = re.search(r"loss ([\d.]+) -> ([\d.]+)", out).groups()
    assert float(after) < float(before)  # one step of SGD lowered the loss


@pytest.mark.slow
def test_fit_example_reaches_the_stated_accuracy(tmp_path):
    out = _run(BLOCKS[2], tmp_path, optimized=True)
    assert float(out.strip().splitlines()[-1]) > 0.94  # the README states 95.19%


def test_cnn_example(tmp_path):
    out = _run(BLOCKS[1], tmp_path)
    # float32: the check warns (to stderr) and still passes, the bias before batch norm included
    assert "PASSED" in out and "zero to rounding" in out
    loss, mean = re.search(r"loss ([\d.]+), running_mean \[([^\]]*)\]", out).groups()
    assert 0 < float(loss) < 10 and len(mean.split()) == 3
