"""Losses: hand-written backward == jax.grad of forward, values == optax, errors are clear."""

import collections
import functools
import re
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import (
    ATOL,
    RTOL,
    assert_no_more_work,
    assert_trees_close,
    compile_as_users,
    run_as_a_user,
    xla_cost,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import bpjax
from bpjax import losses, train


class Case(NamedTuple):
    name: str  # key of losses.LOSSES
    kwargs: dict[str, Any]  # factory hyperparameters
    target: str  # kind of target: "real", "labels", "probs" or "binary"
    reference: Callable  # (pred, target) -> scalar value, from optax where it has one


LOSS_CASES = [
    Case("mse", {}, "real", lambda p, t: 2 * jnp.mean(optax.l2_loss(p, t))),
    # No optax equivalent: half the squared norm per example, mean over examples.
    Case("quadratic", {}, "real", lambda p, t: jnp.mean(jnp.sum(optax.l2_loss(p, t), axis=-1))),
    Case(
        "softmax_cross_entropy",
        {},
        "labels",
        lambda p, t: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(p, t)),
    ),
    Case(
        "softmax_cross_entropy",
        {},
        "probs",
        lambda p, t: jnp.mean(optax.softmax_cross_entropy(p, t)),
    ),
    Case(
        "binary_cross_entropy",
        {},
        "binary",
        lambda p, t: jnp.mean(optax.sigmoid_binary_cross_entropy(p, t)),
    ),
    Case("huber", {}, "real", lambda p, t: jnp.mean(optax.huber_loss(p, t))),
    Case("huber", {"delta": 0.3}, "real", lambda p, t: jnp.mean(optax.huber_loss(p, t, delta=0.3))),
]
CASE_IDS = [
    f"{c.name}-{c.target}" + "".join(f"-{k}={v}" for k, v in c.kwargs.items()) for c in LOSS_CASES
]
LABELS_CASE = LOSS_CASES[2]
assert LABELS_CASE.target == "labels"
# Batch of 1, a single 1-D example, and a batch of 6 over two leading (batch) axes.
SHAPES = [(1, 5), (5,), (2, 3, 4)]


def make_target(kind: str, rng: np.random.Generator, shape: tuple[int, ...], dtype) -> jax.Array:
    """A random target of the given kind for a pred of ``shape`` (numpy, to keep tests fast)."""
    if kind == "real":
        return jnp.asarray(rng.normal(size=shape), dtype)
    if kind == "labels":
        return jnp.asarray(rng.integers(0, shape[-1], size=shape[:-1]), jnp.int32)
    if kind == "probs":
        logits = 2 * rng.normal(size=shape)
        probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
        return jnp.asarray(probs / probs.sum(axis=-1, keepdims=True), dtype)
    if kind == "binary":
        return jnp.asarray(rng.uniform(size=shape), dtype)
    raise ValueError(kind)


def make_inputs(case: Case, shape: tuple[int, ...], dtype, *, seed: int = 0, scale: float = 2.0):
    rng = np.random.default_rng(seed)
    pred = jnp.asarray(scale * rng.normal(size=shape), dtype)
    return pred, make_target(case.target, rng, shape, dtype)


@functools.partial(jax.jit, static_argnames=("name", "kwargs"))
def autodiff_grad(pred, target, *, name: str, kwargs: tuple):
    """jax.grad of the forward value; jitted with static loss, so eager and jit tests share it."""
    forward = losses.get(name, **dict(kwargs)).forward
    return jax.grad(lambda p: forward(p, target)[0])(pred)


def check_backward(case: Case, pred, target, dtype, maybe_jit=lambda f: f):
    """Asserts value is a finite scalar and backward == jax.grad(forward), dtype preserved."""
    loss = losses.get(case.name, **case.kwargs)

    def forward_backward(pred, target):
        value, cache = loss.forward(pred, target)
        return value, loss.backward(cache)

    value, dpred = maybe_jit(forward_backward)(pred, target)
    expected = autodiff_grad(pred, target, name=case.name, kwargs=tuple(case.kwargs.items()))
    assert value.shape == () and value.dtype == dtype
    assert dpred.dtype == dtype
    assert np.isfinite(value) and np.all(np.isfinite(dpred))
    assert_trees_close(dpred, expected, rtol=RTOL[dtype], atol=ATOL[dtype])


def test_cases_cover_every_loss():
    assert {case.name for case in LOSS_CASES} == set(losses.LOSSES)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("case", LOSS_CASES, ids=CASE_IDS)
def test_backward_matches_autodiff(case, shape, dtype, maybe_jit):
    pred, target = make_inputs(case, shape, dtype)
    check_backward(case, pred, target, dtype, maybe_jit)


