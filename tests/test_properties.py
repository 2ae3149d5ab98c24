"""Property tests (hypothesis): every hand-written backward is the gradient of the value it
returns, for every input it accepts, under ``jit``, where values cannot be checked.

Driven by the tables, so what is added later is covered: every loss in
``bpjax.losses.LOSSES`` and every case of ``LAYERS`` in ``tests/test_layers.py``. Inputs mix
random values with edge cases: zeros (signed), tiny (1e-300, subnormal), large, ties (arrays
drawn from two or three values), exact kinks (0 for the ReLU family, ``|pred - target| ==
delta`` for huber), integer and out-of-range labels, probability targets that do not sum to
one, targets outside ``[0, 1]`` for binary cross-entropy. The manual backward must equal
``jax.grad`` / ``jax.vjp`` of the same forward (NaN exactly where it is NaN), the value must be
what the docstring says (an independent numpy formula, or the activation's ``jax.nn``
reference), and a finite value must have a finite gradient.

Shapes are few and fixed per test so each jitted function compiles once; ``max_examples`` is
modest: the file runs in CI on 2 cores.
"""

import functools
from collections.abc import Callable
from typing import Any

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_layers import ACTIVATION_CASES, CASES, LAYERS, setup_layer

from bpjax import layers, losses

# --------------------------------------------------------------------------------------------
# values

EDGES = [0.0, -0.0, 1.0, -1.0, 0.5, -2.0, 1e-8, -1e-8, 1e-300, -1e-300, 5e-324, 50.0, -50.0]


def reals(max_abs: float, dtype=np.float64) -> st.SearchStrategy:
    """Edge values up to ``max_abs`` (and ``max_abs`` itself), or any finite float in range;
    all exactly representable in ``dtype`` (float32 has no 1e-300)."""
    info = np.finfo(dtype)
    edges = [e for e in [*EDGES, max_abs, -max_abs] if abs(e) <= max_abs]
    edges = sorted({float(dtype(e)) for e in edges if e == 0 or abs(e) >= info.smallest_subnormal})
    width = 64 if dtype == np.float64 else 32
    finite = st.floats(-max_abs, max_abs, allow_nan=False, allow_infinity=False, width=width)
    return st.one_of(st.sampled_from(edges), finite)


def draw_array(data, shape: tuple[int, ...], max_abs: float, dtype=np.float64, label: str = ""):
    """An array of ``reals``, or of two or three values only (ties: equal logits, equal halves
    of a max, several examples on one kink)."""
    if data.draw(st.booleans(), label=f"{label} has ties"):
        pool = data.draw(st.lists(reals(max_abs, dtype), min_size=2, max_size=3), label="pool")
        return data.draw(hnp.arrays(dtype, shape, elements=st.sampled_from(pool)), label=label)
    return data.draw(hnp.arrays(dtype, shape, elements=reals(max_abs, dtype)), label=label)


