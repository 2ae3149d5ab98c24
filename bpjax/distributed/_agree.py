"""What the processes of a job agree on, and how: reading results back to the host, one value
for every process (process 0's), and checks that every process runs the same job."""

from __future__ import annotations

import collections
import json
import pathlib
import secrets
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from bpjax.distributed._start import cluster

# Each exchange through the coordination service's key-value store gets keys of its own: every
# process makes the same exchanges in the same order, so a per-tag counter names them alike.
_exchanges: collections.Counter[str] = collections.Counter()


def is_primary() -> bool:
    """Whether this is process 0, which writes the run's files (always, in one process)."""
    return jax.process_index() == 0


def _replicated(x: jax.Array) -> jax.Array:
    """``x`` replicated over its own devices (a collective: every process must call it)."""
    sharding = x.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
        target = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    else:
        mesh = jax.sharding.Mesh(np.array(list(sharding.device_set)), ("all",))
        target = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(lambda a: a, out_shardings=target)(x)


def host_copy(tree: Any) -> Any:
    """The pytree with every jax array as a numpy array on this host.

    A fully addressable array is copied as ``jax.device_get`` would; an array replicated over
    devices of several processes is read from this process's own copy (no communication); an
    array sharded over several processes is first replicated, which is a collective: in a job
    of several processes every process must call ``host_copy`` on it. Other leaves pass as they
    are. Never calls ``device_get`` on an array it cannot address.
    """

    def leaf(x: Any) -> Any:
        if not isinstance(x, jax.Array):
            return x
        if x.is_fully_addressable:
            return np.asarray(jax.device_get(x))
        if not x.sharding.is_fully_replicated:
            x = _replicated(x)
        return np.asarray(x.addressable_data(0))

    return jax.tree_util.tree_map(leaf, tree)


def agree(tree: Any, *, stop: bool | int = False) -> tuple[Any, bool | int]:
    """Process 0's values of ``tree``, and whether any process asked to ``stop``.

    Every process calls it at the same point with a tree of the same structure, shapes and
    dtypes (host values: ``host_copy``'s); each gets back process 0's leaves, bit for bit, so
    that every decision taken from them (a diverged loss, early stopping) is the same
    everywhere, and ``stop`` is true everywhere if it was true anywhere: the largest signal
    number asked, so that every process can stop (and exit, 128 + it) as the one that received
    it. One collective (``process_allgather`` of the leaves' bytes); in one process, the tree as
    it is.

    Args:
        tree: a pytree of numpy arrays or scalars.
        stop: this process's request to stop (an interrupt it received): True, or the number
            of the signal it received (1-255).

    Returns:
        ``(tree, any_stop)``: process 0's tree (numpy leaves) and the largest ``stop`` of any
        process: a signal's number where one (> 1) was asked, else a bool.

    Raises:
        ValueError: ``stop`` outside 0-255.
    """
    if not 0 <= int(stop) <= 255:
        raise ValueError(f"agree: stop must be a bool or a signal number 1-255, got {stop!r}")
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    arrays = [np.asarray(x) for x in leaves]
    if jax.process_count() == 1:
        return jax.tree_util.tree_unflatten(treedef, arrays), _stop_value(int(stop))
    from jax.experimental import multihost_utils

    data = b"".join(a.tobytes() for a in arrays)
    payload = data + bytes([int(stop)])
    payload += b"\0" * (-len(payload) % 4)  # whole uint32 words: no 64-bit types needed
    words = np.frombuffer(payload, np.uint32)
    gathered = np.asarray(multihost_utils.process_allgather(words))  # [processes, words]
    any_stop = _stop_value(int(np.max(gathered.view(np.uint8)[:, len(data)])))
    first = gathered[0].tobytes()
    out, offset = [], 0
    for a in arrays:
        chunk = first[offset : offset + a.nbytes]
        out.append(np.frombuffer(chunk, a.dtype).reshape(a.shape).copy())
        offset += a.nbytes
    return jax.tree_util.tree_unflatten(treedef, out), any_stop


def _stop_value(stop: int) -> bool | int:
    """A signal's number as it is, a plain request (0 or 1) as a bool."""
    return stop if stop > 1 else bool(stop)


class ProcessFailed(RuntimeError):
    """Another process of the job failed (``announce_failure``) while this one waited for it in
    an exchange (``all_texts``): the job can't start, or go on, without it.

    Attributes:
        process_id: the process that failed.
        reason: what it said.
    """

    def __init__(self, process_id: int, reason: str):
        super().__init__(f"process {process_id} failed: {reason}")
        self.process_id, self.reason = process_id, reason


_FAILED = "bpjax/failed/"


def announce_failure(reason: str) -> None:
    """Tells the other processes that this one can't go on (a bad setting, a file missing on
    its host), so that those waiting for it in an exchange stop at once with ``ProcessFailed``
    instead of timing out. Does nothing in one process, or if the service can't be reached."""
    if jax.process_count() == 1:
        return
    try:
        _client().key_value_set(f"{_FAILED}{jax.process_index()}", reason)
    except Exception:  # the job is ending anyway; the reason is printed by its own process
        pass


def _failure(client: Any) -> ProcessFailed | None:
    for key, reason in client.key_value_dir_get(_FAILED):
        index = int(key.rsplit("/", 1)[-1])
        if index != jax.process_index():
            return ProcessFailed(index, reason)
    return None


