"""Grid points: the network, loss, optimizer, starting state and synthetic data of each."""

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from omegaconf import DictConfig, OmegaConf

from bpjax import layers, losses
from bpjax.train import SHUFFLE, TrainState, encode_targets, init_state

MODES = ("manual", "autodiff")


def apply_quick(cfg: DictConfig) -> DictConfig:
    """``cfg`` with ``quick_settings`` applied: fewer repeats, smaller nets and batches."""
    settings = OmegaConf.to_container(cfg.quick_settings, resolve=True)
    max_width, max_batch = settings.pop("max_width"), settings.pop("max_batch")
    max_hidden = settings.pop("max_hidden_layers")
    grid = []
    for point in OmegaConf.to_container(cfg.grid, resolve=True):
        features = list(point["features"])
        hidden = [min(f, max_width) for f in features[1:-1]][:max_hidden]
        features = [features[0], *hidden, features[-1]]
        grid.append({**point, "features": features, "batch": min(point["batch"], max_batch)})
    return OmegaConf.merge(cfg, settings, {"grid": grid})


def synthetic_data(cfg: DictConfig, features: Sequence[int], n: int, seed: int):
    """Synthetic MNIST-like data: ``x [n, n_in]`` uniform in [0, 1), targets for ``cfg.loss``.

    Drawn with numpy and put on device, so no small jax programs need compiling.
    """
    rng = np.random.default_rng(seed)
    x = rng.random((n, features[0]), dtype=np.float32)
    labels = rng.integers(0, features[-1], n)
    y = encode_targets(labels, task="classification", loss_name=cfg.loss, n_outputs=features[-1])
    return jnp.asarray(x), jnp.asarray(y)


def training(cfg: DictConfig, point: dict) -> tuple[layers.Layer, losses.Loss, Any, TrainState]:
    """The grid point's network, loss, optimizer and a starting state (the same for both modes).

    The state has ``init_state``'s structure (from ``jax.eval_shape``) with weights drawn by
    numpy from ``N(0, 1 / n_in)`` and zero biases: timings do not depend on the values, and
    this skips compiling the dozens of small random-number programs an eager init needs.
    """
    net = layers.mlp(list(point["features"][1:]), activation=point["activation"])
    optimizer = optax.sgd(cfg.learning_rate)
    key = jax.random.PRNGKey(cfg.seed)
    in_shape = (int(point["batch"]), int(point["features"][0]))
    shapes = jax.eval_shape(lambda k: init_state(net, optimizer, k, in_shape).params, key)
    rng = np.random.default_rng(cfg.seed)

    def draw(leaf):
        if leaf.ndim < 2:
            return jnp.asarray(np.zeros(leaf.shape, leaf.dtype))
        scale = 1 / math.sqrt(leaf.shape[0])
        return jnp.asarray((scale * rng.standard_normal(leaf.shape)).astype(leaf.dtype))

    params = jax.tree_util.tree_map(draw, shapes)
    step = jnp.asarray(np.zeros((), np.int32))
    state = TrainState(params, optimizer.init(params), step, key)
    return net, losses.get(cfg.loss), optimizer, state


@functools.partial(jax.jit, static_argnums=(2, 3))
def epoch_order_of(key: jax.Array, epoch_index: jax.Array, n: int, batch: int) -> jax.Array:
    """The permutation ``make_epoch`` draws for epoch ``epoch_index``: ``[n // batch, batch]``."""
    steps = n // batch
    shuffle_key = jax.random.fold_in(jax.random.fold_in(key, SHUFFLE), epoch_index)
    return jax.random.permutation(shuffle_key, n)[: steps * batch].reshape(steps, batch)
