"""``fit``: the training loop around the pure engine in ``bpjax.train``.

One call trains a network on a ``bpjax.data.Dataset``: jitted whole-epoch scans, evaluation on
the validation and test splits, early stopping on a validation metric (keeping the best
parameters), atomic checkpoints with exact resume, a divergence guard, and optional data
parallelism over several devices. Printing, progress bars and TensorBoard belong to the caller,
which receives one record per epoch through ``callbacks``.

Several processes (``bpjax.distributed``): after ``jax.distributed.initialize`` in every process,
the same ``fit`` call in each trains one model over all their devices.

``fit`` is a sequence of steps kept in private modules: ``bpjax._fit_setup`` checks the
arguments before anything is compiled and puts the data on the devices (how several processes
share the work), ``bpjax._fit_resume`` opens the checkpoint directory and restores a run
(exact resume), ``bpjax._fit_loop`` trains the epochs (chunks, evaluation, early stopping,
checkpoints, interrupts and lost processes) and makes the result; ``FitResult`` and the errors
are defined in ``bpjax._fit_result``.
"""

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bpjax import credit, distributed
from bpjax._fit_loop import _RAN_LENGTHS as _RAN_LENGTHS  # reachable here too, its first home
from bpjax._fit_loop import _Epochs, _naming_lost_processes, _Schedule
from bpjax._fit_result import FitResult, ResumeError, TrainingDiverged
from bpjax._fit_resume import _open_checkpoints, _start
from bpjax._fit_setup import (
    _check_batch_sharing,
    _check_same_job,
    _checked_inputs,
    _checked_outputs,
    _place_data,
)
from bpjax.data import Dataset
from bpjax.layers import Layer
from bpjax.losses import Loss
from bpjax.train import check_rule, chunk_plan, init_state, make_chunk, make_eval

__all__ = [
    "FitResult",
    "ResumeError",
    "TrainingDiverged",
    "default_monitor",
    "fit",
    "make_mesh",
    "valid_monitors",
]


# ``fit`` calls ``_compiled`` and ``init_state`` through this module's names (tests replace them
# here, to see that nothing is compiled or initialised before the arguments are checked).
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


def make_mesh(devices: int | str | Sequence[Any] = 1) -> jax.sharding.Mesh:
    """A one-axis ("data") mesh over ``devices``: a count, ``"all"``, or device objects.

    In a job of several processes the count is per process and the mesh spans them all
    (``bpjax.distributed.mesh_devices``).

    Raises:
        ValueError: a count below 1 or above the devices there are.
    """
    return jax.sharding.Mesh(np.array(distributed.mesh_devices(devices)), ("data",))


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


def _resolved_monitor(monitor: str, data: Dataset, eval_splits: Sequence[str]) -> str:
    """``fit``'s ``monitor`` checked and resolved: ``"auto"``'s metric, and the training loss
    for a ``val_*`` metric without a validation split."""
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
    return monitor


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
        from there with the same result as a run that never stopped. Within an epoch the next
        chunk is dispatched before the host reads the last one's metrics, so that the device
        trains meanwhile: one more training state in device memory, at most.
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
        the layer), before anything is compiled. Every integer argument (``epochs``,
        ``batch_size``, ``seed`` (0 to 2**63 - 1), ``eval_batch_size``, ``eval_every``,
        ``patience``, ``checkpoint_every``, ``keep_checkpoints``, ``grad_check_every``,
        ``chunk_steps``, a ``devices`` count) must be a Python or numpy integer, not a bool or a
        float, in its range: the error names the argument, its value and what is valid.
    """
    # Every argument is checked before anything is compiled.
    loss_fn, loss_name, eval_splits, compute_dtype = _checked_inputs(
        optimizer,
        data,
        loss,
        eval_splits=eval_splits,
        integers={
            "epochs": epochs,
            "batch_size": batch_size,
            "seed": seed,
            "eval_batch_size": eval_batch_size,
            "eval_every": eval_every,
            "patience": patience,
            "checkpoint_every": checkpoint_every,
            "keep_checkpoints": keep_checkpoints,
            "grad_check_every": grad_check_every,
            "devices": devices,
            "chunk_steps": chunk_steps,
        },
        compute_dtype=compute_dtype,
    )
    mesh = make_mesh(devices)
    n_devices = mesh.devices.size
    _check_batch_sharing(batch_size, n_devices)
    monitor = _resolved_monitor(monitor, data, eval_splits)
    mode = _monitor_mode(monitor)
    n_outputs = _checked_outputs(net, data, batch_size, loss_name)
    rule_options = check_rule(grad_mode, net, (batch_size, *data.input_shape), rule_options)
    # The checkpoints: another run's, or a run's that this call would overwrite, are refused.
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
    manager, resume_from = _open_checkpoints(
        checkpoint_dir,
        keep=keep_checkpoints,
        mode=mode,
        config=config,
        resume=resume,
        run_info=run_info,
    )
    # A process lost from here on (the first collectives: the data and the state placed on the
    # mesh) stops the others with its name, as in training (ProcessLost).
    with _naming_lost_processes(manager):
        _check_same_job(  # before anything is compiled: the same job everywhere
            data,
            manager,
            checkpoint_dir,
            seed=seed,
            batch_size=batch_size,
            epochs=epochs,
            grad_mode=grad_mode,
            loss=loss_name,
            monitor=monitor,
            patience=patience,
            eval_every=eval_every,
            chunk_steps=chunk_steps,
            devices=n_devices,
        )

        # The data on the devices, the compiled functions, and the state to start from.
        placed = _place_data(
            data, mesh, loss_name=loss_name, n_outputs=n_outputs, eval_batch_size=eval_batch_size
        )
        compiled = _compiled(
            net,
            loss_fn,
            optimizer,
            batch_size=batch_size,
            grad_mode=grad_mode,
            compute_dtype=None if compute_dtype is None else compute_dtype.name,
            batch_sharding=placed.batch_sharding,
            grad_check_every=grad_check_every,
            with_layer_stats=layer_stats,
            task=data.task,
            loss_name=loss_name,
            rule_options=tuple(sorted(rule_options.items())),
        )
        state = init_state(
            net,
            optimizer,
            jax.random.PRNGKey(seed),
            (batch_size, *data.input_shape),
            grad_mode=grad_mode,
            rule_options=rule_options,
        )
        start = _start(
            jax.device_put(state, placed.replicated),
            manager,
            resume_from,
            replicated=placed.replicated,
            run_info=run_info,
            epochs=epochs,
            steps_per_epoch=data.n_train // batch_size,
            on_resume=on_resume,
        )
    schedule = _Schedule(
        epochs=epochs,
        batch_size=batch_size,
        plan=chunk_plan(data.n_train // batch_size, chunk_steps),
        eval_every=eval_every,
        eval_splits=eval_splits,
        checkpoint_every=checkpoint_every,
        patience=patience,
        monitor=monitor,
        mode=mode,
        config=config,
        run_info=run_info,
        callbacks=callbacks,
        on_chunk=on_chunk,
    )
    # The epochs, then the test metrics of the best parameters.
    train_data = (placed.x_train, placed.y_train)
    run = _Epochs(schedule, start, manager, compiled, train_data, data.n_train, placed.eval_inputs)
    run.run()
    return run.result(data.n_val)