def _client() -> Any:
    """jax's client of the coordination service (orbax reaches it the same way)."""
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        raise RuntimeError("jax.distributed is not initialized: no coordination service")
    return client


def all_texts(tag: str, text: str, *, timeout: float | None = None) -> list[str]:
    """Every process's ``text``, by process id, through the coordination service.

    Unlike a collective, this needs no compiled program, and a process that fails before the
    exchange can still take part: it posts its error instead of its value (``train.py`` does),
    so the others learn why at once instead of waiting. Every process calls it with the same
    ``tag`` at the same point.

    Args:
        tag: names the exchange (letters, digits, ``_``); repeated calls get keys of their own.
        text: this process's value.
        timeout: seconds to wait for the others (``cluster().initialization_timeout`` if None).

    Returns:
        ``[text of process 0, text of process 1, ...]`` (``[text]`` in one process).

    Raises:
        ProcessFailed: another process announced a failure (``announce_failure``).
        TimeoutError: a process did not post within ``timeout``, naming it.
    """
    count = jax.process_count()
    if count == 1:
        return [text]
    _exchanges[tag] += 1
    directory = f"bpjax/{tag}/{_exchanges[tag]}/"
    client = _client()
    client.key_value_set(directory + str(jax.process_index()), text)
    timeout = cluster().initialization_timeout if timeout is None else timeout
    deadline = time.monotonic() + timeout

    def read() -> dict[int, str]:
        return {int(k.rsplit("/", 1)[-1]): v for k, v in client.key_value_dir_get(directory)}

    while True:
        posted = read()
        if len(posted) == count:
            return [posted[i] for i in range(count)]
        failed = _failure(client)
        if failed is not None:
            # The posts are read again: a process may have posted, then failed later, between
            # the two reads above; the exchange it completed is not a failure.
            posted = read()
            if len(posted) == count:
                return [posted[i] for i in range(count)]
            raise failed
        if time.monotonic() > deadline:
            missing = ", ".join(str(i) for i in range(count) if i not in posted)
            raise TimeoutError(
                f"process(es) {missing} of {count} did not answer within {timeout:g} s ({tag})"
            )
        time.sleep(0.05)


class JobMismatch(ValueError):
    """The processes of a job were not started alike (``check_same``): other settings, other
    data, or checkpoints that not all of them see."""


def check_same(tag: str, values: Mapping[str, Any], *, hint: str = "") -> None:
    """Raises the same ``JobMismatch`` in every process unless all have the same ``values``.

    Args:
        tag: names the check (``all_texts``'s tag).
        values: what must agree, e.g. ``{"data": crc32, "seed": 0}`` (JSON-able).
        hint: added to the error: what to do.

    Raises:
        JobMismatch: naming each process and key that differ from process 0, and both values.
        ProcessFailed: another process announced a failure instead (``all_texts``).
    """
    texts = all_texts(tag, json.dumps(dict(values), sort_keys=True, default=str))
    reference = json.loads(texts[0])
    differ = []
    for index, text in enumerate(texts[1:], start=1):
        mine = json.loads(text)
        for key in sorted(reference.keys() | mine.keys()):
            if reference.get(key) != mine.get(key):
                differ.append(
                    f"{key}: {mine.get(key)!r} in process {index}, {reference.get(key)!r} in "
                    f"process 0"
                )
    if differ:
        raise JobMismatch(
            f"the {len(texts)} processes do not run the same job ({'; '.join(differ[:6])})"
            + (f": {hint}" if hint else "")
        )


def shared_directory(path: str | pathlib.Path) -> pathlib.Path:
    """Process 0's ``path``, created, once every process has seen that it is the same directory.

    Checkpoints are written together (each process its shards, process 0 the rest) into one
    directory that every process must see: a directory on each host's own disk would leave
    every host a part of every checkpoint. Process 0 creates ``path`` and leaves a file there
    that each other process must read back, through the same path. Every process calls it.

    Returns:
        Process 0's ``path`` (its timestamped default may differ from another process's).

    Raises:
        ValueError: a process cannot see process 0's file, naming it and the directory.
    """
    if jax.process_count() == 1:
        pathlib.Path(path).mkdir(parents=True, exist_ok=True)
        return pathlib.Path(path)
    token = secrets.token_hex(8)
    marker = None
    if is_primary():
        pathlib.Path(path).mkdir(parents=True, exist_ok=True)
        marker = pathlib.Path(path) / f".bpjax-shared-{token}"
        marker.write_text(token)
    directory, token = json.loads(all_texts("shared_dir", json.dumps([str(path), token]))[0])
    try:
        seen = (pathlib.Path(directory) / f".bpjax-shared-{token}").read_text() == token
    except OSError:
        seen = False
    answers = all_texts("shared_dir_seen", "yes" if seen else "no")
    if marker is not None:
        marker.unlink(missing_ok=True)
    blind = [str(i) for i, answer in enumerate(answers) if answer != "yes"]
    if blind:
        raise ValueError(
            f"process(es) {', '.join(blind)} cannot see {directory}, which process 0 created: "
            f"the run directory must be on a filesystem every process shares (an absolute "
            f"path on a shared disk)"
        )
    return pathlib.Path(directory)
