"""What ``bpjax.trainer.fit`` does before it compiles anything: checks its arguments against
the data and the network (every ``ValueError`` and ``TypeError`` of a bad call is raised here,
before a compilation), checks that every process of a job runs the same ``fit``, and puts the
data on the devices.

Several processes (``bpjax.distributed``): every process holds the whole dataset and puts it on
its own devices; the jitted epoch gathers each step's batch there and each device computes on
its share of it, so no training data crosses the network, only the gradients' all-reduce (and the
result is that of one process, up to the reduction's rounding).
"""

import functools
import numbers
import zlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import optax

from bpjax import distributed
from bpjax import losses as losses_lib
from bpjax.checkpoint import CheckpointManager
from bpjax.data import Dataset
from bpjax.layers import Layer, NeedsImages
from bpjax.losses import Loss
from bpjax.precision import as_compute_dtype
from bpjax.train import (
    encode_targets,
    output_shape,
    pad_batches,
    single_output_binary,
    target_mismatch,
)


@functools.cache
def _loss_by_name(name: str) -> Loss:
    """The same Loss object for the same name, so ``bpjax.trainer._compiled`` can reuse compiled
    functions."""
    return losses_lib.get(name)


# fit's integer arguments: {name: (least valid value, greatest or None, None allowed: its meaning)}
# (batch_size's greatest is the training set's size, and devices may also be "all" or devices).
_INTEGERS: dict[str, tuple[int, int | None, str | None]] = {
    "epochs": (1, None, None),
    "batch_size": (1, None, None),
    "seed": (0, 2**63 - 1, None),
    "eval_batch_size": (1, None, None),
    "eval_every": (1, None, None),
    "patience": (1, None, "never stop early"),
    "checkpoint_every": (1, None, None),
    "keep_checkpoints": (1, None, None),
    "grad_check_every": (0, None, None),
    "devices": (1, None, None),
    "chunk_steps": (0, None, "one scan per epoch"),
}


def _check_integer(
    name: str,
    value: Any,
    least: int,
    greatest: int | None = None,
    *,
    none: str | None = None,
    valid: str | None = None,
) -> None:
    """Checks one of ``fit``'s integer arguments: a Python or numpy integer (not a bool: True
    would train with batches of 1), ``least`` to ``greatest``, or None where ``none`` says what
    None means. Raises one ``ValueError`` naming the argument, its value and what is valid
    (``valid``, when given, in place of the range)."""
    if value is None and none is not None:
        return
    if valid is None:
        valid = f">= {least}" if greatest is None else f"between {least} and {greatest}"
    or_none = "" if none is None else f" or None ({none})"
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an integer {valid}{or_none}, got {value!r}")
    if value < least or (greatest is not None and value > greatest):
        raise ValueError(f"{name} must be {valid}{or_none}, got {value!r}")


def _check_integers(arguments: dict[str, Any], *, n_train: int) -> None:
    """Checks each of ``fit``'s integer arguments in ``arguments`` (``_INTEGERS``), before
    anything is compiled or cached: a refused value leaves nothing behind (``_compiled``'s
    cache would otherwise hold functions built for ``batch_size=32.0`` under the key of 32)."""
    for name, value in arguments.items():
        least, greatest, none = _INTEGERS[name]
        if name == "devices" and not isinstance(value, numbers.Number):
            continue  # "all", or the devices themselves: make_mesh checks them
        valid = None
        if name == "batch_size":
            greatest = n_train
            valid = f"between 1 and the training set size ({n_train})"
        elif name == "devices":
            valid = ">= 1 (or 'all', or the devices)"
        _check_integer(name, value, least, greatest, none=none, valid=valid)


def _checked_inputs(
    optimizer: optax.GradientTransformation,
    data: Dataset,
    loss: Loss | str,
    *,
    eval_splits: Sequence[str],
    integers: dict[str, Any],
    compute_dtype: Any,
) -> tuple[Loss, str, Sequence[str], Any]:
    """``fit``'s optimizer, data, loss, its integer arguments (``integers``: every name of
    ``_INTEGERS``) and dtype checked: ``(loss, its canonical name, eval_splits with "val",
    compute_dtype as a dtype or None)``."""
    # Names are accepted for the loss only: say so, rather than fail on an attribute later.
    if not all(callable(getattr(optimizer, name, None)) for name in ("init", "update")):
        raise TypeError(
            f"optimizer must be an optax GradientTransformation (init and update, e.g. "
            f"optax.adam(1e-3) or optax.MultiSteps(...)), got "
            f"{type(optimizer).__name__} {optimizer!r}"
        )
    if not isinstance(data, Dataset):
        raise TypeError(
            f"data must be a bpjax.data.Dataset (e.g. bpjax.data.load('digits')), got "
            f"{type(data).__name__} {data!r}"
        )
    # Every integer argument: its type and range, before anything else reads it.
    if set(integers) != set(_INTEGERS):  # a new argument of fit must be checked too
        raise AssertionError(f"fit's integer arguments: {sorted(integers)} != {sorted(_INTEGERS)}")
    _check_integers(integers, n_train=data.n_train)
    loss_fn = (
        _loss_by_name(loss) if isinstance(loss, str) else losses_lib.resolve(loss, "fit: loss")
    )
    # The factory's canonical name, so an alias ("bce") encodes and evaluates as its loss.
    loss_name = loss_fn.name or "custom"
    unknown = set(eval_splits) - {"train", "val", "test"}
    if unknown:
        raise ValueError(f"unknown eval_splits {sorted(unknown)}; valid: train, val, test")
    if "val" not in eval_splits:
        eval_splits = ("val", *eval_splits)
    mismatch = target_mismatch(loss_name, data.task, data.y_train)
    if mismatch:
        raise ValueError(f"{data.name}: {mismatch}")
    compute_dtype = as_compute_dtype(compute_dtype)
    return loss_fn, loss_name, eval_splits, compute_dtype


