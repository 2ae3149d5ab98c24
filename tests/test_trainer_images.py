"""``fit`` on image networks with batch norm (state that is not a parameter): training moves
the running statistics, evaluation uses them, resume is bit-identical (the statistics are in the
checkpoint), mixed precision keeps them in float32, several devices compute the global batch's
statistics, and the learning rules run through convolutions."""

import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_trees_equal, leaves, run_on_host_devices, trees_differ

import bpjax
from bpjax import checkpoint
from bpjax.data import load
from bpjax.trainer import fit

REPO = Path(__file__).resolve().parents[1]
OPTIONS = {"batch_size": 32, "eval_batch_size": 256, "chunk_steps": 10}


def small_cnn():
    # 8x8x1 digits -> conv 3x3x4 -> BN -> relu -> pool -> 4x4x4 -> dense 10
    return bpjax.cnn((4,), convs_per_stage=1, hidden=(), n_classes=10, batch_norm=True)


@pytest.fixture(scope="module")
def images():
    return load("digits", flatten=False)


@pytest.fixture(scope="module")
def reference(images):
    return fit(small_cnn(), "softmax_cross_entropy", optax.adam(1e-2), images, epochs=4, **OPTIONS)


def test_a_cnn_with_batch_norm_learns_and_keeps_its_statistics(images, reference):
    assert reference.metrics["test_accuracy"] > 0.8, reference.metrics
    net = small_cnn()
    in_shape = (OPTIONS["batch_size"], *images.input_shape)
    initial = net.init_state(in_shape)
    moved = reference.state.net_state
    assert jax.tree_util.tree_structure(moved) == jax.tree_util.tree_structure(initial)
    assert trees_differ(moved, initial)  # training mode updated the running averages
    # The best epoch's statistics go with the best params, and evaluation uses them: the test
    # accuracy fit reports is that of the running-statistics forward on the test split.
    forward = jax.jit(lambda params, x, state: bpjax.layers.apply(net, params, x, state=state)[0])
    logits = forward(reference.best_params, jnp.asarray(images.x_test), reference.best_net_state)
    accuracy = float(np.mean(np.argmax(logits, -1) == images.y_test))
    assert accuracy == pytest.approx(reference.metrics["test_accuracy"], abs=1e-6)


def test_resume_is_bit_identical_with_the_running_statistics(images, reference, tmp_path):
    options = {**OPTIONS, "checkpoint_dir": str(tmp_path)}
    opt = optax.adam(1e-2)
    fit(small_cnn(), "softmax_cross_entropy", opt, images, epochs=2, **options)
    saved, _ = checkpoint.restore(checkpoint.CheckpointManager(tmp_path).latest(), reference.state)
    assert trees_differ(saved.net_state, small_cnn().init_state((32, 8, 8, 1)))
    resumed = fit(
        small_cnn(), "softmax_cross_entropy", opt, images, epochs=4, resume=True, **options
    )
    assert_trees_equal(resumed.state, reference.state)
    assert_trees_equal(resumed.best_net_state, reference.best_net_state)


def test_mixed_precision_keeps_float32_statistics(images):
    result = fit(
        small_cnn(),
        "softmax_cross_entropy",
        optax.adam(1e-2),
        images,
        epochs=2,
        compute_dtype="bfloat16",
        **OPTIONS,
    )
    assert {a.dtype for a in leaves(result.state.net_state)} == {np.dtype("float32")}
    assert {a.dtype for a in leaves(result.state.params)} == {np.dtype("float32")}
    assert result.metrics["test_accuracy"] > 0.6


@pytest.mark.parametrize("rule", ["feedback_alignment", "sign_symmetry", "kolen_pollack"])
def test_feedback_rules_train_a_cnn(images, rule):
    result = fit(
        small_cnn(),
        "softmax_cross_entropy",
        optax.adam(1e-2),
        images,
        epochs=2,
        grad_mode=rule,
        grad_check_every=10,
        **OPTIONS,
    )
    assert result.metrics["test_accuracy"] > 0.5, result.metrics
    assert 0 <= result.metrics["alignment/total/angle"] < 90


CHILD = textwrap.dedent(
    """
    import json, jax, numpy as np, optax, bpjax
    from bpjax.data import load
    from bpjax.trainer import fit
    data = load("digits", flatten=False)
    out = {"device_count": jax.device_count()}
    for devices in (1, 4):
        net = bpjax.cnn((4,), convs_per_stage=1, hidden=(), n_classes=10, batch_norm=True)
        result = fit(net, "softmax_cross_entropy", optax.sgd(0.05), data, epochs=2,
                     batch_size=32, eval_batch_size=64, devices=devices)
        out[str(devices)] = {
            "params": [np.asarray(a).tolist() for a in jax.tree_util.tree_leaves(result.state)],
            "test_loss": result.metrics["test_loss"],
        }
    print(json.dumps(out))
    """
)


def test_several_devices_normalise_with_the_global_batch():
    """The batch is sharded over 4 devices; batch norm's statistics are the global batch's, so
    params, running statistics and the test loss equal one device's (to float rounding)."""
    out = run_on_host_devices(CHILD, 4, timeout=600)
    assert out["device_count"] == 4
    for a, b in zip(out["1"]["params"], out["4"]["params"], strict=True):
        np.testing.assert_allclose(np.array(b), np.array(a), rtol=1e-4, atol=1e-5)
    assert out["4"]["test_loss"] == pytest.approx(out["1"]["test_loss"], rel=1e-4)
