"""What experiments/gradcheck.py prints and writes: the sweep's header (the grid, the tolerances
per dtype), a line's cells (the architecture's name, the worst relative error per check, the
first failure) and the rows' CSV and JSON files (written atomically)."""

import csv
import io
import json
import math
import sys
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from bpjax._atomic import atomic_write_text
from bpjax.grad import GradCheckResult, GradCheckRow, default_tolerances
from bpjax.reporting import count
from gradchecking.grid import _GRIDS, COMBINATION_KEYS
from gradchecking.networks import _takes, build_image_net, own_activation


def _architecture_name(features: list[int] | dict[str, Any], n_in: int) -> str:
    if isinstance(features, dict):
        return str(features["name"])
    return "-".join(map(str, [n_in, *features]))


def _worst(result: GradCheckResult, check: str) -> str:
    """The largest relative error of the conclusive rows of ``check`` ("inconcl." when its
    only row is inconclusive, "-" when there is none)."""
    rows = [row for row in result.rows if row.check == check]
    errors = [row.rel_err for row in rows if row.status in ("passed", "failed")]
    if any(math.isnan(e) for e in errors):  # a row with nothing to compare (shapes differ)
        return "nan"
    if errors:
        return f"{max(errors):.1e}"
    return "inconcl." if any(row.status == "inconclusive" for row in rows) else "-"


def _describe(row: GradCheckRow) -> str:
    where = row.layer_name if row.layer is None else f"layer {row.layer} ({row.layer_name})"
    if math.isnan(row.rel_err):  # nothing compared: the row's note says why (shapes, an error)
        return f"{where}: {row.check} check of {row.leaf}: {row.note or 'no error measured'}"
    return f"{where}: {row.check} check of {row.leaf}, rel_err {row.rel_err:.2e} > {row.tol:g}"


def _header(cfg: DictConfig, n_combinations: int, fd_eps: dict[str, float]) -> str:
    mlp, images = (
        " x ".join(f"{len(cfg[k])} {k}" for k in keys) if all(len(cfg[k]) for k in keys) else ""
        for keys in _GRIDS  # a grid with an empty list adds nothing
    )
    once = [
        (s.name, own_activation(build_image_net(OmegaConf.to_container(s), "")))
        for s in cfg.image_architectures
        if not _takes(s.model, "activation")
    ]
    if images and once:
        images += (
            " ("
            + "; ".join(
                f"{name}: no activation to set, checked once"
                + (f" with its own, {own}" if own else ", without one")
                for name, own in once
            )
            + ")"
        )
    grid = " + ".join(g for g in (mlp, images) if g)
    x_dtype = cfg.x_dtype or "the params' dtype"
    lines = [
        f"gradient check sweep: {grid} = {count(n_combinations, 'combination')} "
        f"(batch={cfg.batch}, n_in={cfg.n_in}, inputs in {x_dtype}, b_init={cfg.b_init}, "
        f"seed={cfg.seed})"
    ]
    for name in cfg.dtypes:
        tols = default_tolerances(name)
        note = "  -- LOOSE: rules out gross errors only" if name != "float64" else ""
        lines.append(
            f"  {name}: rtol={tols['rtol']:g} (layer, total), fd_rtol={tols['fd_rtol']:g}, "
            f"eps={fd_eps.get(name, tols['eps']):g}{note}"
        )
    if cfg.x_dtype is not None and not jnp.issubdtype(jnp.dtype(cfg.x_dtype), jnp.inexact):
        lines.append(f"  {cfg.x_dtype} inputs have no gradient: their dx rows are skipped")
    if cfg.inject_bug is not None:
        lines.append(
            f"  inject_bug={cfg.inject_bug}: that layer's backward is deliberately wrong; "
            "expect FAIL naming it"
        )
    return "\n".join(lines)


def _json_safe(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_rows(rows: list[dict[str, Any]], output_dir: Path) -> tuple[Path, Path]:
    """Writes ``gradcheck.csv`` and ``gradcheck.json`` (NaN as ``null``) into ``output_dir``."""
    output_dir.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = output_dir / "gradcheck.csv", output_dir / "gradcheck.json"
    fields = list(rows[0]) if rows else list(COMBINATION_KEYS)
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(csv_path, table.getvalue())
    safe = [{k: _json_safe(v) for k, v in row.items()} for row in rows]
    atomic_write_text(json_path, json.dumps(safe, indent=1) + "\n")
    return csv_path, json_path


# A multirun job's outcome, in its output directory, for SweepOutcome.
STATUS_FILE = "gradcheck_status.json"


def write_status(output_dir: str | Path, status: str, message: str = "") -> None:
    """A multirun job's outcome (``passed``, ``failed`` or ``invalid``, and why), written
    atomically to ``output_dir/gradcheck_status.json``."""
    record = {"status": status, "message": message}
    atomic_write_text(Path(output_dir) / STATUS_FILE, json.dumps(record) + "\n")


class SweepOutcome(Callback):
    """Hydra callback: after a multirun of gradcheck.py, one line of its jobs' outcomes, and
    the sweep's exit status: 1 if a job failed, else 2 if a job was invalid, else 0. Every job
    runs (a failed or invalid one no longer ends the sweep); each wrote ``STATUS_FILE``."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        outcomes: dict[str, list[str]] = {"passed": [], "failed": [], "invalid": []}
        for path in sorted(sweep_dir.glob(f"*/{STATUS_FILE}")):
            record = json.loads(path.read_text())
            outcomes.setdefault(record["status"], []).append(path.parent.name)
        said = ", ".join(
            f"{count(len(jobs), 'job')} {status}" + (f" ({', '.join(jobs)})" if jobs else "")
            for status, jobs in outcomes.items()
            if jobs or status == "passed"
        )
        print(f"\ngradcheck sweep {sweep_dir}: {said}", flush=True)
        if outcomes["failed"] or outcomes["invalid"]:
            sys.exit(1 if outcomes["failed"] else 2)
