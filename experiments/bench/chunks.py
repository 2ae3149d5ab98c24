"""Epochs as ``fit`` runs them, in chunks: against the whole-epoch scan, and with the alignment
signal on against off.

``fit`` (``bpjax.trainer``) runs an epoch as ``make_chunk``'s order function and, for each
``(start, length)`` of ``chunk_plan(steps, chunk_steps)``, one jitted chunk (a ``lax.scan`` of
``length`` steps) followed by ``jax.device_get`` of that chunk's per-step metrics, a finiteness
check and the loss sum (and it reads the last state's step count): progress, Ctrl-C and
checkpoints act between chunks. Within an epoch it dispatches the next chunk before it fetches
a chunk's metrics (the device trains while the host reads them). ``fit_epoch`` does exactly
that, without the callbacks. The
whole-epoch scan (``make_epoch``) is one call with the same steps; it fetches its metrics the
same way once, so the two differ by the chunking only.

* ``chunked_epochs``: chunked (``chunk_steps``, fit's default 200) against whole, the same mode
  and options, A/A control a second whole-epoch executable; one epoch of each from the same
  state must give bit-identical params and losses (``make_chunk`` promises it on CPU).
* ``grad_check_epochs``: the fit epoch with ``grad_check_every`` (the trainer's default 500: a
  reference gradient and the alignment angles at every 500th step) against 0, for ``manual``
  and one learning rule; A/A control a second executable of the epoch without the signal.
"""

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from omegaconf import DictConfig

from bpjax.train import chunk_plan, make_chunk, make_epoch

from .config import rule_options
from .points import Point, epoch_examples, state_for
from .results import epoch_stats
from .timing import Variant, compile_timed, ratios


def _fetch(metrics: dict[str, Any]) -> tuple[np.ndarray, float, bool]:
    """What ``fit`` does with a chunk's metrics: fetch them, sum the loss, check it is finite."""
    losses = jax.device_get(metrics)["loss"]
    return losses, float(np.sum(losses, dtype=np.float64)), bool(np.all(np.isfinite(losses)))


