"""Combinators: serial, the branching forms (parallel, fan_out, fan_in_*), residual, and state.

Their backward passes are checked against jax.vjp in test_layers.py's table (every public
layer is there); this module checks what the table can't: the rules a branch must obey (a
fan-out sums its branches' gradients), residual as the composition it stands for, shape errors,
and the state convention, with a small stateful layer written here.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_trees_close, tree_cast

from bpjax import layers


def normal(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


def init64(net, in_shape):
    """The net's params in float64 (the inputs here are float64)."""
    return tree_cast(net.init(jax.random.key(0), in_shape)[1], jnp.float64)


def centering() -> layers.Layer:
    """A stateful layer for the contract's tests: ``y = x - mean``, the batch mean in training
    mode (and a running mean updated with it), the running mean in evaluation mode."""

    def init(key, in_shape):
        del key
        return in_shape, ()

    def init_state(in_shape):
        return {"mean": jnp.zeros(in_shape[-1:]), "count": jnp.zeros((), jnp.int32)}

    def forward(params, x, *, key=None, state):
        del params
        if key is None:
            return x - state["mean"][None], x.shape[0], state
        mean = jnp.mean(x, axis=0)
        new = {"mean": 0.5 * state["mean"] + 0.5 * mean, "count": state["count"] + 1}
        return x - mean[None], x.shape[0], new

    def backward(params, cache, dy):
        del params
        return (), dy - jnp.mean(dy, axis=0, keepdims=True)

    return layers.Layer(init, forward, backward, "centering", init_state=init_state)


# --------------------------------------------------------------------------------------------
# branches


def test_fan_out_backward_sums_the_branch_gradients():
    grads, dx = layers.fan_out(3).backward(
        (),
        layers.fan_out(3).forward((), normal((2, 4)))[1],
        (normal((2, 4), 1), normal((2, 4), 2), normal((2, 4), 3)),
    )
    assert grads == ()
    np.testing.assert_allclose(dx, normal((2, 4), 1) + normal((2, 4), 2) + normal((2, 4), 3))


def test_a_value_read_twice_gets_the_sum_of_both_gradients():
    """y = x @ w1 + x @ w2 through fan_out/parallel/fan_in_sum: dx = dy (w1 + w2)^T."""
    net = layers.serial(
        layers.fan_out(2),
        layers.parallel(layers.dense(3, use_bias=False), layers.dense(3, use_bias=False)),
        layers.fan_in_sum(),
    )
    params = init64(net, (4, 5))
    x, dy = normal((4, 5)), normal((4, 3), 1)
    y, cache = net.forward(params, x)
    _, dx = net.backward(params, cache, dy)
    w1, w2 = params[1][0]["w"], params[1][1]["w"]
    np.testing.assert_allclose(y, x @ (w1 + w2), rtol=1e-12)
    np.testing.assert_allclose(dx, dy @ (w1 + w2).T, rtol=1e-12)


@pytest.mark.parametrize("shortcut", [None, "dense"])
def test_residual_is_the_composition_it_stands_for(shortcut):
    block = layers.serial(layers.dense(4), layers.tanh(), layers.dense(4))
    short = layers.identity() if shortcut is None else layers.dense(4)
    res = layers.residual(block, None if shortcut is None else short)
    composed = layers.serial(layers.fan_out(2), layers.parallel(block, short), layers.fan_in_sum())
    params = init64(res, (3, 4))
    composed_params = ((), params, ())
    x, dy = normal((3, 4)), normal((3, 4), 1)
    y, cache = res.forward(params, x)
    grads, dx = res.backward(params, cache, dy)
    y_c, cache_c = composed.forward(composed_params, x)
    grads_c, dx_c = composed.backward(composed_params, cache_c, dy)
    assert_trees_close((y, grads, dx), (y_c, grads_c[1], dx_c), rtol=1e-12, atol=1e-14)
    assert res.combinator == "residual" and res.sublayers[0] is block
    assert [s.name for s in res.sublayers] == ["serial(dense(4), tanh, dense(4))", short.name]


def test_residual_names_the_shapes_that_differ():
    res = layers.residual(layers.dense(3))
    with pytest.raises(ValueError, match=r"block maps \(2, 5\) to \(2, 3\).*shortcut to \(2, 5\)"):
        res.init(jax.random.key(0), (2, 5))


