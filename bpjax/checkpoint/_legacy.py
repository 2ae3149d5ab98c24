"""Reads checkpoints of bpjax's former format (one ``.npz`` file each; read, never written).

That format, written until orbax replaced it: the leaves, in ``jax.tree_util`` flattening
order, are entries ``leaf_00000``, ``leaf_00001``, ... and an entry ``__meta__`` holds UTF-8
JSON ``{"format": "bpjax.checkpoint", "version": 1, "treedef": ..., "leaves": [...],
"metadata": {...}}`` with the same leaf records as today's format. Typed PRNG keys were stored as
their key data, and extension dtypes (``bfloat16``) as same-width unsigned integers.
"""

from __future__ import annotations

import contextlib
import pathlib
import zipfile
import zlib
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from bpjax.checkpoint._records import (
    FORMAT,
    UnreadableCheckpoint,
    as_template_kind,
    check_against,
    decode,
)

VERSION = 1
_META_KEY = "__meta__"
_LEAF_KEY = "leaf_{:05d}"
ZIP_MAGIC = b"PK"


@contextlib.contextmanager
def _reading(path: pathlib.Path) -> Iterator[Any]:
    """``np.load(path)``, with a damaged file (truncated, not a zip, an entry missing) reported
    as UnreadableCheckpoint."""
    try:
        # Our own file object: np.load leaks the one it opens when the zip is damaged.
        with open(path, "rb") as file, np.load(file, allow_pickle=False) as npz:
            yield npz
    except (zipfile.BadZipFile, EOFError, zlib.error, KeyError) as e:
        raise UnreadableCheckpoint(path, f"{type(e).__name__}: {e}") from e
    except ValueError as e:
        if isinstance(e, UnreadableCheckpoint) or str(e).startswith(f"{path}:"):
            raise
        raise UnreadableCheckpoint(path, str(e)) from e


def _read_meta(npz: Any, path: pathlib.Path) -> dict[str, Any]:
    if _META_KEY not in npz.files:
        raise UnreadableCheckpoint(path, f"not a bpjax checkpoint: no {_META_KEY!r} entry")
    try:
        meta = decode(npz[_META_KEY].tobytes().decode("utf-8"))
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise UnreadableCheckpoint(path, f"damaged metadata: {e}") from e
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(
            f"{path}: unsupported checkpoint format {meta.get('format')!r} "
            f"version {meta.get('version')!r} (expected {FORMAT!r} version {VERSION})"
        )
    return meta


def load_metadata(path: pathlib.Path) -> dict[str, Any]:
    """The caller's metadata of a ``.npz`` checkpoint (no arrays are read)."""
    with _reading(path) as npz:
        return _read_meta(npz, path)["metadata"]


def restore(path: pathlib.Path, like: Any) -> tuple[Any, dict[str, Any]]:
    """``bpjax.checkpoint.restore`` of a ``.npz`` checkpoint (same contract)."""
    with _reading(path) as npz:
        meta = _read_meta(npz, path)
        records = meta["leaves"]
        like_leaves, like_treedef = check_against(path, records, meta["treedef"], like)
        out = []
        for i, (record, like_leaf) in enumerate(zip(records, like_leaves, strict=True)):
            stored = npz[_LEAF_KEY.format(i)]
            if "key_impl" in record:
                key = jax.random.wrap_key_data(stored, impl=record["key_impl"])
                out.append(jax.device_put(key, getattr(like_leaf, "sharding", None)))
                continue
            dtype = np.dtype(like_leaf.dtype) if hasattr(like_leaf, "dtype") else None
            dtype = dtype if dtype is not None else np.asarray(like_leaf).dtype
            out.append(as_template_kind(stored.view(dtype), like_leaf))
    return jax.tree_util.tree_unflatten(like_treedef, out), meta["metadata"]
