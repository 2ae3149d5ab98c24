"""max_pool, avg_pool, global_avg_pool: forward against lax and loop references, the tie rule,
avg_pool's divisor, errors, and XLA work against autodiff.

The backward of each is checked against ``jax.vjp`` (float64/float32, eager/jit, batch 1 and 7)
through the ``LAYERS`` table of ``test_layers.py``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_no_more_work, xla_cost
from test_layers import autodiff, forward_backward, normal

from bpjax import layers


def pool_forward_naive(x, window, stride, pads, reduce):
    """CS231n's ``max_pool_forward_naive`` style loops; ``reduce`` gets the window's INPUT
    entries (padding excluded)."""
    x = np.asarray(x)
    batch, h, w, c = x.shape
    m_h = (h + sum(pads[0]) - window[0]) // stride[0] + 1
    m_w = (w + sum(pads[1]) - window[1]) // stride[1] + 1
    y = np.zeros((batch, m_h, m_w, c))
    for i in range(m_h):
        for j in range(m_w):
            top, left = i * stride[0] - pads[0][0], j * stride[1] - pads[1][0]
            rows = slice(max(top, 0), min(top + window[0], h))
            cols = slice(max(left, 0), min(left + window[1], w))
            y[:, i, j, :] = reduce(x[:, rows, cols, :].reshape(batch, -1, c), axis=1)
    return y


# (layer kwargs, explicit pads for the references)
POOLS = [
    ({"window": 2}, [(0, 0), (0, 0)]),
    ({"window": 3, "stride": 2}, [(0, 0), (0, 0)]),
    ({"window": 3, "stride": 2, "padding": "SAME"}, [(1, 1), (0, 1)]),  # 7 x 6 input
    ({"window": (2, 3), "stride": (1, 2), "padding": [(1, 0), (0, 2)]}, [(1, 0), (0, 2)]),
    ({"window": 2, "stride": 1, "padding": 1}, [(1, 1), (1, 1)]),
]


@pytest.mark.parametrize(("kwargs", "pads"), POOLS)
def test_max_pool_forward_equals_references(kwargs, pads, maybe_jit):
    layer = layers.max_pool(**kwargs)
    x = normal((2, 7, 6, 3))
    y, _ = maybe_jit(layer.forward)((), x)
    assert y.shape == layers.out_shape(layer, x.shape)
    w, s = _window_stride(kwargs)
    expected = jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, *w, 1), (1, *s, 1), [(0, 0), *pads, (0, 0)]
    )
    np.testing.assert_array_equal(y, expected)
    np.testing.assert_array_equal(y, pool_forward_naive(x, w, s, pads, np.max))


@pytest.mark.parametrize(("kwargs", "pads"), POOLS)
def test_avg_pool_forward_equals_references(kwargs, pads, maybe_jit):
    layer = layers.avg_pool(**kwargs)
    x = normal((2, 7, 6, 3))
    y, _ = maybe_jit(layer.forward)((), x)
    assert y.shape == layers.out_shape(layer, x.shape)
    w, s = _window_stride(kwargs)
    sums = functools.partial(
        jax.lax.reduce_window,
        init_value=0.0,
        computation=jax.lax.add,
        window_dimensions=(1, *w, 1),
        window_strides=(1, *s, 1),
        padding=[(0, 0), *pads, (0, 0)],
    )
    expected = sums(x) / sums(jnp.ones_like(x))  # padding excluded from the divisor
    np.testing.assert_allclose(y, expected, rtol=1e-12)
    np.testing.assert_allclose(y, pool_forward_naive(x, w, s, pads, np.mean), rtol=1e-12)


def _window_stride(kwargs):
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)
    window = pair(kwargs["window"])
    return window, pair(kwargs.get("stride", window))


def test_stride_defaults_to_the_window():
    for pool in (layers.max_pool, layers.avg_pool):
        assert layers.out_shape(pool(2), (1, 7, 6, 3)) == (1, 3, 3, 3)
        assert layers.out_shape(pool((3, 2)), (1, 7, 6, 3)) == (1, 2, 3, 3)
    assert layers.max_pool(2).name == "max_pool(2x2)"
    assert layers.avg_pool(3, stride=1, padding="same").name == (
        "avg_pool(3x3, stride=1x1, padding=SAME)"
    )


# --------------------------------------------------------------------------------------------
# max_pool ties: each window's dy goes to its FIRST maximum (row-major), as jax.grad's


def max_pool_grad(layer, x, dy, maybe_jit=lambda f: f):
    return maybe_jit(forward_backward(layer))((), x, dy, None)[2]


def test_an_all_zero_window_sends_dy_to_exactly_one_element(maybe_jit):
    """All-zero input (ReLU outputs): every 2 x 2 window's dy goes to its top-left entry, once;
    a mask x == max would send it to all four."""
    layer = layers.max_pool(2)
    x = jnp.zeros((2, 4, 6, 3))
    dy = normal((2, 2, 3, 3), seed=1)
    dx = max_pool_grad(layer, x, dy, maybe_jit)
    np.testing.assert_array_equal(dx[:, ::2, ::2], dy)
    np.testing.assert_array_equal(dx[:, 1::2], 0)
    np.testing.assert_array_equal(dx[:, :, 1::2], 0)
    np.testing.assert_array_equal(dx, autodiff(layer, (), x, dy, None)[2])


def test_ties_go_to_the_first_maximum_in_row_major_order(maybe_jit):
    """Window [[0, 3], [3, 1]]: the 3 in the top row wins; [[1, 0], [2, 2]]: the bottom-left 2."""
    layer = layers.max_pool(2)
    x = jnp.array([[0.0, 3.0, 1.0, 0.0], [3.0, 1.0, 2.0, 2.0]]).reshape(1, 2, 4, 1)
    dy = jnp.array([10.0, 20.0]).reshape(1, 1, 2, 1)
    dx = max_pool_grad(layer, x, dy, maybe_jit)
    expected = np.array([[0.0, 10.0, 0.0, 0.0], [0.0, 0.0, 20.0, 0.0]]).reshape(1, 2, 4, 1)
    np.testing.assert_array_equal(dx, expected)
    np.testing.assert_array_equal(dx, autodiff(layer, (), x, dy, None)[2])


def test_overlapping_windows_accumulate_on_a_shared_maximum(maybe_jit):
    """A single 1 among zeros is the maximum of the four 2 x 2 stride-1 windows that hold it:
    it receives their four dy; every other window sends its dy to its own top-left 0."""
    layer = layers.max_pool(2, stride=1)
    x = jnp.zeros((1, 4, 4, 1)).at[0, 1, 1, 0].set(1.0)
    dy = normal((1, 3, 3, 1), seed=2)
    dx = np.asarray(max_pool_grad(layer, x, dy, maybe_jit))[0, :, :, 0]
    d = np.asarray(dy)[0, :, :, 0]
    np.testing.assert_allclose(dx[1, 1], d[:2, :2].sum(), rtol=1e-14)
    assert dx[0, 0] == 0 and dx[0, 1] == 0 and dx[1, 0] == 0  # their windows' max is the 1
    np.testing.assert_allclose(dx.sum(), d.sum(), rtol=1e-14)  # each window's dy sent once
    np.testing.assert_array_equal(dx[None, :, :, None], autodiff(layer, (), x, dy, None)[2])


def test_tied_windows_with_padding_match_autodiff(maybe_jit):
    """Binary inputs tie in most overlapping SAME windows; padding (-inf) never wins."""
    layer = layers.max_pool(3, stride=2, padding="SAME")
    x = jnp.asarray(np.random.default_rng(0).integers(0, 2, (3, 7, 6, 2)), jnp.float64)
    dy = normal((3, 4, 3, 2), seed=3)
    dx = max_pool_grad(layer, x, dy, maybe_jit)
    np.testing.assert_array_equal(dx, autodiff(layer, (), x, dy, None)[2])
    np.testing.assert_allclose(jnp.sum(dx), jnp.sum(dy), rtol=1e-12)


def test_max_pool_pads_with_minus_infinity():
    """All-negative input with SAME padding: the border outputs are input entries, not 0."""
    layer = layers.max_pool(3, stride=1, padding="SAME")
    x = -1.0 - jnp.abs(normal((1, 4, 4, 2)))
    y, _ = layer.forward((), x)
    assert np.all(np.asarray(y) < -1.0)
    np.testing.assert_array_equal(y[0, 0, 0], jnp.max(x[0, :2, :2], axis=(0, 1)))


def test_max_pool_of_integers():
    x = jnp.asarray(np.random.default_rng(1).integers(-50, 50, (2, 5, 5, 3)), jnp.int32)
    y, _ = layers.max_pool(2, padding="SAME").forward((), x)
    assert y.dtype == jnp.int32
    np.testing.assert_array_equal(y, pool_forward_naive(x, (2, 2), (2, 2), [(0, 1)] * 2, np.max))


@pytest.mark.parametrize("pool", [layers.max_pool, layers.avg_pool])
def test_autodiff_of_the_forward_works_under_jit(pool):
    """The witnesses (and value_and_grad(mode="autodiff")) differentiate the forward in jit."""
    layer = pool(2, stride=1, padding="SAME")
    x, dy = normal((2, 5, 4, 3)), normal((2, 5, 4, 3), seed=1)
    _, _, dx = forward_backward(layer)((), x, dy, None)
    np.testing.assert_allclose(jax.jit(functools.partial(autodiff, layer))((), x, dy, None)[2], dx)


# --------------------------------------------------------------------------------------------
# avg_pool: padding does not count in the divisor (TensorFlow/Keras's convention)


def test_avg_pool_divides_by_the_input_entries_a_window_holds(maybe_jit):
    layer = layers.avg_pool(3, stride=1, padding="SAME")
    y, _ = maybe_jit(layer.forward)((), jnp.ones((1, 4, 5, 2)))
    np.testing.assert_allclose(y, 1.0, rtol=1e-15)  # a constant image pools to itself
    x = jnp.arange(20.0).reshape(1, 4, 5, 1)
    y, cache = maybe_jit(layer.forward)((), x)
    np.testing.assert_allclose(y[0, 0, 0, 0], (0 + 1 + 5 + 6) / 4, rtol=1e-15)  # a corner: 4
    np.testing.assert_allclose(y[0, 0, 2, 0], (1 + 2 + 3 + 6 + 7 + 8) / 6, rtol=1e-15)
    np.testing.assert_allclose(y[0, 1, 1, 0], np.mean([0, 1, 2, 5, 6, 7, 10, 11, 12]), rtol=1e-15)
    # dx: each input entry gets dy / count of every window that holds it.
    dy = jnp.zeros_like(y).at[0, 0, 0, 0].set(1.0)
    _, dx = layer.backward((), cache, dy)
    expected = np.zeros((4, 5))
    expected[:2, :2] = 0.25
    np.testing.assert_allclose(dx[0, :, :, 0], expected, rtol=1e-15)


def test_avg_pool_a_window_of_only_padding_raises():
    with pytest.raises(
        ValueError,
        match=r"avg_pool\(2x2, padding=\[\(2, 0\), \(0, 0\)\]\): a window holds only padding",
    ):
        layers.avg_pool(2, padding=[(2, 0), (0, 0)]).init(None, (1, 4, 4, 1))


def test_global_avg_pool(maybe_jit):
    layer = layers.global_avg_pool()
    x, dy = normal((3, 5, 4, 2)), normal((3, 2), seed=1)
    assert layer.init(None, x.shape) == ((3, 2), ())
    y, grads, dx = maybe_jit(forward_backward(layer))((), x, dy, None)
    np.testing.assert_allclose(y, np.asarray(x).mean(axis=(1, 2)), rtol=1e-12)
    np.testing.assert_allclose(dx, np.broadcast_to(np.asarray(dy)[:, None, None, :] / 20, x.shape))
    assert grads == ()


# --------------------------------------------------------------------------------------------
# bad input: one ValueError naming the layer, the shapes and the argument


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: layers.max_pool(0), r"max_pool: window must be a positive int .* got 0"),
        (lambda: layers.avg_pool((2, -1)), r"avg_pool: window .* got \(2, -1\)"),
        (lambda: layers.max_pool(2, stride=0), r"max_pool: stride .* got 0"),
        (lambda: layers.avg_pool(2, stride=(1, 2, 3)), r"avg_pool: stride"),
        (lambda: layers.max_pool(2, padding="FULL"), r"max_pool: padding .* got 'FULL'"),
        (lambda: layers.avg_pool(2, padding=[(0, 1)]), r"avg_pool: padding"),
        (lambda: layers.max_pool(2, padding=-1), r"max_pool: padding .* got -1"),
    ],
)
def test_bad_arguments_raise_at_construction(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize(
    ("layer", "in_shape", "match"),
    [
        (layers.max_pool(2), (4, 4, 3), r"max_pool\(2x2\): input must be rank 4 .*\(4, 4, 3\)"),
        (
            layers.avg_pool(3),
            (1, 2, 5, 1),
            r"avg_pool\(3x3\): the window \(extent 3x3\) is larger than the padded input 2x5 "
            r"\(input shape \(1, 2, 5, 1\)",
        ),
        (
            layers.max_pool(4, padding=1),
            (1, 1, 5, 1),
            r"max_pool\(4x4, padding=\[\(1, 1\), \(1, 1\)\]\): the window .* padded input 3x7",
        ),
        (layers.global_avg_pool(), (2, 5, 3), r"global_avg_pool: input must be rank 4"),
    ],
)
def test_bad_input_shapes_raise_at_init_and_forward(layer, in_shape, match, maybe_jit):
    with pytest.raises(ValueError, match=match):
        layer.init(None, in_shape)
    with pytest.raises(ValueError, match=match):
        maybe_jit(layer.forward)((), jnp.ones(in_shape))


# --------------------------------------------------------------------------------------------
# XLA's exact counts: the hand-written backward compiles to no more work than jax.vjp


@pytest.mark.parametrize(
    "layer",
    [
        layers.max_pool(2),
        layers.max_pool(3, stride=2, padding="SAME"),
        layers.avg_pool(2),
        layers.avg_pool(3, stride=2, padding="SAME"),
        layers.global_avg_pool(),
    ],
    ids=lambda layer: layer.name,
)
def test_no_more_work_than_autodiff(layer):
    in_shape = (16, 14, 14, 8)
    out_shape = layers.out_shape(layer, in_shape)
    x, dy = normal(in_shape, jnp.float32), normal(out_shape, jnp.float32, seed=1)
    manual = xla_cost(forward_backward(layer), (), x, dy, None)
    auto = xla_cost(functools.partial(autodiff, layer), (), x, dy, None)
    assert_no_more_work(manual, auto)
