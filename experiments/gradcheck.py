"""Gradient-check sweep: every hand-written backward against autodiff, over a grid of networks.

For each architecture x activation x loss x dtype in ``conf/gradcheck.yaml``, builds
``bpjax.mlp(features, activation=...)``, draws params, inputs ``[batch, n_in]`` and targets
suited to the loss, and runs ``bpjax.check_grads``: each layer's backward vs ``jax.vjp`` of its
forward ("layer"), the whole manual gradient vs ``jax.grad`` ("total"), and a central finite
difference ("fd"). Prints one line per combination, writes every row to ``gradcheck.csv`` and
``gradcheck.json`` in the run directory, and exits non-zero if anything fails::

    python experiments/gradcheck.py
    python experiments/gradcheck.py architectures=[[8,3]] dtypes=[float64] inject_bug=tanh

``inject_bug=<layer kind>`` (``tanh``, ``relu``, ``dense``, ...) swaps that layer's backward for a
deliberately wrong one, to show the checker naming the layer that goes wrong.
"""

import csv
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import jax
import jax.numpy as jnp
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

import bpjax
from bpjax import losses
from bpjax.grad import GradCheckResult, GradCheckRow, GradCheckWarning, default_tolerances
from bpjax.layers import Layer

COMBINATION_KEYS = ("architecture", "activation", "loss", "dtype")


def layer_kind(layer: Layer) -> str:
    """The layer's name without its arguments: ``"leaky_relu(0.01)"`` -> ``"leaky_relu"``."""
    return layer.name.split("(")[0]


def with_bug(layer: Layer) -> Layer:
    """``layer`` with the same init and forward but a wrong backward (for demonstrations).

    A parameter-free layer forgets its local derivative: ``dx = dy`` instead of
    ``dx = dy * f'(x)``. A layer with a bias forgets to sum its gradient over the batch:
    ``db = mean(dy)`` instead of ``sum(dy)``.
    """

    def backward(params, cache, dy):
        grads, dx = layer.backward(params, cache, dy)
        if not jax.tree_util.tree_leaves(grads):
            return grads, dy
        if not isinstance(grads, dict) or "b" not in grads:
            raise ValueError(f"inject_bug: no bug defined for {layer.name} (params without 'b')")
        batch = dy.size // dy.shape[-1]
        return {**grads, "b": grads["b"] / batch}, dx

    return layer._replace(backward=backward)


def inject_bug(net: Layer, kind: str) -> Layer:
    """Rebuilds a ``serial`` network with ``with_bug`` applied to every layer of ``kind``."""
    return bpjax.serial(
        *(with_bug(layer) if layer_kind(layer) == kind else layer for layer in net.sublayers)
    )


def make_targets(key: jax.Array, loss_name: str, batch: int, n_out: int, dtype: Any) -> jax.Array:
    """Targets in the form each loss expects.

    Returns:
      integer labels ``[batch]`` in ``[0, n_out)`` for ``softmax_cross_entropy``; probabilities
      ``[batch, n_out]`` in ``[0, 1]`` for ``binary_cross_entropy``; standard normal values
      ``[batch, n_out]`` otherwise.
    """
    if loss_name in ("softmax_cross_entropy", "cross_entropy"):
        return jax.random.randint(key, (batch,), 0, n_out, dtype=jnp.int32)
    # Drawn in float32 and cast, so every dtype is checked at the same point.
    if loss_name in ("binary_cross_entropy", "bce"):
        return jax.random.uniform(key, (batch, n_out), jnp.float32).astype(dtype)
    return jax.random.normal(key, (batch, n_out), jnp.float32).astype(dtype)


def check_one(
    features: list[int],
    activation: str,
    loss_name: str,
    dtype: Any,
    *,
    batch: int,
    n_in: int,
    seed: int,
    b_init: str = "normal",
    fd_eps: float | None = None,
    bug: str | None = None,
) -> GradCheckResult:
    """Runs ``bpjax.check_grads`` on one combination (params and inputs cast to ``dtype``).

    ``b_init`` defaults to small random biases: with zero biases a layer of dead ReLUs feeds the
    next one exact zeros, putting its pre-activations (or the logits) exactly on a kink, where
    the derivative is a convention and a finite difference disagrees with any choice.
    """
    init_key, x_key, target_key = jax.random.split(jax.random.PRNGKey(seed), 3)
    net = bpjax.mlp(features, activation=activation, b_init=b_init)
    if bug is not None:
        net = inject_bug(net, bug)
    _, params = net.init(init_key, (batch, n_in))
    params = jax.tree_util.tree_map(lambda p: p.astype(dtype), params)
    x = jax.random.normal(x_key, (batch, n_in), jnp.float32).astype(dtype)
    target = make_targets(target_key, loss_name, batch, features[-1], dtype)
    with warnings.catch_warnings():
        # Tolerances already follow the dtype; the header says float32 checks are loose.
        warnings.simplefilter("ignore", GradCheckWarning)
        return bpjax.check_grads(
            net, losses.get(loss_name), params, x, target, eps=fd_eps, seed=seed
        )


def _worst(result: GradCheckResult, check: str) -> float:
    return max((row.rel_err for row in result.rows if row.check == check), default=math.nan)