def _check_batch_sharing(batch_size: int, n_devices: int) -> None:
    """Checks that every device takes an equal share of each batch."""
    if batch_size % n_devices:
        processes = jax.process_count()
        where = f" ({processes} processes x {n_devices // processes})" if processes > 1 else ""
        raise ValueError(
            f"batch_size {batch_size} is not divisible by {n_devices} devices{where}: each "
            f"device takes an equal share of every batch"
        )


def _checked_outputs(net: Layer, data: Dataset, batch_size: int, loss_name: str) -> int:
    """The number of ``net``'s outputs, checked against ``data``: a batch must map to
    ``(batch, outputs)``, with as many outputs as the data needs."""
    try:
        out_shape = output_shape(net, (batch_size, *data.input_shape))
    except NeedsImages as e:
        if len(data.input_shape) != 1:
            raise
        raise ValueError(
            f"{e}: {data.name} was loaded flat, {data.input_shape} per example; an image network "
            f"needs the images: bpjax.data.load({data.name!r}, flatten=False) (on the command "
            f"line: dataset.flatten=false)"
        ) from None
    if len(out_shape) != 2 or out_shape[0] != batch_size:
        hint = (
            " (flatten the images first: put bpjax.flatten() before the dense layers, or load "
            "the data flat)"
            if len(out_shape) > 2
            else ""
        )
        raise ValueError(
            f"the network {net.name} maps a batch {(batch_size, *data.input_shape)} of "
            f"{data.name} to {tuple(out_shape)}, not to (batch, outputs){hint}"
        )
    n_outputs = out_shape[-1]
    if data.task == "classification":  # more outputs than classes are merely never targeted
        binary = single_output_binary(n_outputs, data.n_classes, loss_name)
        mismatch = n_outputs < data.n_outputs and not binary
    else:
        mismatch = n_outputs != data.n_outputs
    if mismatch:
        raise ValueError(
            f"the network {net.name} has {n_outputs} outputs but {data.name} ({data.task}) "
            f"needs {data.n_outputs}: make its last layer {data.n_outputs} wide"
        )
    return n_outputs


def _digest(data: Dataset) -> str:
    """A checksum of every split's arrays: processes that loaded different data differ here."""
    crc = 0
    for array in (data.x_train, data.y_train, data.x_val, data.y_val, data.x_test, data.y_test):
        array = np.ascontiguousarray(array)
        crc = zlib.crc32(f"{array.dtype}{array.shape}".encode(), crc)
        crc = zlib.crc32(array.view(np.uint8).reshape(-1), crc) if array.size else crc
    return f"{crc:08x}"


def _check_same_job(
    data: Dataset,
    manager: CheckpointManager | None,
    checkpoint_dir: str | None,
    **settings: Any,
) -> None:
    """In a job of several processes, checks (before anything is compiled) that every process
    runs the same ``fit``: the same ``settings``, data and checkpoints."""
    if jax.process_count() > 1:
        distributed.check_same(
            "fit",
            {
                "data": _digest(data),
                "dataset": data.name,
                **settings,
                "checkpoints": None if manager is None else manager.all_steps(),
                "checkpoint_dir": checkpoint_dir,
            },
            hint="start every process with the same settings and data, and checkpoints in "
            "a directory they all share",
        )


class _Placed(NamedTuple):
    """The data on the devices, and the shardings ``fit`` puts its state and batches on."""

    replicated: jax.sharding.NamedSharding  # the state's (and the training set's)
    batch_sharding: jax.sharding.NamedSharding | None  # each batch's, over several devices
    x_train: jax.Array
    y_train: jax.Array  # encoded for the loss
    eval_inputs: dict[str, Any]  # per split: padded, masked evaluation batches


def _place_data(
    data: Dataset,
    mesh: jax.sharding.Mesh,
    *,
    loss_name: str,
    n_outputs: int,
    eval_batch_size: int,
) -> _Placed:
    """Puts the training set on every device, whole, and the evaluation batches shared among
    them, with the targets encoded for the loss."""
    n_devices = mesh.devices.size

    def encode(y):
        return encode_targets(y, task=data.task, loss_name=loss_name, n_outputs=n_outputs)

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    batch_sharding = (
        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
        if n_devices > 1
        else None
    )
    x_train = jax.device_put(data.x_train, replicated)
    y_train = jax.device_put(encode(data.y_train), replicated)
    splits = {"train": (data.x_train, data.y_train), "test": (data.x_test, data.y_test)}
    if data.n_val:
        splits["val"] = (data.x_val, data.y_val)
    # Evaluation is data parallel too: each device takes its share of every padded batch.
    eval_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data"))
    eval_inputs = {
        name: jax.device_put(
            pad_batches(x, encode(y), eval_batch_size, multiple_of=n_devices), eval_sharding
        )
        for name, (x, y) in splits.items()
    }
    return _Placed(replicated, batch_sharding, x_train, y_train, eval_inputs)
