"""Layers: every hand-written backward == jax.vjp of its forward; shapes, modes and errors.

The tables ``ACTIVATION_CASES`` and ``LAYERS`` drive the tests; ``test_tables_cover_every_layer``
asserts they exercise every public constructor in ``bpjax.layers`` and every key of
``layers.ACTIVATIONS``, so a new layer can't go untested.
"""

import functools
import typing
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    ATOL,
    RTOL,
    assert_no_more_work,
    assert_trees_close,
    numpy_init,
    tree_cast,
    xla_cost,
)

from bpjax import initializers, layers


class ActivationCase(NamedTuple):
    id: str
    name: str  # key of layers.ACTIVATIONS
    kwargs: dict[str, Any]  # constructor arguments
    reference: Callable  # the jax.nn (or jnp) forward it must equal


ACTIVATION_CASES = [
    ActivationCase("identity", "identity", {}, lambda x: x),
    ActivationCase("sigmoid", "sigmoid", {}, jax.nn.sigmoid),
    ActivationCase("tanh", "tanh", {}, jnp.tanh),
    ActivationCase("relu", "relu", {}, jax.nn.relu),
    ActivationCase(
        "leaky_relu(0.2)",
        "leaky_relu",
        {"negative_slope": 0.2},
        lambda x: jax.nn.leaky_relu(x, negative_slope=0.2),
    ),
    ActivationCase("elu(0.5)", "elu", {"alpha": 0.5}, lambda x: jax.nn.elu(x, alpha=0.5)),
    ActivationCase("gelu", "gelu", {}, lambda x: jax.nn.gelu(x, approximate=False)),
    ActivationCase(
        "gelu(approximate)",
        "gelu",
        {"approximate": True},
        lambda x: jax.nn.gelu(x, approximate=True),
    ),
    ActivationCase("gelu_tanh", "gelu_tanh", {}, lambda x: jax.nn.gelu(x, approximate=True)),
    ActivationCase("softplus", "softplus", {}, jax.nn.softplus),
    ActivationCase("silu", "silu", {}, jax.nn.silu),
    ActivationCase("swish", "swish", {}, jax.nn.swish),
    ActivationCase("softmax", "softmax", {}, lambda x: jax.nn.softmax(x, axis=-1)),
    ActivationCase("log_softmax", "log_softmax", {}, lambda x: jax.nn.log_softmax(x, axis=-1)),
]
ACTIVATION_IDS = [c.id for c in ACTIVATION_CASES]


def make_activation(case: ActivationCase) -> layers.Layer:
    return layers.activation(case.name, **case.kwargs)


class Case(NamedTuple):
    id: str
    builds: str  # the public constructor exercised (a name in layers.__all__ or ACTIVATIONS)
    factory: Callable[[], layers.Layer]
    in_shape: tuple[int, ...]  # one example's shape; tests prepend the batch axis
    train: bool = False  # forward with a key (training mode: dropout draws a mask)
    has_params: bool = False


LAYERS = [
    *(
        Case(c.id, c.name, lambda c=c: make_activation(c), (6,))
        for c in ACTIVATION_CASES  # built through layers.activation(name, **kwargs)
    ),
    Case("dense", "dense", lambda: layers.dense(6), (5,), has_params=True),
    Case("dense-no-bias", "dense", lambda: layers.dense(6, use_bias=False), (5,), has_params=True),
    Case(
        "dense-he_normal",
        "dense",
        lambda: layers.dense(6, w_init="he_normal", b_init="normal"),
        (5,),
        has_params=True,
    ),
    Case(
        "dense-callable-init",
        "dense",
        lambda: layers.dense(
            3,
            w_init=jax.nn.initializers.orthogonal(),
            b_init=jax.nn.initializers.constant(0.1),
        ),
        (5,),
        has_params=True,
    ),
    Case("dense-2-leading-axes", "dense", lambda: layers.dense(6), (3, 5), has_params=True),
    Case("flatten", "flatten", layers.flatten, (4, 3)),
    Case("dropout-train", "dropout", lambda: layers.dropout(0.3), (6,), train=True),
    Case("dropout-eval", "dropout", lambda: layers.dropout(0.3), (6,)),
    Case("dropout(0)-train", "dropout", lambda: layers.dropout(0.0), (6,), train=True),
    Case(
        "serial",
        "serial",
        lambda: layers.serial(layers.dense(6), layers.tanh(), layers.dense(3)),
        (5,),
        has_params=True,
    ),
    Case(
        "serial-nested-flatten-dropout",
        "serial",
        lambda: layers.serial(
            layers.flatten(),
            layers.dense(6),
            layers.serial(layers.relu(), layers.dropout(0.5)),
            layers.dense(3),
        ),
        (4, 3),
        train=True,
        has_params=True,
    ),
    Case(
        "mlp-dropout-logsoftmax",
        "mlp",
        lambda: layers.mlp(
            [6, 6, 3], activation="elu", output_activation="log_softmax", dropout_rate=0.2
        ),
        (5,),
        train=True,
        has_params=True,
    ),
]
# Branching combinators: an in_shape that is a tuple of shapes is a tuple input.
LAYERS += [
    Case(
        "parallel",
        "parallel",
        lambda: layers.parallel(layers.dense(4), layers.tanh()),
        ((5,), (3,)),
        has_params=True,
    ),
    Case("fan_out", "fan_out", lambda: layers.fan_out(3), (5,)),
    Case("fan_in_sum", "fan_in_sum", layers.fan_in_sum, ((5,), (5,), (5,))),
    Case("fan_in_concat", "fan_in_concat", layers.fan_in_concat, ((5,), (2,))),
    Case("fan_in_concat-axis1", "fan_in_concat", lambda: layers.fan_in_concat(1), ((2, 3), (4, 3))),
    Case(
        "residual-identity",
        "residual",
        lambda: layers.residual(layers.serial(layers.dense(5), layers.tanh())),
        (5,),
        has_params=True,
    ),
    Case(
        "residual-projection",
        "residual",
        lambda: layers.residual(layers.serial(layers.dense(4), layers.relu()), layers.dense(4)),
        (5,),
        has_params=True,
    ),
    Case(
        "serial-fan_out-parallel-fan_in",
        "serial",
        lambda: layers.serial(
            layers.fan_out(2),
            layers.parallel(layers.dense(3), layers.serial(layers.dense(3), layers.sigmoid())),
            layers.fan_in_concat(),
            layers.dense(2),
        ),
        (5,),
        has_params=True,
    ),
]
# Normalization (normalization.py). Random scale and offset (the default ones and zeros would
# hide a missing factor of scale in dx) and, in evaluation mode, running statistics other than
# the initial zeros and ones. Batch 1 on [batch, features] is batch norm's zero-variance case.
_AFFINE = {
    "scale_init": jax.nn.initializers.uniform(2.0),
    "offset_init": jax.nn.initializers.normal(1.0),
}


