"""Tests for bpjax.checkpoint: bit-exact roundtrips, mismatch errors, atomicity, the manager,
damaged checkpoints, the former .npz format, and two processes saving and restoring together."""

import contextlib
import json
import logging
import math
import os
import pathlib
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import types
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from conftest import xla_flags
from omegaconf import OmegaConf

from bpjax import _atomic, checkpoint, distributed

DATA = pathlib.Path(__file__).parent / "data" / "legacy_npz"

# What each public name of `bpjax.checkpoint` is tested by (a new name must be added here).
TESTED = {
    "CheckpointManager": "test_manager_*",
    "DamagedCheckpointWarning": "test_manager_restore_latest_passes_over_a_damaged_latest",
    "UnreadableCheckpoint": "test_damaged_checkpoints_are_reported_by_name",
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


def files(directory: pathlib.Path) -> dict[str, bytes | None]:
    """Every file and folder under ``directory`` (files with their bytes)."""
    return {
        str(p.relative_to(directory)): p.read_bytes() if p.is_file() else None
        for p in sorted(directory.rglob("*"))
    }


def strict_json(text: str) -> Any:
    """json.loads that refuses NaN/Infinity, as strict parsers (and other languages) do."""

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("key_kind", list(KEYS))
def test_roundtrip_is_bit_identical(tmp_path, key_kind):
    state = make_state(1, key_kind)
    path = checkpoint.save(tmp_path / "state", state, metadata={"epoch": 3})
    assert path == tmp_path / "state" and path.is_dir()

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
    checkpoint.save(tmp_path / "s", state)
    like = jax.eval_shape(lambda: make_state(7))

    restored, _ = checkpoint.restore(tmp_path / "s", like)

    assert_bit_identical(restored, state)


def test_restore_onto_the_templates_sharding(tmp_path):
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = make_state(1)
    checkpoint.save(tmp_path / "s", state)

    for like in (
        jax.device_put(make_state(2), replicated),
        jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
            make_state(2),
        ),
    ):
        restored, _ = checkpoint.restore(tmp_path / "s", like)
        assert_bit_identical(restored, state)
        for leaf in jax.tree_util.tree_leaves(restored):
            assert leaf.sharding == replicated  # typed keys too


def test_special_values_and_leaf_kinds_roundtrip(tmp_path):
    tree = {
        "bf16": jnp.asarray([1.5, -2.25, jnp.inf], jnp.bfloat16),
        "bf16_numpy": np.asarray([0.5, -1.0], jnp.bfloat16),
        "nan_payload": np.frombuffer(np.uint64(0x7FF8_0000_DEAD_BEEF).tobytes(), np.float64),
        "numpy": np.arange(6, dtype=np.int16).reshape(2, 3),
        "numpy_scalar": np.float32(2.5),
        "python": 7,
        "bool": jnp.asarray([True, False]),
        "empty": jnp.zeros((0, 3)),  # orbax stores no empty arrays: the record rebuilds it
        "empty_numpy": np.zeros((2, 0), np.int8),
        "typed_keys": jax.random.split(jax.random.key(0, impl="rbg"), 3),
        "no_keys": jax.random.split(jax.random.key(0), 0),
    }
    checkpoint.save(tmp_path / "t", tree)

    restored, _ = checkpoint.restore(tmp_path / "t", tree)

    assert isinstance(restored["numpy"], np.ndarray)
    assert isinstance(restored["bf16_numpy"], np.ndarray)
    assert isinstance(restored["numpy_scalar"], np.float32)
    assert restored["python"] == 7 and isinstance(restored["python"], int)
    tree.pop("python"), restored.pop("python")
    assert_bit_identical(restored, tree)


def test_a_tree_without_arrays_roundtrips(tmp_path):
    tree = {"nothing": (), "empty": np.zeros(0)}
    checkpoint.save(tmp_path / "t", tree, metadata={"epoch": 0})
    restored, metadata = checkpoint.restore(tmp_path / "t", tree)
    assert restored["nothing"] == () and restored["empty"].shape == (0,)
    assert metadata == {"epoch": 0}


def test_metadata_roundtrip(tmp_path):
    cfg = OmegaConf.create(
        {"model": {"sizes": [784, 128, 10], "act": "relu"}, "lr": 1e-3, "base": "${model.act}"}
    )
    metadata = {
        "epoch": np.int64(4),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "raw_cfg": cfg,
        "metrics": {"loss": np.float32(0.25), "acc": jnp.asarray(0.5), "nan": float("nan")},
        "inf": [math.inf, -math.inf],
        "shape": (2, 3),
        "none": None,
        "path": tmp_path,
    }
    checkpoint.save(tmp_path / "m", {"x": jnp.ones(2)}, metadata=metadata)

    _, restored = checkpoint.restore(tmp_path / "m", {"x": jnp.zeros(2)})

    expected_cfg = {"model": {"sizes": [784, 128, 10], "act": "relu"}, "lr": 1e-3, "base": "relu"}
    assert restored["epoch"] == 4 and type(restored["epoch"]) is int
    assert restored["config"] == expected_cfg
    assert restored["raw_cfg"] == expected_cfg
    assert restored["metrics"]["loss"] == 0.25 and type(restored["metrics"]["loss"]) is float
    assert restored["metrics"]["acc"] == 0.5 and type(restored["metrics"]["acc"]) is float
    assert math.isnan(restored["metrics"]["nan"])
    assert restored["inf"] == [math.inf, -math.inf]
    assert restored["shape"] == [2, 3]
    assert restored["none"] is None
    assert restored["path"] == str(tmp_path)
    assert checkpoint.load_metadata(tmp_path / "m") == restored
    # Every JSON file of the checkpoint, orbax's too, is strict JSON.
    for file in (tmp_path / "m").rglob("*"):
        if file.name in ("bpjax.json", "_CHECKPOINT_METADATA"):
            strict_json(file.read_text())


