"""One checkpoint: a directory written by orbax-checkpoint (see the package docstring for its
layout), or a file of the former ``.npz`` format, which is still read."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from bpjax._errors import first_line
from bpjax.checkpoint import _legacy
from bpjax.checkpoint._orbax import (
    ARRAYS,
    META,
    META_FILE,
    ignore_reads_left_pending,
    item_handlers,
    ocp,
    replace,
)
from bpjax.checkpoint._records import (
    FORMAT,
    PathLike,
    UnreadableCheckpoint,
    _to_json,
    absolute,
    as_template_kind,
    check_against,
    decode,
    encode,
    is_typed_key,
    leaf_record,
    records_of,
)

VERSION = 2
_LEAF_KEY = "leaf_{:05d}"


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def _stored(path: str, x: Any) -> Any:
    """What orbax stores for a leaf: a typed key's key data, a jax array as it is (sharded
    across processes, each writes its own shards), anything else as a numpy array."""
    if is_typed_key(x):
        return jax.random.key_data(x)
    arr = x if isinstance(x, jax.Array) else np.asarray(x)
    if arr.dtype.kind not in "biufcV":  # V: ml_dtypes' bfloat16, float8, ...
        raise TypeError(f"checkpoint leaf {path}: cannot store an array of dtype {arr.dtype}")
    return arr


def save_args(tree: Any, metadata: Mapping[str, Any] | None) -> Any:
    """orbax's ``Composite`` save arguments for a checkpoint of ``tree`` and ``metadata``.

    Raises:
        TypeError: metadata without a JSON form, or a leaf that is not numeric (names it);
            raised before anything is written.
    """
    user_metadata = _to_json(dict(metadata or {}))
    leaves, treedef = records_of(tree)
    arrays = {}
    for i, (path, leaf) in enumerate(leaves):
        stored = _stored(path, leaf)
        if stored.size:  # orbax refuses empty arrays; the record alone rebuilds them
            arrays[_LEAF_KEY.format(i)] = stored
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "treedef": str(treedef),
        "leaves": [leaf_record(path, leaf) for path, leaf in leaves],
        "metadata": user_metadata,
    }
    meta = encode(meta)
    json.dumps(meta, allow_nan=False)  # strict JSON, checked before anything is written
    items = {META: ocp().args.JsonSave(meta)}
    if arrays:  # orbax refuses an empty tree
        items[ARRAYS] = ocp().args.PyTreeSave(arrays)
    return ocp().args.Composite(**items)


def save(path: PathLike, tree: Any, *, metadata: Mapping[str, Any] | None = None) -> pathlib.Path:
    """Atomically saves a pytree of arrays, and JSON metadata, as one checkpoint directory.

    Args:
        path: the checkpoint directory to create; its parent is created if needed. An existing
            checkpoint there is replaced: it is renamed aside, the new one written, and only
            then the old one deleted (a failed save puts it back). A KeyboardInterrupt during
            the save is raised once the save is complete.
        tree: a pytree whose leaves are arrays (jax arrays may be sharded, across processes
            too), numpy/Python scalars, or PRNG keys (raw or typed).
        metadata: JSON-able mapping (epoch, config, metrics, ...); numpy/jax scalars and arrays,
            tuples, paths and OmegaConf containers are converted; NaN and infinities are kept.

    Returns:
        The path written.

    Raises:
        TypeError: metadata without a JSON form, or a non-numeric leaf (nothing is written).
        ValueError: a ``.npz`` path (that is the former single-file format, no longer written).
    """
    path = absolute(path)
    if path.suffix == ".npz":
        raise ValueError(
            f"{path}: checkpoints are directories now (orbax); .npz files are only read. "
            f"Save to a name without .npz"
        )
    args = save_args(tree, metadata)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write() -> None:
        checkpointer = ocp().Checkpointer(ocp().CompositeCheckpointHandler(**item_handlers()))
        try:
            checkpointer.save(path, args=args)
        finally:
            checkpointer.close()

    replace(path, path if path.exists() else None, write)
    return path


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def read_meta(path: pathlib.Path) -> dict[str, Any]:
    """The JSON record of a checkpoint directory (no arrays are read)."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    file = path / META / META_FILE
    try:
        meta = decode(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        reason = "not a bpjax checkpoint" if not path.is_dir() else f"no {META}/{META_FILE}"
        raise UnreadableCheckpoint(path, reason) from None
    except (OSError, ValueError) as e:  # ValueError: bad UTF-8, bad JSON
        raise UnreadableCheckpoint(path, f"damaged {META}/{META_FILE}: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UnreadableCheckpoint(path, f"{META}/{META_FILE} is not a bpjax checkpoint record")
    if meta.get("version") != VERSION:
        raise ValueError(
            f"{path}: unsupported checkpoint format {meta.get('format')!r} "
            f"version {meta.get('version')!r} (expected {FORMAT!r} version {VERSION}; "
            f"a newer bpjax wrote it?)"
        )
    return meta


def load_metadata(path: PathLike) -> dict[str, Any]:
    """Reads only the caller's metadata of a checkpoint (no arrays are read).

    Args:
        path: a checkpoint directory written by ``save`` or ``CheckpointManager.save``, or a
            ``.npz`` file of the former format.

    Returns:
        The ``metadata`` mapping given to ``save``, as parsed from JSON (NaN and infinities
        come back as floats).

    Raises:
        FileNotFoundError: nothing at ``path``.
        UnreadableCheckpoint: a damaged checkpoint, or not a bpjax checkpoint (a ValueError).
        ValueError: a checkpoint format version this bpjax does not know.
    """
    path = absolute(path)
    if path.is_file():
        return _legacy.load_metadata(path)
    return read_meta(path)["metadata"]


def _default_sharding() -> jax.sharding.Sharding:
    """Where a leaf goes whose template names no sharding: the first device in one process,
    replicated over every device of every process in several."""
    if jax.process_count() > 1:
        mesh = jax.sharding.Mesh(np.array(jax.devices()), ("devices",))
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _is_jax_leaf(like: Any) -> bool:
    return is_typed_key(like) or isinstance(like, jax.Array | jax.ShapeDtypeStruct)


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {first_line(e, 300)}"


def restore(path: PathLike, like: Any) -> tuple[Any, dict[str, Any]]:
    """Loads a checkpoint into the structure of a template pytree.

    Args:
        path: a checkpoint directory written by ``save`` or ``CheckpointManager.save``, or a
            ``.npz`` file of the former format.
        like: template pytree with the expected structure, shapes and dtypes, e.g. a freshly
            initialized state or ``jax.eval_shape`` of its initializer. Its values are unused;
            its jax arrays' (or ``ShapeDtypeStruct``s') shardings say where each leaf goes
            (orbax reads each device's shard straight onto it); without one, the first device
            (several processes: replicated over all devices).

    Returns:
        ``(tree, metadata)``: a pytree with the structure of ``like`` holding the saved values
        bit for bit, and the metadata given to ``save``. Leaves come back as the kind of their
        template leaf: jax arrays for jax arrays and ``ShapeDtypeStruct``s, numpy arrays for
        numpy arrays, Python scalars for Python scalars, typed keys for typed keys.

    Raises:
        FileNotFoundError: nothing at ``path``.
        UnreadableCheckpoint: missing or damaged files, or not a bpjax checkpoint (a
            ValueError naming ``path``; never an error from orbax's internals).
        ValueError: the tree structure, a leaf's shape or a leaf's dtype differs from ``like``
            (the message names the path and the first mismatching leaf), checked before any
            array is read; or an unknown format version.
    """
    path = absolute(path)
    if path.is_file():
        return _legacy.restore(path, like)
    meta = read_meta(path)
    records = meta["leaves"]
    like_leaves, like_treedef = check_against(path, records, meta["treedef"], like)
    target, restore_args, expected = {}, {}, {}
    for i, (record, like_leaf) in enumerate(zip(records, like_leaves, strict=True)):
        shape = tuple(record["shape"])
        if "key_impl" in record:
            stored = jax.eval_shape(jax.random.key_data, like_leaf)
            shape, dtype = tuple(stored.shape), np.dtype(stored.dtype)
        else:
            dtype = np.dtype(jax.numpy.dtype(record["dtype"]))
        if not np.prod(shape, dtype=int):
            continue
        key = _LEAF_KEY.format(i)
        expected[key] = (shape, dtype)
        if _is_jax_leaf(like_leaf):
            sharding = getattr(like_leaf, "sharding", None) or _default_sharding()
            target[key] = jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
            restore_args[key] = ocp().ArrayRestoreArgs(sharding=sharding, global_shape=shape)
        else:
            target[key] = jax.ShapeDtypeStruct(shape, dtype)
            restore_args[key] = ocp().RestoreArgs(restore_type=np.ndarray)
    arrays = {}
    if target:
        checkpointer = ocp().Checkpointer(ocp().CompositeCheckpointHandler(**item_handlers()))
        item = ocp().args.PyTreeRestore(item=target, restore_args=restore_args)
        failure = None
        # Before the restore, not after its failure: the pending reads can hit the closed
        # loop while orbax's exception is still on its way out.
        ignore_reads_left_pending()
        try:
            arrays = checkpointer.restore(path, args=ocp().args.Composite(**{ARRAYS: item}))
            arrays = dict(arrays[ARRAYS])
        except Exception as e:  # whatever orbax or tensorstore raise for damaged files
            # Only its first line is kept: its traceback holds orbax's frames, and with them
            # the reads still pending; freed now, most are cancelled rather than completed.
            failure = f"arrays: {_first_line(e)}"
        finally:
            checkpointer.close()
        if failure is not None:
            raise UnreadableCheckpoint(path, failure)
    out = []
    for i, (record, like_leaf) in enumerate(zip(records, like_leaves, strict=True)):
        key = _LEAF_KEY.format(i)
        if key in expected:
            arr = arrays.get(key)
            shape, dtype = expected[key]
            if arr is None or tuple(arr.shape) != shape or np.dtype(arr.dtype) != dtype:
                found = "missing" if arr is None else f"{arr.dtype}{list(arr.shape)}"
                recorded = f"{dtype}{list(shape)}"
                raise UnreadableCheckpoint(
                    path, f"leaf {record['path']}: stored as {found}, recorded as {recorded}"
                )
        else:  # no elements: orbax stored nothing, the record rebuilds it
            arr = _empty(record, like_leaf)
        if "key_impl" in record:
            leaf = jax.random.wrap_key_data(arr, impl=record["key_impl"])
        elif _is_jax_leaf(like_leaf):
            leaf = arr
        else:
            leaf = as_template_kind(np.asarray(arr), like_leaf)
        out.append(leaf)
    return jax.tree_util.tree_unflatten(like_treedef, out), meta["metadata"]


def _empty(record: dict[str, Any], like: Any) -> Any:
    """A leaf with no elements (orbax stores none), rebuilt from its record."""
    if "key_impl" in record:
        stored = jax.eval_shape(jax.random.key_data, like)
        arr = np.zeros(stored.shape, stored.dtype)
    else:
        arr = np.zeros(record["shape"], jax.numpy.dtype(record["dtype"]))
    if _is_jax_leaf(like):
        return jax.device_put(arr, getattr(like, "sharding", None) or _default_sharding())
    return arr