def _running(layer: layers.Layer) -> layers.Layer:
    """A batch norm whose initial running mean and variance vary by channel."""

    def init_state(in_shape):
        c = layer.init_state(in_shape)["running_mean"].shape[0]
        return {
            "running_mean": jnp.linspace(-1.0, 1.0, c),
            "running_var": jnp.linspace(0.5, 2.0, c),
        }

    return layer._replace(init_state=init_state)


LAYERS += [
    Case(
        "batch_norm-train",
        "batch_norm",
        lambda: layers.batch_norm(**_AFFINE),
        (5,),
        train=True,
        has_params=True,
    ),
    Case(
        "batch_norm-eval",
        "batch_norm",
        lambda: _running(layers.batch_norm(**_AFFINE)),
        (5,),
        has_params=True,
    ),
    Case(
        "batch_norm-nhwc-train",
        "batch_norm",
        lambda: layers.batch_norm(momentum=0.5, **_AFFINE),
        (3, 5, 4),
        train=True,
        has_params=True,
    ),
    Case(
        "batch_norm-nhwc-eval",
        "batch_norm",
        lambda: _running(layers.batch_norm(**_AFFINE)),
        (3, 5, 4),
        has_params=True,
    ),
    Case(
        "batch_norm-axis1-nchw-train",
        "batch_norm",
        lambda: layers.batch_norm(axis=1, **_AFFINE),
        (3, 5, 2),
        train=True,
        has_params=True,
    ),
    Case(
        "batch_norm-axis-2-eval",
        "batch_norm",
        lambda: _running(layers.batch_norm(axis=-2, **_AFFINE)),
        (3, 5, 2),
        has_params=True,
    ),
    Case("layer_norm", "layer_norm", lambda: layers.layer_norm(**_AFFINE), (5,), has_params=True),
    Case(
        "layer_norm-nhwc",
        "layer_norm",
        lambda: layers.layer_norm(**_AFFINE),
        (3, 2, 5),
        train=True,  # a key changes nothing: the statistics are each position's own
        has_params=True,
    ),
    *(
        Case(
            f"group_norm({g})-nhwc",
            "group_norm",
            lambda g=g: layers.group_norm(g, **_AFFINE),
            (3, 2, 6),
            has_params=True,
        )
        for g in (1, 2, 6)  # 1: the whole example; 2: groups of 3; 6 = c: instance norm
    ),
    Case(
        "group_norm(3)-no-spatial",
        "group_norm",
        lambda: layers.group_norm(3, **_AFFINE),
        (9,),
        has_params=True,
    ),
]
# Convolutions and pooling (conv.py, pooling.py). One example is [h, w, c]; odd sizes and
# strides that do not divide them leave trailing rows/columns that no window reads. Outputs
# stay small: float32 sums of many terms stray from float64 by more than ATOL, autodiff's too.
LAYERS += [
    Case("conv2d-3x3", "conv2d", lambda: layers.conv2d(4, 3), (4, 3, 2), has_params=True),
    Case(
        "conv2d-stride2-same-odd",  # SAME pads asymmetrically here: (1, 1) rows, (0, 1) columns
        "conv2d",
        lambda: layers.conv2d(3, 3, stride=2),
        (5, 4, 2),
        has_params=True,
    ),
    Case(
        "conv2d-valid-rect-unread-he",  # row 5 and columns 5, 6 are never read
        "conv2d",
        lambda: layers.conv2d(
            3, (3, 2), stride=(2, 3), padding="VALID", w_init="he_normal", b_init="normal"
        ),
        (6, 7, 2),
        has_params=True,
    ),
    Case(
        "conv2d-kernel5x3-stride3x2-dilation1x2",  # kernels larger than the strides
        "conv2d",
        lambda: layers.conv2d(2, (5, 3), stride=(3, 2), dilation=(1, 2)),
        (8, 7, 2),
        has_params=True,
    ),
    Case(
        "conv2d-stride2-pad-wider-than-kernel",  # dx's low pad (k - 1) d - lo < 0: a crop
        "conv2d",
        lambda: layers.conv2d(2, 2, stride=2, padding=3),
        (3, 4, 2),
        has_params=True,
    ),
    Case(
        "conv2d-groups2-stride2-explicit-pads",
        "conv2d",
        lambda: layers.conv2d(6, 3, stride=2, padding=[(2, 0), (1, 2)], feature_group_count=2),
        (5, 4, 4),
        has_params=True,
    ),
    Case(
        "conv2d-depthwise-x2-no-bias",  # groups == c_in, two outputs per input channel
        "conv2d",
        lambda: layers.conv2d(6, 3, feature_group_count=3, use_bias=False),
        (4, 4, 3),
        has_params=True,
    ),
    Case("max_pool-2-odd", "max_pool", lambda: layers.max_pool(2), (5, 4, 3)),
    Case(
        "max_pool-3-stride2-same",  # overlapping windows
        "max_pool",
        lambda: layers.max_pool(3, stride=2, padding="SAME"),
        (7, 6, 2),
    ),
    Case(
        "max_pool-2x3-stride1x2-explicit-pads",
        "max_pool",
        lambda: layers.max_pool((2, 3), stride=(1, 2), padding=[(1, 0), (0, 2)]),
        (5, 7, 2),
    ),
    Case("avg_pool-2-odd", "avg_pool", lambda: layers.avg_pool(2), (5, 7, 2)),
    Case(
        "avg_pool-3-stride2-same",
        "avg_pool",
        lambda: layers.avg_pool(3, stride=2, padding="SAME"),
        (7, 6, 2),
    ),
    Case(
        "avg_pool-3x2-stride1-pad1",
        "avg_pool",
        lambda: layers.avg_pool((3, 2), stride=1, padding=1),
        (4, 5, 2),
    ),
    Case("global_avg_pool", "global_avg_pool", layers.global_avg_pool, (5, 3, 4)),
    Case(
        "serial-cnn",  # relu then max_pool: all-zero windows (ties) occur
        "serial",
        lambda: layers.serial(
            layers.conv2d(4, 3),
            layers.relu(),
            layers.max_pool(2),
            layers.conv2d(6, 3, stride=2, padding="VALID", feature_group_count=2),
            layers.relu(),
            layers.avg_pool(2, stride=1, padding="SAME"),
            layers.global_avg_pool(),
            layers.dense(3),
        ),
        (10, 9, 2),
        has_params=True,
    ),
]
# Image networks (models.py), small: LeNet-5 needs 12x12 inputs at least.
LAYERS += [
    Case("lenet5", "lenet5", lambda: layers.lenet5(3), (12, 12, 1), has_params=True),
    Case(
        "cnn-bn-dropout",
        "cnn",
        lambda: layers.cnn(
            (3,), convs_per_stage=1, hidden=(5,), n_classes=2, batch_norm=True, dropout_rate=0.3
        ),
        (4, 4, 2),
        train=True,
        has_params=True,
    ),
    Case(
        "resnet",
        "resnet",
        lambda: layers.resnet((2, 4), 1, n_classes=3),
        (4, 4, 1),
        train=True,
        has_params=True,
    ),
]
LAYER_IDS = [c.id for c in LAYERS]
CASES = {c.id: c for c in LAYERS}
BATCHES = [1, 7]


