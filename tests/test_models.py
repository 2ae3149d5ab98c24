"""Model factories (``bpjax.layers.models``): the architectures they promise, the gradient
through each checked against autodiff (the table in test_layers.py checks each backward against
jax.vjp too), and their refusals."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import init_shapes, numpy_params, tree_cast

import bpjax
from bpjax import layers

KEY = jax.random.PRNGKey(0)


def count(params) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params))


def test_lenet5_is_lecuns_architecture():
    net = layers.lenet5()
    out_shape, params = init_shapes(net, (2, 28, 28, 1))
    assert out_shape == (2, 10)
    shapes = [jax.tree_util.tree_map(jnp.shape, p) for p in params if p != ()]
    assert shapes == [
        {"w": (5, 5, 1, 6), "b": (6,)},  # C1: 28x28 padded by 2, as LeCun's 32x32
        {"w": (5, 5, 6, 16), "b": (16,)},  # C3: 10x10x16
        {"w": (400, 120), "b": (120,)},  # C5 on S4's 5x5x16
        {"w": (120, 84), "b": (84,)},  # F6
        {"w": (84, 10), "b": (10,)},
    ]
    assert count(params) == 61_706
    names = [layer.name.split("(")[0] for layer in net.sublayers]
    assert names[:3] == ["conv2d", "relu", "max_pool"]
    classic = layers.lenet5(activation="tanh", pooling="avg")
    assert [layer.name.split("(")[0] for layer in classic.sublayers][:3] == [
        "conv2d",
        "tanh",
        "avg_pool",
    ]


def test_cnn_stages_batch_norm_and_dropout():
    net = layers.cnn((8, 16), convs_per_stage=2, hidden=(32,), batch_norm=True, dropout_rate=0.5)
    names = [layer.name.split("(")[0] for layer in net.sublayers]
    stage = ["conv2d", "batch_norm", "relu"] * 2 + ["max_pool"]
    assert names == stage * 2 + ["flatten", "dropout", "dense", "relu", "dropout", "dense"]
    assert layers.is_stateful(net)
    out_shape, params = init_shapes(net, (2, 28, 28, 1))
    assert out_shape == (2, 10)
    assert "b" not in params[0] and params[0]["w"].shape == (3, 3, 1, 8)  # the norm's offset
    plain = layers.cnn((8,), convs_per_stage=1, hidden=())
    assert [layer.name.split("(")[0] for layer in plain.sublayers] == [
        "conv2d",
        "relu",
        "max_pool",
        "flatten",
        "dense",
    ]
    assert not layers.is_stateful(plain)


def test_resnet_stages_shortcuts_and_state():
    net = layers.resnet((8, 16), blocks_per_stage=[1, 2], n_classes=5)
    out_shape, _ = init_shapes(net, (2, 28, 28, 3))
    assert out_shape == (2, 5)
    blocks = [layer for layer in net.sublayers if layer.combinator == "residual"]
    assert len(blocks) == 3
    # the first block of the second stage halves the resolution and projects the shortcut
    assert [b.sublayers[1].name.split("(")[0] for b in blocks] == ["identity", "conv2d", "identity"]
    assert layers.out_shape(blocks[1], (2, 28, 28, 8)) == (2, 14, 14, 16)
    assert layers.is_stateful(net)
    state = net.init_state((2, 28, 28, 3))
    means = [
        s["running_mean"].shape
        for s in jax.tree_util.tree_leaves(
            state, is_leaf=lambda n: isinstance(n, dict) and "running_mean" in n
        )
    ]
    assert len(means) == 2 * 3 + 1  # two norms a block, one before the pool


@pytest.mark.parametrize(
    "net",
    [
        layers.lenet5(4),
        layers.cnn((3,), convs_per_stage=2, hidden=(6,), n_classes=4, batch_norm=True),
        layers.resnet((2, 3), 1, n_classes=4),
    ],
    ids=["lenet5", "cnn-bn", "resnet"],
)
def test_manual_gradient_of_each_model_equals_autodiff(net):
    """Training mode (batch statistics), float64, jitted: manual == jax.grad to 1e-10."""
    in_shape = (3, 12, 12, 2)
    params = numpy_params(net, in_shape)  # float64; init's own values are not the point
    state = tree_cast(layers.init_state(net, in_shape), jnp.float64)
    x = jnp.asarray(np.random.default_rng(0).standard_normal(in_shape))
    y = jnp.array([0, 1, 3])
    key = jax.random.PRNGKey(1)
    grads = {}
    for mode in ("manual", "autodiff"):
        f = bpjax.value_and_grad(net, "softmax_cross_entropy", mode=mode, with_state=True)
        (_, new_state), grads[mode] = jax.jit(f)(params, x, y, key=key, state=state)
    for a, b in zip(
        jax.tree_util.tree_leaves(grads["manual"]),
        jax.tree_util.tree_leaves(grads["autodiff"]),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    if layers.is_stateful(net):  # training mode moved the running statistics
        moved = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), new_state, state)
        assert any(jax.tree_util.tree_leaves(moved))


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: layers.lenet5(0), "n_classes"),
        (lambda: layers.lenet5(pooling="min"), "unknown pooling 'min'; valid: max, avg"),
        (lambda: layers.lenet5(activation="nope"), "unknown activation"),
        (lambda: layers.cnn(()), "channels"),
        (lambda: layers.cnn((8, -1)), "channels"),
        (lambda: layers.cnn(dropout_rate=1.0), "dropout_rate"),
        (lambda: layers.cnn(hidden=(0,)), "hidden"),
        (lambda: layers.resnet((8, 16), [1, 2, 3]), "3 entries for 2 stages"),
        (lambda: layers.resnet((8,), 0), "blocks_per_stage"),
        (
            lambda: layers.cnn(output_w_init="zero"),
            r"^output_w_init: unknown initializer 'zero'; valid names",
        ),
        (
            lambda: layers.mlp([4, 2], output_w_init="nope"),
            "^output_w_init: unknown initializer 'nope'",
        ),
        (lambda: layers.lenet5(output_w_init="nope"), "^output_w_init: unknown initializer 'nope'"),
        (
            lambda: layers.resnet((8,), 1, output_w_init="nope"),
            "^output_w_init: unknown initializer",
        ),
        (lambda: layers.mlp([4, 2], w_init="he"), "^w_init: unknown initializer 'he'"),
        (
            lambda: layers.mlp([4, 2], w_init="constant"),
            "^w_init: initializer 'constant' needs arguments",
        ),
    ],
)
def test_bad_arguments_raise_one_clear_error(build, match):
    with pytest.raises(ValueError, match=match):
        build()


OUTPUT_INIT_BUILDERS = {
    "mlp": lambda **kw: layers.mlp([5, 4], **kw),
    "lenet5": lambda **kw: layers.lenet5(4, **kw),
    "cnn": lambda **kw: layers.cnn((3,), convs_per_stage=1, hidden=(5,), n_classes=4, **kw),
    "resnet": lambda **kw: layers.resnet((2,), 1, n_classes=4, **kw),
}


@pytest.mark.parametrize("name", sorted(OUTPUT_INIT_BUILDERS))
def test_output_w_init_sets_the_output_layer_alone(name):
    """``output_w_init`` (the feedback rules' zero start) replaces the output layer's weight
    initializer and nothing else: every other leaf is drawn as without it, bit for bit."""
    build = OUTPUT_INIT_BUILDERS[name]
    in_shape = (2, 6) if name == "mlp" else (2, 28, 28, 1)
    _, default = build().init(KEY, in_shape)
    _, zeroed = build(output_w_init="zeros").init(KEY, in_shape)
    _, constant = build(output_w_init=jax.nn.initializers.constant(0.5)).init(KEY, in_shape)
    out_w = lambda params: params[-1]["w"]
    assert out_w(default).shape[-1] == 4 and jnp.any(out_w(default) != 0)
    assert jnp.all(out_w(zeroed) == 0) and jnp.all(out_w(constant) == 0.5)
    for params in (zeroed, constant):
        rest = [*jax.tree_util.tree_leaves(params[:-1]), params[-1]["b"]]
        same = [*jax.tree_util.tree_leaves(default[:-1]), default[-1]["b"]]
        for a, b in zip(rest, same, strict=True):
            np.testing.assert_array_equal(a, b)


def test_lenet5_on_flattened_images_names_the_input_it_needs():
    with pytest.raises(ValueError, match=r"conv2d.*\(2, 784\)"):
        layers.lenet5().init(KEY, (2, 784))
