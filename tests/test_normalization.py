"""Normalization layers: batch norm's statistics and running state, layer norm, group norm.

Their backward passes are checked against jax.vjp in test_layers.py's table (training and
evaluation mode, [batch, features] and [batch, h, w, c], another feature axis, several group
counts); this module checks the forwards against numpy, the running averages, the numerics of
the variance, dtypes, the state under jit and under a sharded batch, the errors, and that the
hand-written backward does no more work than autodiff's.
"""

import functools
import pathlib
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    assert_no_more_work,
    assert_trees_close,
    run_on_host_devices,
    tree_cast,
    xla_cost,
)

import bpjax
from bpjax import layers

REPO = pathlib.Path(__file__).resolve().parents[1]
EPS = 1e-5


def normal(shape, seed=0, *, loc=0.0, std=1.0, dtype=jnp.float64):
    draws = np.random.default_rng(seed).normal(loc, std, shape)
    return jnp.asarray(draws, dtype)


def affine_params(layer, in_shape, seed=1):
    """Params with a random scale and offset (float64)."""
    _, params = layer.init(jax.random.key(0), in_shape)
    c = params["scale"].shape[0]
    return {"scale": normal((c,), seed, loc=1.0, std=0.5), "offset": normal((c,), seed + 1)}


def reference_norm(x, params, stats_axes, channel_axis, groups=None):
    """numpy, float64: standardize over ``stats_axes`` then scale and offset along
    ``channel_axis``. ``groups``: split the last axis into that many groups first."""
    x = np.asarray(x, np.float64)
    shape = x.shape
    if groups is not None:
        x = x.reshape(*shape[:-1], groups, shape[-1] // groups)
    mean = x.mean(axis=stats_axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=stats_axes, keepdims=True)
    xhat = ((x - mean) / np.sqrt(var + EPS)).reshape(shape)
    along = [1] * len(shape)
    along[channel_axis] = shape[channel_axis]
    scale = np.asarray(params["scale"], np.float64).reshape(along)
    offset = np.asarray(params["offset"], np.float64).reshape(along)
    return xhat * scale + offset


def train(layer, params, x, state=None):
    """Training mode (a key): ``(y, cache, new_state)``."""
    state = layers.init_state(layer, x.shape) if state is None else state
    return layers.apply(layer, params, x, key=jax.random.key(0), state=state)


# --------------------------------------------------------------------------------------------
# forwards against numpy

FORWARDS = [
    # (id, layer, input shape, statistics axes, channel axis, groups)
    ("batch_norm-bf", layers.batch_norm(), (7, 5), (0,), 1, None),
    ("batch_norm-nhwc", layers.batch_norm(), (4, 3, 5, 6), (0, 1, 2), 3, None),
    ("batch_norm-nchw-axis1", layers.batch_norm(axis=1), (4, 6, 3, 5), (0, 2, 3), 1, None),
    ("batch_norm-axis-2", layers.batch_norm(axis=-2), (4, 6, 3), (0, 2), 1, None),
    ("layer_norm-bf", layers.layer_norm(), (7, 5), (1,), 1, None),
    ("layer_norm-nhwc", layers.layer_norm(), (4, 3, 5, 6), (3,), 3, None),
    ("group_norm(1)", layers.group_norm(1), (4, 3, 5, 6), (1, 2, 3), 3, None),
    ("group_norm(6)-instance", layers.group_norm(6), (4, 3, 5, 6), (1, 2), 3, None),
    ("group_norm(2)", layers.group_norm(2), (4, 3, 5, 6), (1, 2, 4), 3, 2),
    ("group_norm(3)", layers.group_norm(3), (4, 3, 5, 6), (1, 2, 4), 3, 3),
    ("group_norm(3)-bf", layers.group_norm(3), (7, 9), (2,), 1, 3),
]


@pytest.mark.parametrize(
    ("layer", "shape", "stats_axes", "channel_axis", "groups"),
    [f[1:] for f in FORWARDS],
    ids=[f[0] for f in FORWARDS],
)
def test_training_forward_matches_numpy(layer, shape, stats_axes, channel_axis, groups):
    x = normal(shape, loc=3.0, std=2.0)
    params = affine_params(layer, shape)
    y, _, _ = train(layer, params, x)
    expected = reference_norm(x, params, stats_axes, channel_axis, groups)
    np.testing.assert_allclose(y, expected, rtol=1e-10, atol=1e-12)


def test_group_norm_identities():
    """group_norm(1) normalizes each example over all of (h, w, c); group_norm(c) is instance
    norm (each example's channel over its positions); layer_norm each position's channels."""
    x = normal((3, 4, 5, 6), loc=-2.0, std=3.0)
    unit = {"scale": jnp.ones(6), "offset": jnp.zeros(6)}

    def standardized(axes):
        mean = x.mean(axis=axes, keepdims=True)
        var = jnp.square(x - mean).mean(axis=axes, keepdims=True)
        return (x - mean) / jnp.sqrt(var + EPS)

    for layer, axes in [
        (layers.group_norm(1), (1, 2, 3)),
        (layers.group_norm(6), (1, 2)),
        (layers.layer_norm(), (3,)),
    ]:
        y, _ = jax.jit(layer.forward)(unit, x)
        np.testing.assert_allclose(y, standardized(axes), rtol=1e-10, atol=1e-12)
        # what the identity says, independently of the formula: zero mean, unit variance
        np.testing.assert_allclose(y.mean(axis=axes), 0.0, atol=1e-12)
        np.testing.assert_allclose(y.var(axis=axes), 1.0, rtol=1e-5)


def test_normalization_params_are_scale_and_offset_and_only_batch_norm_has_state():
    for layer in (layers.batch_norm(), layers.layer_norm(), layers.group_norm(2)):
        _, params = layer.init(jax.random.key(0), (2, 3, 4))
        # never "w": learning rules substitute the leaves named "w" (bpjax.credit)
        assert jax.tree_util.tree_map(jnp.shape, params) == {"scale": (4,), "offset": (4,)}
        np.testing.assert_array_equal(params["scale"], 1.0)
        np.testing.assert_array_equal(params["offset"], 0.0)
        assert params["scale"].dtype == jnp.float32
    bn = layers.batch_norm(dtype=jnp.float64)
    assert layers.is_stateful(bn)
    state = bn.init_state((2, 3, 4))
    assert jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), state) == {
        "running_mean": ((4,), jnp.float64),
        "running_var": ((4,), jnp.float64),
    }
    np.testing.assert_array_equal(state["running_mean"], 0.0)
    np.testing.assert_array_equal(state["running_var"], 1.0)
    assert not layers.is_stateful(layers.layer_norm())
    assert not layers.is_stateful(layers.group_norm(2))
    _, zero = layers.batch_norm(scale_init="zeros").init(jax.random.key(0), (2, 3))
    np.testing.assert_array_equal(zero["scale"], 0.0)  # a residual branch starting at identity