def _public_layer_builders() -> set[str]:
    """Names in ``layers.__all__`` that are functions returning a Layer."""
    builders = set()
    for name in layers.__all__:
        obj = getattr(layers, name)
        if callable(obj) and not isinstance(obj, type):
            if typing.get_type_hints(obj).get("return") is layers.Layer:
                builders.add(name)
    return builders


def test_tables_cover_every_layer():
    covered = {case.builds for case in LAYERS}
    # Every activation case is built through ``layers.activation(name)``.
    assert _public_layer_builders() - {"activation"} <= covered
    assert {c.name for c in ACTIVATION_CASES} == set(layers.ACTIVATIONS)
    assert set(layers.ACTIVATIONS) <= covered
    # Building by name exercises the public constructor of the same name.
    for name in set(layers.ACTIVATIONS) & set(layers.__all__):
        assert layers.ACTIVATIONS[name] is getattr(layers, name)
    # Every layer case is checked (a network at one batch size); the networks named are cases.
    assert {c.values[0].id for c in CASE_BATCHES} == set(LAYER_IDS)
    # ... jitted, and (a layer, not a network) eagerly too; both dtypes come from a fixture.
    for mode, ids in (("jit", set(LAYER_IDS)), ("eager", set(LAYER_IDS) - NETWORKS)):
        assert {c.values[0].id for c in CASE_BATCHES if c.values[2] == mode} == ids, mode
    assert MIXED_DTYPE_NETWORKS <= NETWORKS <= set(LAYER_IDS)


def normal(shape, dtype=jnp.float64, *, seed: int = 0) -> jax.Array:
    """Standard normal float32 numbers (the same in either dtype), drawn with numpy: eager
    jax.random compiles anew for every shape and dtype. A tuple of shapes (the input of a
    branching layer) gives a tuple of arrays."""
    if shape and isinstance(shape[0], tuple | list):
        return tuple(normal(s, dtype, seed=seed + 7 * i) for i, s in enumerate(shape))
    draws = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return jnp.asarray(draws, dtype)


def batched(batch: int, in_shape: tuple) -> tuple:
    """One example's shape (or a tuple of them, for branching layers) with a batch axis."""
    if in_shape and isinstance(in_shape[0], tuple):
        return tuple((batch, *s) for s in in_shape)
    return (batch, *in_shape)


def setup_layer(case: Case, batch: int, dtype, *, seed: int = 0):
    """Builds the layer, its params (cast to ``dtype``), an input, an upstream gradient, a key
    and the layer's state (``()`` for a layer without state; float64 statistics cast too)."""
    layer = case.factory()
    in_shape = batched(batch, case.in_shape)
    out_shape, params = numpy_init(layer, in_shape, seed=seed)
    params = tree_cast(params, dtype)
    x = jax.tree_util.tree_map(lambda a: 2 * a, normal(in_shape, dtype, seed=seed))
    dy = normal(out_shape, dtype, seed=seed + 1)
    key = jax.random.key(seed + 1) if case.train else None
    state = tree_cast(layers.init_state(layer, in_shape), dtype)
    return layer, out_shape, params, x, dy, key, state


def forward_backward(layer: layers.Layer) -> Callable:
    def f(params, x, dy, key, state=()):
        y, cache, _ = layers.apply(layer, params, x, key=key, state=state)
        grads, dx = layer.backward(params, cache, dy)
        return y, grads, dx

    return f


