"""Grid points: what each point trains (network, loss, optimizer, starting state), on what data.

A grid point is a mapping with a ``name``, a ``batch`` and either

* ``features: [n_in, ..., n_out]`` and ``activation``: an MLP, ``bpjax.mlp(features[1:])``; its
  FLOPs are counted (``measure.step_flops``) and it has a matmul-only reference; or
* ``model:``, a node ``hydra.utils.instantiate`` makes into a Layer, written as
  ``conf/model/*.yaml`` are (``_target_: bpjax.lenet5``, ...), and ``input_shape``, one
  example's shape (``[28, 28, 1]``: images are NHWC). Its work is XLA's cost analysis.

Optional: ``epoch: true`` (also time whole epochs), ``epoch_examples`` (this point's epoch size,
default the config's). Inputs are uniform in [0, 1), labels uniform over the network's outputs.
"""

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from bpjax import credit, layers, losses
from bpjax.train import SHUFFLE, TrainState, encode_targets, init_state

MODES = ("manual", "autodiff")


class Point(NamedTuple):
    """A grid point, built: the same network, loss, optimizer and starting state for every mode."""

    name: str
    spec: dict[str, Any]  # the grid entry
    net: layers.Layer
    loss: losses.Loss
    optimizer: optax.GradientTransformation
    state: TrainState
    example_shape: tuple[int, ...]  # one example: (784,), (28, 28, 1)
    n_outputs: int

    @property
    def batch(self) -> int:
        return int(self.spec["batch"])

    @property
    def is_mlp(self) -> bool:
        return is_mlp(self.spec)

    @property
    def in_shape(self) -> tuple[int, ...]:
        return (self.batch, *self.example_shape)


def is_mlp(spec: dict[str, Any]) -> bool:
    """Whether a grid entry is an MLP (``features``) rather than a ``model:`` node."""
    return "features" in spec


def _positive_ints(value: Any) -> bool:
    return (
        isinstance(value, list | tuple)
        and len(value) > 0
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    )


def instantiate_model(spec: dict[str, Any]) -> layers.Layer:
    """The Layer a ``model:`` node instantiates to.

    Raises:
      ValueError: a node that does not instantiate, or not to a Layer.
    """
    try:
        net = instantiate(spec["model"])
    except Exception as e:  # Hydra wraps every failure; one line names the point
        raise ValueError(f"grid point {spec['name']!r}: model: {e}") from e
    if not isinstance(net, layers.Layer):
        raise ValueError(
            f"grid point {spec['name']!r}: model: instantiates to {type(net).__name__}, not a "
            f"bpjax Layer (a factory needs _target_ and its arguments, e.g. _target_: "
            f"bpjax.lenet5)"
        )
    return net


def check_grid(grid: list[dict[str, Any]]) -> None:
    """Checks every grid entry before anything is compiled; a ``model:`` is instantiated and
    its output shape traced (nothing is compiled).

    Raises:
      ValueError: repeated names; an entry without a name or a positive ``batch``; neither or
        both of ``features`` and ``model``; ``features`` (two or more sizes) without an
        ``activation``; ``model`` without ``input_shape``; a model that does not instantiate
        or whose output is not ``[batch, n_outputs]``; an ``epoch_examples`` below ``batch``.
    """
    names = [spec.get("name") for spec in grid]
    if len(set(names)) != len(names):
        raise ValueError(f"grid point names must be unique, got {names}")
    for spec in grid:
        name = spec.get("name")
        where = f"grid point {name!r}"
        if not name or not isinstance(name, str):
            raise ValueError(f"every grid point needs a name, got {spec}")
        if not _positive_ints([spec.get("batch")]):
            raise ValueError(f"{where}: batch must be a positive integer, got {spec.get('batch')}")
        if is_mlp(spec) == ("model" in spec):
            raise ValueError(f"{where}: give either features (an MLP) or model (any network)")
        if is_mlp(spec):
            if not _positive_ints(spec["features"]) or len(spec["features"]) < 2:
                raise ValueError(
                    f"{where}: features are layer sizes with the input and output, e.g. "
                    f"[784, 30, 10], got {spec['features']}"
                )
            if not spec.get("activation"):
                raise ValueError(f"{where}: an MLP point needs an activation")
        else:
            if not _positive_ints(spec.get("input_shape")):
                raise ValueError(
                    f"{where}: a model point needs input_shape, one example's shape, e.g. "
                    f"[28, 28, 1], got {spec.get('input_shape')}"
                )
            shape = tuple(
                layers.out_shape(instantiate_model(spec), (spec["batch"], *spec["input_shape"]))
            )
            if len(shape) != 2:
                raise ValueError(
                    f"{where}: the model's output is {shape}; the benchmark's loss takes "
                    f"[batch, n_outputs]"
                )
        examples = spec.get("epoch_examples")
        if examples is not None and (not _positive_ints([examples]) or examples < spec["batch"]):
            raise ValueError(f"{where}: epoch_examples must be at least batch, got {examples}")