def assert_same(actual, expected, *, rtol: float, scale: float = 1.0) -> None:
    """Close elementwise (NaN where NaN), to ``rtol`` of the largest magnitude around."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    finite = expected[np.isfinite(expected)]
    atol = rtol * max(scale, float(np.max(np.abs(finite), initial=0.0)), 1e-300)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, equal_nan=True)


# --------------------------------------------------------------------------------------------
# losses

N_CLASSES = 3
LOSS_SHAPES = [(4, N_CLASSES), (N_CLASSES,)]  # a batch, and one unbatched example
LOSS_DTYPES = {"f64": (np.float64, 1e-10, 1e100), "f32": (np.float32, 1e-4, 2.0**50)}


def _log_softmax(pred: np.ndarray) -> np.ndarray:
    shifted = pred - np.max(pred, axis=-1, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def _softmax_cross_entropy(pred, target, **kwargs):
    del kwargs  # unused: no hyperparameters
    log_probs = _log_softmax(pred)
    if np.issubdtype(target.dtype, np.integer):
        valid = (target >= 0) & (target < pred.shape[-1])  # else NaN, as documented
        picked = np.take_along_axis(log_probs, np.where(valid, target, 0)[..., None], -1)
        return np.mean(np.where(valid, -picked[..., 0], np.nan))
    return np.mean(-np.sum(target * log_probs, axis=-1))


def _huber(pred, target, *, delta=1.0):
    e = np.abs(pred - target)
    return np.mean(np.where(e <= delta, 0.5 * e**2, delta * (e - 0.5 * delta)))


# What each loss's docstring says its value is, written again in numpy (float64).
VALUES: dict[str, Callable[..., float]] = {
    "mse": lambda pred, target: np.mean((pred - target) ** 2),
    "quadratic": lambda pred, target: (
        0.5 * np.sum((pred - target) ** 2) / (pred.size // pred.shape[-1])
    ),
    "softmax_cross_entropy": _softmax_cross_entropy,
    "binary_cross_entropy": lambda pred, target: np.mean(
        np.maximum(pred, 0) - pred * target + np.log1p(np.exp(-np.abs(pred)))
    ),
    "huber": _huber,
}
# Hyperparameters drawn per loss (the rest take their defaults).
KWARGS = {"huber": st.fixed_dictionaries({"delta": st.sampled_from([0.25, 1.0, 3.0])})}


def _labels(data, shape, n):
    dtype = data.draw(st.sampled_from([np.int32, np.uint8, np.int8]), label="label dtype")
    low = 0 if dtype == np.uint8 else -2
    high = 255 if dtype == np.uint8 else n + 2
    # Mostly in range; out of range (only reachable under jit) now and then.
    in_range = hnp.arrays(dtype, shape, elements=st.integers(0, n - 1))
    anywhere = hnp.arrays(dtype, shape, elements=st.integers(low, high))
    return data.draw(st.one_of(in_range, anywhere), label="labels")


def _at_delta(data, pred, kwargs, dtype):
    """Small dyadic preds and errors of exactly 0, +-delta and +-2 delta: huber's kinks."""
    delta = kwargs.get("delta", 1.0)
    shape = pred.shape
    pred = data.draw(hnp.arrays(dtype, shape, elements=st.integers(-4, 4).map(float)))
    errors = data.draw(
        hnp.arrays(dtype, shape, elements=st.sampled_from([0.0, delta, -delta, 2 * delta]))
    )
    return pred, pred - errors


# Extra targets per loss, beyond the generic one (any real of pred's shape, which is a target
# outside [0, 1] for bce and a "probability" that does not sum to one for cross-entropy).
# Each maps (data, pred, kwargs, dtype) -> (pred, target).
TARGETS: dict[str, list[Callable]] = {
    "softmax_cross_entropy": [
        lambda data, pred, kwargs, dtype: (pred, _labels(data, pred.shape[:-1], pred.shape[-1]))
    ],
    "binary_cross_entropy": [
        lambda data, pred, kwargs, dtype: (
            pred,
            data.draw(hnp.arrays(dtype, pred.shape, elements=st.sampled_from([0.0, 1.0]))),
        )
    ],
    "huber": [_at_delta],
    "mse": [
        lambda data, pred, kwargs, dtype: (
            pred,
            data.draw(hnp.arrays(np.int32, pred.shape, elements=st.integers(-3, 3))),
        )
    ],
}


def test_loss_tables_cover_every_loss():
    assert set(VALUES) == set(losses.LOSSES)
    assert set(TARGETS) | set(KWARGS) <= set(losses.LOSSES)


_compiled: dict[tuple, Callable] = {}


def forward_backward_grad(name: str, kwargs: tuple) -> Callable:
    """Jitted ``(value, backward, jax.grad of the value)`` of one loss (compiled per shape)."""
    if (name, kwargs) not in _compiled:
        loss = losses.get(name, **dict(kwargs))

        def f(pred, target):
            value, cache = loss.forward(pred, target)
            return value, loss.backward(cache), jax.grad(lambda p: loss.forward(p, target)[0])(pred)

        _compiled[(name, kwargs)] = jax.jit(f)
    return _compiled[(name, kwargs)]