def fit_epoch(
    point: Point,
    state: Any,
    data: tuple[jax.Array, jax.Array],
    n: int,
    *,
    mode: str,
    chunk_steps: int | None,
    options: dict[str, Any],
    orders: dict[Any, tuple] | None = None,
) -> tuple[Callable, dict[str, Any], tuple[tuple[int, int], ...]]:
    """Compiles ``fit``'s epoch of ``n`` examples in chunks of at most ``chunk_steps`` steps.

    Args:
      options: ``make_chunk``'s ``grad_check_every``, ``with_layer_stats``, ``rule_options``.
      orders: compiled order functions, shared by the epochs of one point (the order depends
        on the run's key and ``n`` only, the executable on the state's structure too); filled
        in here.

    Returns:
      ``run(state) -> (state, losses)`` (one epoch; ``losses`` per step), the compile info of
      the longest chunk's executable (with ``order_compile_s``, the order function's, and
      ``chunk_executables``), and the plan.
    """
    x, y = data
    order_fn, chunk_fn = make_chunk(
        point.net,
        point.loss,
        point.optimizer,
        batch_size=point.batch,
        grad_mode=mode,
        **options,
    )
    plan = chunk_plan(n // point.batch, chunk_steps)
    epoch_index = jnp.zeros((), jnp.int32)
    orders = {} if orders is None else orders
    cached = (n, jax.tree_util.tree_structure(state))
    if cached not in orders:
        orders[cached] = compile_timed(order_fn, state, n, epoch_index)
    order_c, order_info = orders[cached]
    order = order_c(state, epoch_index)
    chunks, info = {}, {}
    for length in sorted({length for _, length in plan}, reverse=True):
        chunks[length], chunk_info = compile_timed(
            chunk_fn, state, x, y, order, jnp.int32(0), length=length
        )
        info = info or chunk_info  # the longest chunk's
    info = {**info, "order_compile_s": order_info["compile_s"], "chunk_executables": len(chunks)}

    def dispatch(state, order, k):
        start, length = plan[k]
        return chunks[length](state, x, y, order, jnp.int32(start))

    def run(state):
        order = order_c(state, epoch_index)
        parts, loss_sum, finite = [], 0.0, True
        following = dispatch(state, order, 0)
        for k in range(len(plan)):
            before, (state, metrics) = state, following
            # fit dispatches the next chunk before it fetches this one's metrics
            following = dispatch(state, order, k + 1) if k + 1 < len(plan) else None
            int(before.step)  # fit reads the last state's step count (its error messages)
            losses, chunk_sum, chunk_finite = _fetch(metrics)
            parts.append(losses)
            loss_sum, finite = loss_sum + chunk_sum, finite and chunk_finite
        return state, np.concatenate(parts)

    return run, info, plan


def whole_epoch(
    point: Point, state: Any, data: tuple[jax.Array, jax.Array], *, mode: str, options: dict
) -> tuple[Callable, dict[str, Any]]:
    """Compiles ``make_epoch``'s whole-epoch scan; ``run(state) -> (state, losses)`` fetches its
    metrics as a chunk's are."""
    x, y = data
    epoch = make_epoch(
        point.net, point.loss, point.optimizer, batch_size=point.batch, grad_mode=mode, **options
    )
    epoch_index = jnp.zeros((), jnp.int32)
    compiled, info = compile_timed(epoch, state, x, y, epoch_index)

    def run(state):
        state, metrics = compiled(state, x, y, epoch_index)
        return state, _fetch(metrics)[0]

    return run, info


def _options(cfg: DictConfig, grad_check_every: int) -> dict[str, Any]:
    return {
        "grad_check_every": int(grad_check_every),
        "with_layer_stats": False,
        "rule_options": rule_options(cfg),
    }


def variant_of(cfg: DictConfig, run: Callable, state: Any) -> Variant:
    """A timed epoch: ``run(state) -> (state, losses)``, ``epoch_warmup`` untimed calls."""
    return Variant(lambda s: run(s)[0], state, warmup=cfg.epoch_warmup, block=0)


def _leaves(tree: Any) -> list[np.ndarray]:
    return [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(tree)]


def chunked_epochs(cfg: DictConfig, point: Point, data: tuple[jax.Array, jax.Array]) -> dict:
    """Compiles the point's chunked and whole epochs (and the A/A control), checks they agree.

    Returns:
      ``variants`` (``chunked``, ``whole``, ``control``), ``info``, ``plan``, ``steps``,
      ``check`` (``params_identical``, ``losses_identical``, ``params_max_abs_diff``) and
      ``groups``.
    """
    mode, n = cfg.chunked.mode, epoch_examples(cfg, point)
    state = state_for(point, mode, _options(cfg, 0)["rule_options"])
    options = _options(cfg, 0)
    whole, info_whole = whole_epoch(point, state, data, mode=mode, options=options)
    chunked, info_chunked, plan = fit_epoch(
        point, state, data, n, mode=mode, chunk_steps=cfg.chunked.chunk_steps, options=options
    )
    variants = {"chunked": variant_of(cfg, chunked, state), "whole": variant_of(cfg, whole, state)}
    info = {"chunked": info_chunked, "whole": info_whole}
    if cfg.control:
        control, info["control"] = whole_epoch(point, state, data, mode=mode, options=options)
        variants["control"] = variant_of(cfg, control, state)
    (from_whole, losses_whole), (from_chunks, losses_chunks) = whole(state), chunked(state)
    pairs = list(zip(_leaves(from_whole.params), _leaves(from_chunks.params), strict=True))
    check = {
        "params_identical": all(np.array_equal(a, b) for a, b in pairs),
        "losses_identical": bool(np.array_equal(losses_whole, losses_chunks)),
        "params_max_abs_diff": max(float(np.max(np.abs(a - b), initial=0.0)) for a, b in pairs),
    }
    print(f"  compiled {point.name} chunked epoch, {mode} ({len(plan)} chunks)", flush=True)
    # The chunked epoch and the control at either end, the whole epoch (the reference) between.
    names = ("chunked", "whole", "control")
    return {
        "variants": variants,
        "info": info,
        "plan": plan,
        "steps": n // point.batch,
        "check": check,
        "groups": [[variants[name] for name in names if name in variants]],
    }


def grad_check_epochs(cfg: DictConfig, point: Point, data: tuple[jax.Array, jax.Array]) -> dict:
    """Compiles fit's epoch with the alignment signal (``grad_check.every``) and without it,
    for ``manual`` and ``grad_check.rule`` (and each's A/A control: the epoch without the
    signal compiled again).

    Returns:
      ``modes`` (per mode: ``variants`` ``on``, ``off``, ``control`` and ``info``), ``every``,
      ``steps``, ``checks_per_epoch`` and ``groups``.
    """
    n, every = epoch_examples(cfg, point), int(cfg.grad_check.every)
    chunk_steps = cfg.chunked.chunk_steps
    modes, groups, orders = {}, [], {}
    for mode in ("manual", cfg.grad_check.rule):
        state = state_for(point, mode, _options(cfg, 0)["rule_options"])
        variants, info = {}, {}
        for name, checks in (("on", every), ("off", 0), ("control", 0)):
            if name == "control" and not cfg.control:
                continue
            run, info[name], _ = fit_epoch(
                point,
                state,
                data,
                n,
                mode=mode,
                chunk_steps=chunk_steps,
                options=_options(cfg, checks),
                orders=orders,
            )
            variants[name] = variant_of(cfg, run, state)
        print(f"  compiled {point.name} epochs with and without the signal, {mode}", flush=True)
        modes[mode] = {"variants": variants, "info": info}
        groups.append([variants[name] for name in ("on", "off", "control") if name in variants])
    steps = n // point.batch
    return {
        "modes": modes,
        "every": every,
        "steps": steps,
        # counted from step 0 (fit's first epoch): every step divisible by ``every``
        "checks_per_epoch": math.ceil(steps / every),
        "groups": groups,
    }


def _compared(variants: dict[str, Variant], info: dict, subject: str, name: str) -> dict:
    """``subject`` against ``variants["whole"/"off"]`` as ``name`` ratios, and the control's."""
    reference = "whole" if "whole" in variants else "off"
    out: dict[str, Any] = {key: epoch_stats(v, info[key]) for key, v in variants.items()}
    out.update(ratios(variants[subject], variants[reference], name))
    control = variants.get("control")
    keys = ("control_ratio", "control_ratio_paired", "control_ratio_cpu")
    out.update(
        ratios(control, variants[reference], "control_ratio")
        if control is not None
        else dict.fromkeys(keys)
    )
    return out


def chunked_results(built: dict[str, Any], cfg: DictConfig) -> dict[str, Any]:
    """The chunked epoch against the whole one: times, ``chunked_ratio`` (``_paired``,
    ``_cpu``), the control's ratios, the plan, and the agreement check."""
    lengths = sorted({length for _, length in built["plan"]}, reverse=True)
    return {
        "mode": cfg.chunked.mode,
        "chunk_steps": cfg.chunked.chunk_steps,
        "steps": built["steps"],
        "chunks": len(built["plan"]),
        "chunk_lengths": lengths,
        "chunk_executables": built["info"]["chunked"]["chunk_executables"],
        **_compared(built["variants"], built["info"], "chunked", "chunked_ratio"),
        **built["check"],
    }


def grad_check_results(built: dict[str, Any]) -> dict[str, Any]:
    """Per mode, the epoch with the signal over the epoch without it (``cost_ratio``,
    ``_paired``, ``_cpu``) and the control's ratios."""
    return {
        "every": built["every"],
        "steps": built["steps"],
        "checks_per_epoch": built["checks_per_epoch"],
        "modes": {
            mode: _compared(timed["variants"], timed["info"], "on", "cost_ratio")
            for mode, timed in built["modes"].items()
        },
    }
