"""Gradients: manual == autodiff for every loss, as_custom_vjp runs the manual pass, and
check_grads names the layer whose backward is wrong.

Shapes are shared across tests (input 5, hidden 6, output 3, batch 7): eager JAX compiles every
operation anew for each shape, so reusing them keeps the suite fast.
"""

import json
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import ATOL, RTOL, assert_trees_close, numpy_params, tree_cast
from hypothesis import given, settings
from hypothesis import strategies as st

from bpjax import grad, layers, losses, train
from bpjax._gradcheck import finite_difference_row

N_IN, N_OUT, BATCH = 5, 3, 7


class NetCase(NamedTuple):
    id: str
    net: Callable[[], layers.Layer]
    loss: str  # key of losses.LOSSES
    loss_kwargs: dict[str, Any]
    target: str  # "real", "labels", "probs" or "binary"
    in_shape: tuple[int, ...] = (N_IN,)  # one example's shape
    train: bool = False  # forward with a dropout key
    per_example: bool = True  # works on a single unbatched example (vmap)


NETS = [
    NetCase("tanh-mse", lambda: layers.mlp([6, N_OUT], activation="tanh"), "mse", {}, "real"),
    NetCase(
        "relu-ce-labels", lambda: layers.mlp([6, N_OUT]), "softmax_cross_entropy", {}, "labels"
    ),
    NetCase(
        "gelu-ce-probs",
        lambda: layers.mlp([6, 6, N_OUT], activation="gelu"),
        "softmax_cross_entropy",
        {},
        "probs",
    ),
    NetCase(
        "sigmoid-bce",
        lambda: layers.mlp([6, N_OUT], activation="sigmoid"),
        "binary_cross_entropy",
        {},
        "binary",
    ),
    NetCase(
        "elu-huber",
        lambda: layers.mlp([6, N_OUT], activation="elu"),
        "huber",
        {"delta": 0.5},
        "real",
    ),
    NetCase(
        "silu-softmax-quadratic",
        lambda: layers.mlp([6, N_OUT], activation="silu", output_activation="softmax"),
        "quadratic",
        {},
        "probs",
    ),
    NetCase("dense-mse", lambda: layers.dense(N_OUT), "mse", {}, "real"),
    NetCase(
        "flatten-leaky-dropout-ce",
        lambda: layers.serial(
            layers.flatten(),
            layers.dense(6),
            layers.leaky_relu(0.2),
            layers.dropout(0.3),
            layers.dense(N_OUT),
        ),
        "softmax_cross_entropy",
        {},
        "labels",
        in_shape=(1, N_IN),
        train=True,
        per_example=False,
    ),
]
NET_IDS = [c.id for c in NETS]


# What each public name of `bpjax.grad` is tested by (a new name must be added here).
TESTED = {
    "MODES": "test_with_output_returns_the_network_output",
    "GradCheckResult": "test_check_grads_*",
    "GradCheckRow": "test_check_grads_records_serialise_to_json",
    "GradCheckWarning": "test_check_grads_warns_in_float32_and_passes",
    "as_custom_vjp": "test_custom_vjp_*",
    "check_grads": "test_check_grads_*",
    "cosine_similarity": "test_relative_error_and_cosine",
    "default_tolerances": "test_default_tolerances",
    "grad_agreement": "test_grad_agreement_*",
    "relative_error": "test_relative_error_and_cosine",
    "value_and_grad": "test_manual_matches_autodiff",
}


def test_public_names_are_tested():
    assert set(TESTED) == set(grad.__all__)


def test_nets_cover_every_loss():
    assert {case.loss for case in NETS} == set(losses.LOSSES)


def make_target(kind: str, rng: np.random.Generator, shape: tuple[int, ...], dtype) -> jax.Array:
    """A target of the given kind for a prediction of ``shape`` (drawn with numpy: fast)."""
    if kind == "real":
        return jnp.asarray(rng.standard_normal(shape), dtype)
    if kind == "labels":
        return jnp.asarray(rng.integers(0, shape[-1], shape[:-1]))
    if kind == "probs":
        return jax.nn.softmax(jnp.asarray(2 * rng.standard_normal(shape), dtype), axis=-1)
    if kind == "binary":
        return jnp.asarray(rng.uniform(size=shape), dtype)
    raise ValueError(kind)


def setup(case: NetCase, dtype=jnp.float64, *, batch: int = BATCH, seed: int = 0):
    """The net, its loss, params (cast to ``dtype``), an input, a target and a key."""
    net = case.net()
    rng = np.random.default_rng(seed)
    in_shape = (batch, *case.in_shape)
    out_shape, params = net.init(jax.random.key(seed), in_shape)
    params = tree_cast(params, dtype)
    x = jnp.asarray(rng.standard_normal(in_shape), dtype)
    target = make_target(case.target, rng, out_shape, dtype)
    key = jax.random.key(seed + 1) if case.train else None
    return net, losses.get(case.loss, **case.loss_kwargs), params, x, target, key


def tolerances(dtype) -> dict[str, float]:
    return {"rtol": RTOL[dtype], "atol": ATOL[dtype]}


def both_modes(net: layers.Layer, loss: losses.Loss) -> Callable:
    """``(params, x, target, key=None) -> (manual, autodiff)``: value_and_grad in both modes
    (one program when jitted)."""
    manual = grad.value_and_grad(net, loss)
    auto = grad.value_and_grad(net, loss, mode="autodiff")

    def both(params, x, target, key=None):
        return manual(params, x, target, key=key), auto(params, x, target, key=key)

    return both


# --------------------------------------------------------------------------------------------
# value_and_grad


@pytest.mark.parametrize("case", NETS, ids=NET_IDS)
def test_manual_matches_autodiff(case, dtype, maybe_jit):
    net, loss, params, x, target, key = setup(case, dtype)
    both = both_modes(net, loss)
    (value, grads), (value_ref, grads_ref) = maybe_jit(both)(params, x, target, key)
    assert value.shape == () and value.dtype == dtype and np.isfinite(value)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)
    np.testing.assert_allclose(value, value_ref, **tolerances(dtype))
    assert_trees_close(grads, grads_ref, **tolerances(dtype))