def _describe(row: GradCheckRow) -> str:
    where = row.layer_name if row.layer is None else f"layer {row.layer} ({row.layer_name})"
    return f"{where}: {row.check} check of {row.leaf}, rel_err {row.rel_err:.2e} > {row.tol:g}"


def _header(cfg: DictConfig, n_combinations: int, fd_eps: dict[str, float]) -> str:
    grid = " x ".join(
        f"{len(cfg[k])} {k}" for k in ("architectures", "activations", "losses", "dtypes")
    )
    lines = [
        f"gradient check sweep: {grid} = {n_combinations} combinations "
        f"(batch={cfg.batch}, n_in={cfg.n_in}, b_init={cfg.b_init}, seed={cfg.seed})"
    ]
    for name in cfg.dtypes:
        tols = default_tolerances(name)
        note = "  -- LOOSE: rules out gross errors only" if name != "float64" else ""
        lines.append(
            f"  {name}: rtol={tols['rtol']:g} (layer, total), fd_rtol={tols['fd_rtol']:g}, "
            f"eps={fd_eps.get(name, tols['eps']):g}{note}"
        )
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
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    safe = [{k: _json_safe(v) for k, v in row.items()} for row in rows]
    json_path.write_text(json.dumps(safe, indent=1) + "\n")
    return csv_path, json_path


def validate(cfg: DictConfig) -> None:
    """Every name in the sweep is known, before anything is printed or compiled.

    Raises:
      ValueError: an unknown activation, loss, dtype or ``inject_bug`` kind (listing the
        valid ones), or an architecture that is not a list of positive sizes.
    """
    for features in cfg.architectures:
        if not features or not all(isinstance(f, int) and f > 0 for f in features):
            raise ValueError(f"architectures: {list(features)} is not a list of positive sizes")
    for activation in cfg.activations:
        bpjax.activation(activation)  # raises, listing the valid names
    for loss_name in cfg.losses:
        losses.get(loss_name)
    unknown = [d for d in cfg.dtypes if d not in ("float64", "float32", "bfloat16", "float16")]
    if unknown:
        raise ValueError(f"dtypes: unknown {unknown}; valid: float64, float32, bfloat16, float16")
    if cfg.inject_bug is not None:
        kinds = {"dense"} | {layer_kind(bpjax.activation(a)) for a in cfg.activations}
        if cfg.inject_bug not in kinds:
            raise ValueError(
                f"inject_bug={cfg.inject_bug!r} matches no layer of the sweep; "
                f"valid kinds: {', '.join(sorted(kinds))}"
            )


def run(cfg: DictConfig, output_dir: str | Path | None = None) -> dict[str, Any]:
    """Runs the sweep described by ``cfg``, prints a summary and writes CSV + JSON.

    Args:
      cfg: the ``gradcheck`` config (architectures, activations, losses, dtypes, batch, n_in,
        b_init, fd_eps, seed, inject_bug).
      output_dir: where to write; default the Hydra run directory, or the working directory
        outside Hydra.

    Returns:
      ``{"passed", "n_checks", "n_failed", "rows", "csv", "json"}``: ``n_checks`` and
      ``n_failed`` count combinations (one ``check_grads`` each), ``rows`` holds every row of
      every check as a dict prefixed with its combination.
    """
    validate(cfg)
    jax.config.update("jax_enable_x64", True)  # float64 params need it; float32 is cast anyway
    if output_dir is None:
        output_dir = HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else "."
    architectures = [list(map(int, f)) for f in OmegaConf.to_container(cfg.architectures)]
    grid = [
        (features, activation, loss_name, dtype)
        for features in architectures
        for activation in cfg.activations
        for loss_name in cfg.losses
        for dtype in cfg.dtypes
    ]
    fd_eps = dict(cfg.get("fd_eps") or {})
    print(_header(cfg, len(grid), fd_eps), flush=True)
    columns = ("architecture", "activation", "loss", "dtype", "layer", "total", "fd", "result")
    widths = (14, 10, 21, 7, 8, 8, 8, 6)
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip())

    rows: list[dict[str, Any]] = []
    n_failed = 0
    start = time.perf_counter()
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
        )
        architecture = "-".join(map(str, [cfg.n_in, *features]))
        prefix = dict(zip(COMBINATION_KEYS, (architecture, activation, loss_name, dtype)))
        rows += [{**prefix, **record} for record in result.to_records()]
        n_failed += not result.passed
        cells = (
            architecture,
            activation,
            loss_name,
            dtype,
            f"{_worst(result, 'layer'):.1e}",
            f"{_worst(result, 'total'):.1e}",
            f"{_worst(result, 'fd'):.1e}",
            "PASS" if result.passed else "FAIL",
        )
        line = "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
        if not result.passed:
            line += f"  first failure: {_describe(result.first_failure)}"
        print(line, flush=True)

    csv_path, json_path = write_rows(rows, Path(output_dir))
    print(f"{len(rows)} rows in {time.perf_counter() - start:.1f} s -> {csv_path}, {json_path}")
    print(f"{len(grid) - n_failed} passed, {n_failed} failed")
    return {
        "passed": n_failed == 0,
        "n_checks": len(grid),
        "n_failed": n_failed,
        "rows": rows,
        "csv": str(csv_path),
        "json": str(json_path),
    }


@hydra.main(config_path="../conf", config_name="gradcheck", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        validate(cfg)
    except ValueError as e:  # one line, as train.py reports a bad config
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    if not run(cfg)["passed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
