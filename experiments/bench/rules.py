"""The learning rules' steps against the manual step (issue 12: a rule must not cost more than
the backprop it replaces).

Per MLP point in ``rules.points``: ``make_step(..., grad_mode=rule)`` for each rule of
``rules.modes``, jitted as the ``make_step`` path is (returning ``(new_state, loss)``), from the
point's params and the rule state ``init_state(..., grad_mode=rule)`` draws, on the point's
batch; ``manual`` beside them and, with ``control``, a second manual executable (the A/A
control). One group per point, sampled in the steps' rounds: manual and the control at either
end, the rules between, the order reversed every other round. With ``rules.donate`` (the
default) every step, manual's too, is jitted with its state donated, as a Python loop over a
jitted step should be (``make_step``'s docstring): a step that returns an input it does not
donate copies it, and a rule's fixed feedback is such an input.

With ``rules.epochs``, each rule is also timed as training runs it: ``fit``'s epoch
(``make_chunk`` in chunks of ``chunked.chunk_steps``, no signal, ``bench.chunks.fit_epoch``),
against the manual epoch and its A/A control (a second manual executable), on the point's
epoch data; inside the epoch's scan the feedback stays put, donated or not.
"""

from typing import Any

import jax
import jax.numpy as jnp
from omegaconf import DictConfig

from bpjax.train import make_step

from .chunks import fit_epoch, variant_of
from .config import rule_options
from .paths import loss_only
from .points import Point, epoch_examples, state_for, synthetic_data
from .results import control_ratios, epoch_stats, finite, variant_stats
from .timing import Variant, compile_timed, equalize_calls, ratios


def rule_steps(cfg: DictConfig, point: Point, seed: int, rules: list[str]) -> dict[str, Any]:
    """Compiles the point's manual step, each rule's step and the control.

    Args:
      seed: the point's data seed (the same batch as its other steps).
      rules: the learning rules to time.

    Returns:
      ``variants`` (``manual``, each rule, ``control``: the same calls per sample), their
      compiled ``executables`` (for profiles), ``info`` and ``groups``.
    """
    x, y = synthetic_data(cfg, point.example_shape, point.n_outputs, point.batch, seed)
    options = rule_options(cfg)
    names = ["manual", *rules, *(["control"] if cfg.control else [])]
    variants, info, executables = {}, {}, {}
    for name in names:
        mode = "manual" if name == "control" else name
        state = state_for(point, mode, options)
        step = loss_only(
            make_step(point.net, point.loss, point.optimizer, grad_mode=mode, rule_options=options)
        )
        if cfg.rules.donate:  # each variant's own copy: a donated state is consumed by the call
            step, state = jax.jit(step, donate_argnums=0), jax.tree_util.tree_map(jnp.copy, state)
        compiled, info[name] = compile_timed(step, state, x, y)
        executables[name] = compiled
        variants[name] = Variant(
            lambda s, c=compiled: c(s, x, y)[0], state, warmup=cfg.warmup, block=cfg.block_seconds
        )
    print(f"  compiled {point.name} rule steps: {', '.join(rules)}", flush=True)
    equalize_calls(list(variants.values()))
    return {
        "variants": variants,
        "executables": executables,
        "info": info,
        "groups": [[variants[n] for n in names]],
    }


def rule_results(built: dict[str, Any]) -> dict[str, Any]:
    """Each rule's step figures and its ratios to the manual step (``step_ratio``,
    ``_paired``, ``_cpu``: rule / manual); the A/A control's ratios to manual."""
    return _against_manual(built, variant_stats, "step_ratio")


def rule_epochs(cfg: DictConfig, point: Point, data: tuple, rules: list[str]) -> dict[str, Any]:
    """Compiles ``fit``'s epoch (no signal) for ``manual``, each rule and the A/A control.

    Returns:
      ``variants``, ``info`` (each the longest chunk's compile info), ``steps`` and
      ``groups`` (one: manual and the control at either end, the rules between).
    """
    n = epoch_examples(cfg, point)
    names = ["manual", *rules, *(["control"] if cfg.control else [])]
    options = {"grad_check_every": 0, "with_layer_stats": False, "rule_options": rule_options(cfg)}
    variants, info, orders = {}, {}, {}
    for name in names:
        mode = "manual" if name == "control" else name
        state = state_for(point, mode, options["rule_options"])
        run, info[name], _ = fit_epoch(
            point,
            state,
            data,
            n,
            mode=mode,
            chunk_steps=cfg.chunked.chunk_steps,
            options=options,
            orders=orders,
        )
        variants[name] = variant_of(cfg, run, state)
    print(f"  compiled {point.name} rule epochs: {', '.join(rules)}", flush=True)
    return {
        "variants": variants,
        "info": info,
        "steps": n // point.batch,
        "groups": [[variants[n] for n in names]],
    }


def rule_epoch_results(built: dict[str, Any]) -> dict[str, Any]:
    """Each rule's epoch figures and its ratios to the manual epoch (``epoch_ratio``,
    ``_paired``, ``_cpu``); the A/A control's ratios to manual."""
    return {"steps": built["steps"], **_against_manual(built, epoch_stats, "epoch_ratio")}


def _against_manual(built: dict[str, Any], stats: Any, ratio_name: str) -> dict[str, Any]:
    """``modes`` (each variant's ``stats`` and whether its params stayed finite, the control
    left out), ``vs_manual`` (each rule's ``ratio_name`` ratios to manual) and the control's."""
    variants, info = built["variants"], built["info"]
    modes = {
        name: {**stats(v, info[name]), "params_finite": finite(v.carry.params)}
        for name, v in variants.items()
        if name != "control"
    }
    vs_manual = {
        name: ratios(variants[name], variants["manual"], ratio_name)
        for name in modes
        if name != "manual"
    }
    return {"modes": modes, "vs_manual": vs_manual, **control_ratios(variants, "manual")}