def autodiff(layer: layers.Layer, params, x, dy, key, state=()):
    def f(p, x_):
        return layers.apply(layer, p, x_, key=key, state=state)[0]

    y, vjp = jax.vjp(f, params, x)
    grads, dx = vjp(dy)
    return y, grads, dx


def jitted_autodiff(layer: layers.Layer, params, x, dy, key, state=()):
    """``autodiff`` under ``jax.jit``: the reference is the same computation either way, and
    eager JAX compiles every operation for every new shape, which is slow for whole networks."""
    return jax.jit(functools.partial(autodiff, layer))(params, x, dy, key, state)


@functools.cache
def reference(case_id: str, batch: int) -> tuple:
    """jax.vjp of a layer's forward in float64, shared by the float32/float64 and eager/jitted
    runs of a test."""
    layer, _, params, x, dy, key, state = setup_layer(CASES[case_id], batch, jnp.float64)
    return jitted_autodiff(layer, params, x, dy, key, state)


# Whole networks of layers that are each checked eagerly on their own: jitted only (eagerly,
# every operation of a network compiles on its own, for minutes of CPU and nothing new).
NETWORKS = {"serial-cnn", "lenet5", "cnn-bn-dropout", "resnet"}


# (case, batch, mode): every layer jitted at every batch size, and eagerly (op by op, the same
# operations: what it adds is that the backward runs outside a trace) at the larger batch; a
# whole network jitted at the larger batch only (each of its layers is checked at both sizes
# on its own; a network's batch-1 run adds compile time, not cases).
def checked_as(case: Case, batch: int, mode: str) -> bool:
    if case.id in NETWORKS:
        return mode == "jit" and batch == max(BATCHES)
    return mode == "jit" or batch == max(BATCHES)


CASE_BATCHES = [
    pytest.param(case, batch, mode, id=f"{mode}-{case.id}-{batch}")
    for case in LAYERS
    for batch in BATCHES
    for mode in ("eager", "jit")
    if checked_as(case, batch, mode)
]
# Networks whose composition the mixed-dtype test checks: the one with batch norm and dropout
# (state and a key through a stack). Branches are checked by the residual and fan-out cases on
# their own; the ResNet alone took as long to compile in eight dtype combinations as the rest.
MIXED_DTYPE_NETWORKS = {"cnn-bn-dropout"}


def shape_of(tree) -> Any:
    """The shape of an array, or the tuple of shapes of a tuple of arrays."""
    if isinstance(tree, tuple):
        return tuple(shape_of(t) for t in tree)
    return tuple(tree.shape)


def dtypes_of(tree) -> set:
    return {a.dtype for a in jax.tree_util.tree_leaves(tree)}


@pytest.mark.parametrize(("case", "batch", "mode"), CASE_BATCHES)
def test_backward_matches_vjp(case, batch, mode, dtype):
    layer, out_shape, params, x, dy, key, state = setup_layer(case, batch, dtype)
    run = forward_backward(layer)
    y, grads, dx = (jax.jit(run) if mode == "jit" else run)(params, x, dy, key, state)
    # Inputs and params are float32 numbers, so float64 autodiff is the reference for both
    # dtypes. It is also the right one for float32: float32 autodiff underflows where ours does
    # not (jax's tanh-form gelu grad at x = -4.9 is 0, ours -3.2e-6 as in float64).
    expected = tree_cast(reference(case.id, batch), dtype)

    assert shape_of(y) == tuple(out_shape) and dtypes_of(y) == {jnp.dtype(dtype)}
    assert shape_of(dx) == shape_of(x) and dtypes_of(dx) == {jnp.dtype(dtype)}
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)
    for g, p in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(params)):
        assert g.shape == p.shape and g.dtype == p.dtype
    if not case.has_params:
        assert not jax.tree_util.tree_leaves(params) and not jax.tree_util.tree_leaves(grads)
    if dtype == jnp.float64:
        assert_trees_close((y, grads, dx), expected, rtol=RTOL[dtype], atol=ATOL[dtype])
    else:  # float32 rounding of a sum grows with its terms: atol relative to the leaf's scale
        assert jax.tree_util.tree_structure((y, grads, dx)) == jax.tree_util.tree_structure(
            expected
        )
        for a, e in zip(
            jax.tree_util.tree_leaves((y, grads, dx)), jax.tree_util.tree_leaves(expected)
        ):
            scale = max(1.0, float(np.max(np.abs(e)))) if e.size else 1.0
            np.testing.assert_allclose(a, e, rtol=RTOL[dtype], atol=ATOL[dtype] * scale)


# Inputs whose dtype differs from the params' (float64 data into float32 params, a bfloat16
# input): jax.vjp gives each cotangent its primal's dtype, and so must the manual backward, or
# an optimizer state or a scan carry changes dtype. (x, params) dtype pairs; x64 is on here.
MIXED_DTYPES = [
    (jnp.float64, jnp.float32),
    (jnp.float32, jnp.float64),
    (jnp.bfloat16, jnp.float32),
    (jnp.float32, jnp.bfloat16),
]


MIXED_DTYPE_IDS = [f"{x.__name__}-{p.__name__}" for x, p in MIXED_DTYPES]


def mixed_dtype_inputs(case: Case, x_dtype, p_dtype) -> tuple:
    """``setup_layer``'s layer, params, x, dy, key and state with params in ``p_dtype``, x in
    ``x_dtype`` and dy in the dtype of each output (a branch without params keeps its input's
    dtype)."""
    layer, _, params, x, dy, key, state = setup_layer(case, 3, p_dtype)
    x = jax.tree_util.tree_map(lambda a: a.astype(x_dtype), x)
    y = jax.eval_shape(lambda: layers.apply(layer, params, x, key=key, state=state)[0])
    dy = jax.tree_util.tree_map(lambda d, y_: d.astype(y_.dtype), dy, y)
    return layer, params, x, dy, key, state