@pytest.mark.parametrize("mode", ["manual", "autodiff"])  # the learning rules: test_credit.py
def test_with_output_returns_the_network_output(mode):
    net, loss, params, x, target, _ = setup(NETS[0])
    (value, y), grads = grad.value_and_grad(net, loss, mode=mode, with_output=True)(
        params, x, target
    )
    value_only, grads_only = grad.value_and_grad(net, loss, mode=mode)(params, x, target)
    np.testing.assert_array_equal(y, net.forward(params, x)[0])
    np.testing.assert_allclose(value, value_only, rtol=1e-15)
    assert_trees_close(grads, grads_only, rtol=1e-15)


def test_unknown_mode_lists_valid_modes():
    with pytest.raises(ValueError, match="nope") as info:
        grad.value_and_grad(layers.dense(2), "mse", mode="nope")
    for mode in grad.MODES:
        assert mode in str(info.value)


def test_loss_by_name():
    net, loss, params, x, target, _ = setup(NETS[0])
    by_name = grad.value_and_grad(net, "mse")(params, x, target)
    assert_trees_close(by_name, grad.value_and_grad(net, loss)(params, x, target), rtol=0)


def test_unknown_loss_raises():
    with pytest.raises(ValueError, match="nope"):
        grad.value_and_grad(layers.dense(2), "nope")
    with pytest.raises(TypeError, match="Loss"):
        grad.value_and_grad(layers.dense(2), jnp.mean)


PER_EXAMPLE = [c for c in NETS if c.per_example]


@pytest.mark.parametrize("case", PER_EXAMPLE, ids=[c.id for c in PER_EXAMPLE])
def test_vmap_gives_per_example_gradients(case):
    """vmap over (None, 0, 0): each example is a batch of one, so the per-example gradients of
    a mean loss average to the batch gradient."""
    net, loss, params, x, target, _ = setup(case)

    @jax.jit  # eager vmap runs op by op and is slow
    def per_example(params, x, target):
        in_axes = (None, 0, 0)
        manual = jax.vmap(grad.value_and_grad(net, loss), in_axes)(params, x, target)
        auto = jax.vmap(grad.value_and_grad(net, loss, mode="autodiff"), in_axes)(params, x, target)
        return manual, auto

    (values, grads), (values_ref, grads_ref) = per_example(params, x, target)
    assert values.shape == (BATCH,)
    assert_trees_close((values, grads), (values_ref, grads_ref), rtol=1e-10, atol=1e-12)
    value, batch_grads = grad.value_and_grad(net, loss)(params, x, target)
    np.testing.assert_allclose(jnp.mean(values), value, rtol=1e-12)
    mean_grads = jax.tree_util.tree_map(lambda g: jnp.mean(g, axis=0), grads)
    assert_trees_close(mean_grads, batch_grads, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------
# as_custom_vjp


def scaled_dw(layer: layers.Layer, factor: float = 2.0) -> layers.Layer:
    """A dense layer whose backward is deliberately wrong: ``dw`` scaled by ``factor``."""

    def backward(params, cache, dy):
        grads, dx = layer.backward(params, cache, dy)
        return {**grads, "w": factor * grads["w"]}, dx

    return layer._replace(backward=backward)


def forgetful_tanh() -> layers.Layer:
    """A tanh whose backward forgets the (1 - y^2) factor."""
    tanh = layers.tanh()
    return tanh._replace(backward=lambda params, cache, dy: ((), dy))


def net_apply(net: layers.Layer) -> Callable:
    """``apply(params, x, *, key)`` by plain autodiff of the forward pass."""
    return lambda params, x, *, key=None: net.forward(params, x, key=key)[0]


def loss_through(apply: Callable, loss: losses.Loss, target, key) -> Callable:
    return lambda params, x: loss.forward(apply(params, x, key=key), target)[0]


@pytest.mark.parametrize("case", [NETS[1], NETS[2], NETS[-1]], ids=[NET_IDS[1], NET_IDS[2], "key"])
def test_custom_vjp_grad_matches_autodiff(case, maybe_jit):
    net, loss, params, x, target, key = setup(case)
    apply = grad.as_custom_vjp(net)
    np.testing.assert_array_equal(apply(params, x, key=key), net.forward(params, x, key=key)[0])
    g_custom = maybe_jit(jax.grad(loss_through(apply, loss, target, key), argnums=(0, 1)))(
        params, x
    )
    g_auto = jax.grad(loss_through(net_apply(net), loss, target, key), argnums=(0, 1))(params, x)
    assert_trees_close(g_custom, g_auto, rtol=1e-10, atol=1e-12)


def test_custom_vjp_runs_the_hand_written_backward():
    """With a deliberately wrong backward, jax.grad through as_custom_vjp is wrong in exactly
    the manual way (so it really runs the manual pass), while plain autodiff is not."""
    net = layers.serial(layers.dense(6), layers.tanh(), scaled_dw(layers.dense(N_OUT)))
    case = NETS[0]._replace(net=lambda: net)
    net, loss, params, x, target, _ = setup(case)
    objective = loss_through(grad.as_custom_vjp(net), loss, target, None)
    g_custom = jax.grad(objective)(params, x)
    g_auto = jax.grad(loss_through(net_apply(net), loss, target, None))(params, x)
    _, g_manual = grad.value_and_grad(net, loss)(params, x, target)
    assert_trees_close(g_custom, g_manual, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(g_custom[2]["w"], 2 * g_auto[2]["w"], rtol=1e-10)
    np.testing.assert_allclose(g_custom[2]["b"], g_auto[2]["b"], rtol=1e-10)
    # The broken layer's dx is right, so the layers before it get the right gradients.
    assert_trees_close(g_custom[0], g_auto[0], rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------
# check_grads


# An mlp, a bare layer (no sublayers) and a net with dropout; random nets for every loss and
# activation are checked by test_random_mlp_manual_matches_autodiff.
CHECKED = [NETS[0], NETS[-2], NETS[-1]]


@pytest.mark.parametrize("case", CHECKED, ids=[c.id for c in CHECKED])
def test_check_grads_passes_in_float64(case):
    net, loss, params, x, target, key = setup(case)
    result = grad.check_grads(net, loss, params, x, target, key=key)
    assert result.passed, str(result)
    assert result.first_failure is None and result.dtype == "float64"
    text = str(result)
    assert "PASSED" in text and "max_abs_err" in text and "rel_err" in text
    checks = [row.check for row in result.rows]
    assert checks[0] == "loss" and checks[-1] == "fd" and "layer" in checks and "total" in checks
    n_layers = len(net.sublayers) or 1
    assert {row.layer for row in result.rows if row.check == "layer"} == set(range(n_layers))
    assert result.raise_if_failed() is result


def test_check_grads_warns_in_float32_and_passes():
    net, loss, params, x, target, _ = setup(NETS[1], jnp.float32)
    with pytest.warns(grad.GradCheckWarning, match="float32"):
        result = grad.check_grads(net, loss, params, x, target)
    assert result.passed, str(result)
    assert result.dtype == "float32" and result.rtol == grad.default_tolerances(jnp.float32)["rtol"]


BROKEN = [
    # (id, layers, index of the broken layer, leaf where it first shows)
    (
        "tanh-forgets-1-y^2",
        lambda: (layers.dense(6), forgetful_tanh(), layers.dense(N_OUT)),
        1,
        "dx",
    ),
    (
        "dense-dw-scaled",
        lambda: (
            layers.dense(6),
            layers.tanh(),
            scaled_dw(layers.dense(6)),
            layers.tanh(),
            layers.dense(N_OUT),
        ),
        2,
        "w",
    ),
]


@pytest.mark.parametrize(
    ("parts", "index", "leaf"), [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN]
)
def test_check_grads_names_the_broken_layer(parts, index, leaf):
    net = layers.serial(*parts())
    case = NETS[0]._replace(net=lambda: net)
    net, loss, params, x, target, _ = setup(case)
    result = grad.check_grads(net, loss, params, x, target)
    assert not result.passed
    first = result.first_failure
    assert (first.check, first.layer, first.leaf) == ("layer", index, leaf)
    assert first.layer_name == net.sublayers[index].name
    text = str(result)
    assert "FAILED" in text and f"layer {index}" in text and "FAIL" in text
    # Layers after the broken one (earlier in the backward pass) still pass their own check.
    for row in result.rows:
        if row.check == "layer" and row.layer > index:
            assert row.status == "passed", str(result)
    with pytest.raises(AssertionError, match=f"layer {index}"):
        result.raise_if_failed()


def test_check_grads_reports_a_broken_loss():
    net, loss, params, x, target, _ = setup(NETS[0])
    broken = loss._replace(backward=lambda cache: 2 * loss.backward(cache))
    result = grad.check_grads(net, broken, params, x, target)
    assert not result.passed
    first = result.first_failure
    assert (first.check, first.layer, first.layer_name) == ("loss", None, "loss")
    assert "wrong at loss" in str(result)
    assert all(row.status == "passed" for row in result.rows if row.check == "layer")
    assert result.failures == tuple(row for row in result.rows if row.failed)
    assert result.failures[0] is first and len(result.failures) < len(result.rows)


def test_check_grads_records_serialise_to_json():
    net, loss, params, x, target, key = setup(NETS[-1])
    result = grad.check_grads(net, loss, params, x, target, key=key)
    records = json.loads(json.dumps(result.to_records()))
    assert len(records) == len(result.rows)
    assert set(records[0]) == {
        "check",
        "layer",
        "layer_name",
        "leaf",
        "shape",
        "max_abs_err",
        "rel_err",
        "cosine",
        "tol",
        "status",
        "note",
        "passed",
    }
    fd = [r for r in records if r["check"] == "fd"]
    assert len(fd) == 1 and fd[0]["passed"] and fd[0]["shape"] == "scalar"
    assert math.isnan(result.rows[-1].cosine)


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        (jnp.float64, {"rtol": 1e-10, "fd_rtol": 1e-6, "eps": 1e-6}),
        (jnp.float32, {"rtol": 1e-4, "fd_rtol": 3e-2, "eps": 1e-3}),
        (jnp.float16, {"rtol": 1e-2, "fd_rtol": 3e-1, "eps": 1e-1}),
        (jnp.bfloat16, {"rtol": 5e-2, "fd_rtol": 3e-1, "eps": 1e-1}),
    ],
    ids=["f64", "f32", "f16", "bf16"],
)
def test_default_tolerances(dtype, expected):
    assert grad.default_tolerances(dtype) == expected


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_, jnp.complex64])
def test_default_tolerances_refuse_non_float_params(dtype):
    with pytest.raises(ValueError, match="floating-point params"):
        grad.default_tolerances(dtype)