def test_names():
    assert layers.batch_norm().name == "batch_norm"
    assert layers.batch_norm(axis=1).name == "batch_norm(axis=1)"
    assert layers.layer_norm().name == "layer_norm"
    assert layers.group_norm(4).name == "group_norm(4)"
    assert bpjax.batch_norm is layers.batch_norm


# --------------------------------------------------------------------------------------------
# batch norm: running averages and modes


def test_running_averages_update_with_the_biased_batch_variance():
    """running = momentum * running + (1 - momentum) * batch, with the biased batch variance
    (flax/Keras), not PyTorch's unbiased one: with 5 values per channel they differ by 25%."""
    layer = layers.batch_norm(momentum=0.8)
    x = normal((5, 3), loc=2.0, std=3.0)
    params = affine_params(layer, x.shape)
    state = {"running_mean": normal((3,), 5), "running_var": jnp.asarray([0.5, 1.0, 2.0])}
    _, _, new = train(layer, params, x, state)
    xn = np.asarray(x)
    np.testing.assert_allclose(
        new["running_mean"], 0.8 * state["running_mean"] + 0.2 * xn.mean(0), rtol=1e-12
    )
    biased = 0.8 * state["running_var"] + 0.2 * xn.var(0, ddof=0)
    unbiased = 0.8 * state["running_var"] + 0.2 * xn.var(0, ddof=1)
    np.testing.assert_allclose(new["running_var"], biased, rtol=1e-12)
    assert np.all(np.abs(np.asarray(new["running_var"]) - unbiased) > 1e-3 * unbiased)


