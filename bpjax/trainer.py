"""``fit``: the training loop around the pure engine in ``bpjax.train``.

One call trains a network on a ``bpjax.data.Dataset``: jitted whole-epoch scans, evaluation on
the validation and test splits, early stopping on a validation metric (keeping the best
parameters), atomic checkpoints with exact resume, a divergence guard, and optional data
parallelism over several devices. Printing, progress bars and TensorBoard belong to the caller,
which receives one record per epoch through ``callbacks``.

Resume is exact: the epoch's shuffle and every dropout draw are functions of the run key and
the epoch/step counters stored in the checkpoint, so an interrupted and resumed run ends with the
same parameters as one that never stopped (bit-identical on CPU). A learning rule's state (its
feedback weights, ``bpjax.credit``) is part of the checkpointed ``TrainState``, so it resumes
exactly too, Kolen-Pollack's evolving feedback included.

Several processes (``bpjax.distributed``): after ``jax.distributed.initialize`` in every process,
the same ``fit`` call in each trains one model over all their devices. Every process holds the
whole dataset and puts it on its own devices; the jitted epoch gathers each step's batch there and
each device computes on its share of it, so no training data crosses the network, only the
gradients' all-reduce (and the result is that of one process, up to the reduction's rounding).
Metrics are read from each process's own copy, made the same in all of them (``agree``), so every
process stops early, or on a diverged loss, at the same epoch and step; an interrupt stops them
all at the same chunk; a lost process stops the others with ``bpjax.distributed.ProcessLost``.
"""

import contextlib
import functools
import math
import time
import weakref
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bpjax import credit, distributed
from bpjax import losses as losses_lib
from bpjax.checkpoint import CheckpointManager, UnreadableCheckpoint, _to_json, load_metadata
from bpjax.checkpoint import restore as checkpoint_restore
from bpjax.data import Dataset
from bpjax.layers import Layer, NeedsImages
from bpjax.losses import Loss
from bpjax.precision import as_compute_dtype
from bpjax.train import (
    TrainState,
    check_rule,
    chunk_plan,
    encode_targets,
    init_state,
    make_chunk,
    make_eval,
    output_shape,
    pad_batches,
    single_output_binary,
    target_mismatch,
    updates_applied,
)

__all__ = [
    "FitResult",
    "ResumeError",
    "TrainingDiverged",
    "default_monitor",
    "fit",
    "make_mesh",
    "valid_monitors",
]


class FitResult(NamedTuple):
    """What ``fit`` returns.

    Attributes:
      state: the final TrainState (after the last epoch run).
      best_params: the parameters with the best validation metric (``state.params`` without
        a validation split); the test metrics are computed with these.
      metrics: final summary: ``test_*``, ``best_val_*``, ``train_loss``, ``epochs``,
        ``best_epoch``, ``stopped_early``, ``wall_seconds`` (this call, evaluation included),
        ``train_seconds`` and ``examples_per_second`` (training steps only, timed over the
        chunks whose program had already run in this process; both ``None`` when every chunk
        compiled its program, e.g. a single epoch in one chunk), ``steps`` (minibatch steps taken)
        and ``updates`` (optimizer updates applied: fewer than ``steps`` under gradient
        accumulation, ``optax.MultiSteps``); with
        ``grad_check_every``, the last measured alignment of this call,
        ``alignment/layer{i}/angle``, ``alignment/layer{i}/weight_angle`` (feedback rules) and
        ``alignment/total/angle``, in degrees (see ``bpjax.train.make_epoch``).
      history: one record per epoch run by this call.
      best_net_state: the network's state (batch norm's running statistics) that goes with
        ``best_params``; ``()`` for a network without state.
    """

    state: TrainState
    best_params: Any
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    best_net_state: Any = ()


class ResumeError(ValueError):
    """``fit`` can't continue what ``checkpoint_dir`` holds: checkpoints of a run that this
    call would overwrite (``resume=False``) or that is not this run (another seed, batch size,
    monitor, loss, dataset, network or optimizer), or an unreadable checkpoint. Raised before
    anything is compiled; nothing is deleted."""


