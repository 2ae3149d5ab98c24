"""Learning rules: each rule's update against the published equations written another way (plain
numpy matrix algebra, never bpjax's backward), the angle signal against closed forms, the rule
state, Kolen-Pollack's alignment, and the refusals.

Shapes are shared across tests (input 6, hidden 5 and 4, output 3, batch 7) so eager JAX
compiles each operation once.
"""

import math
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import (
    assert_trees_close,
    assert_trees_equal,
    leaves,
    numpy_like,
    numpy_params,
    run_on_host_devices,
    tree_cast,
    trees_differ,
)
from jax import lax
from test_combinators import centering

from bpjax import checkpoint, credit, grad, layers, losses, precision, train, trainer
from bpjax import data as data_lib

N_IN, N_OUT, BATCH = 6, 3, 7
FEEDBACK_RULES = ("feedback_alignment", "sign_symmetry", "kolen_pollack")
NEEDS_FEEDBACK = ("feedback_alignment", "direct_feedback_alignment", "kolen_pollack")
TOL = {jnp.float64: {"rtol": 1e-10, "atol": 1e-12}, jnp.float32: {"rtol": 1e-4, "atol": 1e-6}}

# What each public name of `bpjax.credit` is tested by (a new name must be added here).
TESTED = {
    "DISTRIBUTIONS": "test_init_scale_is_the_documented_one",
    "KP_DECAY": "test_kolen_pollack_update_is_eqs_16_17",
    "KolenPollackState": "test_kolen_pollack_state_*",
    "RULES": "test_every_rule_is_a_gradient_mode",
    "SCALES": "test_init_scale_is_the_documented_one",
    "alignment": "test_alignment_*",
    "angle": "test_angle_*",
    "feedback_params": "test_feedback_params_*",
    "init_rule_state": "test_init_*",
    "kolen_pollack_feedback": "test_kolen_pollack_state_*",
    "kolen_pollack_state": "test_kolen_pollack_state_*",
    "kolen_pollack_update": "test_kolen_pollack_*",
    "update_rule_state": "test_update_rule_state_*",
}


def test_public_names_are_tested():
    assert set(TESTED) == set(credit.__all__)


def test_every_rule_is_a_gradient_mode():
    assert grad.MODES == ("manual", "autodiff", *credit.RULES)


def normal(shape, seed=0, dtype=jnp.float64):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def draw(mode, net, in_shape, seed=1, dtype=jnp.float64):
    return tree_cast(credit.init_rule_state(mode, net, in_shape, key=jax.random.key(seed)), dtype)


def numpy_draw(mode, net, in_shape, seed=1, dtype=jnp.float64):
    """``draw`` in ``init_rule_state``'s structure and shapes (traced: nothing compiled), its
    values drawn by numpy (the rules' own draws: test_init_*)."""
    shapes = jax.eval_shape(
        lambda: credit.init_rule_state(mode, net, in_shape, key=jax.random.key(seed))
    )
    return numpy_like(shapes, dtype, seed=seed)


def feedback_kwargs(mode, feedback):
    return {"feedback": feedback} if mode in NEEDS_FEEDBACK else {}


# --------------------------------------------------------------------------------------------
# numpy references: the published equations as matrix algebra


def np_tree(tree):
    return jax.tree_util.tree_map(np.asarray, tree)


def softmax_ce_error(y, labels):
    """d mean(-log softmax(y)[label]) / dy = (softmax(y) - onehot) / batch."""
    p = np.exp(y - y.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return (p - np.eye(y.shape[-1])[labels]) / y.shape[0]


def mlp_reference(mode, params, feedback, x, labels):
    """A 3-layer tanh MLP trained by ``mode``: Lillicrap et al. (2016) eq. for FA (delta_l =
    (B_{l+1} delta_{l+1}) * f'(a_l)), the same with sign(W) (Liao et al. 2016) or Kolen-Pollack's B
    (Akrout et al. 2019), or Nøkland (2016) eq. 3 for DFA (delta_l = (B_l e) * f'(a_l))."""
    (l1, _, l2, _, l3), x = np_tree(params), np.asarray(x)
    h1 = np.tanh(x @ l1["w"] + l1["b"])
    h2 = np.tanh(h1 @ l2["w"] + l2["b"])
    e = softmax_ce_error(h2 @ l3["w"] + l3["b"], np.asarray(labels))
    if mode == "direct_feedback_alignment":
        b1, b2 = np_tree(feedback)[0], np_tree(feedback)[2]
        d2 = (e @ b2) * (1 - h2**2)
        d1 = (e @ b1) * (1 - h1**2)
    else:
        if mode == "sign_symmetry":
            f2, f3 = np.sign(l2["w"]), np.sign(l3["w"])
        elif mode in ("feedback_alignment", "kolen_pollack"):
            f2, f3 = np_tree(feedback)[2]["w"], np_tree(feedback)[4]["w"]
        else:
            f2, f3 = l2["w"], l3["w"]
        d2 = (e @ f3.T) * (1 - h2**2)
        d1 = (d2 @ f2.T) * (1 - h1**2)

    def layer(inputs, delta):
        return {"w": inputs.T @ delta, "b": delta.sum(0)}

    return (layer(x, d1), (), layer(h1, d2), (), layer(h2, e))


def mlp():
    return layers.serial(
        layers.dense(5), layers.tanh(), layers.dense(4), layers.tanh(), layers.dense(N_OUT)
    )


def mlp_setup(dtype=jnp.float64):
    net = mlp()
    params = tree_cast(net.init(jax.random.key(0), (BATCH, N_IN))[1], dtype)
    x = normal((BATCH, N_IN), 2, dtype)
    labels = jnp.asarray(np.random.default_rng(3).integers(0, N_OUT, BATCH))
    return net, params, x, labels


@pytest.mark.parametrize("mode", ["manual", *credit.RULES])
def test_rule_matches_the_papers_equations(mode, dtype, maybe_jit):
    net, params, x, labels = mlp_setup(dtype)
    feedback = draw(mode, net, x.shape, dtype=dtype)
    f = grad.value_and_grad(net, "softmax_cross_entropy", mode=mode)
    kwargs = feedback_kwargs(mode, feedback)
    value, grads = maybe_jit(lambda p, fb: f(p, x, labels, **({"feedback": fb} if kwargs else {})))(
        params, feedback
    )
    value_ref, _ = grad.value_and_grad(net, "softmax_cross_entropy")(params, x, labels)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)
    assert all(g.dtype == dtype for g in jax.tree_util.tree_leaves(grads))
    np.testing.assert_allclose(value, value_ref, rtol=1e-15)
    expected = mlp_reference(mode, params, feedback, x, labels)
    assert_trees_close(grads, tree_cast(expected, dtype), **TOL[dtype])
    if mode != "manual":  # the rule is not backprop: the test can tell them apart
        assert trees_differ(grads[0], mlp_reference("manual", params, (), x, labels)[0])


@pytest.mark.parametrize("mode", ["feedback_alignment", "kolen_pollack"])
def test_feedback_equal_to_the_weights_is_backprop(mode):
    """With B = w (Kolen-Pollack's fixed point) the rule is backprop: jax.grad."""
    net, params, x, labels = mlp_setup()
    feedback = jax.tree_util.tree_map_with_path(
        lambda path, p: p if path[-1].key == "w" else (), params
    )
    _, grads = grad.value_and_grad(net, "softmax_cross_entropy", mode=mode)(
        params, x, labels, feedback=feedback
    )
    _, true = grad.value_and_grad(net, "softmax_cross_entropy", mode="autodiff")(params, x, labels)
    assert_trees_close(grads, true, rtol=1e-10, atol=1e-14)


def test_manual_still_equals_jax_grad_and_its_angle_is_zero():
    net, params, x, labels = mlp_setup()
    f = grad.value_and_grad(net, "softmax_cross_entropy")

    def objective(p):
        return losses.softmax_cross_entropy().forward(net.forward(p, x)[0], labels)[0]

    _, grads = jax.jit(f)(params, x, labels)
    true = jax.jit(jax.grad(objective))(params)
    assert_trees_close(grads, true, rtol=1e-10, atol=1e-14)
    angles = jax.jit(credit.alignment)(grads, true)
    assert set(angles) == {"layer0/angle", "layer2/angle", "layer4/angle", "total/angle"}
    for value in angles.values():
        assert 0 <= float(value) < 1e-5


@pytest.mark.parametrize("mode", credit.RULES)
def test_with_output_and_state_for_every_rule(mode):
    """The rules return the same kind of function as backprop: output and state packed alike."""
    net = layers.serial(layers.dense(5), centering(), layers.tanh(), layers.dense(N_OUT))
    if mode == "direct_feedback_alignment":
        net = layers.serial(layers.dense(5), layers.tanh(), layers.dense(N_OUT))
    x, labels = normal((BATCH, N_IN), 2), jnp.arange(BATCH) % N_OUT
    params = tree_cast(net.init(jax.random.key(0), x.shape)[1], jnp.float64)
    state = layers.init_state(net, x.shape) or None
    kwargs = {**feedback_kwargs(mode, draw(mode, net, x.shape)), "key": jax.random.key(4)}
    if state is not None:
        kwargs["state"] = state
    (value, (y, new_state)), grads = grad.value_and_grad(
        net, "softmax_cross_entropy", mode=mode, with_output=True, with_state=True
    )(params, x, labels, **kwargs)
    (value_m, (y_m, state_m)), _ = grad.value_and_grad(
        net, "softmax_cross_entropy", with_output=True, with_state=True
    )(params, x, labels, key=jax.random.key(4), **({"state": state} if state else {}))
    assert float(value) == float(value_m)
    assert_trees_equal(y, y_m)
    assert_trees_equal(new_state, state_m)
    value_only, grads_only = grad.value_and_grad(net, "softmax_cross_entropy", mode=mode)(
        params, x, labels, **kwargs
    )
    assert float(value_only) == float(value)
    assert_trees_equal(grads_only, grads)


# --------------------------------------------------------------------------------------------
# feedback rules through branches, state and convolutions


