"""Whole epochs: one ``lax.scan`` against Python loops of jitted steps, and the epoch floor."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from omegaconf import DictConfig

from bpjax.grad import relative_error
from bpjax.train import make_epoch, make_step

from .points import MODES, epoch_order_of, synthetic_data, training
from .steps import backward_matmuls, forward_matmuls, loss_only
from .timing import Variant, compile_timed, paired, ratio

# The Python loops an epoch scan is compared with: ``loop`` keeps the data on device and gathers
# each batch by index inside the jitted step (the scan body's work, one dispatch per step);
# ``host_loop`` is the textbook loop: numpy batches sliced on the host, passed to the jitted step.
LOOPS = ("loop", "host_loop")
EPOCH_KINDS = ("scan", *LOOPS)
_relative_error = jax.jit(relative_error)


FLOOR_LR = 1e-3


def matmul_only_epoch(ws: tuple, x: jax.Array, t: jax.Array, batches: jax.Array) -> tuple:
    """An epoch's floor: per batch only what every SGD step of these layers must do.

    One ``lax.scan`` over ``batches`` (``[steps, batch]`` indices): gather the batch, the
    forward, ``dw`` and ``dx`` matmuls, and ``w - lr * dw``. The loss is least squares of the
    network without biases and activations against the targets ``t`` (``[n, n_out]``), so
    ``dy = out - t`` and each step depends on the last, as in training. Returns the final ``ws``.
    """

    def body(ws, idx):
        acts = forward_matmuls(ws, x[idx])
        grads = backward_matmuls(ws, acts, acts[-1] - t[idx])
        lr = FLOOR_LR / idx.shape[0]
        return tuple(w - lr * g for w, g in zip(ws, grads)), None

    return lax.scan(body, ws, batches)[0]


def point_epochs(cfg: DictConfig, point: dict, seed: int) -> dict[str, Any]:
    """Compiles the scan epoch and the Python-loop epoch of a grid point, both modes."""
    features, batch = list(point["features"]), int(point["batch"])
    n = int(cfg.epoch_examples)
    x, y = synthetic_data(cfg, features, n, seed)
    epoch_index = jnp.zeros((), jnp.int32)
    variants, info, check = {}, {}, {}
    net, loss, optimizer, state = training(cfg, point)
    batches = list(epoch_order_of(state.key, epoch_index, n, batch))
    host_x, host_y, host_batches = np.asarray(x), np.asarray(y), [np.asarray(b) for b in batches]
    for mode in MODES:
        epoch = make_epoch(net, loss, optimizer, batch_size=batch, grad_mode=mode)
        scan, info[f"scan_{mode}"] = compile_timed(epoch, state, x, y, epoch_index)
        step = loss_only(make_step(net, loss, optimizer, grad_mode=mode))

        def loop_step(state, x, y, idx, step=step):
            return step(state, x[idx], y[idx])

        looped, info[f"loop_{mode}"] = compile_timed(loop_step, state, x, y, batches[0])
        plain, info[f"host_loop_{mode}"] = compile_timed(step, state, x[:batch], y[:batch])

        def loop_epoch(state, looped=looped):
            for idx in batches:
                state = looped(state, x, y, idx)[0]
            return state

        def host_loop_epoch(state, plain=plain):
            for idx in host_batches:
                state = plain(state, host_x[idx], host_y[idx])[0]
            return state

        def scan_epoch(state, scan=scan):
            return scan(state, x, y, epoch_index)[0]

        # Same steps, same result: one epoch of each from the same state (also a warm-up).
        from_scan = scan_epoch(state)
        for kind, call in (
            ("scan", scan_epoch),
            ("loop", loop_epoch),
            ("host_loop", host_loop_epoch),
        ):
            if kind != "scan":
                check[f"{kind}_{mode}"] = float(
                    _relative_error(from_scan.params, call(state).params)
                )
            variants[f"{kind}_{mode}"] = Variant(call, state, warmup=cfg.epoch_warmup, block=0)
        print(f"  compiled {point['name']} epochs, {mode} ({len(batches)} steps)", flush=True)
    # The floor: the same batches through the matmuls and weight updates alone.
    ws = tuple(p["w"] for p in state.params if p)
    t = y if y.ndim == 2 else jax.nn.one_hot(y, features[-1], dtype=x.dtype)
    order = jnp.stack(batches)
    floor, info["matmul_only_scan"] = compile_timed(matmul_only_epoch, ws, x, t, order)
    variants["matmul_only_scan"] = Variant(
        lambda ws, floor=floor: floor(ws, x, t, order), ws, warmup=cfg.epoch_warmup, block=0
    )
    return {"variants": variants, "info": info, "check": check, "steps": len(batches)}


def epoch_results(built: dict) -> dict[str, Any]:
    variants, info = built["variants"], built["info"]
    out: dict[str, Any] = {"steps": built["steps"]}
    for name, v in variants.items():
        out[name] = {
            "epoch_s": v.median,
            "epoch_cpu_s": v.cpu_median,
            "epoch_s_samples": list(v.samples),
            "lower_s": info[name]["lower_s"],
            "compile_s": info[name]["compile_s"],
            "memory": info[name]["memory"],
            "peak_bytes": info[name]["memory"]["peak_bytes"],
        }
    floor = variants["matmul_only_scan"]
    out["matmul_only_scan"]["params_finite"] = all(
        bool(np.all(np.isfinite(w))) for w in floor.carry
    )
    scan_manual, scan_autodiff = variants["scan_manual"], variants["scan_autodiff"]
    out["scan_ratio"] = ratio(scan_manual.median, scan_autodiff.median)
    out["scan_ratio_paired"] = paired(scan_manual, scan_autodiff)
    out["scan_ratio_cpu"] = ratio(scan_manual.cpu_median, scan_autodiff.cpu_median)
    for mode in MODES:
        scan = variants[f"scan_{mode}"]
        out[f"scan_over_floor_{mode}"] = ratio(scan.median, floor.median)
        for loop in LOOPS:
            loop_s = variants[f"{loop}_{mode}"].median
            out[f"{loop}_speedup_{mode}"] = ratio(loop_s, scan.median)
            # No scan of these layers can beat the floor: the most its loop/scan could reach
            # (generous: the loop itself would speed up with a faster step).
            out[f"{loop}_speedup_ceiling_{mode}"] = ratio(loop_s, floor.median)
            out[f"{loop}_vs_scan_params_rel_err_{mode}"] = built["check"][f"{loop}_{mode}"]
    return out