@pytest.mark.parametrize("dtype_id", sorted(LOSS_DTYPES))
@pytest.mark.parametrize("name", sorted(losses.LOSSES))
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_loss_backward_is_the_gradient_of_its_value(name, dtype_id, data):
    dtype, rtol, max_abs = LOSS_DTYPES[dtype_id]
    shape = data.draw(st.sampled_from(LOSS_SHAPES), label="shape")
    kwargs = data.draw(KWARGS.get(name, st.just({})), label="kwargs")
    pred = draw_array(data, shape, max_abs, dtype, "pred")
    kinds = [lambda data, pred, kwargs, dtype: (pred, draw_array(data, shape, max_abs, dtype))]
    make = data.draw(st.sampled_from(kinds + TARGETS.get(name, [])), label="target kind")
    pred, target = make(data, pred, kwargs, dtype)

    value, dpred, reference = forward_backward_grad(name, tuple(sorted(kwargs.items())))(
        jnp.asarray(pred), jnp.asarray(target)
    )
    assert dpred.shape == pred.shape and dpred.dtype == pred.dtype
    assert_same(dpred, reference, rtol=rtol)
    expected = VALUES[name](pred.astype(np.float64), target, **kwargs)
    # float32 rounds each term of the sum to its own size: outside the domain (a target of
    # 1e15 against a logit of -1e15) terms of 1e30 cancel, and the error is theirs, not the
    # value's. The scale is the largest term: |pred|, or |pred * target| where they pair up.
    terms = np.abs(pred.astype(np.float64))
    if target.shape == pred.shape and np.issubdtype(target.dtype, np.floating):
        terms = np.maximum(terms, terms * np.abs(target.astype(np.float64)))
    assert_same(value, expected, rtol=rtol, scale=float(np.max(terms, initial=1.0)))
    if np.isfinite(value):
        assert np.all(np.isfinite(dpred))
    out_of_range = np.issubdtype(target.dtype, np.integer) and target.shape != pred.shape
    out_of_range = out_of_range and bool(np.any((target < 0) | (target >= shape[-1])))
    # Within every loss's domain the value is finite (max_abs keeps squares and logit spreads
    # representable); outside it (labels out of range) it is NaN, and so is its gradient row.
    assert np.isfinite(value) != out_of_range


# --------------------------------------------------------------------------------------------
# layers

REFERENCES = {c.id: c.reference for c in ACTIVATION_CASES}
LAYER_BATCH = 3
LAYER_MAX_ABS = 1e4  # large, yet exp-based layers and their jax derivatives stay finite


def draw_input(data, template: Any) -> Any:
    """An input like ``template`` (a tuple of inputs for a branching layer)."""
    if isinstance(template, tuple):
        return tuple(draw_input(data, a) for a in template)
    return jnp.asarray(draw_array(data, template.shape, LAYER_MAX_ABS, label="x"))


@functools.cache
def layer_setup(case_id: str) -> tuple:
    """The case's layer, params, a template input, an upstream gradient, a key, its state and
    the jitted ``(manual, jax.vjp)`` pair of (output, param grads, dx): built once per case."""
    layer, _, params, x, dy, key, state = setup_layer(CASES[case_id], LAYER_BATCH, jnp.float64)

    @jax.jit
    def both(params, x, dy, key, state):
        y, cache, _ = layers.apply(layer, params, x, key=key, state=state)
        grads, dx = layer.backward(params, cache, dy)

        def forward(p, x_):
            return layers.apply(layer, p, x_, key=key, state=state)[0]

        y_ref, vjp = jax.vjp(forward, params, x)
        return (y, grads, dx), (y_ref, *vjp(dy))

    return params, x, dy, key, state, both


@pytest.mark.parametrize("case", LAYERS, ids=[c.id for c in LAYERS])
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_layer_backward_is_the_vjp_of_its_forward(case, data):
    params, template, dy, key, state, both = layer_setup(case.id)
    x = draw_input(data, template)
    manual, expected = both(params, x, dy, key, state)
    scale = max(1.0, *(float(np.max(np.abs(a))) for a in jax.tree_util.tree_leaves(x)))
    for a, b in zip(jax.tree_util.tree_leaves(manual), jax.tree_util.tree_leaves(expected)):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert_same(a, b, rtol=1e-10, scale=scale)
    if case.id in REFERENCES:  # the value is what it claims: jax.nn's function
        assert_same(manual[0], REFERENCES[case.id](x), rtol=1e-12, scale=scale)
    if all(np.all(np.isfinite(a)) for a in jax.tree_util.tree_leaves(manual[0])):
        for g in jax.tree_util.tree_leaves(manual[1:]):
            assert np.all(np.isfinite(g))