def fa_mode_weights(mode, params, feedback):
    """The matrices a feedback rule sends dx back through, in the params' layout."""
    if mode == "sign_symmetry":
        return jax.tree_util.tree_map_with_path(
            lambda path, p: np.sign(p) if path[-1].key == "w" else (), np_tree(params)
        )
    return np_tree(feedback)


@pytest.mark.parametrize("mode", ["feedback_alignment", "sign_symmetry"])
def test_feedback_rule_through_a_residual_block(mode):
    """y = dense(z), z = h + dense(tanh(dense(h))), h = tanh(dense(x)): the skip path carries dz
    unchanged and each dense sends dx back through its feedback."""
    block = layers.serial(layers.dense(5), layers.tanh(), layers.dense(5))
    net = layers.serial(layers.dense(5), layers.tanh(), layers.residual(block), layers.dense(N_OUT))
    x, labels = normal((BATCH, N_IN), 2), jnp.arange(BATCH) % N_OUT
    params = numpy_params(net, x.shape)
    feedback = numpy_draw(mode, net, x.shape)
    f = grad.value_and_grad(net, "softmax_cross_entropy", mode=mode)
    kwargs = feedback_kwargs(mode, feedback)
    _, grads = jax.jit(lambda p, fb: f(p, x, labels, **({"feedback": fb} if kwargs else {})))(
        params, feedback
    )

    (l1, _, ((r1, _, r2), _), l4), xn = np_tree(params), np.asarray(x)
    fb = fa_mode_weights(mode, params, feedback)
    fr1, fr2, f4 = fb[2][0][0]["w"], fb[2][0][2]["w"], fb[3]["w"]
    h = np.tanh(xn @ l1["w"] + l1["b"])
    u = np.tanh(h @ r1["w"] + r1["b"])
    z = h + u @ r2["w"] + r2["b"]
    e = softmax_ce_error(z @ l4["w"] + l4["b"], np.asarray(labels))
    dz = e @ f4.T
    du = (dz @ fr2.T) * (1 - u**2)
    dh = (dz + du @ fr1.T) * (1 - h**2)
    expected = (
        {"w": xn.T @ dh, "b": dh.sum(0)},
        (),
        (({"w": h.T @ du, "b": du.sum(0)}, (), {"w": u.T @ dz, "b": dz.sum(0)}), ()),
        {"w": z.T @ e, "b": e.sum(0)},
    )
    assert_trees_close(grads, expected, rtol=1e-10, atol=1e-12)