def test_check_grads_overrides_and_warn_false():
    """Given tolerances and step are used (and reported); warn=False checks float32 silently
    (pytest turns a GradCheckWarning into an error here)."""
    net, loss, params, x, target, _ = setup(NETS[-2], jnp.float32)  # a bare dense layer
    result = grad.check_grads(
        net, loss, params, x, target, rtol=2e-3, fd_rtol=0.2, eps=1e-2, seed=3, warn=False
    )
    assert result.passed, str(result)
    assert (result.rtol, result.fd_rtol, result.eps) == (2e-3, 0.2, 1e-2)
    assert {row.tol for row in result.rows if row.check != "fd"} == {2e-3}
    assert [row.tol for row in result.rows if row.check == "fd"] == [0.2]
    assert "rtol=0.002, fd_rtol=0.2, eps=0.01" in str(result)


def test_check_grads_bad_params_or_input_name_the_layer():
    """Wrong shapes name the layer by index (as serial's forward does); too few params are
    refused instead of silently checking only the first layers."""
    net, loss, params, x, target, _ = setup(NETS[0])  # mlp: dense(6), tanh, dense(3)
    with pytest.raises(ValueError, match=r"got params for 2 layers, serial\(.*\) has 3"):
        grad.check_grads(net, loss, params[:2], x, target)
    with pytest.raises(ValueError) as info:
        grad.check_grads(net, loss, params, jnp.ones((BATCH, N_IN + 2)), target)
    assert str(info.value).startswith("layer 0 of 3: dense(6): input has shape (7, 7)")
    swapped = (params[0], params[1], {"w": jnp.ones((4, N_OUT)), "b": jnp.ones(N_OUT)})
    with pytest.raises(ValueError, match=r"^layer 2 of 3: dense\(3\).*\(4, 3\)"):
        grad.check_grads(net, loss, swapped, x, target)
    with pytest.raises(ValueError, match=r"^dense\(3\): input has shape \(7, 5\)"):
        grad.check_grads(layers.dense(N_OUT), loss, params[2], x, target)  # bare: no index


def test_check_grads_names_the_call_for_a_factory():
    x = jnp.ones((2, 3))
    with pytest.raises(TypeError, match=r"check_grads: net .*call it: bpjax\.relu\(\)"):
        grad.check_grads(layers.relu, "mse", (), x, x)
    with pytest.raises(TypeError, match=r"check_grads: loss .*call it: bpjax\.losses\.mse\(\)"):
        grad.check_grads(layers.dense(3), losses.mse, {}, x, x)