@pytest.mark.parametrize(
    "case",
    [c for c in LAYERS if c.has_params and (c.id not in NETWORKS or c.id in MIXED_DTYPE_NETWORKS)],
    ids=lambda c: c.id,
)
def test_mixed_dtypes_give_autodiffs_gradient_dtypes(case):
    # Jitted only: dtypes are decided as the backward is traced, the same way eagerly (whose
    # values test_backward_matches_vjp checks). Every dtype pair's manual and autodiff gradients
    # are one jitted program: one compilation per layer, not eight.
    inputs = {
        pair: mixed_dtype_inputs(case, *dtypes)
        for pair, dtypes in zip(MIXED_DTYPE_IDS, MIXED_DTYPES)
    }

    def both(arrays):
        out = {}
        for pair, (params, x, dy, key, state) in arrays.items():
            layer = inputs[pair][0]
            out[pair] = (
                forward_backward(layer)(params, x, dy, key, state)[1:],
                autodiff(layer, params, x, dy, key, state)[1:],
            )
        return out

    results = jax.jit(both)({pair: args[1:] for pair, args in inputs.items()})
    for pair, (x_dtype, p_dtype) in zip(MIXED_DTYPE_IDS, MIXED_DTYPES):
        ours, theirs = results[pair]
        assert jax.tree_util.tree_map(lambda a: a.dtype, ours) == jax.tree_util.tree_map(
            lambda a: a.dtype, theirs
        ), pair
        low = jnp.bfloat16 in (x_dtype, p_dtype)
        as_f32 = functools.partial(tree_cast, dtype=jnp.float32)
        try:
            assert_trees_close(
                as_f32(ours),
                as_f32(theirs),
                rtol=3e-2 if low else 1e-5,
                atol=3e-2 if low else 1e-6,
            )
        except AssertionError as error:
            raise AssertionError(f"x, params dtypes {pair}: {error}") from None


# Every row mixes -100, -50, 0, 50 and 100 (softmax sees them together); the last is all zeros.
EXTREME = np.resize(np.array([-100.0, -50.0, 0.0, 50.0, 100.0]), (7, 6))
EXTREME[-1] = 0.0


@pytest.mark.parametrize("case", ACTIVATION_CASES, ids=ACTIVATION_IDS)
def test_extreme_inputs_are_finite_and_match_autodiff(case):
    layer = make_activation(case)
    x = jnp.asarray(EXTREME)
    dy = normal(x.shape)
    y, grads, dx = forward_backward(layer)((), x, dy, None)
    _, _, dx_ref = autodiff(layer, (), x, dy, None)
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(dx)) and grads == ()
    # Autodiff rules may round a tiny derivative (~1e-22) to 0 where ours keeps it, so the
    # absolute tolerance scales with the input magnitude.
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-10, atol=1e-12 * np.max(np.abs(EXTREME)))


# XLA's cost analysis counts work exactly (no timing, no noise): the hand-written forward +
# backward must do no more than jax.vjp of the same forward.
@pytest.mark.parametrize("case", ACTIVATION_CASES, ids=ACTIVATION_IDS)
def test_backward_does_no_more_work_than_autodiff(case):
    layer = make_activation(case)
    x, dy = normal((64, 128), jnp.float32), normal((64, 128), jnp.float32, seed=1)
    manual = xla_cost(forward_backward(layer), (), x, dy, None)
    auto = xla_cost(functools.partial(autodiff, layer), (), x, dy, None)
    assert_no_more_work(manual, auto)


@pytest.mark.parametrize(
    "net",
    [
        layers.dense(32),
        layers.mlp([64, 10], activation="sigmoid"),
        layers.mlp([64, 64, 10], activation="relu", output_activation="log_softmax"),
        layers.serial(layers.flatten(), layers.dense(16), layers.silu(), layers.dense(4)),
    ],
    ids=["dense", "mlp-sigmoid", "mlp-relu-log_softmax", "flatten-silu"],
)
def test_networks_do_no_more_work_than_autodiff(net):
    in_shape = (32, 4, 8) if net.name.startswith("serial(flatten") else (32, 32)
    out_shape, params = net.init(jax.random.PRNGKey(0), in_shape)
    params = tree_cast(params, jnp.float32)
    x, dy = normal(in_shape, jnp.float32), normal(out_shape, jnp.float32, seed=1)
    manual = xla_cost(forward_backward(net), params, x, dy, None)
    auto = xla_cost(functools.partial(autodiff, net), params, x, dy, None)
    assert_no_more_work(manual, auto)


# Derivatives at large |x| that keep full relative precision. (Sigmoid's y (1 - y), the rule
# autodiff uses too, only keeps it for x < 0: at +50, 1 - y rounds to 0; see layers.sigmoid.
# Likewise elu's y + alpha, the rule autodiff uses for expm1: it loses relative precision as
# exp(x) falls below float resolution of 1, and rounds to 0 at -50, as jax.grad's does.)
EXACT_DERIVATIVES = [
    ("sigmoid", -50.0, np.exp(-50.0) / (1 + np.exp(-50.0)) ** 2),
    ("softplus", -50.0, 1 / (1 + np.exp(50.0))),
    ("silu", -50.0, (1 - 50.0 / (1 + np.exp(-50.0))) / (1 + np.exp(50.0))),  # s (1 + x (1 - s))
]


@pytest.mark.parametrize(("name", "x", "expected"), EXACT_DERIVATIVES)
def test_tiny_derivatives_keep_relative_precision(name, x, expected):
    _, _, dx = forward_backward(layers.activation(name))((), jnp.array([x]), jnp.ones(1), None)
    np.testing.assert_allclose(dx, [expected], rtol=1e-12)