def apply_quick(cfg: DictConfig) -> DictConfig:
    """``cfg`` with ``quick_settings`` applied: fewer points, repeats and examples, smaller nets,
    batches and images.

    ``points`` keeps the grid points it names (None: all); MLP hidden widths are capped at
    ``max_width`` and their count at ``max_hidden_layers``; a model point's spatial sizes (all
    but the last axis of ``input_shape``) at ``max_image_size``, and each run of identical
    consecutive layers of its ``_args_`` (a stack of the same block) at ``max_blocks``; batches
    at ``max_batch``; ``epoch_examples`` is the quick setting everywhere. The other settings
    replace the keys of the same name (nested mappings merge).
    """
    settings = OmegaConf.to_container(cfg.quick_settings, resolve=True)
    max_width, max_batch = settings.pop("max_width"), settings.pop("max_batch")
    max_hidden, max_image = settings.pop("max_hidden_layers"), settings.pop("max_image_size")
    max_blocks = settings.pop("max_blocks")
    keep = settings.pop("points", None)
    grid = []
    for spec in OmegaConf.to_container(cfg.grid, resolve=True):
        if keep is not None and spec.get("name") not in keep:
            continue
        spec = {k: v for k, v in spec.items() if k != "epoch_examples"}
        spec["batch"] = min(spec["batch"], max_batch)
        if is_mlp(spec):
            features = list(spec["features"])
            hidden = [min(f, max_width) for f in features[1:-1]][:max_hidden]
            spec["features"] = [features[0], *hidden, features[-1]]
        elif spec.get("input_shape"):
            *spatial, channels = spec["input_shape"]
            spec["input_shape"] = [*(min(s, max_image) for s in spatial), channels]
            spec["model"] = _fewer_blocks(spec["model"], max_blocks)
        grid.append(spec)
    return OmegaConf.merge(cfg, settings, {"grid": grid})


def _fewer_blocks(model: dict[str, Any], most: int) -> dict[str, Any]:
    """``model`` with each run of identical consecutive layers in its ``_args_`` (a stack of the
    same block, as ``bpjax.serial`` takes them) cut to its first ``most``."""
    args = model.get("_args_")
    if not isinstance(args, list):
        return model
    kept, run = [], 0
    for i, layer in enumerate(args):
        run = run + 1 if i and layer == args[i - 1] else 1
        if run <= most:
            kept.append(layer)
    return {**model, "_args_": kept}


def synthetic_data(
    cfg: DictConfig, example_shape: Sequence[int], n_outputs: int, n: int, seed: int
) -> tuple[jax.Array, jax.Array]:
    """``x [n, *example_shape]`` uniform in [0, 1) and targets for ``cfg.loss`` over
    ``n_outputs`` classes (MNIST-like for an MLP's ``[784]``).

    Drawn with numpy and put on device, so no small jax programs need compiling.
    """
    rng = np.random.default_rng(seed)
    x = rng.random((n, *example_shape), dtype=np.float32)
    labels = rng.integers(0, n_outputs, n)
    y = encode_targets(labels, task="classification", loss_name=cfg.loss, n_outputs=n_outputs)
    return jnp.asarray(x), jnp.asarray(y)


