"""Atomic checkpoints of a training-state pytree, plus JSON metadata.

Convention: a checkpoint is ONE ``.npz`` file. Its leaves, in ``jax.tree_util`` flattening order,
are stored as ``leaf_00000``, ``leaf_00001``, ... and an entry ``__meta__`` holds UTF-8 JSON::

    {"format": "bpjax.checkpoint", "version": 1,
     "treedef": "PyTreeDef(...)",                      # str() of the saved tree's treedef
     "leaves": [{"path": ".params[0]['w']", "dtype": "float32", "shape": [3, 4]}, ...],
     "metadata": {...}}                                # the caller's metadata (epoch, config, ...)

Typed PRNG keys (``jax.random.key``) are stored as their ``jax.random.key_data`` and re-wrapped
on restore (their leaf record also has ``"key_impl"``); raw ``uint32`` keys
(``jax.random.PRNGKey``) are ordinary arrays. Dtypes numpy cannot serialize natively (e.g.
``bfloat16``) are stored as same-width unsigned integers and viewed back, so every restored
array is bit-identical to the saved one.

A file is written to a temporary name in the destination directory, flushed and fsync'ed, then
``os.replace``'d onto its final name (and the directory fsync'ed), so a crash never leaves a
truncated file under the final name. ``restore`` loads into the structure of a template pytree
(e.g. a freshly initialized state or ``jax.eval_shape`` of one) and refuses, naming the leaf,
any checkpoint whose structure, shapes or dtypes differ.

``CheckpointManager`` keeps ``ckpt_{step:06d}.npz`` files in one directory: the last ``keep``
plus the best one by a chosen metric. Which one is best is read back from the files'
metadata, so a new manager on an existing directory picks up where the old one left off.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import re
import sys
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from typing import IO, Any, Literal

import jax
import numpy as np

from bpjax._atomic import atomic_write

__all__ = ["CheckpointManager", "load_metadata", "restore", "save"]

FORMAT = "bpjax.checkpoint"
VERSION = 1
_META_KEY = "__meta__"
_LEAF_KEY = "leaf_{:05d}"

PathLike = str | os.PathLike


# ----------------------------------------------------------------------------------------------
# JSON conversion of user metadata
# ----------------------------------------------------------------------------------------------


def _to_json(x: Any) -> Any:
    """Converts metadata to JSON-able Python (numpy/jax scalars -> float/int/bool, etc.)."""
    if x is None or isinstance(x, bool | int | float | str):
        return x
    omegaconf = sys.modules.get("omegaconf")  # only if the caller uses it: no import here
    if omegaconf is not None and isinstance(x, omegaconf.DictConfig | omegaconf.ListConfig):
        return _to_json(omegaconf.OmegaConf.to_container(x, resolve=True))
    if isinstance(x, Mapping):
        return {_json_key(k): _to_json(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_to_json(v) for v in x]
    if isinstance(x, np.generic | np.ndarray | jax.Array):
        return _to_json(np.asarray(x).tolist())
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    raise TypeError(f"checkpoint metadata: cannot serialize {type(x).__name__} to JSON: {x!r}")


def _json_key(k: Any) -> str:
    if isinstance(k, str):
        return k
    if isinstance(k, bool | int | float | np.generic) or k is None:
        return str(_to_json(k))
    raise TypeError(f"checkpoint metadata: dict key {k!r} is not a str/number")


# ----------------------------------------------------------------------------------------------
# Leaves <-> numpy arrays
# ----------------------------------------------------------------------------------------------


def _is_typed_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _leaf_record(path: str, x: Any) -> tuple[dict[str, Any], np.ndarray]:
    """Returns (the JSON record of a leaf, the numpy array to store for it)."""
    if _is_typed_key(x):
        record = {
            "path": path,
            "dtype": str(x.dtype),
            "shape": list(x.shape),
            "key_impl": str(jax.random.key_impl(x)),
        }
        return record, np.asarray(jax.random.key_data(x))
    arr = np.asarray(x)
    record = {"path": path, "dtype": str(arr.dtype), "shape": list(arr.shape)}
    if arr.dtype.kind == "V":
        # Extension dtypes (ml_dtypes' bfloat16, float8, ...) do not survive np.load: store bits.
        arr = arr.view(np.dtype(f"u{arr.dtype.itemsize}"))
    return record, arr


def _template_record(x: Any) -> tuple[str, tuple[int, ...]]:
    """Returns (dtype string, shape) of a template leaf, as ``_leaf_record`` would write them."""
    if _is_typed_key(x) or isinstance(x, jax.ShapeDtypeStruct | jax.Array | np.ndarray):
        return str(x.dtype), tuple(x.shape)
    arr = np.asarray(x)
    return str(arr.dtype), tuple(arr.shape)


def _from_stored(stored: np.ndarray, record: dict[str, Any], like: Any) -> Any:
    """Rebuilds a leaf of the same kind as ``like`` from its stored array."""
    if "key_impl" in record:
        return jax.random.wrap_key_data(stored, impl=record["key_impl"])
    like_dtype = np.dtype(like.dtype) if hasattr(like, "dtype") else np.asarray(like).dtype
    arr = stored if stored.dtype == like_dtype else stored.view(like_dtype)
    if isinstance(like, np.ndarray | np.generic):
        return arr if isinstance(like, np.ndarray) else arr[()]
    if isinstance(like, bool | int | float | complex):
        return type(like)(arr.item())
    if isinstance(like, jax.Array):
        return jax.device_put(arr, like.sharding)
    return jax.device_put(arr)


# ----------------------------------------------------------------------------------------------
# Atomic file writing
# ----------------------------------------------------------------------------------------------


def _write_npz(file: IO[bytes], arrays: dict[str, np.ndarray]) -> None:
    """Writes ``arrays`` as an uncompressed ``.npz`` into an open binary file."""
    np.savez(file, **arrays)


def _atomic_write_npz(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
    """Writes ``arrays`` to ``path`` atomically (see ``bpjax._atomic``)."""
    atomic_write(path, lambda file: _write_npz(file, arrays))


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------


def save(path: PathLike, tree: Any, *, metadata: Mapping[str, Any] | None = None) -> pathlib.Path:
    """Atomically saves a pytree of arrays, and JSON metadata, to one ``.npz`` file.

    Args:
        path: destination file, used verbatim (no suffix is added); its directory must exist.
            An existing file is replaced atomically.
        tree: a pytree whose leaves are arrays, numpy/Python scalars, or PRNG keys (raw or typed).
        metadata: JSON-able mapping (epoch, config, metrics, ...); numpy/jax scalars and arrays,
            tuples, paths and OmegaConf containers are converted.

    Returns:
        The path written.
    """
    path = pathlib.Path(path)
    user_metadata = _to_json(dict(metadata or {}))
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
    records, arrays = [], {}
    for i, (key_path, leaf) in enumerate(leaves_with_path):
        record, arr = _leaf_record(jax.tree_util.keystr(key_path), leaf)
        records.append(record)
        arrays[_LEAF_KEY.format(i)] = arr
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "treedef": str(treedef),
        "leaves": records,
        "metadata": user_metadata,
    }
    meta_bytes = json.dumps(meta, allow_nan=True).encode("utf-8")
    arrays[_META_KEY] = np.frombuffer(meta_bytes, dtype=np.uint8)
    _atomic_write_npz(path, arrays)
    return path


@contextlib.contextmanager
def _reading(path: pathlib.Path) -> Iterator[Any]:
    """``np.load(path)``, with a damaged file (truncated, not a zip, an entry missing) reported
    as a ValueError that names it, as every other unusable checkpoint is."""
    try:
        # Our own file object: np.load leaks the one it opens when the zip is damaged.
        with open(path, "rb") as file, np.load(file, allow_pickle=False) as npz:
            yield npz
    except (zipfile.BadZipFile, EOFError, zlib.error, KeyError) as e:
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from e
    except ValueError as e:
        if str(e).startswith(f"{path}:"):
            raise
        raise ValueError(f"{path}: not a readable checkpoint ({e})") from e


def _read_meta(npz: Any, path: pathlib.Path) -> dict[str, Any]:
    if _META_KEY not in npz.files:
        raise ValueError(f"{path}: not a bpjax checkpoint (no {_META_KEY!r} entry)")
    meta = json.loads(npz[_META_KEY].tobytes().decode("utf-8"))
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(
            f"{path}: unsupported checkpoint format {meta.get('format')!r} "
            f"version {meta.get('version')!r} (expected {FORMAT!r} version {VERSION})"
        )
    return meta


def load_metadata(path: PathLike) -> dict[str, Any]:
    """Reads only the user metadata of a checkpoint (no arrays are loaded).

    Args:
        path: a file written by ``save``.

    Returns:
        The ``metadata`` mapping given to ``save``, as parsed from JSON.
    """
    path = pathlib.Path(path)
    with _reading(path) as npz:
        return _read_meta(npz, path)["metadata"]


def restore(path: PathLike, like: Any) -> tuple[Any, dict[str, Any]]:
    """Loads a checkpoint into the structure of a template pytree.

    Args:
        path: a file written by ``save``.
        like: template pytree with the expected structure, shapes and dtypes, e.g. a freshly
            initialized state or ``jax.eval_shape`` of its initializer. Its values are unused.

    Returns:
        ``(tree, metadata)``: a pytree with the structure of ``like`` holding the saved values
        bit for bit, and the metadata given to ``save``. Leaves come back as the kind of their
        template leaf: jax arrays (on the template's sharding) for jax arrays and
        ``ShapeDtypeStruct``s, numpy arrays for numpy arrays, Python scalars for Python scalars,
        typed keys for typed keys.

    Raises:
        ValueError: if the file is not a readable bpjax checkpoint (e.g. truncated by a copy),
            or its tree structure, a leaf's shape or a leaf's dtype differs from ``like`` (the
            message names the file and the first mismatching leaf path).
    """
    path = pathlib.Path(path)
    like_leaves, like_treedef = jax.tree_util.tree_flatten_with_path(like)
    like_paths = [jax.tree_util.keystr(p) for p, _ in like_leaves]
    with _reading(path) as npz:
        meta = _read_meta(npz, path)
        records = meta["leaves"]
        saved_paths = [r["path"] for r in records]
        if saved_paths != like_paths:
            n = min(len(saved_paths), len(like_paths))
            i = next((i for i in range(n) if saved_paths[i] != like_paths[i]), n)
            saved = saved_paths[i] if i < len(saved_paths) else "<none>"
            wanted = like_paths[i] if i < len(like_paths) else "<none>"
            raise ValueError(
                f"{path}: tree structure mismatch at leaf #{i}: checkpoint has {saved}, "
                f"template has {wanted} ({len(saved_paths)} vs {len(like_paths)} leaves)"
            )
        if meta["treedef"] != str(like_treedef):
            raise ValueError(
                f"{path}: tree structure mismatch (same leaf paths, different node types):\n"
                f"  checkpoint: {meta['treedef']}\n  template:   {like_treedef}"
            )
        out = []
        for i, (record, (_, like_leaf)) in enumerate(zip(records, like_leaves, strict=True)):
            dtype, shape = _template_record(like_leaf)
            if tuple(record["shape"]) != shape:
                raise ValueError(
                    f"{path}: shape mismatch at leaf {record['path']}: checkpoint has "
                    f"{tuple(record['shape'])}, template has {shape}"
                )
            if record["dtype"] != dtype:
                raise ValueError(
                    f"{path}: dtype mismatch at leaf {record['path']}: checkpoint has "
                    f"{record['dtype']}, template has {dtype}"
                )
            out.append(_from_stored(npz[_LEAF_KEY.format(i)], record, like_leaf))
    return jax.tree_util.tree_unflatten(like_treedef, out), meta["metadata"]


# ----------------------------------------------------------------------------------------------
# Manager
# ----------------------------------------------------------------------------------------------


class CheckpointManager:
    """Keeps the last ``keep`` checkpoints of a run in one directory, plus the best one.

    Files are named ``ckpt_{step:06d}.npz`` and carry the metadata
    ``{"step": int, "metrics": {...}, "config": {...}}``, and ``"run": {...}`` if given. The
    best checkpoint is the one with the smallest (``mode="min"``) or largest (``mode="max"``)
    finite ``metrics[metric]``, the earliest on ties; it is never deleted while it is best, and
    is found again from the files' metadata when a new manager opens the directory. A file that
    cannot be read is never ranked best. One process should write to a directory at a time.

    Args:
        directory: where checkpoints live; created by the first ``save`` (opening a manager
            to look, e.g. ``all_steps()`` or ``latest()``, creates nothing).
        keep: how many of the most recent checkpoints to keep (>= 1).
        metric: key of ``metrics`` that ranks checkpoints, or None to keep only the recent ones.
        mode: ``"min"`` if lower ``metric`` is better, ``"max"`` if higher is better.
    """

    _PATTERN = re.compile(r"ckpt_(\d+)\.npz")

    def __init__(
        self,
        directory: PathLike,
        *,
        keep: int = 3,
        metric: str | None = None,
        mode: Literal["min", "max"] = "min",
    ) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.directory = pathlib.Path(directory)
        self.keep = keep
        self.metric = metric
        self.mode = mode

    def path_for(self, step: int) -> pathlib.Path:
        """The file name used for ``step``."""
        return self.directory / f"ckpt_{step:06d}.npz"

    def all_steps(self) -> list[int]:
        """Steps (or epochs) of the checkpoints present, ascending."""
        steps = []
        if not self.directory.is_dir():
            return steps
        for entry in self.directory.iterdir():
            match = self._PATTERN.fullmatch(entry.name)
            if match and entry.is_file():
                steps.append(int(match.group(1)))
        return sorted(steps)

    def save(
        self,
        tree: Any,
        *,
        step_or_epoch: int,
        metrics: Mapping[str, Any] | None = None,
        config: Mapping[str, Any] | None = None,
        run: Mapping[str, Any] | None = None,
    ) -> pathlib.Path:
        """Atomically writes a checkpoint, then deletes those no longer kept.

        Args:
            tree: the pytree to save (e.g. a ``TrainState``).
            step_or_epoch: number identifying the checkpoint; a checkpoint with the same
                number is replaced.
            metrics: scalars to store (numpy/jax scalars become Python floats); ``metric``
                is looked up here.
            config: the run's configuration, e.g. ``OmegaConf.to_container(cfg, resolve=True)``.
            run: what identifies the run, for a resume to check that it continues the same one
                (``fit`` stores its seed, batch size, monitor, loss and dataset); stored as
                ``metadata["run"]`` when given.

        Returns:
            The path of the new checkpoint.
        """
        step = int(step_or_epoch)
        if step < 0:
            raise ValueError(f"step_or_epoch must be >= 0, got {step}")
        metadata = {
            "step": step,
            "metrics": {str(k): _scalar(v) for k, v in (metrics or {}).items()},
            "config": dict(config or {}),
        }
        if run is not None:
            metadata["run"] = dict(run)
        self.directory.mkdir(parents=True, exist_ok=True)
        path = save(self.path_for(step), tree, metadata=metadata)
        self._prune()
        return path

    def _prune(self) -> None:
        steps = self.all_steps()
        kept = set(steps[-self.keep :])
        best = self._best_step()
        if best is not None:
            kept.add(best)
        for step in steps:
            if step not in kept:
                self.path_for(step).unlink(missing_ok=True)

    def _best_step(self) -> int | None:
        if self.metric is None:
            return None
        best_step, best_value = None, math.nan
        for step in self.all_steps():
            try:
                value = load_metadata(self.path_for(step)).get("metrics", {}).get(self.metric)
            except (OSError, ValueError):
                continue
            if not isinstance(value, int | float) or not math.isfinite(value):
                continue
            better = value < best_value if self.mode == "min" else value > best_value
            if best_step is None or better:
                best_step, best_value = step, value
        return best_step

    def latest(self) -> pathlib.Path | None:
        """Path of the checkpoint with the highest step, or None if there is none."""
        steps = self.all_steps()
        return self.path_for(steps[-1]) if steps else None

    def best(self) -> pathlib.Path | None:
        """Path of the best checkpoint by ``metric``, or None (no metric, or no finite value)."""
        step = self._best_step()
        return None if step is None else self.path_for(step)

    def restore_latest(self, like: Any) -> tuple[Any, dict[str, Any]]:
        """``restore`` of ``latest()``; raises FileNotFoundError if there is no checkpoint."""
        path = self.latest()
        if path is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return restore(path, like)

    def restore_best(self, like: Any) -> tuple[Any, dict[str, Any]]:
        """``restore`` of ``best()``; raises FileNotFoundError if there is no best checkpoint."""
        path = self.best()
        if path is None:
            raise FileNotFoundError(
                f"no best checkpoint (metric={self.metric!r}) in {self.directory}"
            )
        return restore(path, like)


def _scalar(value: Any) -> Any:
    """A metric as a Python number (floats for numpy/jax scalars); other values pass through."""
    if isinstance(value, bool | int | float):
        return value
    if isinstance(value, np.generic | np.ndarray | jax.Array) and np.ndim(value) == 0:
        arr = np.asarray(value)
        return bool(arr) if arr.dtype == np.bool_ else float(arr)
    return value