def test_check_grads_needs_params():
    with pytest.raises(ValueError, match="no parameters"):
        grad.check_grads(layers.relu(), "mse", (), jnp.ones((2, 3)), jnp.ones((2, 3)))


# --------------------------------------------------------------------------------------------
# grad_agreement and the metrics


def test_grad_agreement_of_identical_trees(maybe_jit):
    net, loss, params, x, target, _ = setup(NETS[0])
    _, grads = grad.value_and_grad(net, loss)(params, x, target)
    metrics = maybe_jit(grad.grad_agreement)(grads, grads)
    assert set(metrics) == {
        f"{where}/{metric}"
        for where in ("layer0", "layer2", "total")  # layer1 (tanh) has no parameters
        for metric in ("rel_err", "cosine")
    }
    for name, value in metrics.items():
        assert value.shape == ()
        np.testing.assert_allclose(value, 0.0 if name.endswith("rel_err") else 1.0, atol=1e-12)


def test_grad_agreement_manual_vs_autodiff_and_single_layer():
    net, loss, params, x, target, _ = setup(NETS[-2])  # a bare dense layer: one "layer"
    _, manual = grad.value_and_grad(net, loss)(params, x, target)
    _, auto = grad.value_and_grad(net, loss, mode="autodiff")(params, x, target)
    metrics = grad.grad_agreement(manual, auto)
    assert set(metrics) == {"layer0/rel_err", "layer0/cosine", "total/rel_err", "total/cosine"}
    assert metrics["total/rel_err"] < 1e-12 and abs(metrics["total/cosine"] - 1) < 1e-12
    wrong = jax.tree_util.tree_map(lambda g: -g, manual)
    np.testing.assert_allclose(grad.grad_agreement(wrong, auto)["layer0/cosine"], -1.0)


@pytest.mark.parametrize(
    ("a", "b", "rel_err", "cosine"),
    [
        ([1.0, 0.0], [0.0, 1.0], math.sqrt(2), 0.0),  # orthogonal
        ([1.0, 2.0], [2.0, 4.0], 0.5, 1.0),  # scaled
        ([1.0, 2.0], [-1.0, -2.0], 2.0, -1.0),  # opposite
        ([0.0, 0.0], [0.0, 0.0], 0.0, 1.0),  # both zero
        ([0.0, 0.0], [3.0, 4.0], 1.0, 0.0),  # one zero
    ],
)
def test_relative_error_and_cosine(a, b, rel_err, cosine):
    a, b = jnp.asarray(a), jnp.asarray(b)
    np.testing.assert_allclose(grad.relative_error(a, b), rel_err, rtol=1e-12)
    np.testing.assert_allclose(grad.cosine_similarity(a, b), cosine, rtol=1e-12, atol=1e-15)
    tree_a, tree_b = {"u": a[:1], "v": (a[1:],)}, {"u": b[:1], "v": (b[1:],)}
    np.testing.assert_allclose(grad.relative_error(tree_a, tree_b), rel_err, rtol=1e-12)
    np.testing.assert_allclose(grad.cosine_similarity(tree_a, tree_b), cosine, atol=1e-15)


# --------------------------------------------------------------------------------------------
# random networks


HIDDEN_ACTIVATIONS = sorted(layers.ACTIVATIONS)
TARGET_KINDS = {
    "mse": ["real"],
    "quadratic": ["real"],
    "huber": ["real"],
    "binary_cross_entropy": ["binary"],
    "softmax_cross_entropy": ["labels", "probs"],
}


def test_target_kinds_cover_every_loss():
    assert set(TARGET_KINDS) == set(losses.LOSSES)


# Widths and batch sizes come from small sets spanning 1-16 and 1-8 (shared with the tests
# above): eager JAX compiles every operation for every new shape and check_grads runs many, so
# recurring shapes keep an example to about a second instead of several.
WIDTHS = [1, 3, 6, 16]
BATCHES = [1, 7]


@settings(max_examples=10, deadline=None)  # each example compiles new shapes
@given(
    widths=st.lists(st.sampled_from(WIDTHS), min_size=1, max_size=4),
    activation=st.sampled_from(HIDDEN_ACTIVATIONS),
    loss_name=st.sampled_from(sorted(TARGET_KINDS)),
    batch=st.sampled_from(BATCHES),
    data=st.data(),
)
def test_random_mlp_manual_matches_autodiff(widths, activation, loss_name, batch, data):
    kind = data.draw(st.sampled_from(TARGET_KINDS[loss_name]), label="target")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    net = layers.mlp(widths, activation=activation)
    loss = losses.get(loss_name)
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((batch, N_IN)))
    target = make_target(kind, rng, (batch, widths[-1]), jnp.float64)
    # Params drawn with numpy in init's shapes: eager jax.random compiles for every shape.
    shapes = jax.eval_shape(lambda: net.init(jax.random.key(0), x.shape)[1])
    params = jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.standard_normal(s.shape) / math.sqrt(s.shape[0])), shapes
    )
    # Both modes in one jitted program: eagerly, each example's new shapes compile every
    # operation anew (eager runs are covered by test_manual_matches_autodiff).
    (value, grads), (value_ref, grads_ref) = jax.jit(both_modes(net, loss))(params, x, target)
    np.testing.assert_allclose(value, value_ref, rtol=1e-10)
    assert_trees_close(grads, grads_ref, rtol=1e-10, atol=1e-12)
    result = grad.check_grads(net, loss, params, x, target)
    assert result.passed, str(result)


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_check_grads_tolerances_follow_low_precision_dtypes(dtype_name):
    """Mixed precision: a correct backward passes at the dtype's own (loose) tolerances."""
    low = jnp.dtype(dtype_name)
    net = layers.mlp([16, 4], activation="tanh")
    params = numpy_params(net, (8, 6), low)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 6)), low)
    target = jnp.arange(8) % 4
    with pytest.warns(grad.GradCheckWarning, match=dtype_name):
        result = grad.check_grads(net, "softmax_cross_entropy", params, x, target)
    assert result.dtype == dtype_name
    assert result.rtol == grad.default_tolerances(low)["rtol"] > 1e-3
    assert result.passed, str(result)


# --------------------------------------------------------------------------------------------
# inputs of every dtype the network accepts: images as uint8, labels-as-features as int32,
# masks as bool, and every float. An integer or bool input has no gradient (jax gives it a
# float0 cotangent); the gradient of the params is that of the same network on the input cast
# to float, exactly (every such input value is a float64 number).