@pytest.mark.parametrize("case", ACTIVATION_CASES, ids=ACTIVATION_IDS)
def test_activation_forward_equals_reference(case, dtype):
    x = 3 * normal((7, 6), dtype)
    y, _ = make_activation(case).forward((), x)
    np.testing.assert_allclose(y, case.reference(x), rtol=RTOL[dtype], atol=ATOL[dtype])


def test_relu_family_at_zero_matches_jax():
    """At the kink the derivative is a convention; ours is jax's (relu 0, leaky_relu 1)."""
    x, dy = jnp.zeros((7, 6)), jnp.ones((7, 6))
    for name in ["relu", "leaky_relu", "elu"]:
        layer = layers.activation(name)
        _, _, dx = forward_backward(layer)((), x, dy, None)
        np.testing.assert_array_equal(dx, autodiff(layer, (), x, dy, None)[2])


# --------------------------------------------------------------------------------------------
# dropout


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_dropout_rate_is_the_drop_probability(rate):
    layer = layers.dropout(rate)
    x = jnp.ones((400, 500))
    y, _ = layer.forward((), x, key=jax.random.key(0))
    dropped = np.asarray(y == 0)
    assert abs(dropped.mean() - rate) < 0.01
    np.testing.assert_allclose(np.asarray(y)[~dropped], 1 / (1 - rate), rtol=1e-6)
    assert abs(float(jnp.mean(y)) - 1.0) < 0.03  # inverted dropout preserves the mean


def test_dropout_backward_uses_the_forward_mask():
    layer = layers.dropout(0.5)
    x = normal((8, 16), seed=1)
    y, cache = layer.forward((), x, key=jax.random.key(2))
    _, dx = layer.backward((), cache, jnp.ones_like(x))
    np.testing.assert_array_equal(dx == 0, y == 0)
    np.testing.assert_allclose(dx[dx != 0], 2.0)


def test_dropout_eval_mode_is_identity():
    layer = layers.dropout(0.5)
    x = normal((8, 16), seed=1)
    y, cache = layer.forward((), x)
    np.testing.assert_array_equal(y, x)
    dy = normal(x.shape, seed=2)
    grads, dx = layer.backward((), cache, dy)
    assert grads == ()
    np.testing.assert_array_equal(dx, dy)


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5, float("nan")])
def test_dropout_rate_outside_unit_interval_raises(rate):
    with pytest.raises(ValueError, match="rate"):
        layers.dropout(rate)


def test_different_keys_give_different_masks():
    layer, x = layers.dropout(0.5), jnp.ones((64,))
    y0, _ = layer.forward((), x, key=jax.random.key(0))
    y0_again, _ = layer.forward((), x, key=jax.random.key(0))
    y1, _ = layer.forward((), x, key=jax.random.key(1))
    np.testing.assert_array_equal(y0, y0_again)
    assert np.any(np.asarray(y0) != np.asarray(y1))


def test_dropout_rejects_a_non_key():
    with pytest.raises(TypeError, match="key"):
        layers.dropout(0.5).forward((), jnp.ones(3), key=0)


# --------------------------------------------------------------------------------------------
# serial


def recording(layer: layers.Layer, log: list, tag: int) -> layers.Layer:
    """Wraps ``layer`` so its forward and backward calls are appended to ``log`` (eager only)."""

    def forward(params, x, *, key=None):
        log.append(("forward", tag))
        return layer.forward(params, x, key=key)

    def backward(params, cache, dy):
        log.append(("backward", tag))
        return layer.backward(params, cache, dy)

    return layers.Layer(layer.init, forward, backward, layer.name)


def test_serial_params_grads_and_reverse_order():
    log = []
    parts = [layers.dense(6), layers.tanh(), layers.dense(3), layers.softmax()]
    net = layers.serial(*(recording(layer, log, i) for i, layer in enumerate(parts)))
    out_shape, params = net.init(jax.random.key(0), (7, 5))
    assert out_shape == (7, 3)
    assert isinstance(params, tuple) and len(params) == len(parts)
    assert params[1] == () and params[3] == ()
    assert params[0]["w"].shape == (5, 6) and params[2]["w"].shape == (6, 3)
    params = tree_cast(params, jnp.float64)
    x = normal((7, 5), seed=1)
    dy = normal((7, 3), seed=2)
    y, grads, dx = forward_backward(net)(params, x, dy, None)
    assert log == [("forward", i) for i in range(4)] + [("backward", i) for i in (3, 2, 1, 0)]
    assert grads[1] == () and grads[3] == ()
    y_ref, grads_ref, dx_ref = autodiff(net, params, x, dy, None)
    assert_trees_close((y, grads, dx), (y_ref, grads_ref, dx_ref), rtol=1e-10, atol=1e-12)
    assert net.sublayers == tuple(net.sublayers) and len(net.sublayers) == 4


def test_serial_nested_params_are_nested_tuples():
    inner = layers.serial(layers.relu(), layers.dense(3))
    net = layers.serial(layers.dense(4), inner)
    out_shape, params = net.init(jax.random.key(0), (2, 5))
    assert out_shape == (2, 3)
    assert len(params) == 2 and len(params[1]) == 2 and params[1][0] == ()
    assert set(params[1][1]) == {"w", "b"}
    assert net.name == "serial(dense(4), serial(relu, dense(3)))"


def test_serial_splits_the_key_for_each_dropout():
    net = layers.serial(layers.dropout(0.5), layers.identity(), layers.dropout(0.5))
    x, key = jnp.ones((4, 32)), jax.random.key(3)
    _, params = net.init(jax.random.key(0), x.shape)
    assert params == ((), (), ())
    y, cache = net.forward(params, x, key=key)
    first_mask, second_mask = cache[0], cache[2]
    assert np.any(np.asarray(first_mask) != np.asarray(second_mask))
    keys = layers.split_keys(key, 3)
    y_ref, _ = layers.dropout(0.5).forward((), x, key=keys[0])
    y_ref, _ = layers.dropout(0.5).forward((), y_ref, key=keys[2])
    np.testing.assert_array_equal(y, y_ref)
    y_eval, _ = net.forward(params, x)
    np.testing.assert_array_equal(y_eval, x)


