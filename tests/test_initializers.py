"""Initializers: every name builds, shapes and dtypes are right, arguments reach jax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bpjax import initializers, layers

# Name -> the factory arguments it needs (most need none).
INIT_KWARGS = {name: {} for name in initializers.INITIALIZERS}
INIT_KWARGS["constant"] = {"value": 0.25}
INIT_KWARGS["variance_scaling"] = {"scale": 2.0, "mode": "fan_in", "distribution": "normal"}


def test_table_covers_every_initializer():
    assert set(INIT_KWARGS) == set(initializers.INITIALIZERS)


@pytest.mark.parametrize("name", sorted(INIT_KWARGS))
def test_every_name_builds_with_shape_and_dtype(name, dtype):
    init = initializers.get(name, **INIT_KWARGS[name])
    w = init(jax.random.key(0), (5, 6), dtype)
    assert w.shape == (5, 6) and w.dtype == dtype
    assert np.all(np.isfinite(w))


@pytest.mark.parametrize(("name", "value"), [("zeros", 0.0), ("ones", 1.0), ("constant", 0.25)])
def test_constant_initializers(name, value):
    w = initializers.get(name, **INIT_KWARGS[name])(jax.random.key(0), (3, 2), jnp.float32)
    np.testing.assert_array_equal(w, value)


def test_random_initializers_depend_on_the_key():
    init = initializers.get("glorot_uniform")
    w0 = init(jax.random.key(0), (5, 6), jnp.float32)
    w1 = init(jax.random.key(1), (5, 6), jnp.float32)
    assert np.any(np.asarray(w0) != np.asarray(w1))


def test_callable_passes_through():
    init = jax.nn.initializers.normal(0.5)
    assert initializers.get(init) is init


def test_kwargs_are_forwarded():
    w = initializers.get("normal", stddev=3.0)(jax.random.key(0), (300, 300), jnp.float32)
    assert abs(float(jnp.std(w)) - 3.0) < 0.05
    w = initializers.get("normal")(jax.random.key(0), (300, 300), jnp.float32)
    assert abs(float(jnp.std(w)) - 0.01) < 0.0002  # jax's default stddev


@pytest.mark.parametrize("spec", ["nope", 3, None])
def test_unknown_name_lists_valid_ones(spec):
    with pytest.raises(ValueError, match="unknown initializer") as info:
        initializers.get(spec)
    for name in initializers.INITIALIZERS:
        assert name in str(info.value)


def test_kwargs_with_a_callable_raise():
    with pytest.raises(ValueError, match="stddev"):
        initializers.get(jax.nn.initializers.normal(), stddev=0.1)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("constant", {}), ("variance_scaling", {}), ("normal", {"scale": 2.0})],
)
def test_a_name_without_the_arguments_it_needs_is_one_value_error(name, kwargs):
    # A trial: mlp(..., output_w_init="constant") was a TypeError from jax ("missing 1 required
    # positional argument: 'value'"), and the command line said nothing of how to give it.
    with pytest.raises(ValueError, match=rf"initializer '{name}' needs arguments \(.*callable"):
        initializers.get(name, **kwargs)
    if not kwargs:  # where a model takes it by name
        with pytest.raises(ValueError, match=rf"initializer '{name}' needs arguments"):
            layers.mlp([3, 2], output_w_init=name)