@pytest.mark.parametrize("case", LOSS_CASES, ids=CASE_IDS)
def test_extreme_logits_are_finite_and_match_autodiff(case, dtype, maybe_jit):
    rng = np.random.default_rng(1)
    pred = rng.choice([-100.0, -50.0, 50.0, 100.0], size=(6, 4))
    target = make_target(case.target, rng, (6, 4), dtype)
    check_backward(case, jnp.asarray(pred, dtype), target, dtype, maybe_jit)


@pytest.mark.parametrize(
    ("name", "pred", "target", "expected"),
    [
        ("softmax_cross_entropy", [[100.0, -100.0]], [1], 200.0),
        ("softmax_cross_entropy", [[-100.0, 100.0]], [1], 0.0),
        ("binary_cross_entropy", [-100.0], [1.0], 100.0),
        ("binary_cross_entropy", [100.0], [1.0], 0.0),
    ],
)
def test_extreme_logits_exact_values(name, pred, target, expected, dtype):
    pred = jnp.asarray(pred, dtype)
    value, _ = losses.get(name).forward(pred, jnp.asarray(target))
    np.testing.assert_allclose(value, expected, rtol=RTOL[dtype], atol=ATOL[dtype])


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("case", LOSS_CASES, ids=CASE_IDS)
def test_values_match_reference(case, shape, dtype):
    pred, target = make_inputs(case, shape, dtype)
    value, _ = losses.get(case.name, **case.kwargs).forward(pred, target)
    np.testing.assert_allclose(
        value, case.reference(pred, target), rtol=RTOL[dtype], atol=ATOL[dtype]
    )


# XLA's cost analysis counts work exactly (no timing, no noise): forward + hand-written backward
# against jax.value_and_grad of the same forward. Extra flops allowed, and why:
EXTRA_FLOPS_PER_EXAMPLE = {
    # ours scales each row once (1 / (sum of exps * batch)) and subtracts the one-hot; XLA's
    # gradient of take_along_axis scatters instead: 3 more flops per example, ~80 fewer bytes.
    "softmax_cross_entropy-labels": 3,
}


@pytest.mark.parametrize("case", LOSS_CASES, ids=CASE_IDS)
def test_backward_does_no_more_work_than_autodiff(case):
    loss = losses.get(case.name, **case.kwargs)
    batch, classes = 256, 10
    pred, target = make_inputs(case, (batch, classes), jnp.float32)

    def manual(pred, target):
        value, cache = loss.forward(pred, target)
        return value, loss.backward(cache)

    def auto(pred, target):
        return jax.value_and_grad(lambda p: loss.forward(p, target)[0])(pred)

    ours, theirs = xla_cost(manual, pred, target), xla_cost(auto, pred, target)
    case_id = CASE_IDS[LOSS_CASES.index(case)]
    extra = EXTRA_FLOPS_PER_EXAMPLE.get(case_id, 0) * batch
    assert_no_more_work(ours, theirs, extra_flops=extra)


# The suite compiles plainer than users do (tests/conftest.py); the costs above are of what a
# user's process compiles (the same options; x64 as here), and must stay so.
PROGRAM = """
import jax, jax.numpy as jnp
from bpjax import losses
loss = losses.softmax_cross_entropy()
def manual(pred, target):
    value, cache = loss.forward(pred, target)
    return value, loss.backward(cache)
pred = jnp.linspace(-1.0, 1.0, 2560, dtype=jnp.float32).reshape(256, 10)
target = jnp.arange(256, dtype=jnp.int32) % 10
"""
# As in the suite's process (x64 on), compiled as a user's process compiles it.
USERS_PROGRAM = f"""
import jax
jax.config.update("jax_enable_x64", True)
{PROGRAM}
print(jax.jit(manual).lower(pred, target).compile().as_text())
"""


def instructions(hlo_text: str) -> collections.Counter:
    """An optimized HLO module's instructions, as (shape, opcode) counts: the program, whatever
    its instructions are named and wherever its Python was written."""
    return collections.Counter(re.findall(r"= (\S+) ([a-z][\w-]*)\(", hlo_text))


def test_costs_are_of_the_program_a_user_compiles(tmp_path):
    users = instructions(run_as_a_user([sys.executable, "-c", USERS_PROGRAM], tmp_path))
    here: dict = {}
    exec(PROGRAM, here)  # the same program in this process
    args = here["manual"], here["pred"], here["target"]
    ours = instructions(compile_as_users(*args).as_text())
    assert sum(ours.values()) > 10 and ours == users
    # and it is not what the suite compiles: the override is what makes them equal
    assert instructions(jax.jit(args[0]).lower(*args[1:]).compile().as_text()) != users