INPUT_DTYPES = ["uint8", "int32", "bool", "float16", "bfloat16", "float32", "float64"]


def input_of(dtype_name: str, shape: tuple[int, ...], rng: np.random.Generator) -> jax.Array:
    """Image-like integers (uint8 0-255, int32 -128-127), random bits, or standard normals."""
    dtype = jnp.dtype(dtype_name)
    if dtype == jnp.bool_:
        return jnp.asarray(rng.random(shape) < 0.5)
    if dtype == jnp.uint8:
        return jnp.asarray(rng.integers(0, 256, shape), dtype)
    if jnp.issubdtype(dtype, jnp.integer):
        return jnp.asarray(rng.integers(-128, 128, shape), dtype)
    return jnp.asarray(rng.standard_normal(shape), dtype)


def has_gradient(x: jax.Array) -> bool:
    return jnp.issubdtype(x.dtype, jnp.inexact)


class DtypeSetup(NamedTuple):
    net: layers.Layer
    loss: losses.Loss
    params: Any
    x: jax.Array
    target: jax.Array
    value_ref: jax.Array
    grads_ref: Any


def dtype_setup(dtype_name: str, *, batch: int = BATCH) -> DtypeSetup:
    """A float64 mlp, an input of ``dtype_name``, labels, and the reference: jax.grad of the
    same network on the input cast to float64."""
    net = layers.mlp([6, N_OUT], dtype=jnp.float64)
    rng = np.random.default_rng(0)
    _, params = net.init(jax.random.key(0), (batch, N_IN))
    x = input_of(dtype_name, (batch, N_IN), rng)
    target = jnp.asarray(rng.integers(0, N_OUT, batch))
    loss = losses.softmax_cross_entropy()
    value_ref, grads_ref = jax.value_and_grad(
        lambda p: loss.forward(net.forward(p, x.astype(jnp.float64))[0], target)[0]
    )(params)
    return DtypeSetup(net, loss, params, x, target, value_ref, grads_ref)


def check_value_and_grad(s: DtypeSetup) -> None:
    """Both modes under jit, and grad_agreement of the two."""

    @jax.jit
    def both(params, x, target):
        manual = grad.value_and_grad(s.net, s.loss)(params, x, target)
        auto = grad.value_and_grad(s.net, s.loss, mode="autodiff")(params, x, target)
        return manual, auto, grad.grad_agreement(manual[1], auto[1])

    (value, grads), (value_auto, grads_auto), agreement = both(s.params, s.x, s.target)
    for v, g in ((value, grads), (value_auto, grads_auto)):
        np.testing.assert_allclose(v, s.value_ref, rtol=1e-12)
        assert_trees_close(g, s.grads_ref, rtol=1e-10, atol=1e-12)
    assert float(agreement["total/rel_err"]) < 1e-12
    assert abs(float(agreement["total/cosine"]) - 1) < 1e-12


def check_custom_vjp(s: DtypeSetup) -> None:
    """jax.grad of the params through as_custom_vjp; jax.vjp of the input where it has one."""
    apply = grad.as_custom_vjp(s.net)

    def objective(params, x):
        return s.loss.forward(apply(params, x), s.target)[0]

    grads = jax.jit(jax.grad(objective))(s.params, s.x)
    assert_trees_close(grads, s.grads_ref, rtol=1e-10, atol=1e-12)
    _, vjp = jax.vjp(apply, s.params, s.x)
    _, dx = vjp(jnp.ones((BATCH, N_OUT)))
    _, vjp_ref = jax.vjp(lambda p, x: s.net.forward(p, x)[0], s.params, s.x)
    _, dx_ref = vjp_ref(jnp.ones((BATCH, N_OUT)))
    assert dx.dtype == dx_ref.dtype  # float0 for an input without a gradient
    if has_gradient(s.x):
        np.testing.assert_allclose(
            np.asarray(dx, np.float64), np.asarray(dx_ref, np.float64), rtol=1e-2
        )


def check_check_grads(s: DtypeSetup) -> None:
    result = grad.check_grads(s.net, s.loss, s.params, s.x, s.target)
    assert result.passed, str(result)
    dx_rows = [r for r in result.rows if r.leaf == "dx" and r.layer == 0]
    assert len(dx_rows) == 1
    dtype_name = jnp.dtype(s.x.dtype).name
    if has_gradient(s.x):
        assert dx_rows[0].status == "passed", str(result)
        assert dx_rows[0].tol == max(1e-10, grad.default_tolerances(s.x.dtype)["rtol"])
    else:
        assert dx_rows[0].status == "skipped" and result.skipped == (dx_rows[0],)
        assert f"{dtype_name} input: no gradient" in dx_rows[0].note
        assert f"layer 0:dense(6) dx: skipped: {dtype_name} input: no gradient" in str(result)
    # Every other row compared something and agreed. The fd row may meet a kink: a bool
    # example of all False is a zero input, and the biases are zero (item 2's example).
    assert all(r.status == "passed" for r in result.rows[:-1] if r not in dx_rows), str(result)
    assert result.rows[-1].status in ("passed", "inconclusive"), str(result)