class TrainingDiverged(RuntimeError):
    """A non-finite training loss; ``.epoch``/``.step`` say where, ``.result`` what was kept."""

    def __init__(self, message: str, *, epoch: int, step: int, result: FitResult):
        super().__init__(message)
        self.epoch, self.step, self.result = epoch, step, result


# The chunk lengths each compiled chunk function has run, in this process (fit's throughput
# leaves out a chunk that compiled its program); weak: an evicted function is forgotten.
_RAN_LENGTHS: "weakref.WeakKeyDictionary[Any, set[int]]" = weakref.WeakKeyDictionary()


@functools.lru_cache(maxsize=16)
def _compiled(
    net, loss, optimizer, *, task, loss_name, compute_dtype, rule_options, **epoch_options
):
    """The jitted epoch-order, chunk and evaluation functions, memoised on their (hashable)
    ingredients.

    Building the same network, loss and optimizer objects again (e.g. identical jobs of a Hydra
    sweep in one process, with objects memoised by config) then reuses jax's compilation
    instead of recompiling. Nothing here is mutable: the cache only holds pure functions.
    """
    order_fn, chunk_fn = make_chunk(
        net,
        loss,
        optimizer,
        compute_dtype=None if compute_dtype is None else jnp.dtype(compute_dtype),
        rule_options=dict(rule_options),
        **epoch_options,
    )
    return order_fn, chunk_fn, make_eval(net, loss, task=task, loss_name=loss_name)


def _plan_from(plan: tuple[tuple[int, int], ...], done: int) -> list[tuple[int, int]]:
    """The chunks of ``plan`` after the first ``done`` steps (a resumed epoch), starting with the
    rest of a chunk when ``done`` falls inside one (a plan made with another chunk size)."""
    rest = []
    for start, length in plan:
        if start + length <= done:
            continue
        if start < done:
            rest.append((done, start + length - done))
        else:
            rest.append((start, length))
    return rest


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-step metrics of an epoch's chunks, joined (empty arrays for a resumed epoch whose
    steps were all done before the interrupt)."""
    if not parts:
        return {"loss": np.zeros((0,), np.float32)}
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _last_measured(step_metrics: dict[str, np.ndarray], prefix: str) -> dict[str, float]:
    """The last finite value of each per-step metric named ``prefix...`` (NaN where the step
    measured nothing)."""
    last = {}
    for name, values in step_metrics.items():
        finite = np.flatnonzero(np.isfinite(values))
        if name.startswith(prefix) and finite.size:
            last[name] = float(values[finite[-1]])
    return last


def make_mesh(devices: int | str | Sequence[Any] = 1) -> jax.sharding.Mesh:
    """A one-axis ("data") mesh over ``devices``: a count, ``"all"``, or device objects.

    In a job of several processes the count is per process and the mesh spans them all
    (``bpjax.distributed.mesh_devices``).

    Raises:
        ValueError: a count below 1 or above the devices there are.
    """
    return jax.sharding.Mesh(np.array(distributed.mesh_devices(devices)), ("data",))


def _digest(data: Dataset) -> str:
    """A checksum of every split's arrays: processes that loaded different data differ here."""
    crc = 0
    for array in (data.x_train, data.y_train, data.x_val, data.y_val, data.x_test, data.y_test):
        array = np.ascontiguousarray(array)
        crc = zlib.crc32(f"{array.dtype}{array.shape}".encode(), crc)
        crc = zlib.crc32(array.view(np.uint8).reshape(-1), crc) if array.size else crc
    return f"{crc:08x}"


@contextlib.contextmanager
def _naming_lost_processes(manager: CheckpointManager | None):
    """Turns a collective that failed because a process went away into ``ProcessLost``, in
    every surviving process; any other error passes as it is."""
    try:
        yield
    except TrainingDiverged:
        raise
    except (ValueError, RuntimeError) as e:
        latest = None if manager is None else manager.latest()
        lost = distributed.process_lost(e, last_checkpoint=latest)
        if lost is None:
            raise
        raise lost from e


def _monitor_mode(monitor: str) -> str:
    return "min" if monitor.endswith(("loss", "rmse")) else "max"