@pytest.mark.parametrize(("momentum", "weight_of_batch"), [(0.0, 1.0), (1.0, 0.0)])
def test_momentum_bounds(momentum, weight_of_batch):
    layer = layers.batch_norm(momentum=momentum)
    x = normal((6, 4, 2), loc=1.0)
    state = {"running_mean": jnp.full(2, 7.0), "running_var": jnp.full(2, 9.0)}
    _, _, new = train(layer, affine_params(layer, x.shape), x, state)
    batch_mean = np.asarray(x).mean((0, 1))
    expected = weight_of_batch * batch_mean + (1 - weight_of_batch) * 7.0
    np.testing.assert_allclose(new["running_mean"], expected, rtol=1e-12)


def test_evaluation_uses_the_running_averages_and_keeps_the_state(maybe_jit):
    layer = layers.batch_norm(axis=1)
    x = normal((4, 3, 5), loc=2.0)  # [batch, c, positions]
    params = affine_params(layer, x.shape)
    state = {
        "running_mean": jnp.asarray([1.0, -2.0, 0.5]),
        "running_var": jnp.asarray([0.25, 4.0, 1.0]),
    }
    y, _, new = maybe_jit(functools.partial(layers.apply, layer))(params, x, state=state)
    mean, var = state["running_mean"][None, :, None], state["running_var"][None, :, None]
    expected = (x - mean) / jnp.sqrt(var + EPS) * params["scale"][None, :, None]
    np.testing.assert_allclose(y, expected + params["offset"][None, :, None], rtol=1e-12)
    assert_trees_close(new, state, rtol=0)
    # each example on its own: the output does not depend on the rest of the batch
    y_first, _, _ = layers.apply(layer, params, x[:1], state=state)
    np.testing.assert_allclose(y_first, y[:1], rtol=1e-12)


def test_training_output_ignores_the_running_averages():
    layer = layers.batch_norm()
    x = normal((6, 3), loc=4.0)
    params = affine_params(layer, x.shape)
    y, _, _ = train(layer, params, x)
    y_other, _, _ = train(
        layer, params, x, {"running_mean": jnp.full(3, 9.0), "running_var": jnp.full(3, 0.1)}
    )
    np.testing.assert_array_equal(y, y_other)


def test_a_batch_of_one_is_defined_by_eps():
    """One example with no positions: zero variance, xhat = 0, y = offset, dx = 0."""
    layer = layers.batch_norm(dtype=jnp.float64)
    x = normal((1, 4), loc=3.0)
    params = affine_params(layer, x.shape)
    y, cache, new = train(layer, params, x)
    np.testing.assert_array_equal(y, jnp.broadcast_to(params["offset"], (1, 4)))
    np.testing.assert_allclose(new["running_var"], 0.9, rtol=1e-12)  # 0.9 * 1 + 0.1 * 0
    grads, dx = layer.backward(params, cache, normal((1, 4), 2))
    np.testing.assert_array_equal(dx, 0.0)
    np.testing.assert_array_equal(grads["scale"], 0.0)
    assert np.all(np.isfinite(np.asarray(grads["offset"])))


