"""Gradient-check sweep: every hand-written backward against autodiff, over a grid of networks.

For each architecture x activation x loss x dtype in ``conf/gradcheck.yaml``, builds
``bpjax.mlp(features, activation=...)`` (inputs ``[batch, n_in]``), and for each image
architecture x image activation x image loss x dtype an image network (LeNet-5, a CNN with
batch norm in training mode, a ResNet, strided/grouped/dilated convolutions and pools: inputs
``[batch, h, w, c]``); draws params, inputs and targets suited to the loss, and runs
``bpjax.check_grads``: each layer's backward vs ``jax.vjp`` of its
forward ("layer"), the whole manual gradient vs ``jax.grad`` ("total"), and a central finite
difference ("fd"). Prints one line per combination, writes every row to ``gradcheck.csv`` and
``gradcheck.json`` in the run directory (atomically), and exits non-zero if anything fails::

    python experiments/gradcheck.py
    python experiments/gradcheck.py architectures=[[8,3]] dtypes=[float64] inject_bug=tanh

``inject_bug=<layer kind>`` (``tanh``, ``relu``, ``dense``, ...) swaps that layer's backward for a
deliberately wrong one, to show the checker naming the layer that goes wrong; every row of
the files records it (``inject_bug``: the kind, or null).

An image network whose factory takes no activation (``conv-strided-groups``: a fixed tanh)
is checked once whatever ``image_activations`` holds, and its rows and line record the
activation it has of its own (``tanh``; if it has none: ``-`` on its line, null in the JSON,
empty in the CSV).

``x_dtype`` sets the input's dtype (default: the combination's dtype): ``uint8`` and ``int32``
inputs are image-like integers in ``[0, 256)``, ``bool`` inputs random bits; such inputs have no
gradient, so their ``dx`` rows are skipped (and say so). A finite-difference row whose step
meets a kink (a ReLU at 0, ...) is inconclusive, not failed: the line says so, and the exit code
is 0 when every conclusive row passes. In the files, ``status`` is ``passed``, ``failed``,
``inconclusive`` or ``skipped``, and ``passed`` is false for the failed rows only (a skipped or
inconclusive row did not fail): filtering on ``passed`` finds the failures.

``run`` and ``main`` are here; the parts are in ``experiments/gradchecking/``: the networks, bug
injection and the check of one combination (``networks``), the grid and its validation
(``grid``), the header, lines and files (``report``). Their names are re-exported here, where
they were defined before.
"""

import sys
import time
from pathlib import Path
from typing import Any

import hydra
import jax
import jax.numpy as jnp
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from bpjax import cli, sweep
from bpjax.reporting import count

if str(Path(__file__).resolve().parent) not in sys.path:  # as a script, it is there
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from gradchecking.grid import (
    COMBINATION_KEYS,
    CONF_DIR,
    DTYPES,  # noqa: F401  (re-exported)
    X_DTYPES,  # noqa: F401  (re-exported)
    combinations,
    validate,
)
from gradchecking.networks import (
    ACTIVATION_KINDS,  # noqa: F401  (re-exported)
    activation_used,
    build_image_net,  # noqa: F401  (re-exported)
    check_one,
    inject_bug,  # noqa: F401  (re-exported)
    injectable_kinds,
    layer_kind,  # noqa: F401  (re-exported)
    layers_within,  # noqa: F401  (re-exported)
    make_inputs,  # noqa: F401  (re-exported)
    make_targets,  # noqa: F401  (re-exported)
    network,
    own_activation,  # noqa: F401  (re-exported)
    with_bug,  # noqa: F401  (re-exported)
)
from gradchecking.report import (
    _architecture_name,
    _describe,
    _header,
    _worst,
    write_rows,
    write_status,
)
from training.interrupts import _handle_interrupts, interrupt_status