def test_quadratic_single_example_is_half_squared_norm():
    pred, target = jnp.array([1.0, 2.0, 3.0]), jnp.array([0.0, 0.0, 1.0])
    value, _ = losses.quadratic().forward(pred, target)
    np.testing.assert_allclose(value, 0.5 * (1 + 4 + 4))


@pytest.mark.parametrize("shape", [(2, 3, 4), (4,)], ids=str)
def test_softmax_cross_entropy_labels_equal_one_hot(shape, dtype, maybe_jit):
    loss = losses.softmax_cross_entropy()
    pred, labels = make_inputs(LABELS_CASE, shape, dtype)
    one_hot = jax.nn.one_hot(labels, shape[-1], dtype=dtype)
    value_labels, cache_labels = maybe_jit(loss.forward)(pred, labels)
    value_one_hot, cache_one_hot = maybe_jit(loss.forward)(pred, one_hot)
    np.testing.assert_allclose(value_labels, value_one_hot, rtol=RTOL[dtype])
    assert_trees_close(
        maybe_jit(loss.backward)(cache_labels),
        maybe_jit(loss.backward)(cache_one_hot),
        rtol=RTOL[dtype],
        atol=ATOL[dtype],
    )


def test_integer_targets_are_cast_for_regression_losses(dtype):
    pred = jnp.array([[0.5, 1.5], [2.0, -1.0]], dtype)
    target = jnp.array([[0, 1], [2, -1]])
    value, cache = losses.mse().forward(pred, target)
    assert value.dtype == dtype
    np.testing.assert_allclose(value, 0.125, rtol=RTOL[dtype])
    assert losses.mse().backward(cache).dtype == dtype


@pytest.mark.parametrize("case", LOSS_CASES, ids=CASE_IDS)
def test_vmap_over_examples(case, maybe_jit):
    """vmap gives per-example values; their mean is the batch value, and vmapped backward
    (per-example gradients) is ``batch`` times the batch gradient."""
    batch = 6
    loss = losses.get(case.name, **case.kwargs)
    pred, target = make_inputs(case, (batch, 3), jnp.float64)
    values, caches = maybe_jit(jax.vmap(loss.forward))(pred, target)
    assert values.shape == (batch,)
    for i in range(batch):
        np.testing.assert_allclose(values[i], loss.forward(pred[i], target[i])[0], rtol=1e-12)
    value, cache = loss.forward(pred, target)
    np.testing.assert_allclose(jnp.mean(values), value, rtol=1e-12)
    per_example = maybe_jit(jax.vmap(loss.backward))(caches)
    assert_trees_close(per_example / batch, loss.backward(cache), rtol=1e-12, atol=1e-15)


def test_get_aliases_and_kwargs():
    pred, labels = make_inputs(LABELS_CASE, (3, 4), jnp.float64)
    value, _ = losses.get("cross_entropy").forward(pred, labels)
    expected, _ = losses.softmax_cross_entropy().forward(pred, labels)
    np.testing.assert_allclose(value, expected)
    target = jnp.full(pred.shape, 0.25)
    value, _ = losses.get("bce").forward(pred, target)
    np.testing.assert_allclose(value, losses.binary_cross_entropy().forward(pred, target)[0])
    value, _ = losses.get("huber", delta=0.5).forward(pred, 0 * pred)
    np.testing.assert_allclose(value, jnp.mean(optax.huber_loss(pred, delta=0.5)))


def test_loss_names_are_canonical():
    """``Loss.name`` is the factory's key (training encodes targets by it), aliases included."""
    for name, factory in losses.LOSSES.items():
        loss = losses.get(name)
        assert isinstance(loss, losses.Loss) and loss.name == name == factory().name
    assert losses.get("cross_entropy").name == "softmax_cross_entropy"
    assert losses.get("bce").name == "binary_cross_entropy"


def test_get_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="nope") as info:
        losses.get("nope")
    for name in [*losses.LOSSES, "cross_entropy", "bce"]:
        assert name in str(info.value)


def test_huber_rejects_nonpositive_delta():
    with pytest.raises(ValueError, match="delta"):
        losses.huber(delta=0.0)