@pytest.mark.parametrize(
    "layer",
    [layers.batch_norm(momentum=0.0), layers.layer_norm(), layers.group_norm(1)],
    ids=["batch_norm", "layer_norm", "group_norm(1)"],
)
def test_two_pass_variance_is_accurate_where_the_one_pass_formula_fails(layer):
    """float32 data with mean 1e4 and std 1: E[x^2] - E[x]^2 loses every digit (float32 spacing
    at 1e8 is 8), the two-pass mean((x - mean)^2) keeps them."""
    # 256 values per statistic: along the batch for batch norm, along the features otherwise
    stateful = layers.is_stateful(layer)
    shape, axes = ((256, 3), (0,)) if stateful else ((3, 256), (1,))
    x = normal(shape, 3, loc=1e4, std=1.0, dtype=jnp.float32)
    true_var = np.asarray(x, np.float64).var(axis=axes)
    one_pass = jnp.mean(jnp.square(x), axis=axes) - jnp.square(jnp.mean(x, axis=axes))
    assert np.max(np.abs(np.asarray(one_pass) / true_var - 1)) > 0.1  # the data does discriminate
    _, params = layer.init(jax.random.key(0), x.shape)
    y, _, new = train(layer, params, x)
    if stateful:  # momentum 0: the running variance IS the batch variance
        np.testing.assert_allclose(new["running_var"], true_var, rtol=1e-3)
    y = np.asarray(y, np.float64)
    np.testing.assert_allclose(y.var(axis=axes), true_var / (true_var + EPS), rtol=1e-3)
    np.testing.assert_allclose(y.mean(axis=axes), 0.0, atol=1e-2)


@pytest.mark.parametrize(
    "layer", [layers.batch_norm(), layers.group_norm(2)], ids=lambda layer: layer.name
)
def test_low_precision_inputs_accumulate_in_float32(layer):
    """bfloat16 data around 300 (bfloat16 spacing 2): statistics taken in bfloat16 would be off
    by up to a standard deviation; in float32 the output is right to bfloat16's rounding."""
    x = normal((64, 4), 4, loc=300.0, std=2.0, dtype=jnp.bfloat16)
    params = {"scale": jnp.ones(4, jnp.float32), "offset": jnp.zeros(4, jnp.float32)}
    y, cache, new = train(layer, params, x)
    assert y.dtype == jnp.bfloat16
    axes, groups = ((0,), None) if layers.is_stateful(layer) else ((2,), 2)
    expected = reference_norm(np.asarray(x, np.float64), params, axes, 1, groups)
    np.testing.assert_allclose(np.asarray(y, np.float64), expected, atol=2e-2)
    if layers.is_stateful(layer):
        assert {a.dtype for a in jax.tree_util.tree_leaves(new)} == {jnp.dtype(jnp.float32)}
    grads, dx = layer.backward(params, cache, jnp.ones_like(x))
    assert dx.dtype == jnp.bfloat16 and grads["scale"].dtype == jnp.float32


def test_the_state_keeps_its_dtype():
    layer = layers.batch_norm()
    x = normal((8, 3), dtype=jnp.float32)
    params = affine_params(layer, x.shape)
    for state_dtype in (jnp.float64, jnp.bfloat16):
        state = tree_cast(layer.init_state(x.shape), state_dtype)
        y, _, new = train(layer, tree_cast(params, jnp.float32), x, state)
        assert y.dtype == jnp.float32
        assert {a.dtype for a in jax.tree_util.tree_leaves(new)} == {jnp.dtype(state_dtype)}


def test_jit_carries_the_state_through_a_scan():
    """A jitted lax.scan of training steps updates the running averages once per batch."""
    layer = layers.batch_norm(momentum=0.7, dtype=jnp.float64)
    batches = normal((4, 6, 2, 3), 5, loc=2.0, std=1.5)
    params = affine_params(layer, batches.shape[1:])

    @jax.jit
    def run(state, batches):
        def step(state, x):
            y, _, new = layers.apply(layer, params, x, key=jax.random.key(0), state=state)
            return new, y

        return jax.lax.scan(step, state, batches)

    state, ys = run(layer.init_state(batches.shape[1:]), batches)
    mean, var = np.zeros(3), np.ones(3)
    for x in np.asarray(batches):
        mean = 0.7 * mean + 0.3 * x.mean((0, 1))
        var = 0.7 * var + 0.3 * x.var((0, 1))
    np.testing.assert_allclose(state["running_mean"], mean, rtol=1e-12)
    np.testing.assert_allclose(state["running_var"], var, rtol=1e-12)
    y_last, _, _ = train(layer, params, batches[-1])
    np.testing.assert_allclose(ys[-1], y_last, rtol=1e-12)