# The metrics ``make_eval`` computes, by task.
_EVAL_METRICS = {"classification": ("loss", "accuracy"), "regression": ("loss", "rmse", "r2")}


def valid_monitors(task: str, eval_splits: Sequence[str] = ("val",)) -> list[str]:
    """The metrics that may select the best epoch for ``task`` (never a test metric).

    Args:
      task: ``"classification"`` or ``"regression"`` (``Dataset.task``).
      eval_splits: the splits ``fit`` evaluates; ``"train"`` adds the training-set metrics.

    Returns:
      ``val_*`` metrics of the task, ``train_loss``, and ``train_*`` if the train split is
      evaluated. ``fit`` also accepts ``"auto"`` (see ``default_monitor``).
    """
    if task not in _EVAL_METRICS:
        raise ValueError(f"unknown task {task!r}; valid: {', '.join(_EVAL_METRICS)}")
    metrics = _EVAL_METRICS[task]
    valid = [f"val_{m}" for m in metrics] + ["train_loss"]
    if "train" in eval_splits:
        valid += [f"train_{m}" for m in metrics if m != "loss"]
    return valid


def default_monitor(task: str) -> str:
    """What ``monitor="auto"`` selects: ``val_accuracy`` to classify, ``val_loss`` to regress."""
    valid_monitors(task)  # the same error for an unknown task
    return "val_accuracy" if task == "classification" else "val_loss"


def _resume_point(manager: CheckpointManager, resume: bool, run: dict[str, Any]) -> bool:
    """Whether this run continues from a checkpoint, once the latest is known to be this run's:
    its ``run`` metadata (when it has one) must match ``run``."""
    steps = manager.all_steps()
    if not steps:
        return False
    if not resume:
        names = ", ".join(manager.path_for(s).name for s in steps[-3:])
        raise ResumeError(
            f"{manager.directory} already holds checkpoints of a run ({names}): resume to "
            f"continue it, or start the new run in an empty directory (nothing was deleted)"
        )
    path = manager.latest()
    try:
        saved = load_metadata(path).get("run")
    except UnreadableCheckpoint:
        return True  # damaged: restore_latest passes over it, warning, and fit checks the run
    except (OSError, ValueError) as e:
        raise ResumeError(f"cannot resume: {e}") from e
    _check_run(path, saved, run)
    return True


def _check_run(path: Any, saved: dict[str, Any] | None, run: dict[str, Any]) -> None:
    if saved is not None:
        differ = [
            f"{key} {saved[key]!r} there, {value!r} here"
            for key, value in run.items()
            if key in saved and saved[key] != value
        ]
        if differ:
            raise ResumeError(
                f"cannot resume from {path}: another run saved it ({'; '.join(differ)}); use "
                f"that run's settings, or start the new run in an empty directory"
            )


@functools.cache
def _loss_by_name(name: str) -> Loss:
    """The same Loss object for the same name, so ``_compiled`` can reuse compiled functions."""
    return losses_lib.get(name)


def _restore_whole_epoch(manager, like, epoch: int, saved: dict, epochs: int):
    """The checkpoint of whole epoch ``epoch`` (``restore``'s ``(state, meta)``), for a resume
    whose latest checkpoint is ``saved["epoch_step"]`` steps past it, beyond ``epochs``.

    Raises:
      ResumeError: that epoch's checkpoint is not kept (or can't be read).
    """
    path = manager.path_for(epoch)
    try:
        return checkpoint_restore(path, like)
    except (FileNotFoundError, UnreadableCheckpoint) as e:
        raise ResumeError(
            f"cannot resume with trainer.epochs={epochs}: the run's latest checkpoint is "
            f"{saved['epoch_step']} steps into epoch {epoch + 1} and epoch {epoch}'s ({path.name}) "
            f"is not kept ({e}); resume with epochs={epoch + 1} or more"
        ) from None


def _is_better(value: float, best: float | None, mode: str) -> bool:
    if not math.isfinite(value):
        return False
    return best is None or (value < best if mode == "min" else value > best)


