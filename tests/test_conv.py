"""conv2d: forward against lax and a loop reference, shapes, init, the backward's padding
arithmetic, errors, and XLA work against autodiff.

The backward itself is checked against ``jax.vjp`` (float64/float32, eager/jit, batch 1 and 7,
mixed dtypes) through the ``LAYERS`` table of ``test_layers.py``.
"""

import collections
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    assert_no_more_work,
    assert_trees_close,
    compile_as_users,
    numpy_init,
    tree_cast,
    xla_cost,
)
from test_layers import autodiff, forward_backward, normal

import bpjax
from bpjax import layers


def conv_forward_naive(x, w, b, *, stride, pads, dilation, groups):
    """CS231n's ``conv_forward_naive``, with dilation and groups: explicit loops in numpy."""
    x, w, b = np.asarray(x), np.asarray(w), np.asarray(b)
    batch, _, _, c_in = x.shape
    kh, kw, c_group, n_out = w.shape
    xp = np.pad(x, [(0, 0), *pads, (0, 0)])
    m_h = (xp.shape[1] - ((kh - 1) * dilation[0] + 1)) // stride[0] + 1
    m_w = (xp.shape[2] - ((kw - 1) * dilation[1] + 1)) // stride[1] + 1
    out_group = n_out // groups
    y = np.zeros((batch, m_h, m_w, n_out))
    for n in range(batch):
        for i in range(m_h):
            for j in range(m_w):
                for o in range(n_out):
                    g = o // out_group
                    total = b[o]
                    for p in range(kh):
                        for q in range(kw):
                            row = i * stride[0] + p * dilation[0]
                            col = j * stride[1] + q * dilation[1]
                            for c in range(c_group):
                                total += xp[n, row, col, g * c_group + c] * w[p, q, c, o]
                    y[n, i, j, o] = total
    assert c_in == c_group * groups
    return y


def build(layer, in_shape, *, seed=0):
    out_shape, params = numpy_init(layer, in_shape, seed=seed)
    params = tree_cast(params, jnp.float64)
    if "b" in params:
        params["b"] = normal(params["b"].shape, seed=seed + 5)
    return out_shape, params, normal(in_shape, seed=seed + 1)


# (kwargs, input shape, expected w shape, expected output shape)
SHAPES = [
    ({"n_out": 4, "kernel_size": 3}, (2, 6, 5, 3), (3, 3, 3, 4), (2, 6, 5, 4)),
    ({"n_out": 4, "kernel_size": 3, "stride": 2}, (2, 7, 8, 3), (3, 3, 3, 4), (2, 4, 4, 4)),
    (
        {"n_out": 2, "kernel_size": (3, 2), "stride": (2, 3), "padding": "VALID"},
        (1, 8, 7, 5),
        (3, 2, 5, 2),
        (1, 3, 2, 2),
    ),
    (
        {"n_out": 4, "kernel_size": 3, "dilation": 2, "padding": 1},
        (3, 7, 6, 2),
        (3, 3, 2, 4),
        (3, 5, 4, 4),
    ),
    (
        {"n_out": 6, "kernel_size": 3, "padding": [(2, 0), (1, 2)], "feature_group_count": 2},
        (1, 7, 6, 4),
        (3, 3, 2, 6),
        (1, 7, 7, 6),
    ),
    (
        {"n_out": 6, "kernel_size": 3, "feature_group_count": 3},
        (1, 5, 5, 3),
        (3, 3, 1, 6),
        (1, 5, 5, 6),
    ),
    (
        {"n_out": 3, "kernel_size": 5, "padding": "same", "stride": 3},
        (2, 10, 4, 1),
        (5, 5, 1, 3),
        (2, 4, 2, 3),
    ),
]


@pytest.mark.parametrize(("kwargs", "in_shape", "w_shape", "out_shape"), SHAPES)
def test_param_and_output_shapes(kwargs, in_shape, w_shape, out_shape):
    layer = layers.conv2d(**kwargs)
    out, params = layer.init(jax.random.key(0), in_shape)
    assert out == out_shape
    assert params["w"].shape == w_shape and params["b"].shape == (kwargs["n_out"],)
    assert params["w"].dtype == jnp.float32
    assert layers.out_shape(layer, in_shape) == out_shape
    y, _ = layer.forward(params, jnp.ones(in_shape))
    assert y.shape == out_shape