def test_manual_gradients_and_new_state_agree_with_autodiff_through_a_network():
    # no bias before batch norm: its gradient is exactly 0 (batch norm removes any shift)
    net = layers.serial(
        layers.dense(4, use_bias=False), layers.batch_norm(), layers.tanh(), layers.dense(2)
    )
    x, target = normal((6, 3)), normal((6, 2), 1)
    params = tree_cast(net.init(jax.random.key(0), x.shape)[1], jnp.float64)
    state = net.init_state(x.shape)
    key = jax.random.key(1)
    results = {}
    for mode in ("manual", "autodiff"):
        f = jax.jit(bpjax.value_and_grad(net, "mse", mode=mode, with_state=True))
        results[mode] = f(params, x, target, key=key, state=state)
    assert_trees_close(results["manual"], results["autodiff"], rtol=1e-10, atol=1e-12)
    (_, new_state), _ = results["manual"]
    assert new_state[0] == () and set(new_state[1]) == {"running_mean", "running_var"}


# --------------------------------------------------------------------------------------------
# errors


def _bn_params(c):
    return {"scale": jnp.ones(c), "offset": jnp.zeros(c)}


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (
            lambda: layers.batch_norm().forward(
                _bn_params(3), jnp.ones((2, 4)), state=layers.batch_norm().init_state((2, 4))
            ),
            ValueError,
            r"batch_norm: input has shape \(2, 4\), 4 channels on axis 1, but params\['scale'\] "
            r"has shape \(3,\)",
        ),
        (
            lambda: layers.batch_norm().forward(
                _bn_params(4),
                jnp.ones((2, 4)),
                state={"running_mean": jnp.ones(5), "running_var": jnp.ones(5)},
            ),
            ValueError,
            r"batch_norm: input has shape \(2, 4\).*state\['running_mean'\] has shape \(5,\)",
        ),
        (
            lambda: layers.batch_norm().forward(_bn_params(4), jnp.ones((2, 4)), state={}),
            ValueError,
            r"batch_norm: state must be a dict with keys \['running_mean', 'running_var'\]",
        ),
        (
            lambda: layers.batch_norm().forward(_bn_params(4), jnp.ones((2, 4))),
            TypeError,
            r"batch_norm: forward needs state=.*init_state",
        ),
        (
            lambda: layers.apply(layers.batch_norm(), _bn_params(4), jnp.ones((2, 4))),
            TypeError,
            "batch_norm has state",
        ),
        (
            lambda: layers.batch_norm(axis=3).init(jax.random.key(0), (2, 3, 4)),
            ValueError,
            r"batch_norm\(axis=3\): axis 3 is out of range for input shape \(2, 3, 4\)",
        ),
        (
            lambda: layers.batch_norm(axis=-4).init_state((2, 3, 4)),
            ValueError,
            "out of range",
        ),
        (
            lambda: layers.batch_norm(axis=0).init(jax.random.key(0), (2, 3)),
            ValueError,
            r"axis 0 is the batch axis of input shape \(2, 3\)",
        ),
        (
            lambda: layers.batch_norm(axis=-2).forward(
                _bn_params(2),
                jnp.ones((2, 3)),
                state={"running_mean": jnp.ones(2), "running_var": jnp.ones(2)},
            ),
            ValueError,
            r"axis -2 is the batch axis",
        ),
        (
            lambda: layers.batch_norm().init(jax.random.key(0), (5,)),
            ValueError,
            r"at least 2 axes\), got shape \(5,\)",
        ),
        (
            lambda: layers.group_norm(4).init(jax.random.key(0), (2, 3, 6)),
            ValueError,
            r"group_norm\(4\): 6 channels \(input shape \(2, 3, 6\)\) are not divisible into 4",
        ),
        (
            lambda: layers.group_norm(4).forward(_bn_params(6), jnp.ones((2, 6))),
            ValueError,
            "not divisible",
        ),
        (
            lambda: layers.group_norm(2).forward(_bn_params(4), jnp.ones((2, 6))),
            ValueError,
            r"group_norm\(2\): input has shape \(2, 6\), 6 channels on axis 1, but params",
        ),
        (
            lambda: layers.layer_norm().forward(_bn_params(4), jnp.ones((2, 5))),
            ValueError,
            r"layer_norm: input has shape \(2, 5\), 5 channels on axis 1",
        ),
        (
            lambda: layers.layer_norm().forward({"w": jnp.ones(5)}, jnp.ones((2, 5))),
            ValueError,
            r"layer_norm: params must be a dict with keys \['scale', 'offset'\], got \['w'\]",
        ),
        (
            lambda: layers.layer_norm().init(jax.random.key(0), ()),
            ValueError,
            r"layer_norm: input must have a feature axis, got shape \(\)",
        ),
        (
            lambda: layers.layer_norm().forward(_bn_params(5), jnp.ones((2, 5), jnp.int32)),
            TypeError,
            "layer_norm: input must be floating point, got int32",
        ),
    ],
    ids=[
        "bn-params-channels",
        "bn-state-channels",
        "bn-state-keys",
        "bn-no-state",
        "apply-no-state",
        "bn-axis-range",
        "bn-axis-range-negative",
        "bn-axis-batch",
        "bn-axis-batch-negative",
        "bn-rank",
        "gn-divisible-init",
        "gn-divisible-forward",
        "gn-params-channels",
        "ln-params-channels",
        "ln-params-keys",
        "ln-scalar",
        "ln-integer-input",
    ],
)
def test_bad_input_raises_one_clear_error(call, error, match):
    with pytest.raises(error, match=match) as info:
        call()
    assert "\n" not in str(info.value)