def test_load_metadata_reads_no_arrays(tmp_path, monkeypatch):
    path = checkpoint.save(tmp_path / "m", make_state(1), metadata={"epoch": 2})
    shutil.rmtree(path / "arrays")  # would fail any read of the arrays
    monkeypatch.setitem(sys.modules, "orbax.checkpoint", None)  # and any use of orbax
    assert checkpoint.load_metadata(path) == {"epoch": 2}


def test_metadata_or_leaves_that_cannot_be_stored_raise_before_writing(tmp_path):
    with pytest.raises(TypeError, match="object"):
        checkpoint.save(tmp_path / "m", {"x": jnp.ones(2)}, metadata={"f": object()})
    with pytest.raises(TypeError, match=r"leaf \['s'\]: cannot store an array of dtype <U3"):
        checkpoint.save(tmp_path / "m", {"x": jnp.ones(2), "s": "abc"})
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_the_former_single_file_name(tmp_path):
    with pytest.raises(ValueError, match=r"s\.npz: checkpoints are directories now"):
        checkpoint.save(tmp_path / "s.npz", make_state(0))
    assert list(tmp_path.iterdir()) == []


def test_file_format(tmp_path):
    path = checkpoint.save(tmp_path / "f", make_state(0), metadata={"epoch": 1})
    assert {"_CHECKPOINT_METADATA", "arrays", "meta"} <= {p.name for p in path.iterdir()}
    meta = strict_json((path / "meta" / "bpjax.json").read_text())
    assert meta["format"] == "bpjax.checkpoint" and meta["version"] == 2
    assert meta["metadata"] == {"epoch": 1}
    assert "TrainState" in meta["treedef"]
    assert meta["leaves"][0] == {"path": ".params[0]['b']", "dtype": "float64", "shape": [4]}
    assert meta["leaves"][-1]["path"] == ".key"
    assert meta["leaves"][-1]["key_impl"] == "threefry2x32"
    # The arrays are an ordinary orbax PyTree item: orbax reads them without bpjax.
    with pytest.warns(UserWarning, match="Sharding info not provided"):  # none asked for
        arrays = ocp.PyTreeCheckpointer().restore(path / "arrays")
    assert sorted(arrays) == [f"leaf_{i:05d}" for i in range(len(meta["leaves"]))]
    np.testing.assert_array_equal(arrays["leaf_00001"], make_state(0).params[0]["w"])


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
    checkpoint.save(tmp_path / "s", make_state(0))
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        checkpoint.restore(tmp_path / "s", like)
    assert not isinstance(info.value, checkpoint.UnreadableCheckpoint)


def test_same_leaf_paths_but_different_node_types_is_a_mismatch(tmp_path):
    class Other(NamedTuple):
        params: Any
        opt_state: Any
        step: jax.Array
        key: jax.Array

    checkpoint.save(tmp_path / "s", make_state(0))
    with pytest.raises(ValueError, match="different node types"):
        checkpoint.restore(tmp_path / "s", Other(*make_state(0)))


@pytest.mark.parametrize("version", [1, 99])
def test_unknown_format_version_is_refused(tmp_path, version):
    # Another version is not damage: a resume must not pass over it as if it were.
    path = checkpoint.save(tmp_path / "future", {"x": jnp.ones(2)})
    meta_file = path / "meta" / "bpjax.json"
    meta_file.write_text(meta_file.read_text().replace('"version": 2', f'"version": {version}'))
    for read in (checkpoint.load_metadata, lambda p: checkpoint.restore(p, {"x": jnp.ones(2)})):
        with pytest.raises(ValueError, match=f"'bpjax.checkpoint' version {version} ") as info:
            read(path)
        assert not isinstance(info.value, checkpoint.UnreadableCheckpoint)


def test_missing_and_foreign_paths(tmp_path):
    for read in (checkpoint.load_metadata, lambda p: checkpoint.restore(p, {})):
        with pytest.raises(FileNotFoundError):
            read(tmp_path / "missing")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("x")
    np.savez(tmp_path / "other.npz", x=np.ones(2))
    for name, reason in [("folder", "no meta/bpjax.json"), ("other.npz", "not a bpjax checkpoint")]:
        for read in (checkpoint.load_metadata, lambda p: checkpoint.restore(p, {})):
            with pytest.raises(checkpoint.UnreadableCheckpoint, match=re.escape(reason)):
                read(tmp_path / name)