def fit(
    net: Layer,
    loss: Loss | str,
    optimizer: optax.GradientTransformation,
    data: Dataset,
    *,
    epochs: int,
    batch_size: int,
    grad_mode: str = "manual",
    seed: int = 0,
    eval_batch_size: int = 1000,
    eval_every: int = 1,
    monitor: str = "val_loss",
    patience: int | None = None,
    checkpoint_dir: str | None = None,
    checkpoint_every: int = 1,
    keep_checkpoints: int = 3,
    resume: bool = False,
    config: dict | None = None,
    grad_check_every: int = 0,
    layer_stats: bool = False,
    compute_dtype: Any = None,
    devices: int | str = 1,
    eval_splits: Sequence[str] = ("val",),
    callbacks: Sequence[Callable[[dict[str, Any]], None]] = (),
    chunk_steps: int | None = 200,
    on_chunk: Sequence[Callable[[dict[str, Any]], None]] = (),
    rule_options: Mapping[str, Any] | None = None,
    on_resume: Callable[[dict[str, Any]], None] | None = None,
) -> FitResult:
    """Trains ``net`` on ``data`` and evaluates it on held-out data.

    Args:
      net: the network Layer (e.g. ``bpjax.mlp([100, 10])``).
      loss: a loss name (see ``bpjax.losses.LOSSES``) or a ``Loss``; targets are encoded for it
        (``bpjax.train.encode_targets``).
      optimizer: an optax GradientTransformation.
      data: the dataset (train / val / test splits).
      epochs: epochs to run (in total, counting those before a resume).
      batch_size: minibatch size; must not exceed the training set.
      grad_mode: ``"manual"``, ``"autodiff"`` or a learning rule of ``bpjax.credit``
        (``"feedback_alignment"``, ``"direct_feedback_alignment"``, ``"sign_symmetry"``,
        ``"kolen_pollack"``): its state is drawn from the seed's own stream
        (``bpjax.train.init_state``), carried in ``state.rule_state`` and checkpointed.
      seed: root of every random draw (init, shuffling, dropout, feedback weights).
      eval_batch_size: batch size of the (padded, masked) evaluation.
      eval_every: evaluate the validation split every that many epochs (and at the last).
      monitor: the validation metric for early stopping and the best checkpoint
        (``val_loss``, ``val_accuracy``, ``val_rmse``, ``val_r2``, as the task has them, or
        ``train_loss``; ``"auto"``: ``default_monitor(data.task)``; see ``valid_monitors``);
        lower is better for losses and RMSE, higher otherwise. Without a validation split the
        training loss is monitored.
      patience: stop after this many (>= 1) evaluations without improvement (None: never).
      checkpoint_dir: where to keep checkpoints (None: no checkpoints).
      checkpoint_every: save every that many epochs (and at the last, at a new best, and on
        interrupt).
      keep_checkpoints: how many recent checkpoints to keep (the best is kept as well).
      resume: continue from the latest checkpoint in ``checkpoint_dir``, if any (one that
        cannot be read is renamed aside, with a warning, and the one before it used).
      config: stored in every checkpoint.
      grad_check_every: every that many steps (0: off), record the angle between the step's
        update and the true gradient per layer (``alignment/...``, every mode) and, for
        ``manual``/``autodiff``, their agreement (``grad_check/...``); see
        ``bpjax.train.make_epoch``.
      layer_stats: record per-layer gradient/weight norms and update ratios each epoch.
      compute_dtype: e.g. ``"bfloat16"`` for mixed precision (float32 master params).
      devices: data-parallel devices: a count or ``"all"``; the batch is sharded, parameters are
        replicated and XLA all-reduces the gradients.
      eval_splits: splits evaluated every ``eval_every`` epochs, for the record (``"val"``
        always drives early stopping; ``"test"`` may be logged but never selects anything).
      callbacks: called with each epoch's record (a dict) after it is evaluated.
      chunk_steps: run each epoch's scan in chunks of at most this many steps
        (``bpjax.train.chunk_plan``; None or 0: one scan per epoch). Between chunks ``fit``
        reports progress (``on_chunk``), checks the loss, and answers an interrupt: Ctrl-C (a
        ``KeyboardInterrupt``) checkpoints the steps done, mid-epoch, and a resume continues
        from there with the same result as a run that never stopped.
      on_chunk: called after every chunk with ``{"epoch", "step", "epoch_step",
        "steps_per_epoch", "train_loss" (the epoch's running mean), "step_metrics"}``.
      on_resume: called once a checkpoint has been accepted for a resume, before training,
        with ``{"path"`` (the checkpoint restored: the latest readable one), ``"epoch"`` (the
        epochs completed), ``"epoch_step"`` (the steps done of the next epoch: 0 unless it was
        saved mid-epoch), ``"steps_per_epoch"}``.
      rule_options: a learning rule's options, ``distribution``, ``scale`` (how its feedback
        weights are drawn) and ``kp_decay`` (Kolen-Pollack's decay); defaults and meaning in
        ``bpjax.train.check_rule``. Unused by the modes they don't concern.

    Raises:
      TrainingDiverged: the training loss became non-finite (the last finite checkpoint stays).
      ResumeError: ``checkpoint_dir`` holds another run's checkpoints, or checkpoints that
        ``resume=False`` would overwrite, or none that can be read; before anything is
        compiled.
      ValueError: inconsistent arguments (e.g. an unknown ``monitor``, or a network with fewer
        outputs than the data needs), or a learning rule that can't apply to ``net`` (naming
        the layer), before anything is compiled.
    """
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
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if eval_batch_size < 1:
        raise ValueError(f"eval_batch_size must be >= 1, got {eval_batch_size}")
    compute_dtype = as_compute_dtype(compute_dtype)
    if not 1 <= batch_size <= data.n_train:
        raise ValueError(
            f"batch_size must be between 1 and the training set size ({data.n_train}), "
            f"got {batch_size}"
        )
    mesh = make_mesh(devices)
    n_devices = mesh.devices.size
    if batch_size % n_devices:
        processes = jax.process_count()
        where = f" ({processes} processes x {n_devices // processes})" if processes > 1 else ""
        raise ValueError(
            f"batch_size {batch_size} is not divisible by {n_devices} devices{where}: each "
            f"device takes an equal share of every batch"
        )
    for name, value in (("eval_every", eval_every), ("checkpoint_every", checkpoint_every)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if chunk_steps is not None and (not isinstance(chunk_steps, int) or chunk_steps < 0):
        raise ValueError(f"chunk_steps must be an integer >= 0 or None, got {chunk_steps!r}")
    if patience is not None and patience < 1:
        raise ValueError(f"patience must be >= 1 or None (never stop early), got {patience}")
    if checkpoint_dir is not None and keep_checkpoints < 1:
        raise ValueError(f"keep_checkpoints must be >= 1, got {keep_checkpoints}")
    # An unknown monitor would otherwise fall back to the training loss, ranked as `mode` says.
    if monitor == "auto":
        monitor = default_monitor(data.task)
    valid = valid_monitors(data.task, eval_splits)
    if monitor not in valid:
        raise ValueError(
            f"unknown monitor {monitor!r} for {data.task} on {data.name}; "
            f"valid: auto, {', '.join(valid)}"
        )
    if data.n_val == 0 and monitor.startswith("val_"):
        monitor = "train_loss"
    mode = _monitor_mode(monitor)

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
    rule_options = check_rule(grad_mode, net, (batch_size, *data.input_shape), rule_options)

    manager, resume_from = None, False
    if checkpoint_dir is not None:
        _to_json(config)  # a config that can't be stored fails now, not at the first checkpoint
        manager = CheckpointManager(
            checkpoint_dir, keep=keep_checkpoints, metric="monitor", mode=mode
        )
        run_info = {
            "seed": seed,
            "batch_size": batch_size,
            "monitor": monitor,
            "loss": loss_name,
            "dataset": data.name,
            "n_train": data.n_train,
            "input_shape": list(data.input_shape),
            # Another rule's checkpoint holds other feedback (or none): not this run's.
            "learning_rule": grad_mode if grad_mode in credit.RULES else "backprop",
        }
        resume_from = _resume_point(manager, resume, run_info)
    if jax.process_count() > 1:  # before anything is compiled: the same job everywhere
        distributed.check_same(
            "fit",
            {
                "data": _digest(data),
                "dataset": data.name,
                "seed": seed,
                "batch_size": batch_size,
                "epochs": epochs,
                "grad_mode": grad_mode,
                "loss": loss_name,
                "monitor": monitor,
                "patience": patience,
                "eval_every": eval_every,
                "chunk_steps": chunk_steps,
                "devices": n_devices,
                "checkpoints": None if manager is None else manager.all_steps(),
                "checkpoint_dir": checkpoint_dir,
            },
            hint="start every process with the same settings and data, and checkpoints in "
            "a directory they all share",
        )

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
    order_fn, chunk_fn, evaluate = _compiled(
        net,
        loss_fn,
        optimizer,
        batch_size=batch_size,
        grad_mode=grad_mode,
        compute_dtype=None if compute_dtype is None else compute_dtype.name,
        batch_sharding=batch_sharding,
        grad_check_every=grad_check_every,
        with_layer_stats=layer_stats,
        task=data.task,
        loss_name=loss_name,
        rule_options=tuple(sorted(rule_options.items())),
    )

    def run_eval(params, net_state, split):
        # Process 0's values everywhere, for the decisions taken from them (early stopping).
        metrics, _ = distributed.agree(
            distributed.host_copy(evaluate(params, *eval_inputs[split], net_state))
        )
        return {f"{split}_{k}": float(v) for k, v in metrics.items()}

    state = init_state(
        net,
        optimizer,
        jax.random.PRNGKey(seed),
        (batch_size, *data.input_shape),
        grad_mode=grad_mode,
        rule_options=rule_options,
    )
    state = jax.device_put(state, replicated)
    start_epoch, best, best_epoch, bad_evals = 0, None, -1, 0
    resumed_steps, resumed_loss_sum = 0, 0.0
    best_params, best_net_state = state.params, state.net_state
    if resume_from:
        try:  # the latest readable checkpoint: a damaged one is renamed aside, with a warning
            state, meta = manager.restore_latest(state)
        except ValueError as e:
            hint = " (this run's network or optimizer differs)" if "mismatch" in str(e) else ""
            raise ResumeError(f"cannot resume: {e}{hint}") from e
        _check_run(manager.path_for(int(meta["step"])), meta.get("run"), run_info)
        state = jax.device_put(state, replicated)
        saved = meta["metrics"]
        start_epoch = int(saved.get("epoch", meta["step"]))
        if saved.get("epoch_step") and start_epoch - 1 >= epochs:
            # Saved mid-epoch beyond the epochs asked for: nothing to train, and the run's
            # result is its last whole epoch's, not that of the steps after it.
            state, meta = _restore_whole_epoch(manager, state, start_epoch - 1, saved, epochs)
            state = jax.device_put(state, replicated)
            saved = meta["metrics"]
            start_epoch = int(saved.get("epoch", meta["step"]))
        if saved.get("epoch_step"):  # saved mid-epoch: the steps done of the next epoch
            resumed_steps = int(saved["epoch_step"])
            resumed_loss_sum = float(saved["epoch_loss_sum"])
            start_epoch -= 1
        if on_resume is not None:
            on_resume(
                {
                    "path": manager.path_for(int(meta["step"])),
                    "epoch": start_epoch,
                    "epoch_step": resumed_steps,
                    "steps_per_epoch": data.n_train // batch_size,
                }
            )
        best_epoch, bad_evals = int(saved["best_epoch"]), int(saved["bad_evals"])
        best = None if best_epoch < 0 else float(saved["best"])
        best_params, best_net_state = state.params, state.net_state
        if manager.best() is not None and best_epoch >= 0:
            best_state, best_meta = manager.restore_best(state)
            best_state = jax.device_put(best_state, replicated)
            best_params, best_net_state = best_state.params, best_state.net_state
            kept = best_meta["metrics"]
            if int(kept.get("epoch", best_meta["step"])) != best_epoch:
                # the recorded best was damaged and set aside: the next best stands in for it
                best_epoch, best = int(kept.get("epoch", best_meta["step"])), float(kept["monitor"])

    def checkpoint(record, **in_progress):
        """Saves ``state`` as checkpoint ``record["epoch"]``: the state after that epoch, or,
        with ``in_progress``, after its first ``epoch_step`` steps (``epoch_loss_sum`` their
        summed loss). An epoch saved mid-way is saved again, whole, once it ends."""
        if manager is None:
            return
        monitor_value = record.get(monitor, math.nan) if record.get("evaluated") else math.nan
        manager.save(
            state,
            step_or_epoch=int(record["epoch"]),
            metrics={
                "monitor": monitor_value,
                "best": math.nan if best is None else best,
                "best_epoch": best_epoch,
                "bad_evals": bad_evals,
                **{k: v for k, v in record.items() if isinstance(v, int | float)},
                **in_progress,
            },
            config=config,
            run=run_info,
        )

    steps_per_epoch = data.n_train // batch_size
    plan = chunk_plan(steps_per_epoch, chunk_steps)
    history: list[dict[str, Any]] = []
    last_alignment: dict[str, float] = {}  # the last measured angles (grad_check_every)
    # A run that stopped early stays stopped when resumed (unless patience was raised).
    stopped_early = patience is not None and bad_evals >= patience
    last_epoch = start_epoch if stopped_early else epochs
    # Training throughput is timed over the chunks whose program had already run in this
    # process (a chunk's length picks its program; a sweep's later jobs reuse the earlier ones'
    # programs): a chunk that compiled its program is left out, so that a short run's examples/s
    # is not its compilation's.
    train_seconds, trained_examples = 0.0, 0
    ran_lengths = _RAN_LENGTHS.setdefault(chunk_fn, set())
    t_start = time.perf_counter()
    epoch = start_epoch
    # The epoch being trained, between its chunks: {"epoch", "epoch_step", "epoch_loss_sum"}.
    in_progress: dict[str, Any] = {}
    saved_epoch, stop = None, False  # the last epoch checkpointed whole; an agreed interrupt
    # One process stops where all do: a lost process stops the others, an interrupt stops all
    # at the same chunk (bpjax.distributed).
    with _naming_lost_processes(manager), distributed.deferred_interrupts() as interrupts:
        try:
            for epoch in range(start_epoch + 1, last_epoch + 1):
                t0 = time.perf_counter()
                done, loss_sum = 0, 0.0
                if epoch == start_epoch + 1:
                    done, loss_sum = resumed_steps, resumed_loss_sum
                order = order_fn(state, data.n_train, jnp.int32(epoch))
                parts, timed_seconds, timed_examples = [], 0.0, 0
                for start, length in _plan_from(plan, done):
                    step_before = int(state.step)
                    t_chunk = time.perf_counter()
                    new_state, chunk_metrics = chunk_fn(
                        state, x_train, y_train, order, jnp.int32(start), length=length
                    )
                    # Process 0's metrics everywhere, and whether any process was interrupted.
                    chunk_metrics, stop = distributed.agree(
                        distributed.host_copy(chunk_metrics), stop=bool(interrupts.requested)
                    )
                    if length in ran_lengths:  # its program was compiled before this chunk
                        timed_seconds += time.perf_counter() - t_chunk
                        timed_examples += length * batch_size
                    ran_lengths.add(length)
                    losses = chunk_metrics["loss"]
                    if not np.all(np.isfinite(losses)):
                        bad = int(np.argmin(np.isfinite(losses)))
                        result = FitResult(state, best_params, {}, history, best_net_state)
                        latest = None if manager is None else manager.latest()
                        raise TrainingDiverged(
                            f"training diverged: non-finite loss ({losses[bad]}) at epoch {epoch}, "
                            f"step {step_before + bad + 1} (step {start + bad + 1} of "
                            f"{steps_per_epoch} in the epoch); last finite checkpoint: "
                            f"{latest or 'none yet'}",
                            epoch=epoch,
                            step=step_before + bad + 1,
                            result=result,
                        )
                    chunk_sum = loss_sum + float(np.sum(losses, dtype=np.float64))
                    # One assignment, no call inside it: an interrupt (a second Ctrl-C, which is
                    # not held) can't land between the state and the steps counted.
                    state, done, loss_sum, in_progress = (
                        new_state,
                        start + length,
                        chunk_sum,
                        {"epoch_step": start + length, "epoch_loss_sum": chunk_sum},
                    )
                    parts.append(chunk_metrics)
                    chunk_record = {
                        "epoch": epoch,
                        "step": int(state.step),
                        "epoch_step": done,
                        "steps_per_epoch": steps_per_epoch,
                        "train_loss": loss_sum / done,
                        "step_metrics": chunk_metrics,
                    }
                    for callback in on_chunk:
                        callback(chunk_record)
                    if stop and done < steps_per_epoch:  # every process, after the same chunk
                        raise KeyboardInterrupt("interrupted (a signal to a process of the job)")
                seconds = time.perf_counter() - t0
                train_seconds += timed_seconds
                trained_examples += timed_examples
                step_metrics = _concat(parts)
                last_alignment.update(_last_measured(step_metrics, "alignment/"))
                record: dict[str, Any] = {
                    "epoch": epoch,
                    "step": int(state.step),
                    "train_loss": loss_sum / steps_per_epoch,
                    "epoch_seconds": seconds,
                    # as the run's: None for an epoch whose every chunk compiled its program
                    "examples_per_second": (
                        timed_examples / timed_seconds if timed_examples else None
                    ),
                    "step_metrics": step_metrics,
                    "params": state.params,
                    "net_state": state.net_state,
                    "rule_state": state.rule_state,
                    "evaluated": False,
                }
                if epoch % eval_every == 0 or epoch == epochs:
                    record["evaluated"] = True
                    for split in eval_splits:
                        if split in eval_inputs:
                            # "train_loss" stays the epoch's mean minibatch loss.
                            evaluated = run_eval(state.params, state.net_state, split)
                            evaluated.pop("train_loss", None)
                            record.update(evaluated)
                    value = record.get(monitor, record["train_loss"])
                    if _is_better(value, best, mode):
                        best, best_epoch, bad_evals = value, epoch, 0
                        best_params, best_net_state = state.params, state.net_state
                    else:
                        bad_evals += 1
                    record["best_" + monitor] = best
                # From here on the epoch is recorded: an interrupt before this line (in a chunk or
                # while evaluating) checkpoints the steps done, mid-epoch.
                history.append(record)
                in_progress = {}
                for callback in callbacks:
                    callback(record)
                stopped_early = patience is not None and bad_evals >= patience
                # A new best is saved too, so that a resumed run can restore the best params; so is
                # the last epoch of a run stopped early.
                if (
                    epoch % checkpoint_every == 0
                    or epoch == epochs
                    or best_epoch == epoch
                    or stopped_early
                ):
                    checkpoint(record)
                    saved_epoch = epoch
                # An interrupt in the epoch's last chunk, its evaluation or its callbacks stops
                # here, with the epoch whole (held until now: the state and the steps counted
                # always agree in a checkpoint).
                _, stop = distributed.agree({}, stop=stop or bool(interrupts.requested))
                if stop:
                    raise KeyboardInterrupt("interrupted (a signal to a process of the job)")
                if stopped_early:
                    break
        except KeyboardInterrupt:
            if in_progress:
                checkpoint({"epoch": epoch, "step": int(state.step)}, **in_progress)
            elif history and history[-1]["epoch"] != saved_epoch:
                checkpoint(history[-1])
            raise

    with _naming_lost_processes(manager):  # an interrupt here stops at once
        wall = time.perf_counter() - t_start
        final = run_eval(best_params, best_net_state, "test")
        if data.n_val:
            best_val = run_eval(best_params, best_net_state, "val")
            final.update({f"best_{k}": v for k, v in best_val.items()})
        final.update(run_eval(state.params, state.net_state, "train"))
        final.update(
            {
                "epochs": int(history[-1]["epoch"]) if history else start_epoch,
                "best_epoch": best_epoch,
                "stopped_early": stopped_early,
                "wall_seconds": wall,
                "train_seconds": train_seconds if trained_examples else None,
                "examples_per_second": (
                    trained_examples / train_seconds if trained_examples else None
                ),
                "steps": int(state.step),
                "updates": int(updates_applied(state)),
                **last_alignment,
            }
        )
        return FitResult(state, best_params, final, history, best_net_state)