def test_channel_mismatch_raises_under_jit():
    layer = layers.batch_norm()
    state = layer.init_state((2, 4))
    with pytest.raises(ValueError, match=r"\(2, 4\).*\(3,\)"):
        jax.jit(lambda p, x: layers.apply(layer, p, x, state=state))(
            _bn_params(3), jnp.ones((2, 4))
        )


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: layers.batch_norm(momentum=1.5), "momentum must be in"),
        (lambda: layers.batch_norm(momentum=-0.1), "momentum must be in"),
        (lambda: layers.batch_norm(eps=0.0), "eps must be a positive"),
        (lambda: layers.layer_norm(eps=-1e-5), "eps must be a positive"),
        (lambda: layers.group_norm(2, eps=0), "eps must be a positive"),
        (lambda: layers.batch_norm(axis=1.5), "axis must be an integer"),
        (lambda: layers.group_norm(0), "n_groups must be a positive integer"),
        (lambda: layers.group_norm(2.5), "n_groups must be a positive integer"),
        (lambda: layers.batch_norm(scale_init="nope"), "unknown initializer 'nope'"),
    ],
)
def test_bad_settings_raise_at_construction(build, match):
    with pytest.raises(ValueError, match=match):
        build()


# --------------------------------------------------------------------------------------------
# work: XLA's exact counts, no timing


def _fb(layer):
    def f(params, x, dy, key, state):
        y, cache, _ = layers.apply(layer, params, x, key=key, state=state)
        return y, *layer.backward(params, cache, dy)

    return f


def _autodiff(layer, params, x, dy, key, state):
    y, vjp = jax.vjp(lambda p, x_: layers.apply(layer, p, x_, key=key, state=state)[0], params, x)
    return y, *vjp(dy)