def test_feedback_alignment_through_a_layer_with_state():
    """dense -> centering (state: a running mean) -> tanh -> dense, in training mode."""
    net = layers.serial(layers.dense(5), centering(), layers.tanh(), layers.dense(N_OUT))
    x, labels = normal((BATCH, N_IN), 2), jnp.arange(BATCH) % N_OUT
    params = tree_cast(net.init(jax.random.key(0), x.shape)[1], jnp.float64)
    feedback = draw("feedback_alignment", net, x.shape)
    state = layers.init_state(net, x.shape)
    (_, new_state), grads = grad.value_and_grad(
        net, "softmax_cross_entropy", mode="feedback_alignment", with_state=True
    )(params, x, labels, key=jax.random.key(1), state=state, feedback=feedback)

    (l1, _, _, l2), xn = np_tree(params), np.asarray(x)
    a = xn @ l1["w"] + l1["b"]
    h = np.tanh(a - a.mean(0))
    e = softmax_ce_error(h @ l2["w"] + l2["b"], np.asarray(labels))
    dc = (e @ np.asarray(feedback[3]["w"]).T) * (1 - h**2)
    da = dc - dc.mean(0)
    expected = ({"w": xn.T @ da, "b": da.sum(0)}, (), (), {"w": h.T @ e, "b": e.sum(0)})
    assert_trees_close(grads, expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(new_state[1]["mean"], 0.5 * a.mean(0), rtol=1e-12)


def local_conv(n_out: int, size: int) -> layers.Layer:
    """A valid-padding, stride-1 conv (NHWC input, HWIO kernel named "w") with its backward
    written out by kernel position: the rules' conv test until bpjax's conv2d lands."""

    def init(key, in_shape):
        b, h, w, c = in_shape
        kernel = jax.random.normal(key, (size, size, c, n_out)) / math.sqrt(size * size * c)
        return (b, h - size + 1, w - size + 1, n_out), {"w": kernel, "b": jnp.zeros(n_out)}

    def forward(params, x, *, key=None):
        del key
        y = lax.conv_general_dilated(x, params["w"], (1, 1), "VALID", None, None, CONV_DIMS)
        return y + params["b"].reshape(1, 1, 1, -1), x

    def backward(params, x, dy):
        """dw[a, b] = sum x[:, i + a, j + b]^T dy[:, i, j];  dx[:, i + a, j + b] += dy w[a, b]^T."""
        w, (ho, wo) = params["w"], dy.shape[1:3]
        dw = jnp.stack(
            [
                jnp.stack(
                    [
                        jnp.einsum("nijc,nijo->co", x[:, a : a + ho, b : b + wo], dy)
                        for b in range(size)
                    ]
                )
                for a in range(size)
            ]
        )
        dx = jnp.zeros_like(x)
        for a in range(size):
            for b in range(size):
                dx = dx.at[:, a : a + ho, b : b + wo].add(jnp.einsum("nijo,co->nijc", dy, w[a, b]))
        return {"w": dw, "b": dy.sum((0, 1, 2))}, dx

    return layers.Layer(init, forward, backward, f"local_conv({n_out}, {size})")


CONV_DIMS = ("NHWC", "HWIO", "NHWC")
CONVS = [
    pytest.param(local_conv, id="local_conv"),
    pytest.param(
        lambda n_out, size: layers.conv2d(n_out, size, padding="VALID"),
        id="conv2d",
        marks=pytest.mark.skipif(
            not hasattr(layers, "conv2d"), reason="bpjax.layers.conv2d has not landed (issue 11)"
        ),
    ),
]


def conv(x, kernel):
    return lax.conv_general_dilated(x, kernel, (1, 1), "VALID", None, None, CONV_DIMS)


def test_local_conv_backward_is_right():
    layer = local_conv(3, 2)
    x = normal((2, 4, 5, 2), 1)
    params = numpy_params(layer, x.shape)
    y, cache = layer.forward(params, x)
    dy = normal(y.shape, 2)
    _, vjp = jax.vjp(lambda p, x_: layer.forward(p, x_)[0], params, x)
    assert_trees_close(layer.backward(params, cache, dy), vjp(dy), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("make_conv", CONVS)
@pytest.mark.parametrize("mode", ["feedback_alignment", "sign_symmetry"])
def test_feedback_rule_on_conv_replaces_the_kernel_in_dx_only(mode, make_conv):
    """conv -> tanh -> conv -> tanh -> flatten -> dense: each conv's kernel gradient is the true
    one for its dy; the dx it sends back is the transposed convolution with the feedback kernel."""
    net = layers.serial(
        make_conv(3, 2), layers.tanh(), make_conv(2, 2), layers.tanh(), layers.flatten(),
        layers.dense(N_OUT),
    )  # fmt: skip
    x, labels = normal((2, 5, 5, 2), 1), jnp.arange(2) % N_OUT
    params = numpy_params(net, x.shape)
    feedback = numpy_draw(mode, net, x.shape)
    f = grad.value_and_grad(net, "softmax_cross_entropy", mode=mode)
    kwargs = feedback_kwargs(mode, feedback)
    _, grads = jax.jit(lambda p, fb: f(p, x, labels, **({"feedback": fb} if kwargs else {})))(
        params, feedback
    )

    k1, k2, l3 = params[0], params[2], params[5]
    fb = jax.tree_util.tree_map(jnp.asarray, fa_mode_weights(mode, params, feedback))
    h1 = jnp.tanh(conv(x, k1["w"]) + k1["b"].reshape(1, 1, 1, -1))
    h2 = jnp.tanh(conv(h1, k2["w"]) + k2["b"].reshape(1, 1, 1, -1))
    flat = h2.reshape(2, -1)
    e = jnp.asarray(
        softmax_ce_error(np.asarray(flat @ l3["w"] + l3["b"][None]), np.asarray(labels))
    )
    d2 = (e @ fb[5]["w"].T).reshape(h2.shape) * (1 - h2**2)
    dk2 = jax.vjp(lambda k: conv(h1, k), k2["w"])[1](d2)[0]  # true: does not read the kernel
    dh1 = jax.vjp(lambda z: conv(z, fb[2]["w"]), h1)[1](d2)[0]  # back through the feedback
    d1 = dh1 * (1 - h1**2)
    dk1 = jax.vjp(lambda k: conv(x, k), k1["w"])[1](d1)[0]
    assert_trees_close(grads[2]["w"], dk2, rtol=1e-10, atol=1e-12)
    assert_trees_close(grads[0]["w"], dk1, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(grads[0]["b"], d1.sum((0, 1, 2)), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(grads[5]["w"], flat.T @ e, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------
# direct feedback alignment: segments


def dfa(net, params, x, target, feedback, *, loss="softmax_cross_entropy", key=None):
    f = grad.value_and_grad(net, loss, mode="direct_feedback_alignment")
    return jax.jit(lambda p, fb, k: f(p, x, target, key=k, feedback=fb))(params, feedback, key)


def test_dfa_through_flatten_and_dropout():
    """dense(4) on [batch, 3, 5] -> tanh -> flatten | dense(6) -> relu -> dropout | dense(3):
    the error is injected after the flatten (B_0: [3, 12]) and after the dropout (B_3: [3, 6]),
    and sent back through the same dropout mask the forward pass drew."""
    net = layers.serial(
        layers.dense(4), layers.tanh(), layers.flatten(),
        layers.dense(6), layers.relu(), layers.dropout(0.4),
        layers.dense(N_OUT),
    )  # fmt: skip
    x, labels, key = normal((BATCH, 3, 5), 2), jnp.arange(BATCH) % N_OUT, jax.random.key(5)
    params = numpy_params(net, x.shape)
    feedback = numpy_draw("direct_feedback_alignment", net, x.shape)
    assert jax.tree_util.tree_map(jnp.shape, feedback) == ((3, 12), (), (), (3, 6), (), (), ())
    _, grads = dfa(net, params, x, labels, feedback, key=key)

    mask = np.asarray(net.forward(params, x, key=key)[1][5])  # the forward's dropout scale
    assert 0 < np.count_nonzero(mask) < mask.size
    (l1, _, _, l2, _, _, l3), xn, fb = np_tree(params), np.asarray(x), np_tree(feedback)
    h = np.tanh(xn @ l1["w"] + l1["b"])
    flat = h.reshape(BATCH, 12)
    a = flat @ l2["w"] + l2["b"]
    d = np.maximum(a, 0) * mask
    e = softmax_ce_error(d @ l3["w"] + l3["b"], np.asarray(labels))
    delta2 = (e @ fb[3]) * mask * (a > 0)
    delta1 = (e @ fb[0]).reshape(h.shape) * (1 - h**2)
    expected = (
        {"w": np.einsum("bti,bto->io", xn, delta1), "b": delta1.sum((0, 1))},
        (),
        (),
        {"w": flat.T @ delta2, "b": delta2.sum(0)},
        (),
        (),
        {"w": d.T @ e, "b": e.sum(0)},
    )
    assert_trees_close(grads, expected, rtol=1e-10, atol=1e-12)


def test_dfa_flattens_nested_serials():
    """serial(serial(dense, tanh), serial(dense, tanh), dense) is the flat MLP: same segments,
    feedback nested as the params are."""
    flat_net, params, x, labels = mlp_setup()
    net = layers.serial(
        layers.serial(layers.dense(5), layers.tanh()),
        layers.serial(layers.dense(4), layers.tanh()),
        layers.dense(N_OUT),
    )
    nested = ((params[0], ()), (params[2], ()), params[4])
    flat_feedback = draw("direct_feedback_alignment", flat_net, x.shape)
    feedback = draw("direct_feedback_alignment", net, x.shape)
    assert jax.tree_util.tree_map(jnp.shape, feedback) == (((N_OUT, 5), ()), ((N_OUT, 4), ()), ())
    feedback = ((flat_feedback[0], ()), (flat_feedback[2], ()), ())
    _, grads = dfa(net, nested, x, labels, feedback)
    expected = mlp_reference("direct_feedback_alignment", params, flat_feedback, x, labels)
    assert_trees_close(grads, ((expected[0], ()), (expected[2], ()), expected[4]), rtol=1e-10)


def test_dfa_error_is_the_output_layers_own():
    """An output softmax inside the network: e is the gradient at the last dense's output (after
    the softmax's derivative), Nøkland's e = dL/da_out, not dL/dy. The flatten before the first
    parametric layer is in no segment."""
    net = layers.serial(
        layers.flatten(), layers.dense(5), layers.tanh(), layers.dense(N_OUT), layers.softmax()
    )
    x = normal((BATCH, 2, 3), 2)
    target = jax.nn.softmax(normal((BATCH, N_OUT), 3))
    params = tree_cast(net.init(jax.random.key(0), x.shape)[1], jnp.float64)
    feedback = draw("direct_feedback_alignment", net, x.shape)
    _, grads = dfa(net, params, x, target, feedback, loss="quadratic")

    (_, l1, _, l2, _), xn, t = np_tree(params), np.asarray(x).reshape(BATCH, 6), np.asarray(target)
    h = np.tanh(xn @ l1["w"] + l1["b"])
    z = h @ l2["w"] + l2["b"]
    y = np.exp(z - z.max(-1, keepdims=True))
    y /= y.sum(-1, keepdims=True)
    g = (y - t) / BATCH  # d quadratic / dy
    e = y * (g - (g * y).sum(-1, keepdims=True))  # back through the softmax
    delta = (e @ np.asarray(feedback[1])) * (1 - h**2)
    expected = ((), {"w": xn.T @ delta, "b": delta.sum(0)}, (), {"w": h.T @ e, "b": e.sum(0)}, ())
    assert_trees_close(grads, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("make_conv", CONVS)
def test_dfa_on_a_conv_network(make_conv):
    """flatten is not parametric: the conv's segment is conv -> relu -> flatten, B: [3, 48]."""
    net = layers.serial(make_conv(3, 2), layers.relu(), layers.flatten(), layers.dense(N_OUT))
    x, labels = normal((2, 5, 5, 2), 1), jnp.arange(2) % N_OUT
    params = numpy_params(net, x.shape)
    feedback = numpy_draw("direct_feedback_alignment", net, x.shape)
    assert jax.tree_util.tree_map(jnp.shape, feedback) == ((N_OUT, 48), (), (), ())
    _, grads = dfa(net, params, x, labels, feedback)

    k, l2 = params[0], params[3]
    a = conv(x, k["w"]) + k["b"].reshape(1, 1, 1, -1)
    flat = jax.nn.relu(a).reshape(2, -1)
    e = jnp.asarray(
        softmax_ce_error(np.asarray(flat @ l2["w"] + l2["b"][None]), np.asarray(labels))
    )
    delta = (e @ feedback[0]).reshape(a.shape) * (a > 0)
    dk = jax.vjp(lambda kernel: conv(x, kernel), k["w"])[1](delta)[0]
    assert_trees_close(grads[0], {"w": dk, "b": delta.sum((0, 1, 2))}, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(grads[3]["w"], flat.T @ e, rtol=1e-10)


def test_dfa_per_example_gradients_average_to_the_batch_gradient():
    """Under vmap each example is a batch of one ([n_outputs] outputs): the same B applies."""
    net, params, x, labels = mlp_setup()
    feedback = draw("direct_feedback_alignment", net, x.shape)
    f = grad.value_and_grad(net, "softmax_cross_entropy", mode="direct_feedback_alignment")
    per_example = jax.vmap(lambda x1, t1: f(params, x1, t1, feedback=feedback)[1])(x, labels)
    _, batch = f(params, x, labels, feedback=feedback)
    mean = jax.tree_util.tree_map(lambda g: g.mean(0), per_example)
    assert_trees_close(mean, batch, rtol=1e-10, atol=1e-13)


# --------------------------------------------------------------------------------------------
# the angle signal


def unit2(degrees):
    t = math.radians(degrees)
    return jnp.asarray([math.cos(t), math.sin(t)])


ANGLES = [  # (a, b, degrees)
    ([1.0, 0.0], [0.0, 1.0], 90.0),
    ([1.0, 2.0, -3.0], [2.0, 4.0, -6.0], 0.0),
    ([1.0, 2.0, -3.0], [-0.5, -1.0, 1.5], 180.0),
    ([1.0, 0.0], unit2(30.0), 30.0),
    ([3.0, 0.0], 7 * unit2(135.0), 135.0),
    ([0.0, 0.0], [0.0, 0.0], 0.0),  # both zero: they agree
    ([0.0, 0.0], [1.0, -2.0], 90.0),  # one zero: orthogonal to everything
    ([1e-30, 1e-30], [1e-30, 0.0], 45.0),  # squares underflow float32 without the rescaling
    ([1e30, 0.0], [1e30, 1e30], 45.0),  # and overflow it
]


@pytest.mark.parametrize(("a", "b", "degrees"), ANGLES)
def test_angle_closed_forms(a, b, degrees, dtype, maybe_jit):
    a, b = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
    value = maybe_jit(credit.angle)(a, b)
    assert value.dtype == dtype
    np.testing.assert_allclose(value, degrees, atol=1e-12 if dtype == jnp.float64 else 2e-5)
    np.testing.assert_allclose(maybe_jit(credit.angle)(b, a), value, rtol=1e-15)


def test_angle_is_accurate_near_zero_where_arccos_is_not():
    """1e-3 rad apart in float32: the half-angle form is right to 1e-5 relative; arccos of the
    clipped cosine, the usual formula, is off by percents (cos(1e-3) is 1 - 5e-7, near eps)."""
    a = jnp.asarray([1.0, 0.0, 0.0], jnp.float32)
    b = jnp.asarray([math.cos(1e-3), math.sin(1e-3), 0.0], jnp.float32)
    exact = math.degrees(1e-3)
    np.testing.assert_allclose(credit.angle(a, b), exact, rtol=1e-5)
    naive = jnp.degrees(
        jnp.arccos(jnp.clip(a @ b / (jnp.linalg.norm(a) * jnp.linalg.norm(b)), -1, 1))
    )
    assert abs(float(naive) - exact) / exact > 1e-2


def test_angle_reads_a_pytree_as_one_vector():
    a = {"w": jnp.asarray([[1.0, 2.0]]), "b": jnp.asarray([3.0])}
    b = {"w": jnp.asarray([[-1.0, 0.5]]), "b": jnp.asarray([2.0])}
    flat_a, flat_b = jnp.asarray([3.0, 1.0, 2.0]), jnp.asarray([2.0, -1.0, 0.5])  # leaf order
    cosine = float(flat_a @ flat_b) / float(jnp.linalg.norm(flat_a) * jnp.linalg.norm(flat_b))
    np.testing.assert_allclose(credit.angle(a, b), math.degrees(math.acos(cosine)), rtol=1e-12)
    assert credit.angle(jnp.zeros(2, jnp.bfloat16), jnp.ones(2, jnp.bfloat16)).dtype == jnp.float32
    with pytest.raises(ValueError, match="trees differ"):
        credit.angle(a, {"w": a["w"]})
    with pytest.raises(ValueError, match="trees differ"):
        credit.angle(jnp.zeros(3), jnp.zeros(2))


@pytest.mark.parametrize("mode", credit.RULES)
def test_alignment_keys_and_values(mode):
    """Angles per layer of the top-level serial; the output layer's update is exact for every
    rule (0°); weight angles only for the feedback rules, and equal to angle(w, feedback)."""
    net, params, x, labels = mlp_setup()
    feedback = draw(mode, net, x.shape)
    kwargs = feedback_kwargs(mode, feedback)
    _, grads = grad.value_and_grad(net, "softmax_cross_entropy", mode=mode)(
        params, x, labels, **kwargs
    )
    _, true = grad.value_and_grad(net, "softmax_cross_entropy", mode="autodiff")(params, x, labels)
    signal = jax.jit(lambda g, t, p, fb: credit.alignment(g, t, mode=mode, params=p, feedback=fb))(
        grads, true, params, kwargs.get("feedback")
    )
    keys = {f"layer{i}/angle" for i in (0, 2, 4)} | {"total/angle"}
    if mode in FEEDBACK_RULES:
        keys |= {f"layer{i}/weight_angle" for i in (0, 2, 4)}
    assert set(signal) == keys
    np.testing.assert_allclose(signal["layer4/angle"], 0.0, atol=1e-5)
    assert 1.0 < float(signal["layer0/angle"]) < 179.0
    np.testing.assert_allclose(signal["layer2/angle"], credit.angle(grads[2], true[2]), rtol=1e-12)
    np.testing.assert_allclose(signal["total/angle"], credit.angle(grads, true), rtol=1e-12)
    if mode in FEEDBACK_RULES:
        with pytest.raises(TypeError, match="needs params="):
            credit.alignment(grads, true, mode=mode)
        backward = credit.feedback_params(mode, params, kwargs.get("feedback"))
        np.testing.assert_allclose(
            signal["layer2/weight_angle"],
            credit.angle(params[2]["w"], backward[2]["w"]),
            rtol=1e-12,
        )


def test_feedback_params_replace_only_the_weights():
    net, params, x, _ = mlp_setup()
    feedback = draw("feedback_alignment", net, x.shape)
    for mode, expected in [
        ("feedback_alignment", lambda p, fb: fb),
        ("kolen_pollack", lambda p, fb: fb),
        ("sign_symmetry", lambda p, fb: jnp.sign(p)),
    ]:
        backward = credit.feedback_params(mode, params, feedback)
        for i in (0, 2, 4):
            assert_trees_equal(backward[i]["w"], expected(params[i]["w"], feedback[i]["w"]))
            assert backward[i]["b"] is params[i]["b"]
    with pytest.raises(ValueError, match="direct_feedback_alignment"):
        credit.feedback_params("direct_feedback_alignment", params, feedback)


# --------------------------------------------------------------------------------------------
# rule state


@pytest.mark.parametrize("mode", ["manual", "autodiff", *credit.RULES])
def test_init_is_deterministic_from_the_key(mode):
    net, _, x, _ = mlp_setup()
    first = credit.init_rule_state(mode, net, x.shape, key=jax.random.key(1))
    assert_trees_equal(first, credit.init_rule_state(mode, net, x.shape, key=jax.random.key(1)))
    if mode not in NEEDS_FEEDBACK:
        assert first == ()
        return
    assert trees_differ(first, credit.init_rule_state(mode, net, x.shape, key=jax.random.key(2)))
    matrices = jax.tree_util.tree_leaves(first)
    assert len(matrices) == (3 if mode != "direct_feedback_alignment" else 2)
    assert all(isinstance(b, jax.Array) and b.dtype == jnp.float32 for b in matrices)
    # each layer draws its own: no two matrices share their first entries
    assert len({float(b.ravel()[0]) for b in matrices}) == len(matrices)


@pytest.mark.parametrize("mode", NEEDS_FEEDBACK)
def test_init_rule_state_survives_a_checkpoint(mode, tmp_path):
    net, _, x, _ = mlp_setup()
    feedback = credit.init_rule_state(mode, net, x.shape, key=jax.random.key(1))
    checkpoint.save(tmp_path / "rule", {"rule_state": feedback})
    like = {"rule_state": jax.eval_shape(lambda: feedback)}
    restored, _ = checkpoint.restore(tmp_path / "rule", like)
    assert_trees_equal(restored["rule_state"], feedback)


def wide_net(dtype=jnp.float32):
    return layers.serial(
        layers.dense(300, dtype=dtype), layers.tanh(), layers.dense(200, dtype=dtype)
    )


@pytest.mark.parametrize(
    ("distribution", "scale", "std"),
    [
        ("uniform", "fan_avg", math.sqrt(2 / 800)),  # the default: Glorot's
        ("normal", "fan_avg", math.sqrt(2 / 800)),
        ("uniform", "fan_in", 1 / math.sqrt(500)),
        ("normal", "fan_out", 1 / math.sqrt(300)),
        ("normal", 0.3, 0.3),
    ],
)
def test_init_scale_is_the_documented_one(distribution, scale, std):
    """B of the first dense ([500, 300]): the standard deviation ``scale`` names, zero mean;
    uniform draws lie in [-sqrt(3) std, sqrt(3) std]."""
    assert distribution in credit.DISTRIBUTIONS and (scale in credit.SCALES or scale == 0.3)
    kwargs = {"distribution": distribution, "scale": scale}
    b = np.asarray(
        credit.init_rule_state(
            "feedback_alignment", wide_net(), (1, 500), key=jax.random.key(0), **kwargs
        )[0]["w"]
    )
    assert b.shape == (500, 300)
    np.testing.assert_allclose(b.std(), std, rtol=0.02)
    assert abs(b.mean()) < 0.01 * std
    if distribution == "uniform":
        assert np.abs(b).max() <= math.sqrt(3) * std
        assert np.abs(b).max() > 0.99 * math.sqrt(3) * std
    else:
        assert np.abs(b).max() > 3.5 * std  # a Gaussian's tails, not a uniform's edge


def test_init_defaults_and_dfa_shapes():
    default = credit.init_rule_state(
        "feedback_alignment", wide_net(), (1, 500), key=jax.random.key(0)
    )
    explicit = credit.init_rule_state(
        "feedback_alignment", wide_net(), (1, 500), key=jax.random.key(0),
        distribution="uniform", scale="fan_avg",
    )  # fmt: skip
    assert_trees_equal(default, explicit)
    dfa_state = credit.init_rule_state(
        "direct_feedback_alignment", wide_net(jnp.float64), (1, 500), key=jax.random.key(0)
    )
    b = dfa_state[0]
    assert b.shape == (200, 300) and b.dtype == jnp.float64  # [n_outputs, units], w's dtype
    assert dfa_state[1:] == ((), ())
    np.testing.assert_allclose(np.asarray(b).std(), math.sqrt(2 / 500), rtol=0.03)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"distribution": "cauchy"}, "cauchy.*uniform, normal"),
        ({"scale": "fan_max"}, "fan_max.*fan_in, fan_out, fan_avg"),
        ({"scale": -1.0}, "scale"),
        ({"scale": True}, "scale"),
    ],
)
def test_init_refuses_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        credit.init_rule_state(
            "feedback_alignment", mlp(), (BATCH, N_IN), key=jax.random.key(0), **kwargs
        )


# --------------------------------------------------------------------------------------------
# Kolen-Pollack


def test_kolen_pollack_update_is_eqs_16_17():
    net, params, x, _ = mlp_setup()
    feedback = draw("kolen_pollack", net, x.shape)
    updates = jax.tree_util.tree_map(lambda p: 0.1 * normal(p.shape, 9), params)
    new_updates, new_feedback = credit.kolen_pollack_update(feedback, params, updates, decay=0.05)
    for i in (0, 2, 4):
        w, u, b = params[i]["w"], updates[i]["w"], feedback[i]["w"]
        np.testing.assert_allclose(new_updates[i]["w"], u - 0.05 * w, rtol=1e-14)
        np.testing.assert_allclose(new_feedback[i]["w"], b + u - 0.05 * b, rtol=1e-14)
        np.testing.assert_allclose(
            (w + new_updates[i]["w"]) - new_feedback[i]["w"], 0.95 * (w - b), rtol=1e-12
        )
        assert new_updates[i]["b"] is updates[i]["b"]  # biases: the optimizer's update
    assert jax.tree_util.tree_structure(new_feedback) == jax.tree_util.tree_structure(feedback)
    default = credit.kolen_pollack_update(feedback, params, updates)
    explicit = credit.kolen_pollack_update(feedback, params, updates, decay=credit.KP_DECAY)
    assert_trees_equal(default, explicit)
    for decay in (-0.1, 1.0, "0.1", None, True, jnp.array([0.1, 0.2]), 0.1j):
        with pytest.raises(ValueError, match="decay must be a number in"):
            credit.kolen_pollack_update(feedback, params, updates, decay=decay)
    assert_trees_equal(  # a 0-d array is a number
        credit.kolen_pollack_update(feedback, params, updates, decay=jnp.float32(0.05)),
        credit.kolen_pollack_update(feedback, params, updates, decay=np.float32(0.05)),
    )


@pytest.mark.parametrize("mode", ["manual", "autodiff", *credit.RULES])
def test_update_rule_state_only_changes_kolen_pollack(mode):
    net, params, x, _ = mlp_setup()
    state = draw(mode, net, x.shape)
    updates = jax.tree_util.tree_map(lambda p: 0.1 * normal(p.shape, 9), params)
    got = credit.update_rule_state(mode, state, params, updates, decay=0.05)
    if mode == "kolen_pollack":
        assert_trees_equal(got, credit.kolen_pollack_update(state, params, updates, decay=0.05))
    else:
        assert got[0] is updates and got[1] is state


def test_kolen_pollack_state_holds_b_as_w_plus_scale_times_offset():
    net, params, x, _ = mlp_setup()
    feedback = draw("kolen_pollack", net, x.shape)
    held = credit.kolen_pollack_state(params, feedback)
    assert isinstance(held, credit.KolenPollackState)
    assert float(held.scale) == 1.0 and held.scale.dtype == jnp.float64  # the offset's, if wider
    for i in (0, 2, 4):
        np.testing.assert_array_equal(held.offset[i]["w"], feedback[i]["w"] - params[i]["w"])
        assert held.offset[i]["b"] == ()
    assert_trees_close(
        credit.kolen_pollack_feedback(params, held), feedback, rtol=1e-14, atol=1e-16
    )
    halved = held._replace(scale=jnp.asarray(0.5, jnp.float64))
    for i in (0, 2, 4):  # B = w + scale * offset
        np.testing.assert_allclose(
            credit.kolen_pollack_feedback(params, halved)[i]["w"],
            params[i]["w"] + 0.5 * (feedback[i]["w"] - params[i]["w"]),
            rtol=1e-14,
        )
    f32 = credit.kolen_pollack_state(
        tree_cast(params, jnp.float32), tree_cast(feedback, jnp.float32)
    )
    assert f32.scale.dtype == jnp.float32
    with pytest.raises(ValueError, match=r"feedback at \[0\]\[.w.\] has shape"):
        credit.kolen_pollack_state(params, draw("kolen_pollack", net, (BATCH, N_IN + 1)))
    with pytest.raises(ValueError, match="no parameter named 'w'"):
        credit.kolen_pollack_state({"scale": jnp.ones(3)}, ())


def test_kolen_pollack_state_refuses_what_is_not_its_own():
    net, params, x, labels = mlp_setup()
    feedback = draw("kolen_pollack", net, x.shape)
    held = credit.kolen_pollack_state(params, feedback)
    assert_trees_equal(credit.kolen_pollack_feedback(params, feedback), feedback)  # B: as it is
    with pytest.raises(ValueError, match="KolenPollackState already; pass B itself"):
        credit.kolen_pollack_state(params, held)
    for mode in ("feedback_alignment", "direct_feedback_alignment"):
        fb = held if mode == "feedback_alignment" else draw(mode, net, x.shape)
        if mode == "direct_feedback_alignment":
            fb = credit.KolenPollackState(fb, jnp.ones(()))
        with pytest.raises(ValueError, match=f"^{mode}: feedback is a KolenPollackState"):
            grad.value_and_grad(net, CE, mode=mode)(params, x, labels, feedback=fb)
    short = credit.kolen_pollack_state(params, feedback)._replace(
        offset=draw("kolen_pollack", net, (BATCH, N_IN + 1))
    )
    with pytest.raises(ValueError, match=r"offset \(B - w\) at \[0\]\['w'\] has shape \(7, 5\)"):
        credit.feedback_params("kolen_pollack", params, short)
    updates = jax.tree_util.tree_map(jnp.zeros_like, params)
    plain = held._replace(scale=1.0)  # a Python float is a scalar too
    assert_trees_close(
        credit.kolen_pollack_feedback(params, plain),
        credit.kolen_pollack_feedback(params, held),
        rtol=1e-6,
    )
    for bad in (None, 1, jnp.ones((), jnp.int32), jnp.ones(3)):
        with pytest.raises(ValueError, match="scale must be a floating-point scalar"):
            credit.kolen_pollack_update(held._replace(scale=bad), params, updates)
    # float16/bfloat16 scales are carried in float32: there 1 - 1e-4 rounds to 1 (a trial)
    half = held._replace(scale=jnp.ones((), jnp.bfloat16))
    for _ in range(2):
        _, half = credit.kolen_pollack_update(half, params, updates)
    assert half.scale.dtype == jnp.float32 and float(half.scale) == np.float32(1 - 1e-4) ** 2
    # an integer offset or B: refused, naming the leaf (B came out as int(w) + int(B - w))
    ints = jax.tree_util.tree_map(lambda a: a.astype(jnp.int32), feedback)
    with pytest.raises(ValueError, match=r"feedback at \[0\]\['w'\] has dtype int32"):
        credit.kolen_pollack_state(params, ints)
    with pytest.raises(ValueError, match=r"offset \(B - w\) at \[0\]\['w'\] has dtype int32"):
        credit.kolen_pollack_feedback(params, held._replace(offset=ints))
    with pytest.raises(ValueError, match="update_rule_state: feedback_alignment was given a Kol"):
        credit.update_rule_state("feedback_alignment", held, params, updates)


def test_kolen_pollack_state_is_tied_to_its_params():
    """Replacing a held state's params moves ``B`` with them (the documented caveat); holding
    ``B`` again against the new params (``KolenPollackState``'s recipe) keeps it."""
    net, params, x, _ = mlp_setup()
    feedback = draw("kolen_pollack", net, x.shape)
    held = credit.kolen_pollack_state(params, feedback)
    new = jax.tree_util.tree_map(lambda p: 3 * p, params)
    assert trees_differ(credit.kolen_pollack_feedback(new, held), feedback)
    again = credit.kolen_pollack_state(new, credit.kolen_pollack_feedback(params, held))
    assert_trees_close(credit.kolen_pollack_feedback(new, again), feedback, rtol=1e-14, atol=1e-15)


def test_kolen_pollack_update_takes_a_traced_decay():
    net, params, x, _ = mlp_setup()
    held = credit.kolen_pollack_state(params, draw("kolen_pollack", net, x.shape))
    updates = jax.tree_util.tree_map(jnp.zeros_like, params)
    traced = jax.jit(lambda d: credit.kolen_pollack_update(held, params, updates, decay=d))
    eager = credit.kolen_pollack_update(held, params, updates, decay=0.25)
    assert_trees_close(traced(0.25), eager, rtol=1e-15)
    assert float(traced(0.25)[1].scale) == 0.75


def test_kolen_pollack_state_trains_as_the_per_step_update():
    """Twenty Adam steps of ``make_step`` (``init_state`` holds ``B`` as a ``KolenPollackState``)
    against the same steps with ``B`` itself updated by eqs. 16-17 each step: the same params
    and the same ``B`` (float64, up to rounding)."""
    optimizer, options = optax.adam(1e-2), {"kp_decay": 0.05}
    net, state = train_state("kolen_pollack", optimizer=optimizer, rule_options=options)
    assert isinstance(state.rule_state, credit.KolenPollackState)
    x, y = train_data()
    rule = grad.value_and_grad(net, CE, mode="kolen_pollack")
    steps = 20

    def reference(params, opt_state, feedback):
        for t in range(steps):
            xb, yb = x[t % 4 * STEP_BATCH :][:STEP_BATCH], y[t % 4 * STEP_BATCH :][:STEP_BATCH]
            _, grads = rule(params, xb, yb, feedback=feedback)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            updates, feedback = credit.kolen_pollack_update(feedback, params, updates, decay=0.05)
            params = optax.apply_updates(params, updates)
        return params, feedback

    step = jax.jit(
        train.make_step(net, CE, optimizer, grad_mode="kolen_pollack", rule_options=options)
    )
    held = state
    for t in range(steps):
        held, _ = step(
            held, x[t % 4 * STEP_BATCH :][:STEP_BATCH], y[t % 4 * STEP_BATCH :][:STEP_BATCH]
        )
    params, feedback = jax.jit(reference)(
        state.params, state.opt_state, credit.kolen_pollack_feedback(state.params, state.rule_state)
    )
    assert_trees_close(held.params, params, rtol=1e-9, atol=1e-12)
    assert_trees_close(
        credit.kolen_pollack_feedback(held.params, held.rule_state), feedback, rtol=1e-9, atol=1e-12
    )
    np.testing.assert_allclose(float(held.rule_state.scale), 0.95**steps, rtol=1e-12)
    assert trees_differ(feedback, credit.kolen_pollack_feedback(state.params, state.rule_state))


def test_kolen_pollack_aligns_w_and_b():
    """Plain SGD on a toy regression for 300 steps: ||w - B|| falls as (1 - decay)^steps
    exactly, and the feedback comes to align with w (the angle falls from ~90°), so the hidden
    layer's update comes to align with the true gradient."""
    net = layers.serial(layers.dense(8), layers.tanh(), layers.dense(2))
    x = normal((64, 4), 1)
    y = jnp.tanh(x @ normal((4, 2), 2))
    params = tree_cast(net.init(jax.random.key(0), x.shape)[1], jnp.float64)
    feedback = draw("kolen_pollack", net, x.shape)
    optimizer, decay, steps = optax.sgd(0.2), 0.01, 300
    rule = grad.value_and_grad(net, "mse", mode="kolen_pollack")
    true_grad = grad.value_and_grad(net, "mse", mode="autodiff")

    @jax.jit  # eagerly, every operation of both passes compiles for this test's shapes
    def signal(params, feedback):
        _, g = rule(params, x, y, feedback=feedback)
        _, t = true_grad(params, x, y)
        return credit.alignment(g, t, mode="kolen_pollack", params=params, feedback=feedback)

    def step(carry, _):
        params, opt_state, feedback = carry
        loss, grads = rule(params, x, y, feedback=feedback)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        updates, feedback = credit.update_rule_state(
            "kolen_pollack", feedback, params, updates, decay=decay
        )
        return (optax.apply_updates(params, updates), opt_state, feedback), loss

    (final, _, final_feedback), loss = jax.jit(
        lambda p, fb: lax.scan(step, (p, optimizer.init(p), fb), None, length=steps)
    )(params, feedback)
    for i in (0, 2):
        np.testing.assert_allclose(
            jnp.linalg.norm(final[i]["w"] - final_feedback[i]["w"]),
            (1 - decay) ** steps * jnp.linalg.norm(params[i]["w"] - feedback[i]["w"]),
            rtol=1e-9,
        )
    before, after = signal(params, feedback), signal(final, final_feedback)
    assert float(before["layer2/weight_angle"]) > 60.0  # measured: 75°
    assert float(after["layer2/weight_angle"]) < 10.0  # measured: 4° (feedback alignment: 54°)
    assert float(before["layer0/angle"]) > 60.0  # measured: 70°
    assert float(after["layer0/angle"]) < 10.0  # measured: 3° (feedback alignment: 57°)
    assert float(loss[-1]) < 0.5 * float(loss[0])


# --------------------------------------------------------------------------------------------
# what a rule can't apply to: one clear error, before anything compiles

COMPILATIONS = [0]


def _count_compilation(event, duration, **kwargs):
    del duration, kwargs
    if event == "/jax/core/compile/backend_compile_duration":
        COMPILATIONS[0] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compilation)


def test_the_compile_counter_counts():
    before = COMPILATIONS[0]
    jax.jit(lambda v: v * 2.5 + 1.0)(normal((3,), 0))
    assert COMPILATIONS[0] > before


def scale_layer() -> layers.Layer:
    """``y = x * scale``: parameters, but no weight named "w" (as a normalization's scale)."""

    def init(key, in_shape):
        del key
        return in_shape, {"scale": jnp.ones(in_shape[-1])}

    def forward(params, x, *, key=None):
        del key
        return x * params["scale"][None], x

    def backward(params, x, dy):
        return {"scale": (x * dy).sum(0)}, dy * params["scale"][None]

    return layers.Layer(init, forward, backward, "scale")


BRANCHED = {
    "residual": (
        layers.serial(layers.dense(5), layers.residual(layers.dense(5)), layers.dense(N_OUT)),
        r"layer 1 \(residual\(dense\(5\)\)\) is a residual block",
    ),
    "parallel": (
        layers.serial(
            layers.fan_out(2),
            layers.parallel(layers.dense(N_OUT), layers.dense(N_OUT)),
            layers.fan_in_sum(),
        ),
        r"layer 1 \(parallel\(dense\(3\), dense\(3\)\)\) is a parallel block",
    ),
    "nested": (
        layers.serial(
            layers.serial(layers.dense(5), layers.residual(layers.tanh())), layers.dense(3)
        ),
        r"layer 0\.1 \(residual\(tanh\)\) is a residual block",
    ),
}


@pytest.mark.parametrize("case", sorted(BRANCHED))
def test_dfa_refuses_branches_when_asked_for(case):
    net, match = BRANCHED[case]
    before = COMPILATIONS[0]
    with pytest.raises(ValueError, match=match):
        grad.value_and_grad(net, "softmax_cross_entropy", mode="direct_feedback_alignment")
    with pytest.raises(ValueError, match=match):
        credit.init_rule_state(
            "direct_feedback_alignment", net, (BATCH, N_IN), key=jax.random.key(0)
        )
    assert COMPILATIONS[0] == before


@pytest.mark.parametrize(
    ("mode", "net", "in_shape", "match"),
    [
        (
            "direct_feedback_alignment",
            layers.serial(layers.dense(5), scale_layer(), layers.tanh(), layers.dense(N_OUT)),
            (BATCH, N_IN),
            r"layer 1 \(scale\): it has parameters \(\['scale'\]\) but no weight 'w'",
        ),
        (
            "direct_feedback_alignment",
            layers.serial(layers.dense(5), layers.tanh(), layers.dense(N_OUT)),
            (BATCH, 2, N_IN),
            r"output layer layer 2 \(dense\(3\)\) to give \[batch, n_outputs\].*\(7, 2, 3\)",
        ),
        (
            "feedback_alignment",
            layers.serial(scale_layer(), layers.tanh()),
            (BATCH, N_IN),
            "no parameter named 'w'",
        ),
        ("sign_symmetry", scale_layer(), (BATCH, N_IN), "no parameter named 'w'"),
    ],
    ids=["dfa-no-w", "dfa-3d-output", "fa-no-w", "ss-no-w"],
)
def test_refusals_that_need_shapes_raise_at_trace_time(mode, net, in_shape, match):
    """Known once the params' or input's shapes are: raised by init_rule_state, and by the
    gradient function while it is traced, before XLA compiles anything."""
    x = normal(in_shape, 1)
    params = tree_cast(net.init(jax.random.key(0), in_shape)[1], jnp.float64)
    target = jnp.zeros(layers.out_shape(net, in_shape))
    with pytest.raises(ValueError, match=match):
        credit.init_rule_state(mode, net, in_shape, key=jax.random.key(0))
    f = grad.value_and_grad(net, "mse", mode=mode)
    fake = jax.tree_util.tree_map_with_path(
        lambda path, p: p if path[-1].key == "w" else (), params
    )  # a feedback of the params' layout, so the rule's own check is what refuses
    kwargs = feedback_kwargs(mode, fake)
    before = COMPILATIONS[0]
    with pytest.raises(ValueError, match=match):
        jax.jit(lambda p: f(p, x, target, **kwargs)).lower(params)
    with pytest.raises(ValueError, match=match):
        jax.jit(lambda p: f(p, x, target, **kwargs))(params)
    assert COMPILATIONS[0] == before


def test_feedback_keyword_errors():
    net, params, x, labels = mlp_setup()
    fa = grad.value_and_grad(net, "softmax_cross_entropy", mode="feedback_alignment")
    dfa_f = grad.value_and_grad(net, "softmax_cross_entropy", mode="direct_feedback_alignment")
    for f, mode in [(fa, "feedback_alignment"), (dfa_f, "direct_feedback_alignment")]:
        with pytest.raises(TypeError, match=f"{mode} needs feedback=.*init_rule_state"):
            f(params, x, labels)
    with pytest.raises(ValueError, match="feedback has structure"):
        fa(params, x, labels, feedback=draw("direct_feedback_alignment", net, x.shape))
    with pytest.raises(ValueError, match="feedback has structure"):
        dfa_f(params, x, labels, feedback=draw("feedback_alignment", net, x.shape))
    wrong = draw("feedback_alignment", mlp(), (BATCH, N_IN + 1))
    with pytest.raises(ValueError, match=r"shape \(7, 5\), the network needs \(6, 5\)"):
        fa(params, x, labels, feedback=wrong)
    feedback = draw("feedback_alignment", net, x.shape)
    for mode in ("manual", "autodiff", "sign_symmetry"):
        f = grad.value_and_grad(net, "softmax_cross_entropy", mode=mode)
        with pytest.raises(TypeError, match="no feedback="):
            f(params, x, labels, feedback=feedback)
        f(params, x, labels, feedback=())  # the trainer's rule_state for them: accepted


def test_unknown_rule_lists_the_valid_ones():
    for call in (
        lambda: grad.value_and_grad(mlp(), "mse", mode="feedback_alignmnet"),
        lambda: credit.init_rule_state("feedback_alignmnet", mlp(), (1, 2), key=jax.random.key(0)),
        lambda: credit.update_rule_state("feedback_alignmnet", (), (), ()),
    ):
        with pytest.raises(ValueError, match="feedback_alignmnet") as info:
            call()
        for mode in grad.MODES:
            assert mode in str(info.value)


# --------------------------------------------------------------------------------------------
# training with a learning rule: the state in TrainState, the step, the signal, fit
# (bpjax.train and bpjax.trainer; their public names are listed in test_train.py's TESTED)

SGD = optax.sgd(0.1)
CE = losses.softmax_cross_entropy()
N_TRAIN, STEP_BATCH = 40, 8  # 5 steps per epoch


def train_data(dtype=jnp.float64):
    x = normal((N_TRAIN, N_IN), 11, dtype)
    labels = np.random.default_rng(12).integers(0, N_OUT, N_TRAIN)
    return x, jnp.asarray(np.eye(N_OUT)[labels], dtype)


def train_state(mode, net=None, optimizer=SGD, **kwargs):
    net = net or mlp()
    state = train.init_state(
        net, optimizer, jax.random.PRNGKey(3), (STEP_BATCH, N_IN), grad_mode=mode, **kwargs
    )
    state = tree_cast(state, jnp.float64)
    return net, state._replace(opt_state=optimizer.init(state.params))  # float64 throughout


@pytest.mark.parametrize("mode", ["manual", "autodiff", *credit.RULES])
def test_init_state_draws_the_rule_state_from_its_own_stream(mode):
    """``rule_state`` is ``init_rule_state(fold_in(key, FEEDBACK))``; the params and optimizer
    state don't depend on the rule (their stream is INIT's)."""
    key = jax.random.PRNGKey(3)
    net = mlp()
    state = train.init_state(net, SGD, key, (STEP_BATCH, N_IN), grad_mode=mode)
    expected = credit.init_rule_state(
        mode, net, (STEP_BATCH, N_IN), key=jax.random.fold_in(key, train.FEEDBACK)
    )
    if mode == "kolen_pollack":  # held as B - w and a scale: the same B, up to rounding
        assert_trees_equal(state.rule_state, credit.kolen_pollack_state(state.params, expected))
        assert_trees_close(  # float32: B = w + (B - w) rounds
            credit.kolen_pollack_feedback(state.params, state.rule_state),
            expected,
            rtol=1e-6,
            atol=1e-7,
        )
    else:
        assert_trees_equal(state.rule_state, expected)
    if mode not in NEEDS_FEEDBACK:
        assert state.rule_state == ()
    backprop = train.init_state(net, SGD, key, (STEP_BATCH, N_IN))
    assert backprop.rule_state == ()
    assert_trees_equal(state._replace(rule_state=()), backprop)
    if mode in NEEDS_FEEDBACK:  # not the params' draw, nor the INIT stream's
        other = credit.init_rule_state(
            mode, net, (STEP_BATCH, N_IN), key=jax.random.fold_in(key, 0)
        )
        drawn = (
            credit.kolen_pollack_feedback(state.params, state.rule_state)
            if mode == "kolen_pollack"
            else state.rule_state
        )
        assert trees_differ(
            drawn,
            other
            if mode != "kolen_pollack"
            else credit.kolen_pollack_feedback(state.params, other),
        )


def test_rule_options_reach_the_draw_and_the_step():
    net = mlp()
    options = {"distribution": "normal", "scale": 0.3, "kp_decay": 0.05}
    state = train.init_state(
        net, SGD, jax.random.PRNGKey(3), (STEP_BATCH, N_IN), grad_mode="kolen_pollack",
        rule_options=options,
    )  # fmt: skip
    expected = credit.init_rule_state(
        "kolen_pollack", net, (STEP_BATCH, N_IN),
        key=jax.random.fold_in(jax.random.PRNGKey(3), train.FEEDBACK),
        distribution="normal", scale=0.3,
    )  # fmt: skip
    assert_trees_equal(state.rule_state, credit.kolen_pollack_state(state.params, expected))
    assert train.RULE_OPTIONS == {
        "distribution": "uniform",
        "scale": "fan_avg",
        "kp_decay": credit.KP_DECAY,
    }  # credit's documented defaults
    assert train.check_rule("kolen_pollack", net, (STEP_BATCH, N_IN), {"scale": 0.3}) == {
        **train.RULE_OPTIONS,
        "scale": 0.3,
    }
    # kp_decay reaches the step: w - B shrinks by exactly (1 - decay) per step
    x, y = train_data()
    _, state = train_state("kolen_pollack", rule_options=options)
    step = jax.jit(train.make_step(net, CE, SGD, grad_mode="kolen_pollack", rule_options=options))
    new, _ = step(state, x[:STEP_BATCH], y[:STEP_BATCH])
    assert float(new.rule_state.scale) == 0.95 * float(state.rule_state.scale)
    before, after = (
        credit.kolen_pollack_feedback(state.params, state.rule_state),
        credit.kolen_pollack_feedback(new.params, new.rule_state),
    )
    for i in (0, 2, 4):
        np.testing.assert_allclose(
            new.params[i]["w"] - after[i]["w"],
            0.95 * (state.params[i]["w"] - before[i]["w"]),
            rtol=1e-10,
        )


@pytest.mark.parametrize("mode", credit.RULES)
def test_make_step_runs_the_rule_and_kolen_pollack_after_the_optimizer(mode):
    """One step is: the rule's gradient with feedback=state.rule_state, the optimizer on it
    (whose state never holds the feedback), then for Kolen-Pollack ``kolen_pollack_update`` of
    the optimizer's updates; the other rules' state is carried unchanged."""
    optimizer = optax.adam(1e-2)
    net, state = train_state(mode, optimizer=optimizer)
    x, y = train_data()
    xb, yb = x[:STEP_BATCH], y[:STEP_BATCH]
    new, aux = jax.jit(train.make_step(net, CE, optimizer, grad_mode=mode))(state, xb, yb)
    _, grads = grad.value_and_grad(net, CE, mode=mode)(
        state.params, xb, yb, **feedback_kwargs(mode, state.rule_state)
    )
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    rule_state = state.rule_state
    if mode == "kolen_pollack":
        updates, rule_state = credit.kolen_pollack_update(rule_state, state.params, updates)
    assert_trees_close(aux["grads"], grads, rtol=1e-10, atol=1e-14)
    # Adam's first update is -lr * g / (|g| + eps): at a gradient near 0 it moves lr / eps =
    # 1e6 times as far as g does, so the gradients' atol becomes 1e-8 in the updates.
    moved = 1e-14 * 1e-2 / 1e-8
    assert_trees_close(aux["updates"], updates, rtol=1e-9, atol=moved)
    assert_trees_close(
        new.params, optax.apply_updates(state.params, updates), rtol=1e-10, atol=moved
    )
    assert_trees_close(new.opt_state, opt_state, rtol=1e-9, atol=1e-14)
    assert_trees_close(new.rule_state, rule_state, rtol=1e-10)
    assert jax.tree_util.tree_structure(new.opt_state) == jax.tree_util.tree_structure(
        optimizer.init(state.params)
    )
    if mode == "kolen_pollack":
        assert trees_differ(new.rule_state, state.rule_state)
    else:
        assert_trees_equal(new.rule_state, state.rule_state)


def test_kolen_pollack_under_gradient_accumulation_moves_with_the_updates():
    """With ``optax.MultiSteps(every_k_schedule=2)`` the first step applies no update: the
    feedback, like the weights, stays put; the second applies one to both."""
    optimizer = optax.MultiSteps(SGD, every_k_schedule=2)
    options = {"kp_decay": 0.05}
    net, state = train_state("kolen_pollack", optimizer=optimizer, rule_options=options)
    x, y = train_data()
    step = jax.jit(
        train.make_step(net, CE, optimizer, grad_mode="kolen_pollack", rule_options=options)
    )
    first, _ = step(state, x[:STEP_BATCH], y[:STEP_BATCH])
    assert_trees_equal(first.params, state.params)
    assert_trees_equal(first.rule_state, state.rule_state)
    second, _ = step(first, x[STEP_BATCH : 2 * STEP_BATCH], y[STEP_BATCH : 2 * STEP_BATCH])
    assert int(train.updates_applied(second)) == 1
    before, after = (
        credit.kolen_pollack_feedback(state.params, state.rule_state),
        credit.kolen_pollack_feedback(second.params, second.rule_state),
    )
    for i in (0, 2, 4):
        np.testing.assert_allclose(
            second.params[i]["w"] - after[i]["w"],
            0.95 * (state.params[i]["w"] - before[i]["w"]),
            rtol=1e-10,
        )
        assert not np.allclose(after[i]["w"], before[i]["w"])


@pytest.mark.parametrize("mode", ["manual", "autodiff", *credit.RULES])
def test_epoch_records_the_alignment_signal(mode):
    """Every ``grad_check_every`` steps: the angles of ``bpjax.credit.alignment`` between the
    step's gradients and jax.grad's on the same minibatch; NaN at the other steps. Weight
    angles for the feedback rules only; manual-vs-autodiff agreement for backprop only."""
    net, state = train_state(mode)
    x, y = train_data()
    epoch = train.make_epoch(
        net, CE, SGD, batch_size=STEP_BATCH, grad_mode=mode, grad_check_every=2
    )
    _, metrics = epoch(state, x, y, jnp.int32(1))
    keys = {f"alignment/layer{i}/angle" for i in (0, 2, 4)} | {"alignment/total/angle"}
    if mode in FEEDBACK_RULES:
        keys |= {f"alignment/layer{i}/weight_angle" for i in (0, 2, 4)}
    assert {k for k in metrics if k.startswith("alignment/")} == keys
    checks = {k for k in metrics if k.startswith("grad_check/")}
    assert bool(checks) == (mode in ("manual", "autodiff"))
    for name in keys | checks:
        values = np.asarray(metrics[name])
        assert values.shape == (5,) and values.dtype == np.float32
        np.testing.assert_array_equal(np.isfinite(values), np.arange(5) % 2 == 0)
    # step 0: the signal of the initial state on the epoch's first minibatch
    first = np.asarray(train.epoch_order(state.key, 1, N_TRAIN, STEP_BATCH))[0]
    xb, yb = x[first], y[first]
    _, grads = grad.value_and_grad(net, CE, mode=mode)(
        state.params, xb, yb, **feedback_kwargs(mode, state.rule_state)
    )
    _, true = grad.value_and_grad(net, CE, mode="autodiff")(state.params, xb, yb)
    expected = credit.alignment(
        grads, true, mode=mode, params=state.params, feedback=state.rule_state
    )
    for name, value in expected.items():
        np.testing.assert_allclose(metrics[f"alignment/{name}"][0], value, rtol=1e-5, atol=1e-6)
    total = np.asarray(metrics["alignment/total/angle"])[::2]
    if mode == "autodiff":
        np.testing.assert_array_equal(total, 0.0)  # the step's gradient is the true one
    elif mode == "manual":
        assert np.all(total < 1e-5)  # the control: float64 rounding
    else:
        assert np.all(total > 1.0)  # the rule is not the gradient


# fit end to end, on digits (200 training examples, 8 steps of 25 per epoch)

FIT_NET = layers.serial(
    layers.dense(32), layers.tanh(), layers.dense(16), layers.tanh(), layers.dense(10)
)
FIT_ADAM = optax.adam(1e-2)
FIT = {"batch_size": 25, "eval_batch_size": 512, "grad_check_every": 3}


@pytest.fixture(scope="module")
def digits_small():
    return data_lib.load("digits", limit_train=200)


class _RuleRuns(dict):
    """Uninterrupted 8-epoch runs with checkpoints, by rule, each run when first asked for:
    xdist spreads a module's cases over its workers, and each worker builds its own fixture
    (a run is ~10 s of CPU, most of it compiling)."""

    def __init__(self, data, tmp_path_factory):
        super().__init__()
        self.data, self.tmp_path_factory = data, tmp_path_factory

    def __missing__(self, mode):
        directory = self.tmp_path_factory.mktemp(mode)
        result = trainer.fit(
            FIT_NET, CE, FIT_ADAM, self.data, epochs=8, grad_mode=mode,
            checkpoint_dir=str(directory), **FIT,
        )  # fmt: skip
        self[mode] = (result, directory)
        return self[mode]


@pytest.fixture(scope="module")
def rule_runs(digits_small, tmp_path_factory):
    """``{rule: (FitResult, checkpoint directory)}``: see ``_RuleRuns``."""
    return _RuleRuns(digits_small, tmp_path_factory)


@pytest.mark.parametrize("mode", credit.RULES)
def test_fit_trains_with_every_rule(mode, rule_runs, digits_small):
    result, directory = rule_runs[mode]
    assert result.metrics["test_accuracy"] > 0.6, result.metrics  # chance: 0.1
    # the rule state is the one drawn from the seed, carried (Kolen-Pollack: updated)
    drawn = train.init_state(
        FIT_NET, FIT_ADAM, jax.random.PRNGKey(0), (25, 64), grad_mode=mode
    ).rule_state
    if mode == "kolen_pollack":
        assert jax.tree_util.tree_structure(result.state.rule_state) == (
            jax.tree_util.tree_structure(drawn)
        )
        assert trees_differ(result.state.rule_state, drawn)
    else:
        assert_trees_equal(result.state.rule_state, drawn)
    # the final angles: the last measured (step 63 of 64), in fit's metrics
    steps = np.concatenate([r["step_metrics"]["alignment/total/angle"] for r in result.history])
    assert steps.shape == (64,)
    np.testing.assert_array_equal(np.flatnonzero(np.isfinite(steps)), np.arange(0, 64, 3))
    if mode in NEEDS_FEEDBACK:  # the hidden layers' updates come to align (from ~90°)
        hidden = np.concatenate(
            [r["step_metrics"]["alignment/layer0/angle"] for r in result.history]
        )[::3]
        assert hidden[0] > 75 and hidden[-1] < hidden[0] - 15, hidden
    names = {k for k in result.metrics if k.startswith("alignment/")}
    expected_names = {"alignment/total/angle"} | {f"alignment/layer{i}/angle" for i in (0, 2, 4)}
    if mode in FEEDBACK_RULES:
        expected_names |= {f"alignment/layer{i}/weight_angle" for i in (0, 2, 4)}
    assert names == expected_names
    for name in names:
        last = result.history[-1]["step_metrics"][name]
        assert result.metrics[name] == float(last[np.isfinite(last)][-1])
    assert result.metrics["alignment/layer4/angle"] < 1e-3  # the output layer: its true gradient
    # the checkpoint carries the rule state
    path = checkpoint.CheckpointManager(directory).latest()
    restored, _ = checkpoint.restore(path, result.state)
    assert_trees_equal(restored.rule_state, result.state.rule_state)


@pytest.mark.parametrize("mode", ["feedback_alignment", "kolen_pollack"])
def test_fit_resumes_a_rule_bit_identically(mode, rule_runs, digits_small, tmp_path):
    expected, _ = rule_runs[mode]
    options = {"grad_mode": mode, "checkpoint_dir": str(tmp_path), **FIT}
    trainer.fit(FIT_NET, CE, FIT_ADAM, digits_small, epochs=5, **options)
    resumed = trainer.fit(FIT_NET, CE, FIT_ADAM, digits_small, epochs=8, resume=True, **options)
    assert [r["epoch"] for r in resumed.history] == [6, 7, 8]
    assert_trees_equal(resumed.state, expected.state)  # params, optimizer, rule state, step
    assert resumed.metrics["test_loss"] == expected.metrics["test_loss"]
    # another rule's checkpoints are not this run's
    with pytest.raises(trainer.ResumeError, match="learning_rule"):
        trainer.fit(
            FIT_NET, CE, FIT_ADAM, digits_small, epochs=9, resume=True,
            **{**options, "grad_mode": "sign_symmetry"},
        )  # fmt: skip


def test_fit_resumes_a_kolen_pollack_checkpoint_that_holds_b_itself(
    digits_small, tmp_path, monkeypatch
):
    """Before ``KolenPollackState`` the trainer kept ``B`` itself in the state and its
    checkpoints: such a checkpoint is read and converted (the same ``B``), and the run goes on
    as the uninterrupted one does (float32 rounding apart)."""
    options = {"grad_mode": "kolen_pollack", **FIT}
    with monkeypatch.context() as m:  # the trainer as it was: B itself, updated every step
        m.setattr(credit, "kolen_pollack_state", lambda params, feedback: feedback)
        old = trainer.fit(
            FIT_NET, CE, FIT_ADAM, digits_small, epochs=3, checkpoint_dir=str(tmp_path), **options
        )
        whole = trainer.fit(FIT_NET, CE, FIT_ADAM, digits_small, epochs=5, **options)
    assert not isinstance(old.state.rule_state, credit.KolenPollackState)
    resumed = trainer.fit(
        FIT_NET, CE, FIT_ADAM, digits_small, epochs=5, resume=True,
        checkpoint_dir=str(tmp_path), **options,
    )  # fmt: skip
    assert [r["epoch"] for r in resumed.history] == [4, 5]
    assert isinstance(resumed.state.rule_state, credit.KolenPollackState)
    assert_trees_close(resumed.state.params, whole.state.params, rtol=1e-4, atol=1e-5)
    assert_trees_close(
        credit.kolen_pollack_feedback(resumed.state.params, resumed.state.rule_state),
        whole.state.rule_state,
        rtol=1e-4,
        atol=1e-5,
    )


def test_a_resumed_run_keeps_the_angles_measured_before_its_checkpoint(digits_small, tmp_path):
    # Measured at step 0 only, before the checkpoint: the resumed call measured nothing, and
    # its metrics (metrics.json, compare_rules' table) had no angles at all (a trial).
    options = {**FIT, "grad_mode": "feedback_alignment", "grad_check_every": 1000}
    whole = trainer.fit(FIT_NET, CE, FIT_ADAM, digits_small, epochs=2, **options)
    angles = {k: v for k, v in whole.metrics.items() if k.startswith("alignment/")}
    assert "alignment/total/angle" in angles and "alignment/layer0/weight_angle" in angles
    options["checkpoint_dir"] = str(tmp_path)
    trainer.fit(FIT_NET, CE, FIT_ADAM, digits_small, epochs=1, **options)
    resumed = trainer.fit(FIT_NET, CE, FIT_ADAM, digits_small, epochs=2, resume=True, **options)
    assert [r["epoch"] for r in resumed.history] == [2]
    assert {k: v for k, v in resumed.metrics.items() if k.startswith("alignment/")} == angles


def forbid_compiling(monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("compiled or initialised before validating the arguments")

    monkeypatch.setattr(trainer, "_compiled", must_not_run)
    monkeypatch.setattr(trainer, "init_state", must_not_run)


RESIDUAL_NET = layers.serial(layers.dense(16), layers.residual(layers.dense(16)), layers.dense(10))


@pytest.mark.parametrize(
    ("net", "kwargs", "match"),
    [
        (
            RESIDUAL_NET,
            {"grad_mode": "direct_feedback_alignment"},
            r"layer 1 \(residual\(dense\(16\)\)\) is a residual block",
        ),
        (FIT_NET, {"grad_mode": "feedback_alignmnet"}, "feedback_alignmnet.*kolen_pollack"),
        (FIT_NET, {"grad_mode": "feedback_alignment", "rule_options": {"decay": 0.1}}, "decay"),
        (FIT_NET, {"rule_options": {"kp_decay": 1.0}}, r"kp_decay must be a number in \[0, 1\)"),
        (
            FIT_NET,
            {"grad_mode": "feedback_alignment", "rule_options": {"distribution": "cauchy"}},
            "cauchy",
        ),
        (
            layers.serial(layers.dense(16), scale_layer(), layers.dense(10)),
            {"grad_mode": "direct_feedback_alignment"},
            r"layer 1 \(scale\): it has parameters",
        ),
    ],
    ids=["dfa-residual", "unknown-rule", "unknown-option", "kp-decay", "distribution", "no-w"],
)
def test_fit_refuses_a_rule_before_compiling(net, kwargs, match, digits_small, monkeypatch):
    forbid_compiling(monkeypatch)
    before = COMPILATIONS[0]
    with pytest.raises(ValueError, match=match):
        trainer.fit(net, CE, FIT_ADAM, digits_small, epochs=1, batch_size=25, **kwargs)
    assert COMPILATIONS[0] == before


def test_check_rule_applies_each_rule_to_residual_networks_or_refuses():
    """The feedback rules go through branches; DFA refuses them; nothing is compiled."""
    before = COMPILATIONS[0]
    for mode in ("manual", "autodiff", *FEEDBACK_RULES):
        assert train.check_rule(mode, RESIDUAL_NET, (25, 64)) == train.RULE_OPTIONS
    with pytest.raises(ValueError, match="residual block"):
        train.check_rule("direct_feedback_alignment", RESIDUAL_NET, (25, 64))
    assert COMPILATIONS[0] == before


@pytest.mark.parametrize("mode", credit.RULES)
def test_mixed_precision_grad_of_every_rule(mode):
    """Under a compute dtype the rule runs on the network as given (DFA walks its layers and
    caches): bfloat16 gradients close to the float32 ones, in the params' dtype; the output
    comes back in float32."""
    net = mlp()
    params = tree_cast(net.init(jax.random.key(0), (BATCH, N_IN))[1], jnp.float32)
    x = normal((BATCH, N_IN), 2, jnp.float32)
    y = jnp.asarray(np.eye(N_OUT)[np.arange(BATCH) % N_OUT], jnp.float32)
    feedback = draw(mode, net, x.shape, dtype=jnp.float32)
    kwargs = feedback_kwargs(mode, feedback)
    low = precision.mixed_precision_grad(net, CE, mode, jnp.bfloat16)
    (value, (output, _)), grads = jax.jit(lambda p: low(p, x, y, **kwargs))(params)
    full = precision.mixed_precision_grad(net, CE, mode, None)
    (value32, (output32, _)), grads32 = full(params, x, y, **kwargs)
    assert output.dtype == jnp.float32 and value.dtype == jnp.float32
    np.testing.assert_allclose(output, output32, rtol=0, atol=0.05 * float(jnp.abs(output32).max()))
    assert all(g.dtype == jnp.float32 for g in jax.tree_util.tree_leaves(grads))
    np.testing.assert_allclose(value, value32, rtol=2e-2)
    for g, g32 in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads32)):
        np.testing.assert_allclose(g, g32, rtol=0, atol=0.05 * float(jnp.abs(g32).max()))
    assert float(credit.angle(grads, grads32)) < 3.0


def test_fit_dfa_in_bfloat16(digits_small):
    result = trainer.fit(
        FIT_NET, CE, FIT_ADAM, digits_small, epochs=8, grad_mode="direct_feedback_alignment",
        compute_dtype="bfloat16", **FIT,
    )  # fmt: skip
    assert all(a.dtype == np.float32 for a in leaves(result.state.params))
    assert all(a.dtype == np.float32 for a in leaves(result.state.rule_state))
    assert result.metrics["test_accuracy"] > 0.6
    assert 0 < result.metrics["alignment/total/angle"] < 90


DATA_PARALLEL = textwrap.dedent(
    """
    import json
    import jax
    import numpy as np
    import optax
    import bpjax
    from bpjax.data import load
    from bpjax.trainer import fit

    data = load("two_moons", n_samples=400)
    net = bpjax.mlp([16, 16, 2], activation="tanh")
    loss = bpjax.losses.softmax_cross_entropy()
    opt = optax.adam(1e-2)
    out = {"device_count": jax.device_count()}
    for mode in ("feedback_alignment", "direct_feedback_alignment", "kolen_pollack"):
        for devices in (1, 4):
            result = fit(
                net, loss, opt, data, epochs=2, batch_size=32, grad_mode=mode, devices=devices,
                grad_check_every=4,
            )
            out[f"{mode}/{devices}"] = {
                "state": [np.asarray(a).tolist() for a in jax.tree_util.tree_leaves(
                    (result.state.params, result.state.rule_state))],
                "angle": result.metrics["alignment/total/angle"],
            }
    print(json.dumps(out))
    """
)


def test_data_parallel_rule_matches_single_device():
    out = run_on_host_devices(DATA_PARALLEL, 4, timeout=600)
    assert out["device_count"] == 4
    for mode in ("feedback_alignment", "direct_feedback_alignment", "kolen_pollack"):
        one, four = out[f"{mode}/1"], out[f"{mode}/4"]
        for a, b in zip(one["state"], four["state"], strict=True):
            np.testing.assert_allclose(np.array(b), np.array(a), rtol=1e-4, atol=1e-6)
        assert four["angle"] == pytest.approx(one["angle"], abs=0.05)
