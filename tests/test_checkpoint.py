"""Tests for bpjax.checkpoint: bit-exact roundtrips, mismatch errors, atomicity, the manager."""

import json
import math
import os
import re
import stat
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from omegaconf import OmegaConf

from bpjax import _atomic, checkpoint

# What each public name of `bpjax.checkpoint` is tested by (a new name must be added here).
TESTED = {
    "CheckpointManager": "test_manager_*",
    "load_metadata": "test_metadata_roundtrip",
    "restore": "test_roundtrip_is_bit_identical",
    "save": "test_roundtrip_is_bit_identical",
}


def test_public_names_are_tested():
    assert set(TESTED) == set(checkpoint.__all__)


class TrainState(NamedTuple):
    params: Any
    opt_state: Any
    step: jax.Array
    key: jax.Array


KEYS = {"typed": jax.random.key, "raw": jax.random.PRNGKey}


def make_state(seed: int, key_kind: str = "typed", n_hidden: int = 4) -> TrainState:
    """A small state: two dense layers around a parameter-free one, with an adam state."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = (
        {"w": jax.random.normal(k1, (3, n_hidden)), "b": jnp.zeros(n_hidden)},
        (),
        {
            "w": jax.random.normal(k2, (n_hidden, 2), dtype=jnp.float32),
            "b": jax.random.normal(k3, (2,), dtype=jnp.float32),
        },
    )
    opt = optax.adam(1e-3)
    opt_state = opt.init(params)
    # Take one update so mu/nu/count are not all zeros.
    grads = jax.tree_util.tree_map(lambda p: jnp.ones_like(p) * (seed + 1), params)
    _, opt_state = opt.update(grads, opt_state, params)
    return TrainState(params, opt_state, jnp.asarray(seed * 10, jnp.int32), KEYS[key_kind](seed))


def assert_bit_identical(actual, expected) -> None:
    """Same structure, and every leaf has the same dtype, shape and bytes."""
    assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected)
    for a, e in zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected)):
        assert a.dtype == e.dtype
        if jax.dtypes.issubdtype(e.dtype, jax.dtypes.prng_key):
            assert jax.random.key_impl(a) == jax.random.key_impl(e)
            a, e = jax.random.key_data(a), jax.random.key_data(e)
        a, e = np.asarray(a), np.asarray(e)
        assert a.shape == e.shape
        assert a.tobytes() == e.tobytes()


@pytest.mark.parametrize("key_kind", list(KEYS))
def test_roundtrip_is_bit_identical(tmp_path, key_kind):
    state = make_state(1, key_kind)
    path = checkpoint.save(tmp_path / "state.npz", state, metadata={"epoch": 3})
    assert path == tmp_path / "state.npz"

    restored, metadata = checkpoint.restore(path, make_state(2, key_kind))

    assert_bit_identical(restored, state)
    assert isinstance(restored, TrainState)
    assert isinstance(restored.opt_state[0], optax.ScaleByAdamState)
    assert all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(restored))
    assert metadata == {"epoch": 3}
    # The restored key draws the same numbers as the saved one.
    np.testing.assert_array_equal(
        jax.random.normal(restored.key, (5,)), jax.random.normal(state.key, (5,))
    )


def test_restore_into_abstract_template(tmp_path):
    state = make_state(1)
    checkpoint.save(tmp_path / "s.npz", state)
    like = jax.eval_shape(lambda: make_state(7))

    restored, _ = checkpoint.restore(tmp_path / "s.npz", like)

    assert_bit_identical(restored, state)


def test_special_values_and_leaf_kinds_roundtrip(tmp_path):
    tree = {
        "bf16": jnp.asarray([1.5, -2.25, jnp.inf], jnp.bfloat16),
        "nan_payload": np.frombuffer(np.uint64(0x7FF8_0000_DEAD_BEEF).tobytes(), np.float64),
        "numpy": np.arange(6, dtype=np.int16).reshape(2, 3),
        "python": 7,
        "bool": jnp.asarray([True, False]),
        "empty": jnp.zeros((0, 3)),
        "typed_keys": jax.random.split(jax.random.key(0, impl="rbg"), 3),
    }
    checkpoint.save(tmp_path / "t.npz", tree)

    restored, _ = checkpoint.restore(tmp_path / "t.npz", tree)

    assert isinstance(restored["numpy"], np.ndarray)
    assert restored["python"] == 7 and isinstance(restored["python"], int)
    tree.pop("python"), restored.pop("python")
    assert_bit_identical(restored, tree)


def test_metadata_roundtrip(tmp_path):
    cfg = OmegaConf.create(
        {"model": {"sizes": [784, 128, 10], "act": "relu"}, "lr": 1e-3, "base": "${model.act}"}
    )
    metadata = {
        "epoch": np.int64(4),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "raw_cfg": cfg,
        "metrics": {"loss": np.float32(0.25), "acc": jnp.asarray(0.5), "nan": float("nan")},
        "shape": (2, 3),
        "none": None,
    }
    checkpoint.save(tmp_path / "m.npz", {"x": jnp.ones(2)}, metadata=metadata)

    _, restored = checkpoint.restore(tmp_path / "m.npz", {"x": jnp.zeros(2)})

    expected_cfg = {"model": {"sizes": [784, 128, 10], "act": "relu"}, "lr": 1e-3, "base": "relu"}
    assert restored["epoch"] == 4 and type(restored["epoch"]) is int
    assert restored["config"] == expected_cfg
    assert restored["raw_cfg"] == expected_cfg
    assert restored["metrics"]["loss"] == 0.25 and type(restored["metrics"]["loss"]) is float
    assert restored["metrics"]["acc"] == 0.5 and type(restored["metrics"]["acc"]) is float
    assert math.isnan(restored["metrics"]["nan"])
    assert restored["shape"] == [2, 3]
    assert restored["none"] is None
    assert checkpoint.load_metadata(tmp_path / "m.npz") == restored


def test_metadata_that_is_not_json_raises(tmp_path):
    with pytest.raises(TypeError, match="object"):
        checkpoint.save(tmp_path / "m.npz", {"x": jnp.ones(2)}, metadata={"f": object()})
    assert list(tmp_path.iterdir()) == []


def test_file_format(tmp_path):
    checkpoint.save(tmp_path / "f.npz", make_state(0), metadata={"epoch": 1})
    with np.load(tmp_path / "f.npz", allow_pickle=False) as npz:
        meta = json.loads(npz["__meta__"].tobytes().decode())
        assert meta["format"] == "bpjax.checkpoint" and meta["version"] == 1
        assert meta["metadata"] == {"epoch": 1}
        assert "TrainState" in meta["treedef"]
        n = len(meta["leaves"])
        assert sorted(npz.files) == ["__meta__"] + [f"leaf_{i:05d}" for i in range(n)]
        assert meta["leaves"][0] == {"path": ".params[0]['b']", "dtype": "float64", "shape": [4]}
        assert meta["leaves"][-1]["path"] == ".key"
        assert meta["leaves"][-1]["key_impl"] == "threefry2x32"


@pytest.mark.parametrize(
    ("like", "message"),
    [
        pytest.param(
            make_state(0, n_hidden=5), "shape mismatch at leaf .params[0]['b']", id="shape"
        ),
        pytest.param(
            make_state(0)._replace(step=jnp.asarray(0, jnp.int64)),
            "dtype mismatch at leaf .step",
            id="dtype",
        ),
        pytest.param(make_state(0, "raw"), "shape mismatch at leaf .key", id="raw-vs-typed-key"),
        pytest.param(
            make_state(0)._replace(params=make_state(0).params[:2]),
            "structure mismatch at leaf #2: checkpoint has .params[2]['b'], "
            "template has .opt_state[0].count",
            id="missing-layer",
        ),
        pytest.param(
            make_state(0)._replace(params=({"w": 1.0}, *make_state(0).params[1:])),
            "structure mismatch at leaf #0: checkpoint has .params[0]['b'], "
            "template has .params[0]['w']",
            id="renamed-leaf",
        ),
        pytest.param(
            make_state(0)._replace(opt_state=optax.sgd(0.1, momentum=0.9).init(make_state(0)[0])),
            "structure mismatch at leaf #4",
            id="other-optimizer",
        ),
    ],
)
def test_mismatch_names_the_leaf(tmp_path, like, message):
    checkpoint.save(tmp_path / "s.npz", make_state(0))
    with pytest.raises(ValueError, match=re.escape(message)):
        checkpoint.restore(tmp_path / "s.npz", like)


def test_same_leaf_paths_but_different_node_types_is_a_mismatch(tmp_path):
    class Other(NamedTuple):
        params: Any
        opt_state: Any
        step: jax.Array
        key: jax.Array

    checkpoint.save(tmp_path / "s.npz", make_state(0))
    with pytest.raises(ValueError, match="different node types"):
        checkpoint.restore(tmp_path / "s.npz", Other(*make_state(0)))


def test_not_a_checkpoint(tmp_path):
    np.savez(tmp_path / "other.npz", x=np.ones(2))
    with pytest.raises(ValueError, match="not a bpjax checkpoint"):
        checkpoint.restore(tmp_path / "other.npz", {"x": np.ones(2)})


@pytest.mark.parametrize(
    ("meta", "match"),
    [
        ({"format": "other", "version": 1}, "unsupported checkpoint format 'other' version 1"),
        ({"format": "bpjax.checkpoint", "version": 99}, "'bpjax.checkpoint' version 99"),
    ],
)
def test_unknown_format_or_version_is_refused(tmp_path, meta, match):
    meta = {**meta, "treedef": "", "leaves": [], "metadata": {}}
    blob = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    np.savez(tmp_path / "future.npz", __meta__=blob)
    for read in (checkpoint.load_metadata, lambda path: checkpoint.restore(path, {})):
        with pytest.raises(ValueError, match=re.escape(match)):
            read(tmp_path / "future.npz")


def test_load_metadata_of_other_files(tmp_path):
    np.savez(tmp_path / "other.npz", x=np.ones(2))
    with pytest.raises(ValueError, match=r"other\.npz: not a bpjax checkpoint"):
        checkpoint.load_metadata(tmp_path / "other.npz")
    with pytest.raises(FileNotFoundError):
        checkpoint.load_metadata(tmp_path / "missing.npz")


# Files damaged outside bpjax (a copy cut short, an emptied file, a zip missing its entries):
# every reader names the file and says it can't be read, with a ValueError.
DAMAGED = {
    "truncated": lambda good: good[: len(good) // 2],
    "empty": lambda good: b"",
    "not a zip": lambda good: b"just some text, not a checkpoint",
}


@pytest.mark.parametrize("damage", DAMAGED)
def test_damaged_files_are_reported_by_name(tmp_path, damage):
    path = checkpoint.save(tmp_path / "s.npz", make_state(1), metadata={"epoch": 1})
    path.write_bytes(DAMAGED[damage](path.read_bytes()))
    for read in (checkpoint.load_metadata, lambda p: checkpoint.restore(p, make_state(0))):
        with pytest.raises(ValueError, match=r"s\.npz: not a readable checkpoint"):
            read(path)


def test_manager_ranks_around_a_damaged_file(tmp_path):
    # An unreadable file used to make every later save raise (zipfile.BadZipFile from pruning).
    manager = checkpoint.CheckpointManager(tmp_path, keep=2, metric="loss")
    for step, loss in ((1, 0.5), (2, 0.1)):
        manager.save(make_state(step), step_or_epoch=step, metrics={"loss": loss})
    manager.path_for(2).write_bytes(manager.path_for(2).read_bytes()[:100])  # the best, damaged
    manager.save(make_state(3), step_or_epoch=3, metrics={"loss": 0.3})
    assert manager.best() == manager.path_for(3)  # the damaged file is never ranked
    assert manager.all_steps() == [2, 3]  # the last two are kept, readable or not


def test_manager_stores_what_identifies_the_run(tmp_path):
    manager = checkpoint.CheckpointManager(tmp_path)
    manager.save(make_state(1), step_or_epoch=1, run={"seed": 3, "shape": (8, 8)})
    assert checkpoint.load_metadata(manager.latest())["run"] == {"seed": 3, "shape": [8, 8]}
    manager.save(make_state(2), step_or_epoch=2)
    assert "run" not in checkpoint.load_metadata(manager.latest())


def _crashing_writer(file, arrays):
    """Writes part of a real checkpoint, then dies, like a process killed mid-write."""
    file.write(b"PK\x03\x04 half a zip file")
    file.flush()
    raise RuntimeError("simulated crash")


def test_crash_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    old = make_state(1)
    path = checkpoint.save(tmp_path / "s.npz", old, metadata={"epoch": 1})
    monkeypatch.setattr(checkpoint, "_write_npz", _crashing_writer)

    with pytest.raises(RuntimeError, match="simulated crash"):
        checkpoint.save(path, make_state(2), metadata={"epoch": 2})
    with pytest.raises(RuntimeError, match="simulated crash"):
        checkpoint.save(tmp_path / "new.npz", make_state(2))

    assert [p.name for p in tmp_path.iterdir()] == ["s.npz"]  # no temp files, no new.npz
    restored, metadata = checkpoint.restore(path, make_state(3))
    assert_bit_identical(restored, old)
    assert metadata == {"epoch": 1}


def test_crash_in_manager_keeps_previous_checkpoints(tmp_path, monkeypatch):
    manager = checkpoint.CheckpointManager(tmp_path, keep=1)
    manager.save(make_state(1), step_or_epoch=1)
    monkeypatch.setattr(checkpoint, "_write_npz", _crashing_writer)

    with pytest.raises(RuntimeError, match="simulated crash"):
        manager.save(make_state(2), step_or_epoch=2)

    assert [p.name for p in tmp_path.iterdir()] == ["ckpt_000001.npz"]
    assert_bit_identical(manager.restore_latest(make_state(0))[0], make_state(1))


@pytest.mark.parametrize(
    ("mode", "losses", "best_step"),
    [
        # NaN first and a later NaN/inf never become best.
        ("min", [math.nan, 1.0, 3.0, math.nan, 4.0, math.inf, 2.0], 2),
        ("max", [math.nan, 1.0, 3.0, math.nan, 4.0, -math.inf, 2.0], 5),
    ],
)
def test_manager_keeps_last_k_and_best(tmp_path, mode, losses, best_step):
    directory = tmp_path / "does" / "not" / "exist"
    manager = checkpoint.CheckpointManager(directory, keep=2, metric="val/loss", mode=mode)
    assert manager.latest() is None and manager.best() is None and manager.all_steps() == []

    for step, loss in enumerate(losses, start=1):
        state = make_state(step)
        path = manager.save(
            state,
            step_or_epoch=step,
            metrics={"val/loss": np.float32(loss), "acc": jnp.asarray(0.5)},
            config={"lr": 0.1, "model": {"sizes": (3, 2)}},
        )
        assert path == directory / f"ckpt_{step:06d}.npz"

    n = len(losses)
    assert manager.all_steps() == sorted({best_step, n - 1, n})
    assert sorted(p.name for p in directory.iterdir()) == [
        f"ckpt_{s:06d}.npz" for s in manager.all_steps()
    ]

    # A new manager on the same directory sees the same checkpoints.
    reopened = checkpoint.CheckpointManager(directory, keep=2, metric="val/loss", mode=mode)
    for m in (manager, reopened):
        assert m.latest() == directory / f"ckpt_{n:06d}.npz"
        assert m.best() == directory / f"ckpt_{best_step:06d}.npz"
        best, metadata = m.restore_best(make_state(0))
        assert_bit_identical(best, make_state(best_step))
        assert metadata["step"] == best_step
        assert metadata["metrics"]["val/loss"] == losses[best_step - 1]
        assert type(metadata["metrics"]["acc"]) is float
        assert metadata["config"] == {"lr": 0.1, "model": {"sizes": [3, 2]}}
        latest, metadata = m.restore_latest(make_state(0))
        assert_bit_identical(latest, make_state(n))
        assert metadata["step"] == n

    # The reopened manager keeps pruning around the best.
    reopened.save(make_state(9), step_or_epoch=n + 1, metrics={"val/loss": math.nan})
    assert reopened.all_steps() == sorted({best_step, n, n + 1})


def test_manager_without_metric_keeps_only_recent(tmp_path):
    manager = checkpoint.CheckpointManager(tmp_path, keep=3)
    with pytest.raises(FileNotFoundError):
        manager.restore_latest(make_state(0))
    for step in range(0, 50, 10):
        manager.save(make_state(step), step_or_epoch=step, metrics={"loss": 1.0})
    assert manager.all_steps() == [20, 30, 40]
    assert manager.best() is None
    with pytest.raises(FileNotFoundError):
        manager.restore_best(make_state(0))


def test_manager_all_nan_has_no_best(tmp_path):
    manager = checkpoint.CheckpointManager(tmp_path, keep=1, metric="loss")
    for step in range(3):
        manager.save(make_state(step), step_or_epoch=step, metrics={"loss": jnp.nan})
    assert manager.all_steps() == [2]
    assert manager.best() is None


def test_manager_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="keep"):
        checkpoint.CheckpointManager(tmp_path, keep=0)
    with pytest.raises(ValueError, match="mode"):
        checkpoint.CheckpointManager(tmp_path, mode="best")
    manager = checkpoint.CheckpointManager(tmp_path)
    with pytest.raises(ValueError, match="step_or_epoch must be >= 0, got -1"):
        manager.save({"x": jnp.ones(2)}, step_or_epoch=-1)
    assert list(tmp_path.iterdir()) == []


def test_manager_creates_its_directory_only_to_save(tmp_path):
    manager = checkpoint.CheckpointManager(tmp_path / "a" / "ckpts")
    assert manager.all_steps() == [] and manager.latest() is None and manager.best() is None
    assert not (tmp_path / "a").exists()  # looking creates nothing
    manager.save({"x": jnp.ones(2)}, step_or_epoch=1)
    assert manager.all_steps() == [1]


def test_manager_file_names_and_foreign_files(tmp_path):
    manager = checkpoint.CheckpointManager(tmp_path)
    assert manager.path_for(7) == tmp_path / "ckpt_000007.npz"
    assert manager.path_for(1234567) == tmp_path / "ckpt_1234567.npz"
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "ckpt_000009.npz.tmp").write_text("x")  # not a checkpoint name
    (tmp_path / "ckpt_000008.npz").mkdir()  # a directory, not a file
    manager.save({"x": jnp.ones(2)}, step_or_epoch=3)
    assert manager.all_steps() == [3] and manager.latest() == manager.path_for(3)


# --------------------------------------------------------------------------------------------
# bpjax._atomic: the write underneath checkpoints, dataset caches and run metrics


def test_atomic_write_creates_parents_and_replaces(tmp_path):
    path = tmp_path / "a" / "b" / "file.bin"
    assert _atomic.atomic_write(path, lambda f: f.write(b"first")) == path
    assert path.read_bytes() == b"first"
    _atomic.atomic_write(str(path), lambda f: f.write(b"second"))
    assert path.read_bytes() == b"second"
    assert [p.name for p in path.parent.iterdir()] == ["file.bin"]  # no temp file left


def test_atomic_write_uses_umask_permissions(tmp_path):
    old = os.umask(0o027)
    try:
        path = _atomic.atomic_write(tmp_path / "f", lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # 0o666 less the umask, not mkstemp's 0o600


def test_atomic_write_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"old")

    def fail(file):
        file.write(b"partial")
        raise KeyboardInterrupt  # a BaseException, as a Ctrl-C mid-write

    with pytest.raises(KeyboardInterrupt):
        _atomic.atomic_write(path, fail)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]