def _mlp_params(cfg: DictConfig, net: layers.Layer, optimizer: Any, key: jax.Array, in_shape):
    """An MLP's params with ``init_state``'s structure (``jax.eval_shape``), weights drawn by
    numpy from ``N(0, 1 / n_in)``, zero biases: timings do not depend on the values, and this
    skips compiling the dozens of small random-number programs an eager init needs."""
    shapes = jax.eval_shape(lambda k: init_state(net, optimizer, k, in_shape).params, key)
    rng = np.random.default_rng(cfg.seed)

    def draw(leaf):
        if leaf.ndim < 2:
            return jnp.asarray(np.zeros(leaf.shape, leaf.dtype))
        scale = 1 / math.sqrt(leaf.shape[0])
        return jnp.asarray((scale * rng.standard_normal(leaf.shape)).astype(leaf.dtype))

    return jax.tree_util.tree_map(draw, shapes)


def build(cfg: DictConfig, spec: dict[str, Any]) -> Point:
    """The grid point's network, loss, ``optax.sgd(cfg.learning_rate)`` and starting state.

    An MLP's params are drawn by numpy (``_mlp_params``); a model's come from its own ``init``
    (batch norm's scales must be ones, which a generic draw would not know), through one
    jitted ``init_state``, with its network state (batch norm's running statistics).
    """
    optimizer = optax.sgd(cfg.learning_rate)
    key = jax.random.PRNGKey(cfg.seed)
    if is_mlp(spec):
        example_shape = (int(spec["features"][0]),)
        net = layers.mlp(list(spec["features"][1:]), activation=spec["activation"])
        in_shape = (int(spec["batch"]), *example_shape)
        params = _mlp_params(cfg, net, optimizer, key, in_shape)
        step = jnp.asarray(np.zeros((), np.int32))
        state = TrainState(params, optimizer.init(params), step, key)
        n_outputs = int(spec["features"][-1])
    else:
        example_shape = tuple(int(s) for s in spec["input_shape"])
        net = instantiate_model(spec)
        in_shape = (int(spec["batch"]), *example_shape)
        state = jax.jit(lambda k: init_state(net, optimizer, k, in_shape))(key)
        n_outputs = int(layers.out_shape(net, in_shape)[-1])
    loss = losses.get(cfg.loss)
    return Point(spec["name"], spec, net, loss, optimizer, state, example_shape, n_outputs)


def state_for(point: Point, mode: str, rule_options: dict[str, Any] | None = None) -> TrainState:
    """The point's starting state for ``mode``: for a learning rule, its rule state (feedback
    weights) drawn by ``init_state(..., grad_mode=mode, rule_options=...)`` in one jitted call,
    beside the point's params (Kolen-Pollack's drawn ``B`` held against them: its
    ``KolenPollackState`` is tied to the params); the point's state as it is for backprop."""
    if mode in MODES:
        return point.state

    def draw(key, params):
        state = init_state(
            point.net,
            point.optimizer,
            key,
            point.in_shape,
            grad_mode=mode,
            rule_options=rule_options,
        )
        if not isinstance(state.rule_state, credit.KolenPollackState):
            return state.rule_state
        drawn = credit.kolen_pollack_feedback(state.params, state.rule_state)
        return credit.kolen_pollack_state(params, drawn)

    return point.state._replace(rule_state=jax.jit(draw)(point.state.key, point.state.params))


def epoch_examples(cfg: DictConfig, point: Point) -> int:
    """Examples in the point's epoch: its own ``epoch_examples``, or the config's."""
    return int(point.spec.get("epoch_examples") or cfg.epoch_examples)


@functools.partial(jax.jit, static_argnums=(2, 3))
def epoch_order_of(key: jax.Array, epoch_index: jax.Array, n: int, batch: int) -> jax.Array:
    """The permutation ``make_epoch`` draws for epoch ``epoch_index``: ``[n // batch, batch]``."""
    steps = n // batch
    shuffle_key = jax.random.fold_in(jax.random.fold_in(key, SHUFFLE), epoch_index)
    return jax.random.permutation(shuffle_key, n)[: steps * batch].reshape(steps, batch)