def check_make_step(s: DtypeSetup) -> None:
    optimizer = optax.sgd(0.5)
    state = train.TrainState(
        s.params, optimizer.init(s.params), jnp.zeros((), jnp.int32), jax.random.key(1)
    )
    new_state, aux = jax.jit(train.make_step(s.net, s.loss, optimizer))(state, s.x, s.target)
    expected = jax.tree_util.tree_map(lambda p, g: p - 0.5 * g, s.params, s.grads_ref)
    assert_trees_close(new_state.params, expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(aux["loss"], s.value_ref, rtol=1e-12)


def check_make_epoch(s: DtypeSetup) -> None:
    """Two steps with the manual-vs-autodiff signal at every step (grad_check_every=1)."""
    optimizer = optax.sgd(0.5)
    state = train.TrainState(
        s.params, optimizer.init(s.params), jnp.zeros((), jnp.int32), jax.random.key(1)
    )
    x = jnp.concatenate([s.x, s.x[::-1]])
    target = jnp.concatenate([s.target, s.target[::-1]])
    epoch = train.make_epoch(s.net, s.loss, optimizer, batch_size=BATCH, grad_check_every=1)
    new_state, metrics = epoch(state, x, target, 0)
    assert metrics["loss"].shape == (2,) and np.all(np.isfinite(metrics["loss"]))
    rel_err = np.asarray(metrics["grad_check/total/rel_err"])
    assert rel_err.shape == (2,) and np.all(rel_err < 1e-6), rel_err
    assert int(new_state.step) == 2


UTILITIES = {
    "value_and_grad": check_value_and_grad,
    "as_custom_vjp": check_custom_vjp,
    "check_grads": check_check_grads,
    "make_step": check_make_step,
    "make_epoch": check_make_epoch,
}


@pytest.mark.parametrize("dtype_name", INPUT_DTYPES)
@pytest.mark.parametrize("utility", sorted(UTILITIES))
def test_every_gradient_utility_takes_inputs_of_every_dtype(utility, dtype_name):
    UTILITIES[utility](dtype_setup(dtype_name))


def branching_net() -> layers.Layer:
    """Two inputs of their own dtypes, joined: ``relu(x0 @ w0 + x1 @ w1) @ w2``."""
    return layers.serial(
        layers.parallel(layers.dense(4, dtype=jnp.float64), layers.dense(4, dtype=jnp.float64)),
        layers.fan_in_sum(),
        layers.tanh(),
        layers.dense(N_OUT, dtype=jnp.float64),
    )


TUPLE_DTYPES = [("uint8", "bfloat16"), ("bool", "float64"), ("float32", "int32")]


@pytest.mark.parametrize("dtypes", TUPLE_DTYPES, ids="-".join)
def test_tuple_inputs_of_mixed_dtypes(dtypes):
    net, loss = branching_net(), losses.softmax_cross_entropy()
    rng = np.random.default_rng(0)
    x = tuple(input_of(d, (BATCH, n), rng) for d, n in zip(dtypes, (N_IN, 2)))
    target = jnp.asarray(rng.integers(0, N_OUT, BATCH))
    params = numpy_params(net, ((BATCH, N_IN), (BATCH, 2)))

    def objective(p, x):
        return loss.forward(net.forward(p, x)[0], target)[0]

    as_float = tuple(a.astype(jnp.float64) for a in x)
    value_ref, grads_ref = jax.value_and_grad(objective)(params, as_float)
    for mode in ("manual", "autodiff"):  # the rules: tests/test_credit.py
        value, grads = jax.jit(grad.value_and_grad(net, loss, mode=mode))(params, x, target)
        np.testing.assert_allclose(value, value_ref, rtol=1e-12)
        assert_trees_close(grads, grads_ref, rtol=1e-10, atol=1e-12)

    apply = grad.as_custom_vjp(net)
    _, vjp = jax.vjp(lambda p, x: loss.forward(apply(p, x), target)[0], params, x)
    grads, dx = vjp(1.0)
    assert_trees_close(grads, grads_ref, rtol=1e-10, atol=1e-12)
    _, dx_ref = jax.vjp(objective, params, x)[1](1.0)
    assert [d.dtype for d in dx] == [d.dtype for d in dx_ref]
    for a, d, d_ref in zip(x, dx, dx_ref):
        if has_gradient(a):
            np.testing.assert_allclose(
                np.asarray(d, np.float64), np.asarray(d_ref, np.float64), rtol=1e-2, atol=1e-12
            )

    result = grad.check_grads(net, loss, params, x, target, warn=False)
    assert result.passed, str(result)
    rows = {r.leaf: r for r in result.rows if r.layer == 0 and r.leaf.startswith("dx")}
    assert set(rows) == {"dx/0", "dx/1"}
    for i, a in enumerate(x):
        assert rows[f"dx/{i}"].status == ("passed" if has_gradient(a) else "skipped"), str(result)
        assert rows[f"dx/{i}"].shape == a.shape


# --------------------------------------------------------------------------------------------
# the finite-difference witness at kinks: inconclusive, never a false failure; a wrong
# gradient where the loss is smooth still fails.


def kinked_setup(activation: str, scale: float, dtype=jnp.float64):
    """The issue's example: a relu-family mlp at default init (zero biases) and an example
    scaled to ``scale``: 0 puts every hidden pre-activation of that example exactly on the
    kink; 1e-8 puts them within the step (~1e-8 from it), off centre. Shapes as
    ``dtype_setup``'s (relu in float64: its very params), so most programs are compiled once."""
    net = layers.mlp([6, N_OUT], activation=activation, dtype=dtype)
    _, params = net.init(jax.random.key(0), (BATCH, N_IN))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((BATCH, N_IN)), dtype)
    return net, params, x.at[0].multiply(scale), jnp.arange(BATCH) % N_OUT


@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
@pytest.mark.parametrize("scale", [0.0, 1e-8], ids=["at-the-centre", "inside-the-step"])
def test_fd_row_is_inconclusive_at_a_kink(activation, scale):
    net, params, x, target = kinked_setup(activation, scale)
    result = grad.check_grads(net, "softmax_cross_entropy", params, x, target)
    fd = result.rows[-1]
    assert fd.check == "fd" and fd.status == "inconclusive", str(result)
    assert fd.rel_err > fd.tol  # it disagrees: without the kink test it would have failed
    assert result.passed and result.inconclusive == (fd,)
    assert all(r.status == "passed" for r in result.rows[:-1]), str(result)
    text = str(result)
    assert "INCONCLUSIVE" in text and "FAIL" not in text
    assert "not smooth within the step" in fd.note and "not smooth within the step" in text
    assert "PASSED" in text and "1 inconclusive" in text


def test_fd_row_is_inconclusive_at_a_kink_in_float32():
    net, params, x, target = kinked_setup("relu", 0.0, jnp.float32)
    # seed=0: a direction along which the kink moves the difference beyond float32's fd_rtol.
    result = grad.check_grads(net, "softmax_cross_entropy", params, x, target, warn=False, seed=0)
    fd = result.rows[-1]
    assert result.passed and fd.status == "inconclusive" and fd.rel_err > fd.tol, str(result)