def _cut(file: pathlib.Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _cut_array_data(path: pathlib.Path) -> None:
    for file in (path / "arrays" / "d").iterdir():  # the data orbax reads, once merged
        _cut(file)


# Checkpoints damaged outside bpjax (a copy cut short, files lost): every reader names the path
# and says it can't be read, with UnreadableCheckpoint (a ValueError), never orbax's own error.
# Whether `load_metadata` fails too: it reads only meta/bpjax.json.
DAMAGED = {
    "metadata cut short": (lambda p: _cut(p / "meta" / "bpjax.json"), True),
    "metadata emptied": (lambda p: (p / "meta" / "bpjax.json").write_bytes(b""), True),
    "metadata lost": (lambda p: (p / "meta" / "bpjax.json").unlink(), True),
    "metadata not utf-8": (lambda p: (p / "meta" / "bpjax.json").write_bytes(b"\xff{"), True),
    "array data cut short": (_cut_array_data, False),
    "array manifest lost": (lambda p: (p / "arrays" / "manifest.ocdbt").unlink(), False),
    "arrays lost": (lambda p: shutil.rmtree(p / "arrays"), False),
    "emptied": (lambda p: [shutil.rmtree(c) if c.is_dir() else c.unlink() for c in p.iterdir()],
                True),
}  # fmt: skip


@pytest.mark.parametrize("damage", DAMAGED)
def test_damaged_checkpoints_are_reported_by_name(tmp_path, damage):
    damage_fn, metadata_unreadable = DAMAGED[damage]
    path = checkpoint.save(tmp_path / "s", make_state(1), metadata={"epoch": 1})
    damage_fn(path)
    readers = [lambda p: checkpoint.restore(p, make_state(0))]
    if metadata_unreadable:
        readers.append(checkpoint.load_metadata)
    else:
        assert checkpoint.load_metadata(path) == {"epoch": 1}
    for read in readers:
        with pytest.raises(checkpoint.UnreadableCheckpoint, match=r"/s: not a readable") as info:
            read(path)
        assert info.value.path == path


# The same for files of the former .npz format.
DAMAGED_NPZ = {
    "truncated": lambda good: good[: len(good) // 2],
    "empty": lambda good: b"",
    "not a zip": lambda good: b"just some text, not a checkpoint",
}


@pytest.mark.parametrize("damage", DAMAGED_NPZ)
def test_damaged_npz_files_are_reported_by_name(tmp_path, damage):
    path = tmp_path / "s.npz"
    path.write_bytes(DAMAGED_NPZ[damage]((DATA / "state_typed_key.npz").read_bytes()))
    for read in (checkpoint.load_metadata, lambda p: checkpoint.restore(p, make_state(0))):
        with pytest.raises(checkpoint.UnreadableCheckpoint, match=r"s\.npz: not a readable"):
            read(path)


async def _crash(self, item, directory):
    """Dies while writing the metadata, the arrays half written, as a process killed mid-save."""
    (directory / "partial").write_text("half a file")
    raise RuntimeError("simulated crash")


def test_crash_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    old = make_state(1)
    path = checkpoint.save(tmp_path / "s", old, metadata={"epoch": 1})
    before = files(tmp_path)
    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", _crash)

    with pytest.raises(RuntimeError, match="simulated crash"):
        checkpoint.save(path, make_state(2), metadata={"epoch": 2})  # a replacement
    with pytest.raises(RuntimeError, match="simulated crash"):
        checkpoint.save(tmp_path / "new", make_state(2))

    assert files(tmp_path) == before  # the old one back in place; no temp dirs, no "new"
    restored, metadata = checkpoint.restore(path, make_state(3))
    assert_bit_identical(restored, old)
    assert metadata == {"epoch": 1}


@pytest.mark.parametrize("replace", [False, True])
def test_an_interrupt_during_a_save_waits_for_it(tmp_path, monkeypatch, replace):
    # SIGTERM (turned into KeyboardInterrupt, as experiments/train.py does) mid-save used to
    # stop it there, leaving orbax's writer threads filling a directory the next save deleted.
    write_json = ocp.JsonCheckpointHandler._save_fn

    async def slow(self, item, directory):
        os.kill(os.getpid(), signal.SIGALRM)  # handled in the main thread, which waits
        time.sleep(0.5)
        await write_json(self, item, directory)

    def interrupt(signum, frame):
        raise distributed.Interrupted(signum)

    manager = checkpoint.CheckpointManager(tmp_path, keep=2)
    if replace:
        manager.save(make_state(0), step_or_epoch=1)
    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", slow)
    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        with pytest.raises(KeyboardInterrupt, match="signal"):
            manager.save(make_state(1), step_or_epoch=1)
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_000001"]  # complete, alone
    assert_bit_identical(manager.restore_latest(make_state(0))[0], make_state(1))


def test_replacing_a_checkpoint(tmp_path):
    path = checkpoint.save(tmp_path / "s", make_state(1), metadata={"epoch": 1})
    checkpoint.save(path, make_state(2), metadata={"epoch": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # the old one is gone
    restored, metadata = checkpoint.restore(path, make_state(0))
    assert_bit_identical(restored, make_state(2))
    assert metadata == {"epoch": 2}


def test_manager_crash_keeps_previous_checkpoints(tmp_path, monkeypatch):
    manager = checkpoint.CheckpointManager(tmp_path, keep=1)
    manager.save(make_state(1), step_or_epoch=1)
    manager.save(make_state(2), step_or_epoch=2)
    before = files(tmp_path)
    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", _crash)

    for step in (3, 2):  # a new step; a replacement of the latest
        with pytest.raises(RuntimeError, match="simulated crash"):
            manager.save(make_state(9), step_or_epoch=step)

    assert files(tmp_path) == before
    assert_bit_identical(manager.restore_latest(make_state(0))[0], make_state(2))


_SAVER = """
import sys
import numpy as np
from bpjax import checkpoint

manager = checkpoint.CheckpointManager(sys.argv[1], keep=1000)
w = np.random.default_rng(0).normal(size=(1_000_000,))  # 8 MB: a save takes a while
for step in range(1, 100_000):
    manager.save({"w": w + step}, step_or_epoch=step)
    print(step, flush=True)
"""


@pytest.mark.slow
def test_kill_9_mid_save_leaves_only_whole_checkpoints(tmp_path):
    """A process killed at any moment of a save leaves complete checkpoints only."""
    with subprocess.Popen(
        [sys.executable, "-c", _SAVER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    ) as proc:
        try:
            assert proc.stdout.readline().strip() == "1"
            t0 = time.monotonic()
            assert proc.stdout.readline().strip() == "2"
            time.sleep((time.monotonic() - t0) / 2)  # about halfway through saving step 3
        finally:
            proc.send_signal(signal.SIGKILL)
    w = np.random.default_rng(0).normal(size=(1_000_000,))
    manager = checkpoint.CheckpointManager(tmp_path)
    steps = manager.all_steps()
    assert steps[:2] == [1, 2]
    for step in steps:  # each one whole, whatever the moment of the kill
        restored, metadata = checkpoint.restore(manager.path_for(step), {"w": w})
        np.testing.assert_array_equal(restored["w"], w + step)
        assert metadata["step"] == step
    # What a save cut short left is not a checkpoint, and the next save deletes it.
    manager.save({"w": w}, step_or_epoch=steps[-1] + 1)
    assert not list(tmp_path.glob("*orbax-checkpoint-tmp*"))


def test_only_the_noise_of_a_failed_restore_is_silenced(tmp_path, monkeypatch):
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    path = checkpoint.save(tmp_path / "s", make_state(1))
    _cut_array_data(path)
    with pytest.raises(checkpoint.UnreadableCheckpoint):
        checkpoint.restore(path, make_state(0))

    noise = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"), object=None)
    other = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"), object=len)
    sys.unraisablehook(noise)
    sys.unraisablehook(other)
    assert other in reported and noise not in reported


# --------------------------------------------------------------------------------------------
# CheckpointManager


@pytest.mark.parametrize(
    ("mode", "losses", "best_step"),
    [
        # NaN first and a later NaN/inf never become best; the earliest of equals is.
        ("min", [math.nan, 1.0, 3.0, math.nan, 4.0, math.inf, 2.0, 1.0], 2),
        ("max", [math.nan, 1.0, 3.0, math.nan, 4.0, -math.inf, 2.0, 4.0], 5),
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
        assert path == directory / f"ckpt_{step:06d}"

    n = len(losses)
    assert manager.all_steps() == sorted({best_step, n - 1, n})
    assert sorted(p.name for p in directory.iterdir()) == [
        f"ckpt_{s:06d}" for s in manager.all_steps()
    ]

    # A new manager on the same directory sees the same checkpoints.
    reopened = checkpoint.CheckpointManager(directory, keep=2, metric="val/loss", mode=mode)
    for m in (manager, reopened):
        assert m.latest() == directory / f"ckpt_{n:06d}"
        assert m.best() == directory / f"ckpt_{best_step:06d}"
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


def test_manager_replaces_a_step_and_ranks_the_new_one(tmp_path):
    manager = checkpoint.CheckpointManager(tmp_path, keep=1, metric="loss")
    for step, loss in ((1, 0.5), (2, 0.9), (3, 0.8)):
        manager.save(make_state(step), step_or_epoch=step, metrics={"loss": loss})
    assert manager.all_steps() == [1, 3]
    manager.save(make_state(7), step_or_epoch=3, metrics={"loss": 0.1})  # better than step 1
    assert manager.all_steps() == [3] and manager.best() == manager.path_for(3)
    assert_bit_identical(manager.restore_latest(make_state(0))[0], make_state(7))
    manager.save(make_state(8), step_or_epoch=2, metrics={"loss": 0.9})  # an older step
    assert manager.all_steps() == [3]  # neither the latest nor the best: not kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_000003"]


def test_manager_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="keep"):
        checkpoint.CheckpointManager(tmp_path, keep=0)
    with pytest.raises(ValueError, match="mode"):
        checkpoint.CheckpointManager(tmp_path, mode="best")
    manager = checkpoint.CheckpointManager(tmp_path / "ckpts")
    with pytest.raises(ValueError, match="step_or_epoch must be >= 0, got -1"):
        manager.save({"x": jnp.ones(2)}, step_or_epoch=-1)
    with pytest.raises(TypeError, match="object"):
        manager.save({"x": jnp.ones(2)}, step_or_epoch=1, config={"f": object()})
    assert list(tmp_path.iterdir()) == []


def test_manager_creates_its_directory_only_to_save(tmp_path):
    manager = checkpoint.CheckpointManager(tmp_path / "a" / "ckpts")
    assert manager.all_steps() == [] and manager.latest() is None and manager.best() is None
    assert not (tmp_path / "a").exists()  # looking creates nothing
    manager.save({"x": jnp.ones(2)}, step_or_epoch=1)
    assert manager.all_steps() == [1]


def test_manager_file_names_and_foreign_files(tmp_path):
    manager = checkpoint.CheckpointManager(tmp_path, keep=1)
    assert manager.path_for(7) == tmp_path / "ckpt_000007"
    assert manager.path_for(1234567) == tmp_path / "ckpt_1234567"
    foreign = {
        "notes.txt": "file",
        "ckpt_000009.npz.tmp": "file",  # not a checkpoint name
        "ckpt_000008.npz": "dir",  # a directory, not a file of the former format
        "ckpt_000010.damaged": "dir",
        "ckpt_000011.orbax-checkpoint-tmp-1234": "dir",  # an unfinished save
    }
    for name, kind in foreign.items():
        (tmp_path / name).mkdir() if kind == "dir" else (tmp_path / name).write_text("x")
    manager.save({"x": jnp.ones(2)}, step_or_epoch=3)
    manager.save({"x": jnp.ones(2)}, step_or_epoch=4)
    assert manager.all_steps() == [4] and manager.latest() == manager.path_for(4)
    foreign.pop("ckpt_000011.orbax-checkpoint-tmp-1234")  # deleted by the save: a dead write
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*foreign, "ckpt_000004"])


def test_manager_stores_what_identifies_the_run(tmp_path):
    manager = checkpoint.CheckpointManager(tmp_path)
    manager.save(make_state(1), step_or_epoch=1, run={"seed": 3, "shape": (8, 8)})
    assert checkpoint.load_metadata(manager.latest())["run"] == {"seed": 3, "shape": [8, 8]}
    manager.save(make_state(2), step_or_epoch=2)
    assert "run" not in checkpoint.load_metadata(manager.latest())


def test_manager_ranks_around_a_damaged_checkpoint(tmp_path):
    # An unreadable file used to make every later save raise (zipfile.BadZipFile from pruning).
    manager = checkpoint.CheckpointManager(tmp_path, keep=2, metric="loss")
    for step, loss in ((1, 0.5), (2, 0.1)):
        manager.save(make_state(step), step_or_epoch=step, metrics={"loss": loss})
    _cut(manager.path_for(2) / "meta" / "bpjax.json")  # the best, damaged
    manager.save(make_state(3), step_or_epoch=3, metrics={"loss": 0.3})
    assert manager.best() == manager.path_for(3)  # the damaged one is never ranked
    assert manager.all_steps() == [2, 3]  # the last two are kept, readable or not


@pytest.mark.parametrize("damage", ["metadata cut short", "array data cut short"])
def test_manager_restore_latest_passes_over_a_damaged_latest(tmp_path, damage):
    manager = checkpoint.CheckpointManager(tmp_path, keep=5)
    for step in (1, 2, 3):
        manager.save(make_state(step), step_or_epoch=step)
    DAMAGED[damage][0](manager.path_for(3))
    DAMAGED[damage][0](manager.path_for(2))

    with pytest.warns(checkpoint.DamagedCheckpointWarning) as caught:
        restored, metadata = manager.restore_latest(make_state(0))

    assert_bit_identical(restored, make_state(1))
    assert metadata["step"] == 1
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2  # one per damaged checkpoint, each named
    for step, message in zip((3, 2), messages):
        assert message.startswith(f"{manager.path_for(step)}: not a readable checkpoint")
        assert message.endswith(
            f"renamed to ckpt_{step:06d}.damaged (kept), resuming from ckpt_000001"
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt_000001", "ckpt_000002.damaged", "ckpt_000003.damaged"
    ]  # fmt: skip
    assert manager.all_steps() == [1]
    # The run goes on, and a damaged step saved and damaged again is set aside under a new name.
    manager.save(make_state(2), step_or_epoch=2)
    _cut(manager.path_for(2) / "meta" / "bpjax.json")
    with pytest.warns(checkpoint.DamagedCheckpointWarning, match=r"ckpt_000002\.damaged-2"):
        manager.restore_latest(make_state(0))


def test_manager_restore_best_passes_over_a_damaged_best(tmp_path):
    manager = checkpoint.CheckpointManager(tmp_path, keep=5, metric="loss")
    for step, loss in ((1, 0.5), (2, 0.1), (3, 0.3)):
        manager.save(make_state(step), step_or_epoch=step, metrics={"loss": loss})
    _cut_array_data(manager.path_for(2))  # the best's arrays; its metadata still reads
    with pytest.warns(checkpoint.DamagedCheckpointWarning, match=r"ckpt_000002.*next best"):
        restored, metadata = manager.restore_best(make_state(0))
    assert metadata["step"] == 3  # the next best by the metric
    assert_bit_identical(restored, make_state(3))
    assert (tmp_path / "ckpt_000002.damaged").is_dir()


def test_manager_restore_latest_refuses_when_none_can_be_read(tmp_path):
    manager = checkpoint.CheckpointManager(tmp_path)
    for step in (1, 2):
        manager.save(make_state(step), step_or_epoch=step)
    _cut(manager.path_for(2) / "meta" / "bpjax.json")
    _cut_array_data(manager.path_for(1))
    before = files(tmp_path)
    message = (
        rf"{tmp_path}: none of its 2 checkpoints can be read \({tmp_path}/ckpt_000002: not a "
        rf"readable checkpoint .*; {tmp_path}/ckpt_000001: not a readable checkpoint \(arrays: "
        rf".*\); nothing was renamed or deleted: move them out of {tmp_path} to start afresh"
    )
    with pytest.raises(checkpoint.UnreadableCheckpoint, match=message):
        manager.restore_latest(make_state(0))
    assert files(tmp_path) == before


def test_manager_restore_latest_does_not_pass_over_a_mismatch(tmp_path):
    manager = checkpoint.CheckpointManager(tmp_path)
    manager.save(make_state(1), step_or_epoch=1)
    manager.save(make_state(2, n_hidden=5), step_or_epoch=2)  # another network
    with pytest.raises(ValueError, match=r"ckpt_000002: shape mismatch"):
        manager.restore_latest(make_state(0))
    assert manager.all_steps() == [1, 2]


# --------------------------------------------------------------------------------------------
# The former .npz format, written by bpjax until orbax (tests/data/legacy_npz was written by its
# last version, commit a5ef1e7: `checkpoint.save(path, make_state(1, kind), metadata=...)`, the
# special leaves below, and a 2-epoch `fit` of the configuration of tests/test_trainer.py).


@pytest.mark.parametrize("key_kind", list(KEYS))
def test_npz_checkpoints_still_restore(key_kind, optimized_compiler):
    path = DATA / f"state_{key_kind}_key.npz"
    restored, metadata = checkpoint.restore(path, make_state(0, key_kind))
    assert_bit_identical(restored, make_state(1, key_kind))
    assert metadata["epoch"] == 3
    assert checkpoint.load_metadata(path) == metadata
    if key_kind == "typed":
        assert math.isnan(metadata["metrics"]["loss"])  # written as a bare NaN back then
    with pytest.raises(ValueError, match=re.escape("shape mismatch at leaf .params[0]['b']")):
        checkpoint.restore(path, make_state(0, key_kind, n_hidden=5))


def test_npz_special_leaves_still_restore():
    tree = {
        "bf16": jnp.asarray([1.5, -2.25, jnp.inf], jnp.bfloat16),
        "numpy": np.arange(6, dtype=np.int16).reshape(2, 3),
        "python": 7,
        "typed_keys": jax.random.split(jax.random.key(0, impl="rbg"), 3),
    }
    restored, _ = checkpoint.restore(DATA / "special_leaves.npz", tree)
    assert restored["python"] == 7 and isinstance(restored["numpy"], np.ndarray)
    tree.pop("python"), restored.pop("python")
    assert_bit_identical(restored, tree)


def test_a_run_checkpointed_as_npz_resumes_as_from_the_same_state_saved_now(
    tmp_path, optimized_compiler
):
    # The .npz files hold a state trained on another CPU (XLA's CPU code differs between AVX2
    # and AVX-512, and so can the last bits), so this CPU's own uninterrupted run is not the
    # reference: the same numbers saved in today's format are. Resuming from either must give
    # the same run, bit for bit; both are close to this CPU's uninterrupted run.
    import bpjax
    from bpjax import losses
    from bpjax.data import load
    from bpjax.trainer import fit

    directory = shutil.copytree(DATA / "fit_run", tmp_path / "run")
    net, loss = bpjax.mlp([32, 10], activation="tanh"), losses.softmax_cross_entropy()
    data, optimizer = load("digits", limit_train=200), optax.adam(0.1)
    options = {"batch_size": 25, "eval_batch_size": 512, "config": {"note": "legacy"}}
    manager = checkpoint.CheckpointManager(directory, keep=2, metric="monitor")
    assert manager.all_steps() == [1, 2] and manager.latest() == directory / "ckpt_000002.npz"

    # The same checkpoints in today's format: the .npz states and metadata, saved again.
    converted = tmp_path / "converted"
    here = fit(net, loss, optimizer, data, epochs=2, checkpoint_dir=str(converted),
               keep_checkpoints=2, **options)  # fmt: skip
    saver = checkpoint.CheckpointManager(converted, keep=2, metric="monitor")
    for epoch in (1, 2):
        state, metadata = checkpoint.restore(directory / f"ckpt_{epoch:06d}.npz", here.state)
        saver.save(
            state, step_or_epoch=epoch, **{k: metadata[k] for k in ("metrics", "config", "run")}
        )
    assert_close(state, here.state)  # the stored run is this configuration's

    resumed = fit(net, loss, optimizer, data, epochs=4, checkpoint_dir=str(directory),
                  resume=True, keep_checkpoints=2, **options)  # fmt: skip
    reference = fit(net, loss, optimizer, data, epochs=4, checkpoint_dir=str(converted),
                    resume=True, keep_checkpoints=2, **options)  # fmt: skip
    whole = fit(net, loss, optimizer, data, epochs=4, **options)

    assert [r["epoch"] for r in resumed.history] == [3, 4]
    assert_bit_identical(resumed.state, reference.state)
    assert_bit_identical(resumed.best_params, reference.best_params)
    assert resumed.metrics == {**reference.metrics, **{
        k: resumed.metrics[k] for k in ("wall_seconds", "train_seconds", "examples_per_second")
    }}  # fmt: skip
    assert_close(resumed.state, whole.state)
    # It goes on in the new format; the .npz files are left as they were.
    assert sorted(p.name for p in directory.iterdir()) == [
        "ckpt_000001.npz", "ckpt_000002.npz", "ckpt_000003", "ckpt_000004"
    ]  # fmt: skip
    for name in ("ckpt_000001.npz", "ckpt_000002.npz"):
        assert (directory / name).read_bytes() == (DATA / "fit_run" / name).read_bytes()


def assert_close(actual, expected, rtol=0.05, atol=0.01) -> None:
    """Same structure; float leaves close (last-bit differences grow over Adam's steps at a
    learning rate of 0.1: up to 2e-3 after 16 steps between an AVX2 and an AVX-512 CPU;
    another configuration's state differs by tenths), others exactly."""
    assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected)
    for a, e in zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected)):
        if jax.dtypes.issubdtype(e.dtype, jax.dtypes.prng_key):
            a, e = jax.random.key_data(a), jax.random.key_data(e)
        a, e = np.asarray(a), np.asarray(e)
        if a.dtype.kind == "f":
            np.testing.assert_allclose(a, e, rtol=rtol, atol=atol)
        else:
            np.testing.assert_array_equal(a, e)


# --------------------------------------------------------------------------------------------
# Several processes: two real ones on 127.0.0.1, one CPU device each, one global mesh.

_WORKER = """
import json, sys
import jax
import numpy as np

port, process_id, directory = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
    initialization_timeout=60, heartbeat_timeout_seconds=10, shutdown_timeout_seconds=10,
)
from jax.sharding import NamedSharding, PartitionSpec as P
from bpjax import checkpoint

mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
replicated, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

def state(step):
    w = np.arange(12, dtype=np.float32).reshape(4, 3) + step  # each process holds 2 rows
    b = np.full(3, step, np.float32)
    key_data = np.asarray(jax.random.key_data(jax.random.key(step)))
    return {
        "w": jax.make_array_from_callback(w.shape, rows, lambda index: w[index]),
        "b": jax.make_array_from_callback((3,), replicated, lambda index: b[index]),
        "key": jax.random.wrap_key_data(
            jax.make_array_from_callback((2,), replicated, lambda index: key_data[index])
        ),
        "step": step,
    }

manager = checkpoint.CheckpointManager(directory, keep=1, metric="loss")
for step, loss in ((1, 0.1), (2, 0.5), (3, 0.7)):
    manager.save(state(step), step_or_epoch=step, metrics={"loss": loss}, run={"processes": 2})
latest, metadata = manager.restore_latest(state(0))
best, best_metadata = manager.restore_best(state(0))
print("RESULT " + json.dumps({
    "steps": manager.all_steps(),
    "latest": metadata["step"], "best": best_metadata["step"],
    "w_sharded": latest["w"].sharding == rows,
    "b_replicated": latest["b"].sharding == replicated and best["b"].sharding == replicated,
    "w_here": [np.asarray(s.data).tolist() for s in latest["w"].addressable_shards],
    "best_b_here": [np.asarray(s.data).tolist() for s in best["b"].addressable_shards],
    "key_data_here": [np.asarray(s.data).tolist()
                      for s in jax.random.key_data(latest["key"]).addressable_shards],
    "step": latest["step"],
}), flush=True)
jax.distributed.shutdown()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def processes(commands: list[list[str]], **popen: Any):
    """Starts one process per command (text output, piped unless ``popen`` says otherwise) and
    kills, on the way out, every one still running: none outlives its test."""
    options = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **popen}
    procs = []
    try:
        for command in commands:
            procs.append(subprocess.Popen(command, **options))
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


@pytest.mark.slow
def test_two_processes_save_and_restore_together(tmp_path):
    port, directory = _free_port(), tmp_path / "ckpts"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags()}  # one device each
    commands = [[sys.executable, "-c", _WORKER, str(port), str(i), str(directory)] for i in (0, 1)]
    with processes(commands, env=env) as procs:
        outputs = [proc.communicate(timeout=180) for proc in procs]
    results = []
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.split("RESULT ", 1)[1]))
    key_data = np.asarray(jax.random.key_data(jax.random.key(3))).tolist()
    w = (np.arange(12.0).reshape(4, 3) + 3).tolist()
    for i, result in enumerate(results):
        assert result["steps"] == [1, 3]  # the last one and the best
        assert result["latest"] == 3 and result["best"] == 1 and result["step"] == 3
        assert result["w_sharded"] and result["b_replicated"]
        assert result["w_here"] == [w[2 * i : 2 * i + 2]]  # each process its own rows
        assert result["best_b_here"] == [[1.0, 1.0, 1.0]]
        assert result["key_data_here"] == [key_data]
    # Each process wrote its own shards; the metadata was written once.
    arrays = directory / "ckpt_000003" / "arrays"
    assert {p.name for p in arrays.glob("ocdbt.process_*")} == {
        "ocdbt.process_0",
        "ocdbt.process_1",
    }
    assert checkpoint.load_metadata(directory / "ckpt_000003")["run"] == {"processes": 2}
    restored, _ = checkpoint.restore(
        directory / "ckpt_000003", {"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32),
                                    "key": jax.random.key(0), "step": 0}
    )  # fmt: skip
    np.testing.assert_array_equal(restored["w"], w)  # one process reads what two wrote


# --------------------------------------------------------------------------------------------
# Import time: orbax is imported on first use, not with bpjax.


def test_importing_bpjax_does_not_import_orbax():
    code = (
        "import sys, bpjax, bpjax.trainer, bpjax.checkpoint\n"
        "bpjax.checkpoint.CheckpointManager('unused').latest()\n"
        "assert 'orbax.checkpoint' not in sys.modules, 'orbax imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_orbax_logs_no_info_lines(tmp_path, caplog):
    # Under Hydra the root logger shows INFO: orbax logged ~40 lines per save to the console.
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.INFO, logger="absl")
    manager = checkpoint.CheckpointManager(tmp_path)
    manager.save(make_state(1), step_or_epoch=1)
    manager.restore_latest(make_state(0))
    assert not [r.getMessage() for r in caplog.records if "orbax" in r.pathname]
    logging.getLogger("absl").info("another absl user")  # is not silenced
    assert caplog.records[-1].getMessage() == "another absl user"


# --------------------------------------------------------------------------------------------
# bpjax._atomic: the write underneath dataset caches and run metrics (metrics.json)


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


def test_atomic_write_text_writes_utf8(tmp_path):
    path = _atomic.atomic_write_text(tmp_path / "table.md", "| angle (°) |\n")
    assert path.read_bytes() == "| angle (°) |\n".encode()
    assert [p.name for p in tmp_path.iterdir()] == ["table.md"]


# Files a run only reads back for debugging (HLO dumps) or that are not records (the shared
# directory check's marker); everything else is a record and is written atomically.
_NOT_RECORDS = {"experiments/bench/steps.py", "experiments/readme_step_probe.py"}
_MARKER = "marker.write_text(token)"


def test_every_record_is_written_atomically():
    """The kind of fault "a record written in place": a script killed mid-write left a
    truncated gradcheck.json, summary.csv or benchmark.json. No module writes a file in place
    but through ``bpjax._atomic`` (or orbax, for checkpoints)."""
    root = pathlib.Path(__file__).resolve().parents[1]
    in_place = re.compile(r"\.write_(text|bytes)\(|open\([^)]*[\"'][wax]b?[\"']|\.savefig\(")
    found = []
    for path in sorted([*(root / "bpjax").rglob("*.py"), *(root / "experiments").rglob("*.py")]):
        name = str(path.relative_to(root))
        if name in _NOT_RECORDS or name == "bpjax/_atomic.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if in_place.search(line) and _MARKER not in line and "atomic_write" not in line:
                found.append(f"{name}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


def test_relative_and_home_paths_are_made_absolute_once(tmp_path, monkeypatch):
    """orbax refuses relative paths: a relative or ``~`` path is resolved where bpjax receives
    it (``~`` expanded, then absolute against the current directory of that call)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    manager = checkpoint.CheckpointManager("runs/ck", keep=2)
    assert manager.directory == tmp_path / "cwd" / "runs" / "ck"
    manager.save(make_state(1), step_or_epoch=1)
    assert manager.all_steps() == [1]
    monkeypatch.chdir(tmp_path)  # resolved once: a later chdir moves nothing
    manager.save(make_state(2), step_or_epoch=2)
    assert files(tmp_path / "cwd" / "runs" / "ck") == files(manager.directory)
    assert_bit_identical(manager.restore_latest(make_state(0))[0], make_state(2))
    assert not (tmp_path / "runs").exists()

    home = checkpoint.CheckpointManager("~/ck")
    assert home.directory == tmp_path / "home" / "ck"
    home.save(make_state(3), step_or_epoch=3)
    assert home.all_steps() == [3] and not (tmp_path / "~").exists()

    path = checkpoint.save("one", make_state(4), metadata={"epoch": 4})  # relative, from cwd
    assert path == tmp_path / "one"
    assert checkpoint.load_metadata("one") == {"epoch": 4}
    assert_bit_identical(checkpoint.restore("one", make_state(0))[0], make_state(4))
    assert checkpoint.save("~/two", make_state(5)) == tmp_path / "home" / "two"
    assert_bit_identical(checkpoint.restore("~/two", make_state(0))[0], make_state(5))
