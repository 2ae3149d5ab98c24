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
"""

import csv
import inspect
import io
import json
import math
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
import jax
import jax.numpy as jnp
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf

import bpjax
from bpjax import losses
from bpjax._atomic import atomic_write_text
from bpjax.grad import GradCheckResult, GradCheckRow, GradCheckWarning, default_tolerances
from bpjax.layers import ACTIVATIONS, Layer, init_state, is_stateful
from bpjax.reporting import count

COMBINATION_KEYS = ("architecture", "activation", "loss", "dtype", "x_dtype")
X_DTYPES = ("uint8", "int32", "bool", "float16", "bfloat16", "float32", "float64")
DTYPES = ("float64", "float32", "bfloat16", "float16")


def layer_kind(layer: Layer) -> str:
    """The layer's name without its arguments: ``"leaky_relu(0.01)"`` -> ``"leaky_relu"``."""
    return layer.name.split("(")[0]


# The kinds of bpjax's activation layers (``"tanh"``, ``"leaky_relu"``, ...).
ACTIVATION_KINDS = frozenset(layer_kind(make()) for make in ACTIVATIONS.values())


def with_bug(layer: Layer) -> Layer:
    """``layer`` with the same init and forward but a wrong backward (for demonstrations).

    A parameter-free layer forgets its local derivative: ``dx = dy`` instead of
    ``dx = dy * f'(x)``. A layer with a bias forgets to sum its gradient over the batch:
    ``db = mean(dy)`` instead of ``sum(dy)``; one without (a conv before batch norm) forgets
    half its weight gradient: ``dw / 2``. Any other layer with parameters (batch norm's
    ``scale``/``offset``, a residual block's nested gradients) halves every parameter gradient.
    A parameter-free layer whose output has another shape than its input (pooling, flatten)
    returns a ``dx`` of the wrong shape, which the check reports as a failure of that layer.
    """

    def backward(params, cache, dy):
        grads, dx = layer.backward(params, cache, dy)
        if not jax.tree_util.tree_leaves(grads):
            return grads, dy
        if isinstance(grads, dict) and "b" in grads:
            batch = dy.size // dy.shape[-1]
            return {**grads, "b": grads["b"] / batch}, dx
        if isinstance(grads, dict) and "w" in grads:
            return {**grads, "w": grads["w"] / 2}, dx
        return jax.tree_util.tree_map(lambda g: g / 2, grads), dx

    return layer._replace(backward=backward)


# How to rebuild a combinator from new sublayers (``Layer.combinator`` -> constructor).
_REBUILD = {
    "serial": lambda subs: bpjax.serial(*subs),
    "parallel": lambda subs: bpjax.layers.parallel(*subs),
    "residual": lambda subs: bpjax.layers.residual(*subs),
}


def layers_within(net: Layer) -> Iterator[Layer]:
    """``net`` and every layer inside it, at any depth (residual blocks, parallel branches)."""
    yield net
    for layer in net.sublayers:
        yield from layers_within(layer)


def inject_bug(net: Layer, kind: str) -> Layer:
    """``net`` with ``with_bug`` applied to every layer of ``kind`` at any depth: the convs
    inside a residual block too (the check then names the block that holds them)."""
    if layer_kind(net) == kind:
        return with_bug(net)
    if net.combinator in _REBUILD:
        return _REBUILD[net.combinator]([inject_bug(layer, kind) for layer in net.sublayers])
    return net


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


