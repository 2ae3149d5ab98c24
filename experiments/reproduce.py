"""Rerun the README's results table and write it, with where and when it was measured.

    python experiments/reproduce.py                                   # every row, seeds 0, 1, 2
    python experiments/reproduce.py 'only=[default]' 'seeds=[0]' readme=null

Every row of ``conf/reproduce.yaml`` runs as ``python experiments/train.py <overrides>
seed=<seed>`` (a subprocess, exactly the command a user types, in its own run directory), for
each seed. The table quotes seed 0 (the README's command as written) and the spread over the
seeds, and says at which commit, with which jax, on which device and CPU (its vector
extensions: XLA's CPU code differs between AVX2 and AVX-512, and so can the last digits) it was
measured. It is written to ``docs/results.md`` and into the README between
``<!-- results:start -->`` and ``<!-- results:end -->``, so the README's figures always come
from this script. Rerun it whenever a change can move a figure.
"""

import datetime
import json
import math
import os
import pathlib
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from bpjax._atomic import atomic_write_text

ROOT = pathlib.Path(__file__).resolve().parents[1]
START, END = "<!-- results:start -->", "<!-- results:end -->"
# The CPU features that change what XLA's CPU backend generates.
CPU_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "neon")


def provenance() -> dict[str, str]:
    """Commit (and whether the tree had changes), jax/jaxlib versions, device, CPU and its
    vector extensions, and the date: what the table's figures depend on."""
    # Imported here: this process only launches the runs; it computes nothing with jax.
    import jax
    import jaxlib

    def git(*args):
        try:
            out = subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
            )
            return out.stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += " (with uncommitted changes)"
    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    if cpuinfo.exists():
        text = cpuinfo.read_text()
        found = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        model = found.group(1).strip() if found else model
        found = re.search(r"^(?:flags|Features)\s*:\s*(.+)$", text, re.M)
        flags = set(found.group(1).split()) if found else set()
    device = jax.devices()[0]
    return {
        "commit": commit,
        "jax": f"jax {jax.__version__}, jaxlib {jaxlib.__version__}",
        "device": f"{jax.device_count()} x {device.device_kind} ({device.platform})",
        "cpu": f"{model}, {os.cpu_count()} cores",
        "cpu_flags": " ".join(f for f in CPU_FLAGS if f in flags) or "unknown",
        "date": datetime.date.today().isoformat(),
    }


def load_average() -> float:
    """The 1-minute load average (nan where the OS has none): wall times measured while other
    work runs are longer, and the table says how busy the machine was."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return math.nan


def run_row(row: DictConfig, seed: int, run_dir: pathlib.Path, timeout: float) -> dict[str, Any]:
    """One run of a row: the train script as a subprocess; its metrics and wall time."""
    command = [sys.executable, "experiments/train.py", *row.overrides, f"seed={seed}"]
    hydra_dir = f"hydra.run.dir={run_dir}"
    t0 = time.perf_counter()
    done = subprocess.run(
        [*command, hydra_dir],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-5:])
        raise RuntimeError(f"{' '.join(command)} failed (exit {done.returncode}):\n{tail}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"metrics": metrics, "wall": wall}


def _metric(metrics: dict[str, Any]) -> tuple[str, float]:
    for name in ("test_accuracy", "test_rmse"):
        if isinstance(metrics.get(name), int | float):
            return name, float(metrics[name])
    raise KeyError("the run's metrics.json has no test_accuracy or test_rmse")


def _format(name: str, value: float) -> str:
    return f"{100 * value:.2f}%" if name == "test_accuracy" else f"{value:.4f}"


def table(
    rows: list[dict[str, Any]], where: dict[str, str], seeds: list[int], load: float = math.nan
) -> str:
    """The results table in markdown, headed by its provenance and, when known, the highest
    1-minute load average seen at the start or end of a run (``load``)."""
    busy = (
        f" The machine's load average reached {load:.1f} during the runs (on "
        f"{os.cpu_count()} cores: above that, wall times include waiting for a core)."
        if math.isfinite(load)
        else ""
    )
    lines = [
        f"Measured by `python experiments/reproduce.py` on {where['date']} at commit "
        f"`{where['commit']}`; {where['jax']}; {where['device']}; CPU {where['cpu']} "
        f"(vector extensions: {where['cpu_flags']}). Test accuracy of the parameters with the "
        f"best validation accuracy; wall time of the whole command, seed 0. Seeds "
        f"{', '.join(map(str, seeds))}: mean ± standard deviation, and the range.{busy}",
        "",
        "| command | network, cost, optimizer | test accuracy (seed 0) | over seeds | wall time "
        "| reference |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        name, values = row["metric"], row["values"]
        spread = _format(name, statistics.fmean(values))
        if len(values) > 1:
            std = statistics.stdev(values)
            spread += (
                f" ± {_format(name, std)} ({_format(name, min(values))} to "
                f"{_format(name, max(values))}, n={len(values)})"
            )
        command = " ".join(["python experiments/train.py", *row["overrides"]])
        lines.append(
            f"| `{command}` | {row['network']} | {_format(name, row['first'])} | {spread} | "
            f"{row['wall']:.0f} s | {row['reference']} |"
        )
    return "\n".join(lines) + "\n"


def replace_block(text: str, block: str) -> str:
    """``text`` with what lies between the results markers replaced by ``block``."""
    if START not in text or END not in text or text.index(START) > text.index(END):
        raise ValueError(f"the README has no {START} ... {END} block to replace")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{block}{END}{tail}"


def reproduce(cfg: DictConfig, out_dir: pathlib.Path) -> str:
    """Runs the rows and seeds of ``cfg``; writes and returns the table."""
    rows = [r for r in cfg.rows if cfg.only is None or r.name in cfg.only]
    unknown = set(cfg.only or ()) - {r.name for r in cfg.rows}
    if unknown or not rows:
        valid = ", ".join(r.name for r in cfg.rows)
        raise ValueError(f"unknown rows {sorted(unknown)}; valid: {valid}")
    seeds = list(cfg.seeds)
    if not seeds or any(not isinstance(s, int) or s < 0 for s in seeds):
        raise ValueError(f"seeds must be non-negative integers, got {seeds}")
    results, loads = [], []
    for row in rows:
        values, first, wall = [], math.nan, math.nan
        for seed in seeds:
            loads.append(load_average())
            run = run_row(row, seed, out_dir / row.name / f"seed{seed}", cfg.timeout)
            loads.append(load_average())
            metric, value = _metric(run["metrics"])
            values.append(value)
            if seed == seeds[0]:
                first, wall = value, run["wall"]
            print(
                f"reproduce: {row.name} seed {seed}: {_format(metric, value)} in "
                f"{run['wall']:.0f} s",
                flush=True,
            )
        results.append(
            {
                **OmegaConf.to_container(row),
                "metric": metric,
                "values": values,
                "first": first,
                "wall": wall,
            }
        )
    text = table(results, provenance(), seeds, max(filter(math.isfinite, loads), default=math.nan))
    output = ROOT / cfg.output
    atomic_write_text(output, "# Results\n\n" + text)
    if cfg.readme:
        readme = ROOT / cfg.readme
        atomic_write_text(readme, replace_block(readme.read_text(), text))
    return text


@hydra.main(config_path="../conf", config_name="reproduce", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        text = reproduce(cfg, pathlib.Path(HydraConfig.get().runtime.output_dir))
    except (ValueError, RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    print(text)


if __name__ == "__main__":
    main()