def test_no_bias_and_dtype():
    _, params = layers.conv2d(3, 2, use_bias=False, dtype=jnp.float64).init(
        jax.random.key(0), (1, 4, 4, 2)
    )
    assert set(params) == {"w"} and params["w"].dtype == jnp.float64


@pytest.mark.parametrize(("kwargs", "in_shape", "w_shape", "out_shape"), SHAPES)
def test_forward_equals_lax(kwargs, in_shape, w_shape, out_shape, maybe_jit):
    del w_shape, out_shape  # unused: checked above
    layer = layers.conv2d(**kwargs)
    _, params, x = build(layer, in_shape)
    y, _ = maybe_jit(layer.forward)(params, x)
    padding = kwargs.get("padding", "SAME")
    padding = padding.upper() if isinstance(padding, str) else padding
    if isinstance(padding, int):
        padding = [(padding, padding)] * 2
    pair = lambda v: (v, v) if isinstance(v, int) else v
    expected = jax.lax.conv_general_dilated(
        x,
        params["w"],
        window_strides=pair(kwargs.get("stride", 1)),
        padding=padding,
        rhs_dilation=pair(kwargs.get("dilation", 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=kwargs.get("feature_group_count", 1),
    ) + params["b"].reshape(1, 1, 1, -1)
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "pads"),
    [
        # SAME with stride 2 on 7 x 6: pads (1, 1) rows and (0, 1) columns, resolved by hand.
        ({"n_out": 3, "kernel_size": 3, "stride": 2}, [(1, 1), (0, 1)]),
        (
            {
                "n_out": 4,
                "kernel_size": (2, 3),
                "stride": (1, 2),
                "dilation": (2, 1),
                "padding": [(1, 0), (0, 2)],
                "feature_group_count": 2,
            },
            [(1, 0), (0, 2)],
        ),
    ],
)
def test_forward_equals_a_loop_reference(kwargs, pads):
    layer = layers.conv2d(**kwargs)
    _, params, x = build(layer, (2, 7, 6, 2))
    y, _ = layer.forward(params, x)
    pair = lambda v: (v, v) if isinstance(v, int) else v
    expected = conv_forward_naive(
        x,
        params["w"],
        params["b"],
        stride=pair(kwargs.get("stride", 1)),
        pads=pads,
        dilation=pair(kwargs.get("dilation", 1)),
        groups=kwargs.get("feature_group_count", 1),
    )
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)


def test_same_pads_are_resolved_once_into_the_cache():
    """An even kernel pads SAME asymmetrically, the extra row at the end (as lax, TF)."""
    layer = layers.conv2d(2, 4, stride=2)
    _, params, x = build(layer, (1, 7, 8, 1))
    _, cache = layer.forward(params, x)
    pads = cache[1].value
    assert pads == ((1, 2), (1, 1))
    assert list(pads) == [tuple(p) for p in jax.lax.padtype_to_pads((7, 8), (4, 4), (2, 2), "SAME")]


def test_rows_a_strided_forward_never_reads_get_zero_gradient(maybe_jit):
    """k = 3, s = 2 on 8 rows (VALID) reads rows 0..6: row 7 changes neither y nor dw, and
    its dx is exactly 0."""
    layer = layers.conv2d(3, 3, stride=2, padding="VALID")
    out_shape, params, x = build(layer, (2, 8, 8, 2))
    dy = normal(out_shape, seed=3)
    y, grads, dx = maybe_jit(forward_backward(layer))(params, x, dy, None)
    np.testing.assert_array_equal(dx[:, 7], 0)
    np.testing.assert_array_equal(dx[:, :, 7], 0)
    assert np.all(np.asarray(dx[:, :7, :7]) != 0)
    x_changed = x.at[:, 7].set(100.0).at[:, :, 7].set(-100.0)
    y2, grads2, _ = maybe_jit(forward_backward(layer))(params, x_changed, dy, None)
    np.testing.assert_array_equal(y, y2)
    assert_trees_close(grads, grads2, rtol=1e-14)
    assert_trees_close((y, grads, dx), autodiff(layer, params, x, dy, None), rtol=1e-12, atol=1e-12)


def test_weight_gradient_does_not_read_w():
    """Learning rules that replace ``w`` in the backward (bpjax.credit) rely on it."""
    layer = layers.conv2d(4, 3, stride=2, feature_group_count=2)
    out_shape, params, x = build(layer, (2, 5, 6, 4))
    dy = normal(out_shape, seed=3)
    _, cache = layer.forward(params, x)
    grads, _ = layer.backward(params, cache, dy)
    zeroed, dx = layer.backward({**params, "w": jnp.zeros_like(params["w"])}, cache, dy)
    assert_trees_close(grads, zeroed, rtol=0)
    np.testing.assert_array_equal(dx, 0)