@pytest.mark.parametrize(
    ("layer", "shapes", "match"),
    [
        (layers.fan_in_sum(), ((2, 3), (2, 4)), r"equal shapes.*\(2, 3\), \(2, 4\)"),
        (layers.fan_in_concat(), ((2, 3), (3, 4)), r"outside axis -1"),
        (layers.fan_in_concat(), ((2, 3), (2, 3, 1)), "different ranks"),
        (layers.fan_in_sum(), (2, 3), "tuple of input shapes"),
        (layers.parallel(layers.relu(), layers.relu()), ((2, 3),), "tuple of 2 inputs"),
    ],
    ids=["sum-shapes", "concat-shapes", "concat-ranks", "sum-not-a-tuple", "parallel-count"],
)
def test_joins_name_the_shapes_they_cannot_join(layer, shapes, match):
    with pytest.raises(ValueError, match=match):
        layer.init(jax.random.key(0), shapes)


def test_fan_in_concat_splits_dy_where_it_joined():
    layer = layers.fan_in_concat(axis=1)
    xs = (normal((2, 1, 3)), normal((2, 4, 3), 1))
    y, cache = layer.forward((), xs)
    assert y.shape == (2, 5, 3)
    _, (d0, d1) = layer.backward((), cache, y)
    np.testing.assert_array_equal(d0, xs[0])
    np.testing.assert_array_equal(d1, xs[1])


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_fan_out_needs_a_positive_count(bad):
    with pytest.raises(ValueError, match="fan_out"):
        layers.fan_out(bad)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (
            lambda: layers.serial(layers.dense(3), layers.relu),
            r"argument 1.*call it: bpjax\.relu\(\)",
        ),
        (lambda: layers.serial(layers.dense), r"argument 0.*call it: bpjax\.dense\(\.\.\.\)"),
        (lambda: layers.parallel(layers.tanh), r"parallel: argument 0.*bpjax\.tanh\(\)"),
        (lambda: layers.residual(layers.relu), r"residual: block.*bpjax\.relu\(\)"),
        (lambda: layers.serial(3), "argument 0 is int, not a Layer"),
    ],
    ids=["serial-relu", "serial-dense", "parallel", "residual", "not-callable"],
)
def test_a_factory_where_a_layer_belongs_says_call_it(build, match):
    with pytest.raises(TypeError, match=match):
        build()


# --------------------------------------------------------------------------------------------
# state


def test_layers_without_state_have_none_and_keep_two_outputs():
    for layer in (
        layers.dense(3),
        layers.relu(),
        layers.mlp([4, 2]),
        layers.residual(layers.relu()),
    ):
        assert layers.init_state(layer, (2, 3)) == () and not layers.is_stateful(layer)
    _, params = layers.mlp([4, 2]).init(jax.random.key(0), (2, 3))
    assert len(layers.mlp([4, 2]).forward(params, normal((2, 3)))) == 2


@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: layers.serial(layers.dense(4), s, layers.relu()),
        lambda s: layers.serial(layers.serial(s), layers.dense(2)),
        lambda s: layers.residual(layers.serial(layers.dense(4), s)),
        lambda s: layers.serial(
            layers.fan_out(2), layers.parallel(s, layers.tanh()), layers.fan_in_sum()
        ),
    ],
    ids=["serial", "nested-serial", "residual", "parallel"],
)
def test_combinators_thread_state_in_training_and_keep_it_in_evaluation(wrap):
    net = wrap(centering())
    assert layers.is_stateful(net)
    params = init64(net, (8, 4))
    state = net.init_state((8, 4))
    x = normal((8, 4))
    with pytest.raises(TypeError, match="has state"):
        layers.apply(net, params, x)
    y_eval, _, same = net.forward(params, x, state=state)
    jax.tree_util.tree_map(np.testing.assert_array_equal, same, state)
    _, cache, new = net.forward(params, x, key=jax.random.key(1), state=state)
    counts = [int(c) for c in jax.tree_util.tree_leaves(new) if c.dtype == jnp.int32]
    assert counts == [1]  # updated once, wherever the stateful layer sits
    # the backward is unchanged by state: check it against jax.vjp in training mode
    dy = normal(y_eval.shape, 2)
    grads, dx = net.backward(params, cache, dy)

    def f(p, x_):
        return net.forward(p, x_, key=jax.random.key(1), state=state)[0]

    _, vjp = jax.vjp(f, params, x)
    assert_trees_close((grads, dx), vjp(dy), rtol=1e-10, atol=1e-12)


def test_jit_carries_state_through_a_loop():
    net = layers.serial(layers.dense(3), centering())
    params = init64(net, (5, 2))
    state = net.init_state((5, 2))
    step = jax.jit(lambda s, x: net.forward(params, x, key=jax.random.key(0), state=s)[2])
    for i in range(3):
        state = step(state, normal((5, 2), i))
    assert int(state[1]["count"]) == 3


def test_out_shape_reads_shapes_without_params():
    net = layers.serial(
        layers.fan_out(2), layers.parallel(layers.dense(3), layers.dense(4)), layers.fan_in_concat()
    )
    assert layers.out_shape(net, (7, 5)) == (7, 7)
