"""Whole epochs: one ``lax.scan`` (``make_epoch``) against Python loops of jitted steps, manual
against autodiff, with an A/A control of the scan and, for an MLP, the epoch floor.

The loops do the scan's steps with the scan's permutation: ``loop`` keeps the data on device and
gathers each batch by index inside the jitted step (the scan body's work, one dispatch per
step: the step compiled as a single call, which for convolutions XLA's CPU backend compiles
differently from the same step inside a while loop); ``host_loop`` is the textbook loop, numpy
batches sliced on the host and passed to the jitted step (MLP points only: for a model point it
adds nothing ``loop`` does not show).
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from omegaconf import DictConfig

from bpjax.grad import relative_error
from bpjax.train import make_epoch

from .floors import matmul_only_epoch
from .paths import path_step
from .points import MODES, Point, epoch_examples, epoch_order_of
from .results import epoch_stats, finite
from .timing import Variant, compile_timed, ratio, ratios

LOOPS = ("loop", "host_loop")
EPOCH_KINDS = ("scan", *LOOPS)
_relative_error = jax.jit(relative_error)


def epoch_kinds(point: Point) -> tuple[str, ...]:
    """The epochs timed at a point: every kind for an MLP, the scan and the loop for a model."""
    return EPOCH_KINDS if point.is_mlp else ("scan", "loop")


def point_epochs(cfg: DictConfig, point: Point, data: tuple[jax.Array, jax.Array]) -> dict:
    """Compiles the point's epochs (``epoch_kinds``), both modes; with ``cfg.control`` a second
    autodiff scan (the A/A control); for an MLP the floor. Every loop's final params are
    compared with the scan's, from the same state.

    Args:
      data: the training set ``(x [n, ...], y [n, ...])`` (``epoch_examples``).

    Returns:
      ``variants``, ``info``, ``check`` (each loop's relative error to the scan's params),
      ``steps`` and ``groups`` (the variants as the round-robin samples them).
    """
    batch, state, kinds = point.batch, point.state, epoch_kinds(point)
    x, y = data
    n = epoch_examples(cfg, point)
    epoch_index = jnp.zeros((), jnp.int32)
    variants, info, check = {}, {}, {}
    batches = list(epoch_order_of(state.key, epoch_index, n, batch))
    host_x, host_y, host_batches = np.asarray(x), np.asarray(y), [np.asarray(b) for b in batches]
    net, loss, optimizer = point.net, point.loss, point.optimizer
    for mode in MODES:
        epoch = make_epoch(net, loss, optimizer, batch_size=batch, grad_mode=mode)
        scan, info[f"scan_{mode}"] = compile_timed(epoch, state, x, y, epoch_index)
        step = path_step("make_step", point, mode)

        def loop_step(state, x, y, idx, step=step):
            return step(state, x[idx], y[idx])

        looped, info[f"loop_{mode}"] = compile_timed(loop_step, state, x, y, batches[0])

        def scan_epoch(state, scan=scan):
            return scan(state, x, y, epoch_index)[0]

        def loop_epoch(state, looped=looped):
            for idx in batches:
                state = looped(state, x, y, idx)[0]
            return state

        calls = {"scan": scan_epoch, "loop": loop_epoch}
        if "host_loop" in kinds:
            plain, info[f"host_loop_{mode}"] = compile_timed(step, state, x[:batch], y[:batch])

            def host_loop_epoch(state, plain=plain):
                for idx in host_batches:
                    state = plain(state, host_x[idx], host_y[idx])[0]
                return state

            calls["host_loop"] = host_loop_epoch
        # Same steps, same result: one epoch of each from the same state (also a warm-up).
        from_scan = scan_epoch(state)
        for kind in kinds:
            call = calls[kind]
            if kind != "scan":
                check[f"{kind}_{mode}"] = float(
                    _relative_error(from_scan.params, call(state).params)
                )
            variants[f"{kind}_{mode}"] = Variant(call, state, warmup=cfg.epoch_warmup, block=0)
        print(f"  compiled {point.name} epochs, {mode} ({len(batches)} steps)", flush=True)
    groups = []
    if cfg.control:  # the A/A control: the autodiff scan compiled and timed a second time
        epoch = make_epoch(net, loss, optimizer, batch_size=batch, grad_mode="autodiff")
        control, info["scan_control"] = compile_timed(epoch, state, x, y, epoch_index)
        variants["scan_control"] = Variant(
            lambda s, c=control: c(s, x, y, epoch_index)[0], state, warmup=cfg.epoch_warmup, block=0
        )
    if point.is_mlp:  # the floor: the same batches through the matmuls and updates alone
        ws = tuple(p["w"] for p in state.params if p)
        t = y if y.ndim == 2 else jax.nn.one_hot(y, point.n_outputs, dtype=x.dtype)
        order = jnp.stack(batches)
        floor, info["matmul_only_scan"] = compile_timed(matmul_only_epoch, ws, x, t, order)
        variants["matmul_only_scan"] = Variant(
            lambda ws, floor=floor: floor(ws, x, t, order), ws, warmup=cfg.epoch_warmup, block=0
        )
        groups.append([variants["matmul_only_scan"]])
    # Manual and the control at either end of the scan group, as for the steps.
    names = [[f"{kind}_{mode}" for mode in MODES] for kind in kinds]
    names[0].append("scan_control")
    groups += [[variants[name] for name in group if name in variants] for group in names]
    return {
        "variants": variants,
        "info": info,
        "check": check,
        "steps": len(batches),
        "kinds": kinds,
        "groups": groups,
    }


def epoch_results(built: dict) -> dict[str, Any]:
    """The epochs' times (s), the scan's manual/autodiff ratios and A/A control, each loop's
    speedup over the scan; for an MLP the floor, each scan over it and each loop's ceiling (None
    for a model point, and for kinds not timed there)."""
    variants, info = built["variants"], built["info"]
    out: dict[str, Any] = {"steps": built["steps"], "kinds": list(built["kinds"])}
    for name, v in variants.items():
        out[name] = epoch_stats(v, info[name])
    floor = variants.get("matmul_only_scan")
    if floor is not None:
        out["matmul_only_scan"]["params_finite"] = finite(floor.carry)
    scan_manual, scan_autodiff = variants["scan_manual"], variants["scan_autodiff"]
    out.update(ratios(scan_manual, scan_autodiff, "scan_ratio"))
    control = variants.get("scan_control")
    out.update(
        ratios(control, scan_autodiff, "scan_control_ratio")
        if control is not None
        else dict.fromkeys(
            ("scan_control_ratio", "scan_control_ratio_paired", "scan_control_ratio_cpu")
        )
    )
    for mode in MODES:
        scan = variants[f"scan_{mode}"]
        out[f"scan_step_ms_{mode}"] = 1e3 * scan.median / built["steps"]
        out[f"scan_over_floor_{mode}"] = None if floor is None else ratio(scan.median, floor.median)
        for loop in LOOPS:
            timed = variants.get(f"{loop}_{mode}")
            loop_s = None if timed is None else timed.median
            out[f"{loop}_speedup_{mode}"] = ratio(loop_s, scan.median)
            # No scan of these layers can beat the floor: the most its loop/scan could reach
            # (generous: the loop itself would speed up with a faster step).
            out[f"{loop}_speedup_ceiling_{mode}"] = (
                None if floor is None else ratio(loop_s, floor.median)
            )
            out[f"{loop}_vs_scan_params_rel_err_{mode}"] = built["check"].get(f"{loop}_{mode}")
    return out


def relate_to_step(epoch: dict[str, Any], point: dict[str, Any]) -> None:
    """Adds ``scan_step_over_step_{mode}``: a step's time inside the scan (epoch / steps) over
    the same step timed alone (``make_step``, one call at a time), to ``epoch``. Above 1, the
    step costs more inside the scan's while loop than as a single call (or the gather and the
    epoch's other data cost that much)."""
    for mode in MODES:
        alone = point["modes"][mode]["step_ms"]
        epoch[f"scan_step_over_step_{mode}"] = ratio(epoch[f"scan_step_ms_{mode}"], alone)