def pair_max(*, split_ties: bool = True) -> layers.Layer:
    """``y = max(x[..., 0::2], x[..., 1::2])`` written with ``jnp.max`` (max pooling in one
    dimension, window 2). The backward splits ``dy`` equally among tied inputs, as jax's rule
    for ``max`` does; ``split_ties=False`` is a wrong backward that gives each tie all of it."""

    def init(key, in_shape):
        del key  # unused: no parameters
        return (*in_shape[:-1], in_shape[-1] // 2), ()

    def forward(params, x, *, key=None):
        del params, key  # unused: no parameters, deterministic
        pairs = x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
        y = jnp.max(pairs, axis=-1)
        return y, (pairs, y)

    def backward(params, cache, dy):
        del params  # unused: no parameters
        pairs, y = cache
        winners = (pairs == y[..., None]).astype(dy.dtype)
        if split_ties:
            winners = winners / jnp.sum(winners, axis=-1, keepdims=True)
        return (), (winners * dy[..., None]).reshape(*pairs.shape[:-2], -1)

    return layers.Layer(init, forward, backward, "pair_max")


def tied_setup(offset: float, *, split_ties: bool = True):
    """``dense(4) -> pair_max -> dense(3)`` whose two dense columns of each pair differ by
    ``offset`` in their bias only: ties at the point (0), or a tie ~offset away (inside the
    finite-difference step for a tiny offset)."""
    net = layers.serial(
        layers.dense(4, dtype=jnp.float64),
        pair_max(split_ties=split_ties),
        layers.dense(N_OUT, dtype=jnp.float64),
    )
    params = numpy_params(net, (BATCH, N_IN))
    w = params[0]["w"]
    first = {"w": w.at[:, 1].set(w[:, 0]).at[:, 3].set(w[:, 2]), "b": jnp.array([0, offset] * 2)}
    params = (first, *params[1:])
    x = jnp.asarray(np.random.default_rng(0).standard_normal((BATCH, N_IN)))
    return net, params, x, jnp.arange(BATCH) % N_OUT


def test_max_ties_at_the_centre_agree_with_the_difference():
    """Ties split evenly: the derivative at a tie is the mean of the two sides, which is what
    a central difference across it measures, so the fd row passes (and nothing fails)."""
    net, params, x, target = tied_setup(0.0)
    result = grad.check_grads(net, "softmax_cross_entropy", params, x, target)
    assert all(r.status == "passed" for r in result.rows), str(result)


def test_max_ties_inside_the_step_are_inconclusive():
    net, params, x, target = tied_setup(1e-9)
    result = grad.check_grads(net, "softmax_cross_entropy", params, x, target)
    assert result.passed and result.rows[-1].status == "inconclusive", str(result)


def _row_cases():
    """(name, result) of check_grads with a skipped, an inconclusive and a failed row."""
    s = dtype_setup("uint8")
    skipped = grad.check_grads(s.net, s.loss, s.params, s.x, s.target)
    net, params, x, target = kinked_setup("relu", 0.0)
    inconclusive = grad.check_grads(net, "softmax_cross_entropy", params, x, target)
    net, params, x, target = tied_setup(0.0, split_ties=False)
    failed = grad.check_grads(net, "softmax_cross_entropy", params, x, target)
    return {"skipped": skipped, "inconclusive": inconclusive, "failed": failed}


def test_a_row_passed_unless_it_failed():
    """A skipped or inconclusive row did not fail: its ``passed`` (and its record's) is true,
    its ``status`` says which; ``passed`` is false for the failed rows only, so a result passed
    exactly when every row did, and filtering records on ``passed`` finds the failures. A
    uint8 input's skipped dx row had ``passed`` false: filtering picked it up as a failure."""
    cases = _row_cases()
    for status, result in cases.items():
        rows = [r for r in result.rows if r.status == status]
        assert rows, str(result)
        assert all(r.passed == (status != "failed") for r in rows), str(result)
        assert result.passed == all(r.passed for r in result.rows) == (status != "failed")
        assert tuple(r for r in result.rows if not r.passed) == result.failures
        records = result.to_records()
        assert [r["passed"] for r in records] == [r.status != "failed" for r in result.rows]
        assert [r["status"] for r in records] == [r.status for r in result.rows]
    assert len(cases["skipped"].skipped) == 1 and cases["skipped"].skipped[0].leaf == "dx"
    assert cases["inconclusive"].inconclusive == (cases["inconclusive"].rows[-1],)


def test_wrong_backward_at_a_kink_fails():
    """A max that gives every tie the whole gradient is wrong exactly at ties: the layer and
    total rows fail, and name it, whatever the fd row can say there."""
    net, params, x, target = tied_setup(0.0, split_ties=False)
    result = grad.check_grads(net, "softmax_cross_entropy", params, x, target)
    assert not result.passed
    first = result.first_failure
    assert (first.check, first.layer, first.leaf) == ("layer", 1, "dx"), str(result)
    assert result.rows[-1].status in ("failed", "inconclusive"), str(result)
    assert "FAILED" in str(result) and "layer 1" in str(result)


def test_wrong_backward_in_a_smooth_region_fails_the_fd_row():
    net = layers.serial(layers.dense(6), forgetful_tanh(), layers.dense(N_OUT))
    net, loss, params, x, target, _ = setup(NETS[0]._replace(net=lambda: net))
    result = grad.check_grads(net, loss, params, x, target)
    fd = result.rows[-1]
    assert fd.status == "failed" and "smooth on the step" in fd.note, str(result)
    assert not result.passed and result.first_failure.layer == 1


def test_smooth_network_fd_row_passes():
    net, loss, params, x, target, _ = setup(NETS[0])  # tanh
    result = grad.check_grads(net, loss, params, x, target)
    assert result.rows[-1].status == "passed" and not result.inconclusive, str(result)


# A kink at s * eps along the direction, anywhere in the step: each quadrature alone is blind
# at some places (2/3 for Simpson's rule; 1/6 and 5/6 for the composite rule), not both.
KINK_PLACES = [0.0, 1 / 6, -1 / 6, 1 / 3, -1 / 3, 1 / 2, 2 / 3, -2 / 3, 3 / 4, -3 / 4, 5 / 6]
FD_DTYPES = {"f64": jnp.float64, "f32": jnp.float32}


def ramp(kink: float) -> Callable:
    """A smooth function plus a ReLU with its kink at ``kink``: slopes 1 and 4 on its sides."""
    return lambda p: jnp.sum(3 * jax.nn.relu(p - kink) + jnp.sin(p) + 0.5 * p**2)


def fd_row(objective: Callable, gradient_offset: float, dtype) -> grad.GradCheckRow:
    """The fd witness of a one-parameter objective at 0 (its unit direction is +1 or -1)."""
    p = jnp.zeros(1, dtype)
    g = jax.grad(objective)(p) + gradient_offset
    tols = grad.default_tolerances(dtype)
    return finite_difference_row(objective, p, g, eps=tols["eps"], fd_rtol=tols["fd_rtol"], seed=0)


@pytest.mark.parametrize("dtype", FD_DTYPES.values(), ids=FD_DTYPES)
@pytest.mark.parametrize("place", KINK_PLACES, ids=lambda s: f"{s:+.2f}eps")
def test_fd_witness_at_a_kink_anywhere_in_the_step(place, dtype):
    eps = grad.default_tolerances(dtype)["eps"]
    row = fd_row(ramp(place * eps), 0.0, dtype)
    assert row.status == "inconclusive", row
    assert row.rel_err > row.tol


@pytest.mark.parametrize("dtype", FD_DTYPES.values(), ids=FD_DTYPES)
@pytest.mark.parametrize(
    "place", [1.5, -1.5, 3.0, math.inf], ids=["+1.5eps", "-1.5eps", "3eps", "none"]
)
def test_fd_witness_outside_a_kink_passes_right_and_fails_wrong(place, dtype):
    """A kink outside the step is never looked at: a right gradient passes and a wrong one
    (off by 0.5, an eighth of the slope) fails."""
    eps = grad.default_tolerances(dtype)["eps"]
    objective = ramp(place * eps if math.isfinite(place) else 1.0)
    assert fd_row(objective, 0.0, dtype).status == "passed"
    wrong = fd_row(objective, 0.5, dtype)
    assert wrong.status == "failed" and "smooth on the step" in wrong.note, wrong


# --------------------------------------------------------------------------------------------
# a leaf whose gradient cancels: zero to rounding is agreement, not a failure


@pytest.mark.parametrize(
    ("err", "scale", "status"),
    [
        (1e-6, 1.0, "passed"),  # both ~0 next to the whole gradient: zero to rounding
        (1e-6, 0.0, "failed"),  # no scale given: the relative error alone decides
        (1e-3, 1.0, "failed"),  # an error of 1e-3 of the whole gradient is a real one
    ],
)
def test_compare_passes_a_leaf_that_is_zero_to_rounding(err, scale, status):
    from bpjax._gradcheck import compare

    row = compare("total", 0, "conv", "b", jnp.asarray([err, 0.0]), jnp.zeros(2), 1e-4, scale)
    assert row.rel_err == 1.0 and row.status == status
    assert ("zero to rounding" in row.note) == (status == "passed")


def bias_before_batch_norm(conv: layers.Layer | None = None) -> layers.Layer:
    return layers.serial(
        conv or layers.conv2d(4, 3),
        layers.batch_norm(),
        layers.relu(),
        layers.flatten(),
        layers.dense(3),
    )


def test_check_grads_bias_before_batch_norm_in_float32():
    # Batch norm in training mode removes every per-channel constant, so the conv bias has a zero
    # gradient; manual and jax.grad both return float32 rounding noise, relative error ~1. It
    # used to be reported as FAILED, a correct backward flagged.
    net = bias_before_batch_norm()
    shape = (8, 6, 6, 2)
    params = numpy_params(net, shape, jnp.float32)
    x = jnp.asarray(np.random.default_rng(1).uniform(size=shape), jnp.float32)
    y = jnp.arange(8) % 3
    state = tree_cast(layers.init_state(net, shape), jnp.float32)
    key = jax.random.PRNGKey(2)
    result = grad.check_grads(net, "softmax_cross_entropy", params, x, y, key=key, state=state,
                              warn=False)  # fmt: skip
    assert result.passed, str(result)
    bias_rows = [r for r in result.rows if r.layer == 0 and r.leaf == "b"]
    assert {r.check for r in bias_rows} == {"layer", "total"}
    assert all(r.max_abs_err < 1e-4 for r in bias_rows)
    # A wrong bias gradient there (off by a constant) is still a failure, named at the layer.
    conv = layers.conv2d(4, 3)

    def backward(p, cache, dy):
        grads, dx = conv.backward(p, cache, dy)
        return {**grads, "b": grads["b"] + 0.1}, dx

    broken = bias_before_batch_norm(conv._replace(backward=backward))
    result = grad.check_grads(broken, "softmax_cross_entropy", params, x, y, key=key,
                              state=state, warn=False)  # fmt: skip
    assert not result.passed and result.first_failure.layer == 0
    assert result.first_failure.leaf == "b"


def test_check_grads_reports_a_dx_of_the_wrong_shape_and_goes_on():
    """A backward that returns dy unchanged from a pooling layer: a FAIL row naming the shapes
    and the layer, the layers below still checked (fed jax.vjp's dx), the total row failed
    because the whole backward raises; never an exception from the check itself."""
    pool = layers.max_pool(2)
    bad = pool._replace(backward=lambda p, c, dy: (pool.backward(p, c, dy)[0], dy))
    net = layers.serial(
        layers.conv2d(4, 3, dtype=jnp.float64),
        layers.relu(),
        bad,
        layers.flatten(),
        layers.dense(3, dtype=jnp.float64),
    )
    params = numpy_params(net, (4, 6, 6, 2))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 6, 6, 2)))
    result = grad.check_grads(net, "softmax_cross_entropy", params, x, jnp.arange(4) % 3)
    assert not result.passed
    first = result.first_failure
    assert (first.layer, first.leaf) == (2, "dx")
    assert "shape (4, 3, 3, 4), but the reference's is (4, 6, 6, 4)" in first.note
    below = [r for r in result.rows if r.check == "layer" and r.layer in (0, 1)]
    assert below and all(r.status == "passed" for r in below)
    total = [r for r in result.rows if r.check == "total"]
    assert [r.status for r in total] == ["failed"]
    assert "the hand-written backward raised" in total[0].note
    assert "FAIL" in str(result)


def test_check_grads_reports_a_backward_that_raises():
    relu = layers.relu()

    def broken(params, cache, dy):
        raise ValueError("a bug in this backward")

    net = layers.serial(
        layers.dense(5, dtype=jnp.float64),
        relu._replace(backward=broken),
        layers.dense(3, dtype=jnp.float64),
    )
    params = numpy_params(net, (4, 6))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 6)))
    result = grad.check_grads(net, "softmax_cross_entropy", params, x, jnp.arange(4) % 3)
    failed = [(r.check, r.layer) for r in result.rows if r.status == "failed"]
    assert ("layer", 1) in failed and ("total", None) in failed
    assert "ValueError: a bug in this backward" in result.first_failure.note
    # the layer below was still checked, with jax.vjp's dx as its upstream gradient
    assert all(r.status == "passed" for r in result.rows if r.check == "layer" and r.layer == 0)