def test_split_keys_eval_mode():
    assert layers.split_keys(None, 3) == [None, None, None]
    assert len(layers.split_keys(jax.random.key(0), 3)) == 3


def test_serial_rejects_non_layers_and_empty():
    with pytest.raises(ValueError, match="at least one"):
        layers.serial()
    with pytest.raises(TypeError, match="argument 1"):
        layers.serial(layers.relu(), jnp.tanh)


# --------------------------------------------------------------------------------------------
# mlp


def test_mlp_layers_and_shapes():
    net = layers.mlp([100, 10])
    assert [layer.name for layer in net.sublayers] == ["dense(100)", "relu", "dense(10)"]
    out_shape, params = net.init(jax.random.key(0), (32, 784))
    assert out_shape == (32, 10)
    shapes = jax.tree_util.tree_map(jnp.shape, params)
    assert shapes == ({"w": (784, 100), "b": (100,)}, (), {"w": (100, 10), "b": (10,)})
    y, _ = net.forward(params, jnp.ones((32, 784)))
    assert y.shape == (32, 10)


@pytest.mark.parametrize(
    ("act", "expected_std"),
    [
        ("relu", np.sqrt(2 / 400)),  # He: sqrt(2 / fan_in)
        ("leaky_relu", np.sqrt(2 / 400)),
        ("elu", np.sqrt(2 / 400)),
        (layers.leaky_relu(0.2), np.sqrt(2 / 400)),
        ("tanh", np.sqrt(2 / (400 + 800))),  # Glorot: sqrt(2 / (fan_in + fan_out))
        ("sigmoid", np.sqrt(2 / (400 + 800))),
    ],
    ids=lambda a: a.name if isinstance(a, layers.Layer) else str(a),
)
def test_mlp_default_init_by_activation(act, expected_std):
    net = layers.mlp([800, 10], activation=act)
    _, params = net.init(jax.random.key(0), (1, 400))
    std = float(jnp.std(params[0]["w"]))
    assert abs(std - expected_std) < 0.02 * expected_std
    np.testing.assert_array_equal(params[0]["b"], 0)


def test_default_w_init_names():
    assert layers.default_w_init("relu") == "he_normal"
    assert layers.default_w_init(layers.gelu()) == "he_normal"
    assert layers.default_w_init("tanh") == "glorot_uniform"
    assert layers.default_w_init(None) == "glorot_uniform"


def test_mlp_w_init_by_name_and_callable():
    _, params = layers.mlp([4, 3], w_init="zeros").init(jax.random.key(0), (2, 5))
    np.testing.assert_array_equal(params[0]["w"], 0)
    np.testing.assert_array_equal(params[2]["w"], 0)
    init = jax.nn.initializers.constant(0.5)
    _, params = layers.mlp([4], w_init=init, b_init="ones").init(jax.random.key(0), (2, 5))
    np.testing.assert_array_equal(params[0]["w"], 0.5)
    np.testing.assert_array_equal(params[0]["b"], 1)


def test_mlp_output_activation():
    net = layers.mlp([4, 3], activation="tanh", output_activation="softmax")
    assert [layer.name for layer in net.sublayers] == ["dense(4)", "tanh", "dense(3)", "softmax"]
    _, params = net.init(jax.random.key(0), (5, 2))
    y, _ = net.forward(params, normal((5, 2), seed=1))
    np.testing.assert_allclose(jnp.sum(y, axis=-1), 1.0, rtol=1e-6)
    assert layers.mlp([3]).sublayers[-1].name == "dense(3)"  # linear output by default


def test_mlp_dropout_rate():
    net = layers.mlp([8, 8, 3], dropout_rate=0.5)
    names = [layer.name for layer in net.sublayers]
    assert names == ["dense(8)", "relu", "dropout(0.5)"] * 2 + ["dense(3)"]
    _, params = net.init(jax.random.key(0), (4, 5))
    x = normal((4, 5), seed=1)
    y_eval, _ = net.forward(params, x)
    y_eval_again, _ = net.forward(params, x)
    y_train, _ = net.forward(params, x, key=jax.random.key(2))
    np.testing.assert_array_equal(y_eval, y_eval_again)
    assert np.any(np.asarray(y_eval) != np.asarray(y_train))
    assert "dropout" not in " ".join(layer.name for layer in layers.mlp([8, 3]).sublayers)


def test_mlp_accepts_names_or_layers():
    by_name = layers.mlp([4, 2], activation="elu", output_activation="log_softmax")
    by_layer = layers.mlp([4, 2], activation=layers.elu(), output_activation=layers.log_softmax())
    x = normal((3, 5), seed=1)
    _, params = by_name.init(jax.random.key(0), x.shape)
    _, params_by_layer = by_layer.init(jax.random.key(0), x.shape)
    assert_trees_close(params, params_by_layer, rtol=0)
    y, _ = by_name.forward(params, x)
    np.testing.assert_array_equal(y, by_layer.forward(params, x)[0])
    assert by_name.name == by_layer.name


# --------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    "build",
    [
        lambda: layers.activation("nope"),
        lambda: layers.mlp([3], activation="nope"),
        lambda: layers.mlp([3], output_activation="nope"),
    ],
)
def test_unknown_activation_lists_valid_names(build):
    with pytest.raises(ValueError, match="nope") as info:
        build()
    for name in layers.ACTIVATIONS:
        assert name in str(info.value)