@pytest.mark.parametrize(
    ("name", "pred_shape", "target_shape", "target_dtype"),
    [
        ("mse", (4, 3), (4, 2), jnp.float32),
        ("mse", (4, 3), (3,), jnp.float32),  # would broadcast silently without the check
        ("quadratic", (4, 3), (4, 1), jnp.float32),
        ("binary_cross_entropy", (4, 3), (4,), jnp.float32),
        ("huber", (5,), (4,), jnp.int32),
        ("softmax_cross_entropy", (4, 3), (3,), jnp.int32),  # labels must be pred.shape[:-1]
        ("softmax_cross_entropy", (4, 3), (4,), jnp.float32),  # float labels are not labels
        ("softmax_cross_entropy", (4, 3), (4, 2), jnp.float32),
    ],
)
def test_mismatched_shapes_raise(name, pred_shape, target_shape, target_dtype, maybe_jit):
    pred, target = jnp.ones(pred_shape), jnp.zeros(target_shape, target_dtype)
    with pytest.raises(ValueError) as info:
        maybe_jit(losses.get(name).forward)(pred, target)
    message = str(info.value)
    assert name in message and str(pred_shape) in message and str(target_shape) in message


@pytest.mark.parametrize("name", ["quadratic", "softmax_cross_entropy"])
def test_per_example_losses_need_a_feature_axis(name):
    with pytest.raises(ValueError, match="axis"):
        losses.get(name).forward(jnp.ones(()), jnp.zeros((), jnp.int32))


@settings(max_examples=15, deadline=None)
@given(
    case=st.sampled_from(LOSS_CASES),
    batch_shape=st.lists(st.integers(1, 4), max_size=2),
    n=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
    scale=st.sampled_from([0.1, 1.0, 10.0, 100.0]),
)
def test_backward_matches_autodiff_random(case, batch_shape, n, seed, scale):
    pred, target = make_inputs(case, (*batch_shape, n), jnp.float64, seed=seed, scale=scale)
    check_backward(case, pred, target, jnp.float64)


OUT_OF_RANGE = [[0, 3], [-1, 1], [0, 64], [-4, -1]]


@pytest.mark.parametrize("labels", OUT_OF_RANGE, ids=str)
def test_out_of_range_labels_raise_when_their_values_are_known(labels):
    # They used to give a NaN value (labels >= n) or silently take the last class (-1).
    loss = losses.softmax_cross_entropy()
    pred = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\) for 3 logits"):
        loss.forward(pred, jnp.asarray(labels, jnp.int32))


@pytest.mark.parametrize("label_dtype", [jnp.int32, jnp.uint8, jnp.int8])
@pytest.mark.parametrize("labels", OUT_OF_RANGE, ids=str)
def test_out_of_range_labels_under_jit_are_nan_in_value_and_gradient(labels, label_dtype):
    """Under jit the labels are not known: an out-of-range one makes its example's loss NaN,
    and its row of the gradient NaN too, so the backward is still jax.grad of the value
    (it used to be the last class's value with no class's gradient, or a NaN value with a
    finite gradient)."""
    labels = np.asarray(labels).astype(label_dtype)  # uint8 wraps -1 to 255: out of range too
    loss = losses.softmax_cross_entropy()
    pred = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3)))

    @jax.jit
    def value_and_grads(pred, labels):
        value, cache = loss.forward(pred, labels)
        reference = jax.grad(lambda p: loss.forward(p, labels)[0])(pred)
        return value, loss.backward(cache), reference

    value, dpred, reference = value_and_grads(pred, jnp.asarray(labels))
    assert np.isnan(value)
    invalid = (labels < 0) | (labels >= 3)
    np.testing.assert_array_equal(np.isnan(dpred), np.broadcast_to(invalid[:, None], (2, 3)))
    np.testing.assert_allclose(dpred, reference, rtol=1e-12, atol=1e-15)  # NaN where NaN
    # The examples with a valid label keep their gradient (a batch of two: 1/2 of each row's).
    for i in np.flatnonzero(~invalid):
        expected = jax.grad(lambda p, i=i: loss.forward(p, labels[i : i + 1])[0])(pred[i : i + 1])
        np.testing.assert_allclose(dpred[i], expected[0] / 2, rtol=1e-12)


# --------------------------------------------------------------------------------------------
# a loss factory passed where its Loss is expected (issue 10, item 16)


def _net_and_batch():
    net = bpjax.mlp([4, 3], dtype=jnp.float64)
    _, params = net.init(jax.random.PRNGKey(0), (2, 2))
    return net, params, jnp.ones((2, 2)), jnp.zeros((2, 3))


def _check_grads(loss):
    net, params, x, target = _net_and_batch()
    return bpjax.check_grads(net, loss, params, x, target)