@pytest.mark.parametrize(
    ("layer", "shape", "training"),
    [
        (layers.batch_norm(), (32, 8, 8, 16), True),
        (layers.batch_norm(), (32, 8, 8, 16), False),
        (layers.batch_norm(axis=1), (32, 16, 8, 8), True),
        (layers.batch_norm(), (64, 128), True),
        (layers.layer_norm(), (32, 8, 8, 16), False),
        (layers.layer_norm(), (64, 128), False),
        (layers.group_norm(1), (32, 8, 8, 16), False),
        (layers.group_norm(4), (32, 8, 8, 16), False),
        (layers.group_norm(16), (32, 8, 8, 16), False),
    ],
    ids=[
        "bn-nhwc-train",
        "bn-nhwc-eval",
        "bn-nchw-train",
        "bn-bf-train",
        "ln-nhwc",
        "ln-bf",
        "gn(1)",
        "gn(4)",
        "gn(16)-instance",
    ],
)
def test_backward_does_no_more_work_than_autodiff(layer, shape, training):
    _, params = layer.init(jax.random.key(0), shape)
    state = layers.init_state(layer, shape)
    x = normal(shape, dtype=jnp.float32)
    dy = normal(shape, 1, dtype=jnp.float32)
    key = jax.random.key(0) if training else None
    manual = xla_cost(_fb(layer), params, x, dy, key, state)
    auto = xla_cost(functools.partial(_autodiff, layer), params, x, dy, key, state)
    assert_no_more_work(manual, auto)


# --------------------------------------------------------------------------------------------
# a batch sharded over devices: the statistics are the global batch's

SHARDED_CHILD = textwrap.dedent(
    """
    import json
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    from bpjax import layers

    jax.config.update("jax_enable_x64", True)
    layer = layers.batch_norm(momentum=0.5)
    rng = np.random.default_rng(0)
    # The two halves of the batch differ (means 0 and 5): per-device statistics would not be
    # the global ones.
    x = np.concatenate([rng.normal(0.0, 1.0, (4, 3, 3, 2)), rng.normal(5.0, 2.0, (4, 3, 3, 2))])
    dy = rng.normal(size=x.shape)
    _, params = layer.init(jax.random.key(0), x.shape)
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params)
    state = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), layer.init_state(x.shape))

    @jax.jit
    def step(x, dy):
        y, cache, new = layers.apply(layer, params, x, key=jax.random.key(0), state=state)
        grads, dx = layer.backward(params, cache, dy)
        return y, new, grads, dx

    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    batch = NamedSharding(mesh, PartitionSpec("data"))
    xs, dys = jax.device_put(x, batch), jax.device_put(dy, batch)
    out = {
        "device_count": jax.device_count(),
        "x_devices": len(xs.sharding.device_set),
        "halves_mean": [x[:4].mean((0, 1, 2)).tolist(), x[4:].mean((0, 1, 2)).tolist()],
        "global_mean": x.mean((0, 1, 2)).tolist(),
        "global_var": x.var((0, 1, 2)).tolist(),
    }
    for name, args in [("sharded", (xs, dys)), ("one", (jnp.asarray(x), jnp.asarray(dy)))]:
        y, new, grads, dx = step(*args)
        out[name] = {
            "y": np.asarray(y).tolist(),
            "running_mean": np.asarray(new["running_mean"]).tolist(),
            "running_var": np.asarray(new["running_var"]).tolist(),
            "grads": [np.asarray(g).tolist() for g in jax.tree_util.tree_leaves(grads)],
            "dx": np.asarray(dx).tolist(),
            "y_devices": len(y.sharding.device_set),
        }
    print(json.dumps(out))
    """
)


def test_sharded_batch_uses_the_global_batch_statistics():
    out = run_on_host_devices(SHARDED_CHILD, 2, timeout=300)
    assert out["device_count"] == 2 and out["x_devices"] == 2
    sharded, one = out["sharded"], out["one"]
    assert sharded["y_devices"] == 2 and one["y_devices"] == 1
    # running mean = 0.5 * 0 + 0.5 * the GLOBAL batch mean, not either device's half
    np.testing.assert_allclose(
        sharded["running_mean"], 0.5 * np.array(out["global_mean"]), rtol=1e-12
    )
    np.testing.assert_allclose(
        sharded["running_var"], 0.5 + 0.5 * np.array(out["global_var"]), rtol=1e-12
    )
    for half in out["halves_mean"]:
        assert np.all(np.abs(np.array(half) - np.array(out["global_mean"])) > 1.0)
    for name in ("y", "running_mean", "running_var", "grads", "dx"):
        np.testing.assert_allclose(
            np.array(sharded[name]), np.array(one[name]), rtol=1e-10, atol=1e-12, err_msg=name
        )