# Init: fan-in kh kw c_in / groups, fan-out kh kw n_out (jax.nn.initializers on HWIO).
@pytest.mark.parametrize(
    ("kwargs", "c_in", "expected_std"),
    [
        ({"w_init": "he_normal"}, 32, np.sqrt(2 / (3 * 3 * 32))),
        ({"w_init": "he_normal", "feature_group_count": 4}, 32, np.sqrt(2 / (3 * 3 * 8))),
        ({}, 32, np.sqrt(2 / (3 * 3 * 32 + 3 * 3 * 64))),  # default: glorot_uniform, as dense
        ({"w_init": "glorot_normal"}, 16, np.sqrt(2 / (3 * 3 * 16 + 3 * 3 * 64))),
    ],
    ids=["he_normal", "he_normal-groups4", "default-glorot_uniform", "glorot_normal"],
)
def test_init_std_uses_the_receptive_field(kwargs, c_in, expected_std):
    _, params = layers.conv2d(64, 3, **kwargs).init(jax.random.key(0), (1, 8, 8, c_in))
    assert abs(float(jnp.std(params["w"])) - expected_std) < 0.02 * expected_std
    np.testing.assert_array_equal(params["b"], 0)


def test_default_init_is_glorot_uniform_like_dense():
    key = jax.random.key(3)
    _, params = layers.conv2d(5, (2, 3)).init(key, (1, 4, 4, 2))
    w_key = jax.random.split(key)[0]
    expected = jax.nn.initializers.glorot_uniform()(w_key, (2, 3, 2, 5), jnp.float32)
    np.testing.assert_array_equal(params["w"], expected)


def test_names():
    assert layers.conv2d(8, 3).name == "conv2d(8, 3x3)"
    name = layers.conv2d(
        8, (3, 1), stride=2, padding="VALID", dilation=2, feature_group_count=4
    ).name
    assert name == "conv2d(8, 3x1, stride=2x2, padding=VALID, dilation=2x2, groups=4)"


# --------------------------------------------------------------------------------------------
# bad input: one ValueError naming the layer, the shapes and the argument


@pytest.mark.parametrize(
    ("build_layer", "match"),
    [
        (lambda: layers.conv2d(0, 3), r"conv2d: n_out must be a positive integer, got 0"),
        (lambda: layers.conv2d(True, 3), r"conv2d: n_out"),
        (lambda: layers.conv2d(4, 0), r"conv2d: kernel_size .* got 0"),
        (lambda: layers.conv2d(4, (3, -1)), r"conv2d: kernel_size .* got \(3, -1\)"),
        (lambda: layers.conv2d(4, (3, 3, 3)), r"conv2d: kernel_size"),
        (lambda: layers.conv2d(4, 2.5), r"conv2d: kernel_size"),
        (lambda: layers.conv2d(4, 3, stride=0), r"conv2d: stride"),
        (lambda: layers.conv2d(4, 3, dilation=(1, 0)), r"conv2d: dilation"),
        (lambda: layers.conv2d(4, 3, feature_group_count=0), r"conv2d: feature_group_count"),
        (lambda: layers.conv2d(4, 3, padding="FULL"), r"conv2d: padding .* got 'FULL'"),
        (lambda: layers.conv2d(4, 3, padding=-1), r"conv2d: padding .* got -1"),
        (lambda: layers.conv2d(4, 3, padding=[(1, 1)]), r"conv2d: padding .* got \[\(1, 1\)\]"),
        (lambda: layers.conv2d(4, 3, padding=[(1, 1), (1,)]), r"conv2d: padding"),
        (lambda: layers.conv2d(4, 3, padding=[(1, 1), (1, -2)]), r"conv2d: padding"),
        (lambda: layers.conv2d(4, 3, padding=[(1, 1), (1, 0.5)]), r"conv2d: padding"),
        (lambda: layers.conv2d(4, 3, padding=[(1, 1), "ab"]), r"conv2d: padding"),
        (
            lambda: layers.conv2d(6, 3, feature_group_count=4),
            r"conv2d\(6, 3x3, groups=4\): n_out=6 is not divisible by feature_group_count=4",
        ),
    ],
)
def test_bad_arguments_raise_at_construction(build_layer, match):
    with pytest.raises(ValueError, match=match):
        build_layer()