def test_activation_passes_a_layer_through_and_refuses_its_kwargs():
    layer = layers.elu(0.5)
    assert layers.activation(layer) is layer
    # The kwargs could not reach an already built layer: they used to be dropped silently.
    with pytest.raises(ValueError, match=r"\['alpha'\] given with a Layer"):
        layers.activation(layer, alpha=2.0)
    assert layers.activation("elu", alpha=2.0).name == "elu(2.0)"


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: layers.dense(3).init(jax.random.key(0), ()), r"dense\(3\).*feature axis.*\(\)"),
        (
            lambda: layers.dense(3).forward({"w": jnp.ones((2, 3))}, jnp.ones(())),
            r"dense\(3\): input has shape \(\)",
        ),
        (lambda: layers.flatten().forward((), jnp.ones(())), r"flatten.*batch axis.*\(\)"),
    ],
    ids=["dense-init", "dense-forward", "flatten-forward"],
)
def test_scalar_inputs_raise_naming_layer_and_shape(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize(
    "build",
    [
        lambda: layers.dense(3, w_init="nope"),
        lambda: layers.dense(3, b_init="nope"),
        lambda: layers.mlp([3], w_init="nope"),
    ],
)
def test_unknown_initializer_lists_valid_names(build):
    with pytest.raises(ValueError, match="nope") as info:
        build()
    for name in initializers.INITIALIZERS:
        assert name in str(info.value)


def test_input_feature_mismatch_names_layer_and_shapes(maybe_jit):
    layer = layers.dense(5)
    _, params = layer.init(jax.random.key(0), (2, 3))
    with pytest.raises(ValueError) as info:  # under jit: raised at trace time, not a NaN
        maybe_jit(layer.forward)(params, jnp.ones((2, 4)))
    message = str(info.value)
    assert "dense(5)" in message and "(2, 4)" in message and "(3, 5)" in message


@pytest.mark.parametrize(
    ("net", "index"),
    [
        (layers.mlp([4, 5]), 0),
        (layers.serial(layers.dense(4), layers.tanh(), layers.dense(5)), 0),
        (layers.serial(layers.tanh(), layers.dense(5)), 1),
    ],
    ids=["mlp", "serial-first", "serial-second"],
)
def test_input_feature_mismatch_inside_serial_names_the_index(net, index, maybe_jit):
    _, params = net.init(jax.random.key(0), (2, 3))
    with pytest.raises(ValueError) as info:
        maybe_jit(net.forward)(params, jnp.ones((2, 7)))
    message = str(info.value)
    n = len(net.sublayers)
    assert f"layer {index} of {n}" in message and "(2, 7)" in message and "dense(" in message


def test_mismatch_deep_inside_serial_names_the_index(maybe_jit):
    """Params of a wrongly sized middle layer: the message names layer 2 and both shapes."""
    net = layers.mlp([4, 5])
    _, params = net.init(jax.random.key(0), (2, 3))
    _, wrong = layers.dense(5).init(jax.random.key(1), (2, 7))
    with pytest.raises(ValueError) as info:
        maybe_jit(net.forward)((params[0], params[1], wrong), jnp.ones((2, 3)))
    message = str(info.value)
    assert "layer 2 of 3" in message and "dense(5)" in message
    assert "(2, 4)" in message and "(7, 5)" in message


@pytest.mark.parametrize(
    "build",
    [
        lambda: layers.mlp([]),
        lambda: layers.mlp([0]),
        lambda: layers.mlp([4, -1]),
        lambda: layers.mlp([4, 2.5]),
        lambda: layers.dense(0),
        lambda: layers.dense(-3),
        lambda: layers.dense(True),
    ],
)
def test_empty_or_non_positive_sizes_raise(build):
    with pytest.raises(ValueError):
        build()


# --------------------------------------------------------------------------------------------
# vmap: per-example forward/backward on single (1-D) examples

VMAP_CASES = [c for c in LAYERS if c.builds in (*layers.ACTIVATIONS, "dense")]
VMAP_CASES = [c for c in VMAP_CASES if len(c.in_shape) == 1]


@pytest.mark.parametrize("case", VMAP_CASES, ids=[c.id for c in VMAP_CASES])
def test_vmap_gives_per_example_backward(case):
    batch = 5
    layer, _, params, x, dy, _, _ = setup_layer(case, batch, jnp.float64)

    @jax.jit  # eager vmap runs op by op and is slow; per-example results don't depend on jit
    def per_example(params, x, dy):
        manual = jax.vmap(forward_backward(layer), in_axes=(None, 0, 0, None))(params, x, dy, None)
        reference = jax.vmap(autodiff, in_axes=(None, None, 0, 0, None))(layer, params, x, dy, None)
        return manual, reference

    (y, grads, dx), reference = per_example(params, x, dy)
    y_batch, grads_batch, dx_batch = forward_backward(layer)(params, x, dy, None)
    tol = {"rtol": 1e-10, "atol": 1e-12}
    assert y.shape == y_batch.shape
    assert_trees_close((y, grads, dx), reference, **tol)  # each example is a 1-D input
    assert_trees_close(y, y_batch, **tol)
    assert_trees_close(dx, dx_batch, **tol)
    summed = jax.tree_util.tree_map(lambda g: jnp.sum(g, axis=0), grads)
    assert_trees_close(summed, grads_batch, **tol)


@pytest.mark.parametrize("rate", [-0.5, 1.0, 1.5])
def test_mlp_rejects_a_dropout_rate_outside_0_1(rate):
    with pytest.raises(ValueError, match="dropout_rate"):
        layers.mlp([4, 2], dropout_rate=rate)


def test_sizes_may_be_numpy_integers():
    net = layers.mlp([np.int64(4), np.int32(2)])
    out_shape, params = net.init(jax.random.PRNGKey(0), (3, 5))
    assert out_shape == (3, 2)
    assert params[0]["w"].shape == (5, 4)
    assert layers.dense(np.int64(5)).init(jax.random.PRNGKey(0), (2, 3))[0] == (2, 5)
