"""What a checkpoint records besides its arrays, in either format: the caller's metadata as
strict JSON, one record per leaf (path, dtype, shape, PRNG key implementation), and the check of
those records against a template pytree. Nothing here imports orbax."""

from __future__ import annotations

import json
import math
import os
import pathlib
import sys
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

FORMAT = "bpjax.checkpoint"

PathLike = str | os.PathLike


def absolute(path: PathLike) -> pathlib.Path:
    """``path`` resolved once, where bpjax receives it: ``~`` expanded, then made absolute
    against the current directory of this call (orbax refuses relative paths, and a later
    ``chdir`` must not move a run's checkpoints)."""
    return pathlib.Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


class UnreadableCheckpoint(ValueError):
    """A checkpoint that cannot be read: missing or damaged files (a copy cut short, a disk
    that lost the last write), or a path that is not a bpjax checkpoint at all. The message
    names the path; ``.path`` holds it. A checkpoint that reads but does not fit a template
    (another network or optimizer) raises a plain ``ValueError`` instead."""

    def __init__(self, path: PathLike, reason: str, *, message: str | None = None):
        super().__init__(message or f"{path}: not a readable checkpoint ({reason})")
        self.path = pathlib.Path(path)


# ----------------------------------------------------------------------------------------------
# The caller's metadata as strict JSON
# ----------------------------------------------------------------------------------------------

# JSON has no NaN or infinity (a strict parser rejects Python's bare `NaN`), and metrics are
# often NaN (an epoch not evaluated): they are written as {"$float": "nan"} and read back.
_FLOAT_TAG = "$float"


def _to_json(x: Any) -> Any:
    """Converts metadata to JSON-able Python (numpy/jax scalars -> float/int/bool, etc.).

    Raises:
        TypeError: for a value (or a dict key) that has no JSON form, naming it.
    """
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


def _tag_nonfinite(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return {_FLOAT_TAG: repr(x)}  # 'nan', 'inf', '-inf': what float() reads back
    if isinstance(x, dict):
        return {k: _tag_nonfinite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_tag_nonfinite(v) for v in x]
    return x


# The same objects as json's own NaN/Infinity: two NaNs compare equal only if identical.
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _untag(obj: dict[str, Any]) -> Any:
    if len(obj) == 1 and obj.get(_FLOAT_TAG) in _NONFINITE:
        return _NONFINITE[obj[_FLOAT_TAG]]
    return obj


def encode(record: Mapping[str, Any]) -> Any:
    """A JSON-able record (e.g. from ``_to_json``) with non-finite floats tagged, so that
    ``json.dumps(..., allow_nan=False)`` accepts it."""
    return _tag_nonfinite(dict(record))


def decode(text: str) -> Any:
    """Parses what ``encode`` wrote (and plain JSON, NaN literals included, as the .npz format
    wrote them)."""
    return json.loads(text, object_hook=_untag)


# ----------------------------------------------------------------------------------------------
# Leaf records and the check against a template
# ----------------------------------------------------------------------------------------------


def is_typed_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def leaf_record(path: str, x: Any) -> dict[str, Any]:
    """The JSON record of a leaf: its path, dtype and shape (and a typed key's implementation)."""
    if is_typed_key(x):
        return {
            "path": path,
            "dtype": str(x.dtype),
            "shape": list(x.shape),
            "key_impl": str(jax.random.key_impl(x)),
        }
    dtype, shape = template_record(x)
    return {"path": path, "dtype": dtype, "shape": list(shape)}


def template_record(x: Any) -> tuple[str, tuple[int, ...]]:
    """(dtype string, shape) of a template leaf, as ``leaf_record`` writes them."""
    if is_typed_key(x) or isinstance(x, jax.ShapeDtypeStruct | jax.Array | np.ndarray):
        return str(x.dtype), tuple(x.shape)
    arr = np.asarray(x)
    return str(arr.dtype), tuple(arr.shape)


def records_of(tree: Any) -> tuple[list[tuple[str, Any]], Any]:
    """([(keystr path, leaf), ...], treedef) of a pytree, in flattening order."""
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [(jax.tree_util.keystr(p), leaf) for p, leaf in leaves_with_path], treedef


def check_against(
    path: PathLike, records: list[dict[str, Any]], treedef: str, like: Any
) -> tuple[list[Any], Any]:
    """Checks saved leaf records against a template pytree, before any array is read.

    Returns:
        (the template's leaves, its treedef).

    Raises:
        ValueError: naming ``path`` and the first leaf whose path, shape or dtype differs, or
            saying that the leaf paths agree but the node types differ.
    """
    like_leaves, like_treedef = records_of(like)
    saved_paths = [r["path"] for r in records]
    like_paths = [p for p, _ in like_leaves]
    if saved_paths != like_paths:
        n = min(len(saved_paths), len(like_paths))
        i = next((i for i in range(n) if saved_paths[i] != like_paths[i]), n)
        saved = saved_paths[i] if i < len(saved_paths) else "<none>"
        wanted = like_paths[i] if i < len(like_paths) else "<none>"
        raise ValueError(
            f"{path}: tree structure mismatch at leaf #{i}: checkpoint has {saved}, "
            f"template has {wanted} ({len(saved_paths)} vs {len(like_paths)} leaves)"
        )
    if treedef != str(like_treedef):
        raise ValueError(
            f"{path}: tree structure mismatch (same leaf paths, different node types):\n"
            f"  checkpoint: {treedef}\n  template:   {like_treedef}"
        )
    for record, (_, like_leaf) in zip(records, like_leaves, strict=True):
        dtype, shape = template_record(like_leaf)
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
    return [leaf for _, leaf in like_leaves], like_treedef


def as_template_kind(arr: Any, like: Any) -> Any:
    """A restored numpy array as the kind of its template leaf: a numpy scalar, a Python
    scalar, or (for jax templates) a jax array on the template's sharding, if it has one."""
    if isinstance(like, np.ndarray):
        return arr
    if isinstance(like, np.generic):
        return arr[()]
    if isinstance(like, bool | int | float | complex):
        return type(like)(arr.item())
    return jax.device_put(arr, getattr(like, "sharding", None))