@pytest.mark.parametrize(
    ("layer", "w_shape", "in_shape", "match"),
    [
        (
            layers.conv2d(4, 3),
            (3, 3, 1, 4),
            (2, 5, 5),
            r"conv2d\(4, 3x3\): input must be rank 4 .*\(2, 5, 5\)",
        ),
        (
            layers.conv2d(4, 3, feature_group_count=2),
            (3, 3, 2, 4),  # 3 channels would fit 2 per group x 2 groups if divisible
            (1, 5, 5, 3),
            r"input channels 3 \(input shape \(1, 5, 5, 3\)\) are not divisible by "
            r"feature_group_count=2",
        ),
        (
            layers.conv2d(4, 5, padding="VALID"),
            (5, 5, 1, 4),
            (1, 4, 6, 1),
            r"conv2d\(4, 5x5, padding=VALID\): the kernel \(extent 5x5\) is larger than the "
            r"padded input 4x6 \(input shape \(1, 4, 6, 1\)",
        ),
        (
            layers.conv2d(4, 3, dilation=3, padding=[(0, 1), (1, 0)]),
            (3, 3, 1, 4),
            (1, 5, 5, 1),
            r"the kernel \(extent 7x7\) is larger than the padded input 6x6",
        ),
    ],
)
def test_bad_input_shapes_raise_at_init_and_forward(layer, w_shape, in_shape, match, maybe_jit):
    with pytest.raises(ValueError, match=match):
        layer.init(jax.random.key(0), in_shape)
    params = {"w": jnp.ones(w_shape), "b": jnp.zeros(w_shape[3])}
    with pytest.raises(ValueError, match=match):
        maybe_jit(layer.forward)(params, jnp.ones(in_shape))


def test_window_that_fits_exactly_is_fine():
    """extent 7 on 5 + 1 + 1 rows: one output row (the error is for m < 1 only)."""
    layer = layers.conv2d(4, 3, dilation=3, padding=1)
    assert layer.init(jax.random.key(0), (1, 5, 5, 1))[0] == (1, 1, 1, 4)


def test_input_channels_must_match_the_params(maybe_jit):
    layer = layers.conv2d(4, 3, feature_group_count=2)
    _, params = layer.init(jax.random.key(0), (1, 5, 5, 6))
    with pytest.raises(ValueError) as info:
        maybe_jit(layer.forward)(params, jnp.ones((1, 5, 5, 4)))
    message = str(info.value)
    assert message.startswith("conv2d(4, 3x3, groups=2): input has shape (1, 5, 5, 4)")
    assert "expect 6 channels (3 per group x 2 groups)" in message


def test_params_of_another_layer_raise():
    _, params = layers.conv2d(4, 5).init(jax.random.key(0), (1, 8, 8, 1))
    with pytest.raises(ValueError, match=r"conv2d\(4, 3x3\): w has shape \(5, 5, 1, 4\)"):
        layers.conv2d(4, 3).forward(params, jnp.ones((1, 8, 8, 1)))


# --------------------------------------------------------------------------------------------
# XLA's exact counts: the hand-written backward compiles to no more work than jax.vjp


def hlo_ops(fn, *args) -> collections.Counter:
    """Opcodes of the optimized HLO of ``jax.jit(fn)`` (every computation, fusions included)."""
    text = compile_as_users(fn, *args).as_text()
    return collections.Counter(re.findall(r"= \S+ ([a-z][\w-]*)\(", text))