def make_inputs(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """Inputs of ``dtype``: image-like integers in ``[0, 256)`` for integer dtypes, random bits
    for bool, standard normal values (drawn in float32 and cast) for floating dtypes."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.bool_:
        return jax.random.bernoulli(key, 0.5, shape)
    if jnp.issubdtype(dtype, jnp.integer):
        return jax.random.randint(key, shape, 0, 256, jnp.int32).astype(dtype)
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def network(
    features: list[int] | dict[str, Any],
    activation: str,
    *,
    batch: int,
    n_in: int,
    b_init: str = "normal",
) -> tuple[Layer, tuple[int, ...]]:
    """``(net, in_shape)`` of a combination (``check_one``'s ``features``): an MLP on
    ``[batch, n_in]`` inputs, or an image network on ``[batch, *input_shape]``."""
    if isinstance(features, dict):
        return build_image_net(features, activation), (batch, *features["input_shape"])
    return bpjax.mlp(features, activation=activation, b_init=b_init), (batch, n_in)


def injectable_kinds(net: Layer) -> set[str]:
    """The kinds ``inject_bug`` can reach in ``net``: every layer at any depth, blocks
    (``residual``) included, but not the ``serial`` stacks that hold them."""
    return {layer_kind(layer) for layer in layers_within(net)} - {"serial"}


def own_activation(net: Layer) -> str | None:
    """The activation a network uses of its own (one whose factory takes none): the kinds of
    its activation layers at any depth, in order, joined by ``+`` (``"tanh"``,
    ``"relu+sigmoid"``), or None if it has none."""
    kinds = [layer_kind(layer) for layer in layers_within(net)]
    return "+".join(dict.fromkeys(k for k in kinds if k in ACTIVATION_KINDS)) or None


def activation_used(
    features: list[int] | dict[str, Any], activation: str, *, batch: int, n_in: int
) -> str | None:
    """What a combination's network really uses as its activation, as its rows record it:
    ``activation`` where it is set (an MLP, an image network whose factory takes one), else
    the network's own (``own_activation``: ``"tanh"`` for ``conv-strided-groups``, None for a
    network without one), whatever ``image_activations`` says."""
    if not isinstance(features, dict) or _takes(features["model"], "activation"):
        return activation
    return own_activation(network(features, activation, batch=batch, n_in=n_in)[0])


def _key(features: Any) -> str:
    """A hashable key of ``combinations``' ``features`` (a list of sizes or an image spec)."""
    return json.dumps(features, sort_keys=True)


def check_one(
    features: list[int] | dict[str, Any],
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
    x_dtype: Any = None,
) -> GradCheckResult:
    """Runs ``bpjax.check_grads`` on one combination (params cast to ``dtype``, inputs to
    ``x_dtype``, by default ``dtype``; see ``make_inputs``).

    ``features`` is an MLP's layer sizes (inputs ``[batch, n_in]``), or an image network: a
    dict with the model's Hydra config (``model``, its ``activation`` set to ``activation``
    where the model takes one) and one example's ``input_shape`` ``[h, w, c]``. A network with
    state (batch norm) is checked in training mode (batch statistics, a key), the harder case.

    ``b_init`` defaults to small random biases: with zero biases a layer of dead ReLUs feeds the
    next one exact zeros, putting its pre-activations (or the logits) exactly on a kink, where
    a finite difference is no derivative and the fd row can only be inconclusive.
    """
    init_key, x_key, target_key = jax.random.split(jax.random.PRNGKey(seed), 3)
    net, in_shape = network(features, activation, batch=batch, n_in=n_in, b_init=b_init)
    if bug is not None:
        net = inject_bug(net, bug)
    out_shape, params = net.init(init_key, in_shape)
    params = jax.tree_util.tree_map(lambda p: p.astype(dtype), params)
    x = make_inputs(x_key, in_shape, dtype if x_dtype is None else x_dtype)
    target = make_targets(target_key, loss_name, batch, out_shape[-1], dtype)
    stateful = is_stateful(net)
    state = init_state(net, in_shape) if stateful else None
    with warnings.catch_warnings():
        # Tolerances already follow the dtype; the header says float32 checks are loose.
        warnings.simplefilter("ignore", GradCheckWarning)
        return bpjax.check_grads(
            net,
            losses.get(loss_name),
            params,
            x,
            target,
            key=jax.random.PRNGKey(seed + 1) if stateful else None,
            state=state,
            eps=fd_eps,
            seed=seed,
        )


def build_image_net(spec: dict[str, Any], activation: str) -> Layer:
    """The image network of an ``image_architectures`` entry, with ``activation`` where its
    factory takes one."""
    model = dict(spec["model"])
    if _takes(model, "activation"):
        model["activation"] = activation
    return hydra.utils.instantiate(model, _convert_="all")


def _takes(model: dict[str, Any], argument: str) -> bool:
    factory = hydra.utils.get_method(model["_target_"])
    return argument in inspect.signature(factory).parameters


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


# The two grids of the sweep: MLPs, and image networks (``combinations``).
_GRIDS = (
    ("architectures", "activations", "losses", "dtypes"),
    ("image_architectures", "image_activations", "image_losses", "dtypes"),
)


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


def validate(cfg: DictConfig) -> None:
    """Every name in the sweep is known, before anything is printed or compiled.

    Raises:
      ValueError: an unknown activation, loss, dtype, ``x_dtype`` or ``inject_bug`` kind
        (listing the valid ones), or an architecture that is not a list of positive sizes.
    """
    examples = {"architectures": "[[8, 3], [16, 16, 3]]", "dtypes": "[float64, float32]"}
    for key in {k for keys in _GRIDS for k in keys}:
        if not isinstance(cfg[key], ListConfig):
            raise ValueError(
                f"{key} must be a list, e.g. {key}={examples.get(key, '[...]')}; got {cfg[key]!r}"
            )
    for features in cfg.architectures:
        if not isinstance(features, ListConfig):
            raise ValueError(
                f"architectures: {features!r} is not a list of sizes: each architecture is one, "
                f"e.g. architectures=[[4,3]] (not architectures=[4,3])"
            )
        if not features or not all(isinstance(f, int) and f > 0 for f in features):
            raise ValueError(f"architectures: {list(features)} is not a list of positive sizes")
    for activation in [*cfg.activations, *cfg.image_activations]:
        bpjax.activation(activation)  # raises, listing the valid names
    for loss_name in [*cfg.losses, *cfg.image_losses]:
        losses.get(loss_name)
    for spec in cfg.image_architectures:
        missing = {"name", "model", "input_shape"} - set(spec)
        if missing:
            raise ValueError(
                f"image_architectures: an entry without {', '.join(sorted(missing))}: "
                f"each is {{name, model: {{_target_: ...}}, input_shape: [h, w, c]}}"
            )
        try:
            hydra.utils.get_method(spec.model._target_)
        except Exception as e:  # Hydra's own error types vary: say which entry
            raise ValueError(f"image_architectures: {spec.name}: {e}") from None
    if not combinations(cfg):
        empty = sorted({k for keys in _GRIDS for k in keys if not len(cfg[k])})
        raise ValueError(
            f"nothing to check: {', '.join(empty)} "
            f"{'is' if len(empty) == 1 else 'are'} empty, so neither the MLP grid "
            f"({' x '.join(_GRIDS[0])}) nor the image grid ({' x '.join(_GRIDS[1])}) has a "
            "combination"
        )
    unknown = [d for d in cfg.dtypes if d not in DTYPES]
    if unknown:
        raise ValueError(f"dtypes: unknown {unknown}; valid: {', '.join(DTYPES)}")
    if cfg.x_dtype is not None and cfg.x_dtype not in X_DTYPES:
        raise ValueError(
            f"x_dtype: unknown {cfg.x_dtype!r}; valid: null (the params' dtype), "
            f"{', '.join(X_DTYPES)}"
        )
    if cfg.inject_bug is not None:
        # The kinds of the networks the sweep checks: each (network, activation) it runs.
        kinds = set()
        for features, activation in {
            (_key(f), a): (f, a) for f, a, *_ in combinations(cfg)
        }.values():
            kinds |= injectable_kinds(
                network(features, activation, batch=cfg.batch, n_in=cfg.n_in)[0]
            )
        if cfg.inject_bug not in kinds:
            raise ValueError(
                f"inject_bug={cfg.inject_bug!r} matches no layer of the sweep; "
                f"valid kinds: {', '.join(sorted(kinds))}"
            )


def combinations(cfg: DictConfig) -> list[tuple[Any, str, str, str]]:
    """The sweep's ``(features, activation, loss, dtype)`` combinations: every MLP of
    ``architectures`` x activations x losses x dtypes, then every image network x
    image_activations x image_losses x dtypes (a network whose factory takes no activation
    once, at the first: its rows record the activation it has of its own, ``activation_used``)."""
    architectures = [list(map(int, f)) for f in OmegaConf.to_container(cfg.architectures)]
    return [
        (features, activation, loss_name, dtype)
        for features in architectures
        for activation in cfg.activations
        for loss_name in cfg.losses
        for dtype in cfg.dtypes
    ] + [
        (spec, activation, loss_name, dtype)
        for spec in OmegaConf.to_container(cfg.image_architectures)
        for activation in (
            cfg.image_activations
            if _takes(spec["model"], "activation")
            else cfg.image_activations[:1]
        )
        for loss_name in cfg.image_losses
        for dtype in cfg.dtypes
    ]


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
    try:
        validate(cfg)
    except ValueError as e:  # one line, as train.py reports a bad config
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    try:
        passed = run(cfg)["passed"]
    except KeyboardInterrupt:  # run said what it kept
        sys.exit(130)
    if not passed:
        sys.exit(1)


if __name__ == "__main__":
    main()