ENTRY_POINTS = {
    "value_and_grad": lambda loss: bpjax.value_and_grad(_net_and_batch()[0], loss),
    "check_grads": lambda loss: _check_grads(loss),
    "make_step": lambda loss: train.make_step(_net_and_batch()[0], loss, optax.sgd(0.1)),
    "make_epoch": lambda loss: train.make_epoch(
        _net_and_batch()[0], loss, optax.sgd(0.1), batch_size=2
    ),
    "fit": lambda loss: bpjax.fit(
        _net_and_batch()[0], loss, optax.sgd(0.1), bpjax.data.load("xor"), epochs=1, batch_size=2
    ),
}


@pytest.mark.parametrize("factory", sorted(losses.LOSSES))
@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_an_uncalled_loss_factory_names_the_call(entry, factory):
    with pytest.raises(TypeError) as info:
        ENTRY_POINTS[entry](losses.LOSSES[factory])
    message = str(info.value)
    assert (
        f"loss factory bpjax.losses.{factory}, not a Loss: call it: bpjax.losses.{factory}()"
        in (message)
    )


def test_resolve():
    mse = losses.mse()
    assert losses.resolve(mse) is mse
    assert losses.resolve("bce").name == "binary_cross_entropy"
    with pytest.raises(ValueError, match="nope"):
        losses.resolve("nope")

    def my_loss(*, scale: float) -> losses.Loss:
        return losses.mse()._replace(name=f"mine{scale}")

    with pytest.raises(
        TypeError, match=r"f: loss is the loss factory .*my_loss.*call it: .*my_loss\(\.\.\.\)"
    ):
        losses.resolve(my_loss, "f: loss")
    # A callable that does not make a Loss is not called a factory.
    for other in (jnp.mean, optax.l2_loss, 3, None):
        with pytest.raises(TypeError, match=r"must be a bpjax\.losses\.Loss or a loss") as info:
            losses.resolve(other, "f: loss")
        assert "call it" not in str(info.value)


@pytest.mark.parametrize("shape", [(), (7,), (3, 4)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64, jnp.bfloat16])
def test_one_hot_scattered_is_one_hot(shape, dtype):
    labels = jnp.asarray(np.random.default_rng(0).integers(0, 5, shape), jnp.int32)
    got = losses._one_hot_scattered(labels, 5, dtype)
    expected = jax.nn.one_hot(labels, 5, dtype=dtype)
    assert got.dtype == expected.dtype and got.shape == expected.shape == (*shape, 5)
    np.testing.assert_array_equal(np.asarray(got, np.float64), np.asarray(expected, np.float64))


def test_the_manual_cross_entropy_backward_has_a_source_of_its_own():
    # Issue 10 #18: a plain jax.jit of value_and_grad(mode="manual") + an update ran 7-22%
    # slower than autodiff's, the same kernels: XLA:CPU's runtime runs a program whose every
    # instruction depends on the one before differently. The labels' one-hot, a scatter (as in
    # autodiff's program) rather than a fused one_hot, gives the backward an independent source
    # (experiments/readme_step_probe.py times it; docs/benchmarks.md).
    net = bpjax.mlp([16, 10])
    _, params = net.init(jax.random.key(0), (32, 8))
    x, y = jnp.ones((32, 8)), jnp.arange(32) % 10
    for mode in ("manual", "autodiff"):
        grad_fn = bpjax.value_and_grad(net, losses.softmax_cross_entropy(), mode=mode)
        hlo = compile_as_users(grad_fn, params, x, y).as_text()
        assert re.search(r"= \S+ scatter\(", hlo), mode


def test_the_cross_entropy_backward_of_labels_is_autodiff_s_bit_for_bit_under_jit():
    # A trial: the one-hot scattered as ones, then multiplied by 1/batch, let XLA contract that
    # product with the softmax's into a fused multiply-add: 1 ulp off autodiff's float64
    # gradient in ~10-20% of draws, where the fused one_hot had been exact. Scattering 1/batch
    # itself keeps it exact. Compiled as a user's process compiles (the suite's x64 is on).
    loss = losses.softmax_cross_entropy()
    rng = np.random.default_rng(0)
    for shape in [(4, 5), (32, 10), (3, 2, 7)]:
        pred = jnp.zeros(shape, jnp.float64)
        labels = jnp.zeros(shape[:-1], jnp.int32)
        automatic = compile_as_users(jax.grad(lambda p, t: loss.forward(p, t)[0]), pred, labels)
        manual = compile_as_users(lambda p, t: loss.backward(loss.forward(p, t)[1]), pred, labels)
        for _ in range(30):
            pred = jnp.asarray(rng.normal(size=shape) * 2)
            labels = jnp.asarray(rng.integers(0, shape[-1], shape[:-1]), jnp.int32)
            assert pred.dtype == jnp.float64
            np.testing.assert_array_equal(manual(pred, labels), automatic(pred, labels))