@pytest.mark.parametrize(
    ("kwargs", "in_shape"),
    [
        ({"n_out": 16, "kernel_size": 3}, (16, 14, 14, 8)),
        ({"n_out": 16, "kernel_size": 3, "stride": 2}, (16, 15, 15, 8)),
        ({"n_out": 6, "kernel_size": 5, "padding": "VALID"}, (16, 28, 28, 1)),
        ({"n_out": 16, "kernel_size": 3, "feature_group_count": 4, "dilation": 2}, (16, 13, 13, 8)),
        ({"n_out": 16, "kernel_size": 3, "feature_group_count": 8}, (16, 13, 13, 8)),
    ],
    ids=["3x3", "3x3-stride2", "lenet-5x5-valid", "groups4-dilation2", "depthwise"],
)
def test_no_more_work_than_autodiff(kwargs, in_shape):
    layer = layers.conv2d(**kwargs)
    out_shape, params = numpy_init(layer, in_shape)  # XLA's counts: any values
    x, dy = normal(in_shape, jnp.float32), normal(out_shape, jnp.float32, seed=1)
    manual_fn, auto_fn = forward_backward(layer), functools.partial(autodiff, layer)
    # The backward's convolutions are written in canonical layouts (see the next test); for
    # grouped convolutions that costs an explicit reordering of the kernel: up to two more
    # transposes or copies of it, and their bytes. Everything else is as autodiff's.
    grouped = kwargs.get("feature_group_count", 1) > 1
    kernel_bytes = 2 * params["w"].size * params["w"].dtype.itemsize if grouped else 0
    manual_cost = xla_cost(manual_fn, params, x, dy, None)
    auto_cost = xla_cost(auto_fn, params, x, dy, None)
    assert_no_more_work(manual_cost, {**auto_cost, "bytes": auto_cost["bytes"] + kernel_bytes})
    manual, auto = hlo_ops(manual_fn, params, x, dy, None), hlo_ops(auto_fn, params, x, dy, None)
    assert manual["convolution"] == auto["convolution"] == 3  # forward, dx, dw
    for op in ("transpose", "copy", "reverse"):
        assert manual[op] <= auto[op] + (2 if grouped else 0), (op, manual, auto)


def test_backward_convolutions_stay_canonical_inside_a_loop():
    """In an epoch's lax.scan (a while loop) XLA's CPU backend did not canonicalize the layouts
    of a weight-gradient convolution and ran it 3-4x slower (LeNet-5's step: 43 against 23 ms).
    The hand-written backward's convolutions are canonical (NHWC, HWIO) wherever they run."""
    net = layers.serial(
        layers.conv2d(8, 3, stride=2), layers.relu(), layers.conv2d(8, 3), layers.flatten(),
        layers.dense(3),
    )  # fmt: skip
    x, y = jnp.ones((16, 13, 13, 4), jnp.float32), jnp.arange(16) % 3
    _, params = net.init(jax.random.key(0), x.shape)
    grad = bpjax.value_and_grad(net, "softmax_cross_entropy", mode="manual")

    def loop(params):
        def body(i, p):
            return jax.tree_util.tree_map(lambda a, g: a - 0.1 * g, p, grad(p, x, y)[1])

        return jax.lax.fori_loop(0, 3, body, params)

    text = compile_as_users(loop, params).as_text()
    labels = re.findall(r"convolution\([^\n]*?dim_labels=([\w>-]+)", text)
    assert len(labels) == 5  # forward and dw of both layers, dx of the second (the input's unused)
    assert set(labels) == {"b01f_01io->b01f"}, labels


@pytest.mark.parametrize(
    ("net", "in_shape"),
    [
        (
            layers.serial(
                layers.conv2d(6, 5, padding=2),
                layers.relu(),
                layers.max_pool(2),
                layers.conv2d(16, 5, padding="VALID"),
                layers.relu(),
                layers.max_pool(2),
                layers.flatten(),
                layers.dense(120),
                layers.relu(),
                layers.dense(10),
            ),
            (16, 28, 28, 1),
        ),
        (
            layers.serial(
                layers.conv2d(16, 3),
                layers.residual(
                    layers.serial(
                        layers.relu(), layers.conv2d(16, 3), layers.relu(), layers.conv2d(16, 3)
                    )
                ),
                layers.avg_pool(2),
                layers.global_avg_pool(),
                layers.dense(10),
            ),
            (16, 16, 16, 3),
        ),
    ],
    ids=["lenet", "residual-block"],
)
def test_cnns_do_no_more_work_than_autodiff(net, in_shape):
    out_shape, params = numpy_init(net, in_shape)  # XLA's counts: any values
    x, dy = normal(in_shape, jnp.float32), normal(out_shape, jnp.float32, seed=1)
    manual_fn, auto_fn = forward_backward(net), functools.partial(autodiff, net)
    assert_no_more_work(
        xla_cost(manual_fn, params, x, dy, None), xla_cost(auto_fn, params, x, dy, None)
    )
    manual, auto = hlo_ops(manual_fn, params, x, dy, None), hlo_ops(auto_fn, params, x, dy, None)
    assert manual["convolution"] == auto["convolution"]
    assert manual["transpose"] <= auto["transpose"]