def run(cfg: DictConfig, output_dir: str | Path | None = None) -> dict[str, Any]:
    """Runs the sweep described by ``cfg``, prints a summary and writes CSV + JSON.

    Args:
      cfg: the ``gradcheck`` config (architectures, activations, losses, dtypes, x_dtype,
        batch, n_in, b_init, fd_eps, seed, inject_bug).
      output_dir: where to write; default the Hydra run directory, or the working directory
        outside Hydra.

    Returns:
      ``{"passed", "n_checks", "n_failed", "n_inconclusive", "rows", "csv", "json"}``:
      ``n_checks``, ``n_failed`` and ``n_inconclusive`` count combinations (one ``check_grads``
      each; inconclusive: passed, with an inconclusive row), ``rows`` holds every row of every
      check as a dict prefixed with its combination. ``passed``: every conclusive row passed.
    """
    validate(cfg)
    jax.config.update("jax_enable_x64", True)  # float64 params need it; float32 is cast anyway
    if output_dir is None:
        output_dir = HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else "."
    grid = combinations(cfg)
    fd_eps = dict(cfg.get("fd_eps") or {})
    print(_header(cfg, len(grid), fd_eps), flush=True)
    columns = ("architecture", "activation", "loss", "dtype", "layer", "total", "fd", "result")
    widths = (20, 10, 21, 7, 8, 8, 8, 6)
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip())

    rows: list[dict[str, Any]] = []
    n_failed = n_inconclusive = 0
    start = time.perf_counter()
    done = 0
    try:
        for features, activation, loss_name, dtype in grid:
            result = check_one(
                features,
                activation,
                loss_name,
                jnp.dtype(dtype),
                batch=cfg.batch,
                n_in=cfg.n_in,
                seed=cfg.seed,
                b_init=cfg.b_init,
                fd_eps=fd_eps.get(dtype),
                bug=cfg.inject_bug,
                x_dtype=cfg.x_dtype,
            )
            architecture = _architecture_name(features, cfg.n_in)
            x_dtype = cfg.x_dtype or dtype
            used = activation_used(features, activation, batch=cfg.batch, n_in=cfg.n_in)
            prefix = dict(zip(COMBINATION_KEYS, (architecture, used, loss_name, dtype, x_dtype)))
            prefix["inject_bug"] = cfg.inject_bug  # a file from an injected-bug run says so
            rows += [{**prefix, **record} for record in result.to_records()]
            n_failed += not result.passed
            n_inconclusive += result.passed and bool(result.inconclusive)
            cells = (
                architecture,
                used or "-",
                loss_name,
                dtype,
                _worst(result, "layer"),
                _worst(result, "total"),
                _worst(result, "fd"),
                "PASS" if result.passed else "FAIL",
            )
            line = "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
            if not result.passed:
                line += f"  first failure: {_describe(result.first_failure)}"
            elif result.inconclusive:
                line += "  fd inconclusive: the loss is not smooth within the step (see its note)"
            if cfg.inject_bug is not None and cfg.inject_bug not in injectable_kinds(
                network(features, activation, batch=cfg.batch, n_in=cfg.n_in)[0]
            ):
                line += f"  (no {cfg.inject_bug} layer here: nothing injected)"
            print(line, flush=True)
            done += 1
    except KeyboardInterrupt:  # Ctrl-C: the rows of the combinations checked are kept
        if rows:
            csv_path, json_path = write_rows(rows, Path(output_dir))
            kept = f"their {count(len(rows), 'row')} are in {csv_path}, {json_path}"
        else:
            kept = "nothing to keep"
        print(f"interrupted after {done} of {count(len(grid), 'combination')}: {kept}", flush=True)
        raise
    csv_path, json_path = write_rows(rows, Path(output_dir))
    rows_took = f"{count(len(rows), 'row')} in {time.perf_counter() - start:.1f} s"
    print(f"{rows_took} -> {csv_path}, {json_path}")
    inconclusive = f" ({n_inconclusive} with an inconclusive fd row)" if n_inconclusive else ""
    print(f"{len(grid) - n_failed} passed{inconclusive}, {n_failed} failed")
    return {
        "passed": n_failed == 0,
        "n_checks": len(grid),
        "n_failed": n_failed,
        "n_inconclusive": n_inconclusive,
        "rows": rows,
        "csv": str(csv_path),
        "json": str(json_path),
    }


@hydra.main(config_path="../conf", config_name="gradcheck", version_base="1.3")
def main(cfg: DictConfig) -> None:
    # In a multirun every job runs and records its outcome; SweepOutcome (conf/gradcheck.yaml's
    # callback) gives the sweep's exit status at its end. A single run exits with its own.
    multirun = HydraConfig.get().mode.name == "MULTIRUN"
    output_dir = HydraConfig.get().runtime.output_dir
    try:
        validate(cfg)
    except ValueError as e:  # one line, as train.py reports a bad config
        print(f"error: {e}", file=sys.stderr, flush=True)
        if not multirun:
            sys.exit(2)
        write_status(output_dir, "invalid", str(e))
        return
    try:
        passed = run(cfg)["passed"]
    except KeyboardInterrupt as e:  # run said what it kept
        sys.exit(interrupt_status(e))  # 128 + the signal: Ctrl-C 130, SIGTERM 143
    if multirun:
        write_status(output_dir, "passed" if passed else "failed")
    elif not passed:
        sys.exit(1)


def command_line() -> None:
    """``main``, with Hydra's refusals of the command line itself as one ``error:`` line naming
    the nearest valid key, exit 2 (``bpjax.cli.run_command_line``), as train.py does. SIGTERM
    stops it as Ctrl-C does, keeping the rows checked (it killed it, losing them)."""
    _handle_interrupts()
    sweep.pickle_by_value("gradchecking", "training")  # for submitit's jobs
    cli.run_command_line(main, CONF_DIR, config_name="gradcheck")


if __name__ == "__main__":
    command_line()
