"""References for what no step can skip: the device's square matmul, an MLP step's matmuls
alone, and an MLP epoch's floor (its matmuls and weight updates alone, one ``lax.scan``)."""

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from omegaconf import DictConfig

from .timing import Variant, compile_timed

# The matmul-only epoch's step size: least squares on MNIST-shaped data is stable there (the
# value changes no work; a diverging or vanishing residual could, through infs or denormals).
FLOOR_LR = 1e-3


def forward_matmuls(ws: tuple, x: jax.Array) -> list[jax.Array]:
    """``[x, x @ w0, x @ w0 @ w1, ...]``: a network's forward matmuls, nothing else."""
    acts = [x]
    for w in ws:
        acts.append(acts[-1] @ w)
    return acts


def backward_matmuls(ws: tuple, acts: list[jax.Array], dy: jax.Array) -> tuple:
    """The weight gradients ``h.T @ g`` (in ``ws``' order) and the ``g @ w.T`` that carry ``g``
    down; no ``dx`` for the first layer."""
    grads, g = [], dy
    for i in reversed(range(len(ws))):
        grads.append(lax.dot_general(acts[i], g, (((0,), (0,)), ((), ()))))
        if i > 0:
            g = g @ ws[i].T
    return tuple(reversed(grads))


def matmul_only(ws: tuple, x: jax.Array, dy: jax.Array) -> tuple[jax.Array, tuple]:
    """The step's matmuls alone: forward ``h @ w``; backward ``h.T @ g`` and ``g @ w.T``.

    Returns ``x`` made to depend on the result (so calls chain) and the weight gradients.
    """
    acts = forward_matmuls(ws, x)
    return x + 0 * acts[-1][:, :1], backward_matmuls(ws, acts, dy)


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


def square_matmul(cfg: DictConfig, n: int) -> tuple[Variant, dict[str, Any]]:
    """A device reference: a chained jitted float32 ``a @ b``, ``b`` norm-preserving."""
    rng = np.random.default_rng(cfg.seed)
    a = jnp.asarray(rng.standard_normal((n, n), dtype=np.float32))
    b = jnp.asarray(rng.standard_normal((n, n), dtype=np.float32) / np.float32(math.sqrt(n)))
    compiled, info = compile_timed(lambda a, b: a @ b, a, b)
    variant = Variant(lambda a: compiled(a, b), a, warmup=cfg.warmup, block=cfg.block_seconds)
    return variant, {"size": n, "flops": 2 * n**3, "compile_s": info["compile_s"]}
